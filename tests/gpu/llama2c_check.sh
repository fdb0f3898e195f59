#!/usr/bin/env bash
# collapse_llama2c's CUDA engine on a machine with a GPU (issue 10), about a minute after a CUDA build:
#  1. selfcheck --backend cuda: the engine against a float64 reference of llama2.c (random models of
#     several shapes, then stories260k at B = 32, also against the CPU engine, and greedy decoding)
#  2. compute-sanitizer memcheck and racecheck on the selfcheck's random models (SKIP_SANITIZERS=1 skips)
#  3. forward --backend cuda on the first $STORIES stories of stories260k: against the CPU backend
#     and the dataset (features.npy: max |diff| <= 0.01, the float16 rounding; nll.npy: <= 1e-4)
#  4. greedy generate --backend cuda --print-text begins "Once upon a time, there was a little girl named Lily."
#  5. bench --backend cuda --batch 1,32 (decode tokens/s with and without the session)
# Prints one PASS/FAIL line per check and exits non-zero when any failed. Files go to $OUT/llama2c
# (when OUT is set) or <build>/llama2c_check.
# Usage (repository root): tests/gpu/llama2c_check.sh [BUILD_DIR]   (default: build-gpu if present, else build)
# The model and data are looked up in $LLAMA2C_MODEL_DIR / $LLAMA2C_DATA_DIR, then ../shared/{models,data}/stories260k,
# then .carry/stories260k/{model,data} (tests/gpu/prepare_carry.sh copies them there; features.npy may
# instead be in $COLLAPSE_REAL_DATA_DIR or .carry/data).
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
build="${1:-}"
if [ -z "$build" ]; then if [ -d build-gpu ]; then build=build-gpu; else build=build; fi; fi
bin="$build/examples/llama2c/collapse_llama2c"
out="${OUT:+$OUT/llama2c}"
out="${out:-$build/llama2c_check}"
mkdir -p "$out"
STORIES="${STORIES:-20}"
export PATH="/usr/local/cuda/bin:$PATH"
failed=0
pass() { echo "PASS $1: $2" | tee -a "$out/summary.txt"; }
fail() { echo "FAIL $1: $2" | tee -a "$out/summary.txt"; failed=$((failed + 1)); }
first_dir() { for d in "$@"; do [ -n "$d" ] && [ -d "$d" ] && { echo "$d"; return; }; done; }
model_dir="$(first_dir "${LLAMA2C_MODEL_DIR:-}" ../shared/models/stories260k .carry/stories260k/model)"
data_dir="$(first_dir "${LLAMA2C_DATA_DIR:-}" ../shared/data/stories260k .carry/stories260k/data)"
model="$model_dir/stories260K.bin"
tok="$model_dir/tok512.bin"
: > "$out/summary.txt"

if [ ! -x "$bin" ]; then fail build "$bin not found (build with -DCOLLAPSE_CUDA=ON first)"; exit 1; fi
if [ -z "$model_dir" ] || [ ! -f "$model" ]; then fail model "stories260K.bin not found (set LLAMA2C_MODEL_DIR)"; exit 1; fi

# 1. selfcheck
timeout 300 "$bin" selfcheck --backend cuda --model "$model" > "$out/selfcheck.txt" 2>&1
rc=$?
grep -E '^(FAIL|SKIP)' "$out/selfcheck.txt" | head -20
if [ $rc -eq 0 ]; then pass selfcheck "$(tail -1 "$out/selfcheck.txt")"; else fail selfcheck "rc=$rc: $(tail -1 "$out/selfcheck.txt") (see selfcheck.txt)"; fi

# 2. sanitizers on the random models (shared-memory races in the attention and sampling kernels,
#    out-of-bounds cache or logits accesses)
for tool in memcheck racecheck; do
  if [ -n "${SKIP_SANITIZERS:-}" ] || ! command -v compute-sanitizer > /dev/null; then echo "SKIP $tool"; continue; fi
  timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 "$bin" selfcheck --backend cuda --quick > "$out/$tool.txt" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then pass "$tool" "clean on selfcheck (random models)"; else fail "$tool" "rc=$rc (see $tool.txt)"; grep -m5 -E "ERROR|Error|Invalid|Race" "$out/$tool.txt"; fi
done

# 3. forward on the first stories, both backends, against each other and the dataset
if [ -z "$data_dir" ]; then
  fail forward "stories260k data not found (set LLAMA2C_DATA_DIR)"
else
  tool_bin="$out/llama2c_npy_tool"
  cxx="${CXX:-$(command -v c++ || command -v g++)}"
  "$cxx" -O2 -std=c++17 -o "$tool_bin" tests/gpu/llama2c_npy_tool.cpp || fail "npy tool" "could not compile tests/gpu/llama2c_npy_tool.cpp with $cxx"
  sub="$out/first_stories"
  mkdir -p "$sub"
  rows=$("$tool_bin" head "$data_dir" "$STORIES" "$sub")
  features="$data_dir/features.npy"
  [ -f "$features" ] || features="${COLLAPSE_REAL_DATA_DIR:-.carry/data}/features.npy"
  for be in cuda cpu; do
    timeout 150 "$bin" forward --model "$model" --inputs "$sub/inputs.npy" --seq "$sub/seq.npy" --pos "$sub/pos.npy" \
      --labels "$sub/labels.npy" --output "$out/features_$be.npy" --nll "$out/nll_$be.npy" --backend $be > "$out/forward_$be.txt" 2>&1 \
      || fail "forward $be" "rc=$? (see forward_$be.txt)"
  done
  # "max_abs X compared N nan_mismatch M" -> pass when X <= tol, N > 0 and M == 0
  check_diff() {  # name a b tol
    local r; r=$("$tool_bin" maxdiff "$2" "$3" "$rows" 2>&1)
    if awk -v tol="$4" '{ exit !($1 == "max_abs" && $2 <= tol && $4 > 0 && $6 == 0) }' <<< "$r"; then pass "$1" "$r (tolerance $4, $rows rows)"; else fail "$1" "$r (tolerance $4, $rows rows)"; fi
  }
  if [ -f "$out/features_cuda.npy" ]; then
    check_diff "forward cuda hidden vs dataset" "$out/features_cuda.npy" "$features" 0.01
    check_diff "forward cuda nll vs dataset" "$out/nll_cuda.npy" "$data_dir/nll.npy" 1e-4
    if [ -f "$out/features_cpu.npy" ]; then
      check_diff "forward cuda hidden vs cpu" "$out/features_cuda.npy" "$out/features_cpu.npy" 1e-3
      check_diff "forward cuda nll vs cpu" "$out/nll_cuda.npy" "$out/nll_cpu.npy" 1e-4
    fi
    tail -1 "$out/forward_cuda.txt"
  fi
fi

# 4. greedy text
want="Once upon a time, there was a little girl named Lily."
timeout 120 "$bin" generate --model "$model" --tokenizer "$tok" --batch 1 --steps 64 --temperature 0 --print-text --backend cuda \
  > "$out/generate_cuda.txt" 2> "$out/generate_cuda.err"
rc=$?
text="$(head -1 "$out/generate_cuda.txt")"
if [ $rc -eq 0 ] && [ "${text:0:${#want}}" = "$want" ]; then pass "greedy generate cuda" "\"${text:0:100}\""; else fail "greedy generate cuda" "rc=$rc, text \"${text:0:100}\" $(tail -1 "$out/generate_cuda.err")"; fi
timeout 120 "$bin" generate --model "$model" --tokenizer "$tok" --batch 1 --steps 64 --temperature 0 --print-text --backend cpu \
  > "$out/generate_cpu.txt" 2>/dev/null && { cmp -s "$out/generate_cpu.txt" "$out/generate_cuda.txt" && echo "INFO greedy text: cuda == cpu (64 steps)" || echo "INFO greedy text: cuda != cpu (see generate_*.txt)"; }

# 5. bench
timeout 240 "$bin" bench --model "$model" --backend cuda --batch 1,32 > "$out/bench_cuda.txt" 2>&1
rc=$?
cat "$out/bench_cuda.txt"
if [ $rc -eq 0 ]; then pass "bench cuda" "$(grep -c '^B=' "$out/bench_cuda.txt") batch sizes (bench_cuda.txt)"; else fail "bench cuda" "rc=$rc (see bench_cuda.txt)"; fi

echo "== llama2c check: $failed failed =="
exit $((failed > 0))
