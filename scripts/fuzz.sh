#!/usr/bin/env bash
# Fuzzes collapse's input parsers with libFuzzer (clang, ASan + UBSan) in build-fuzz/.
#   scripts/fuzz.sh --seconds N [target...]
# Targets: fuzz_npy fuzz_safetensors fuzz_config fuzz_capi_ingest fuzz_checkpoint (default: all),
# each run for N seconds, one after another. Seeds: tests/fuzz/corpus/<target>/ (checked in, made
# by make_fuzz_corpus); what the fuzzer learns goes to build-fuzz/corpus/<target>/ and is reused by
# the next run. Exits non-zero if any target crashed, leaked, hit UB, ran out of memory or timed
# out; the input that did it is kept as build-fuzz/crashes/<target>/<kind>-<sha1> and the log as
# build-fuzz/logs/<target>.log. Replay one: build-fuzz/tests/fuzz/<target> <file>.
# Environment: COLLAPSE_FUZZ_JOBS (build parallelism, default 2), COLLAPSE_FUZZ_RSS_MB (default
# 2048), COLLAPSE_FUZZ_TIMEOUT (seconds per input, default 20).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
all=(fuzz_npy fuzz_safetensors fuzz_config fuzz_capi_ingest fuzz_checkpoint)
seconds=""
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="${2:-}"; shift 2 ;;
    --seconds=*) seconds="${1#*=}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh --seconds N [target...]  (N >= 1)" >&2
  exit 2
fi
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (known: ${all[*]})" >&2; exit 2; }
done

bash "$root/scripts/install_deps.sh"
build="$root/build-fuzz"
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCOLLAPSE_CUDA=OFF -DCOLLAPSE_BUILD_FUZZERS=ON -DCOLLAPSE_BUILD_BENCH=OFF -DCOLLAPSE_BUILD_CLI=OFF \
  -DCMAKE_C_FLAGS="$san" -DCMAKE_CXX_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >"$root/build-fuzz-configure.log" 2>&1 \
  || { cat "$root/build-fuzz-configure.log" >&2; exit 1; }
cmake --build "$build" -j"${COLLAPSE_FUZZ_JOBS:-2}" --target "${targets[@]}" make_fuzz_corpus

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"  # the targets' scratch files and spill directories
mkdir -p "$build/logs"
failed=()
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t" crashes="$build/crashes/$t"
  mkdir -p "$corpus" "$crashes"
  seeds="$root/tests/fuzz/corpus/$t"
  [ -d "$seeds" ] || { mkdir -p "$scratch/seeds"; "$build/tests/fuzz/make_fuzz_corpus" "$scratch/seeds"; seeds="$scratch/seeds/$t"; }
  extra=()
  [ "$t" = fuzz_config ] && extra=("$root/configs")  # the shipped configs are seeds too
  echo "fuzz: $t for ${seconds}s"
  rc=0
  "$build/tests/fuzz/$t" -max_total_time="$seconds" -timeout="${COLLAPSE_FUZZ_TIMEOUT:-20}" \
    -rss_limit_mb="${COLLAPSE_FUZZ_RSS_MB:-2048}" -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$crashes/" "$corpus" "$seeds" "${extra[@]}" >"$build/logs/$t.log" 2>&1 || rc=$?
  grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$build/logs/$t.log" | sed "s/^/fuzz: $t /" || true
  if [ "$rc" -ne 0 ]; then
    echo "fuzz: $t FAILED (exit $rc); log $build/logs/$t.log; input(s):" >&2
    ls -t "$crashes" | head -3 | sed "s|^|  $crashes/|" >&2
    grep -m1 -E "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error|deadly signal" "$build/logs/$t.log" >&2 || true
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failures in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} target(s) ran ${seconds}s without a finding"
