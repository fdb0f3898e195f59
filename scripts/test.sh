#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run). Installs the Debian packages, then runs the stages:
#   release  Release build (CUDA backend when nvcc is found), every test    scripts/ci_stage_release.sh
#   asan     ASan+UBSan Debug build (CPU only, -O1, assertions on), every test but a few
#            data-heavy ones; any sanitizer report fails                     scripts/ci_stage_asan.sh
#   fuzz     bounded fuzzing of the parsers, when scripts/fuzz.sh exists     scripts/ci_stage_fuzz.sh
#   debug    plain Debug build (-O0, CPU only), the asan stage's tests      scripts/ci_stage_debug.sh
# CI runs release, asan and fuzz. The debug stage is on demand: the asan stage is a Debug build too
# (assertions on) and its ASan finds the ODR violations the debug stage was added for
# (detect_odr_violation=2), so in CI it only cost 5-6 minutes of a 30-minute budget.
# Locally, COLLAPSE_TEST_STAGES picks some, e.g. COLLAPSE_TEST_STAGES=release or
# COLLAPSE_TEST_STAGES="debug asan". Every stage runs even when an earlier one failed (one CI run
# reports every failure); each stage's wall time is printed, and a summary table comes last.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
stages="${COLLAPSE_TEST_STAGES:-release asan fuzz}"

for stage in $stages; do
  [ -f "scripts/ci_stage_${stage}.sh" ] ||
    { echo "test.sh: unknown stage '$stage' (stages: release debug asan fuzz)" >&2; exit 2; }
done

# Each stage's output is also kept in build-logs/<stage>.log: CI shows only the end of the output,
# so the lines that name what failed are repeated after the summary table.
logs="$root/build-logs"
rm -rf "$logs"
mkdir -p "$logs"

start=$SECONDS
bash scripts/install_deps.sh || { echo "test.sh: installing packages failed" >&2; exit 1; }
summary=$(printf '%-8s %-6s %6ss' deps ok $((SECONDS - start)))
failed=0
failed_stages=""
for stage in $stages; do
  script="scripts/ci_stage_${stage}.sh"
  echo "===== stage $stage ====="
  t0=$SECONDS
  log="$logs/$stage.log"
  if bash "$script" 2>&1 | tee "$log"; then result=ok; else result=FAILED; failed=1; failed_stages+=" $stage"; fi
  dt=$((SECONDS - t0))
  echo "===== stage $stage: $result in $((dt / 60))m$((dt % 60))s ====="
  summary+=$'\n'$(printf '%-8s %-6s %6ss' "$stage" "$result" "$dt")
done
echo
echo "stage    result   time"
echo "$summary"
echo "total: $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
for stage in $failed_stages; do
  log="$logs/$stage.log"
  # ctest's list of failed tests, pytest's FAILED lines, compiler errors, sanitizer and fuzzer
  # findings; else the stage's last lines.
  hits=$( (grep -E -A60 "^The following tests FAILED:" "$log" | grep -E "^The following|^[[:space:]]+[0-9]+ - " ;
           grep -E "^(FAILED|ERROR) |: error: |Error [0-9]+$|ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|deadly signal|fuzz: .*(finding|crash)" "$log") | head -n 40)
  echo "--- $stage failed (its whole output: build-logs/$stage.log):"
  if [ -n "$hits" ]; then echo "$hits"; else tail -n 15 "$log"; fi
done
exit $failed
