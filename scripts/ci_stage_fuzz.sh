#!/usr/bin/env bash
# CI stage "fuzz": bounded fuzzing of the file parsers through scripts/fuzz.sh (clang's libFuzzer,
# build-fuzz/), COLLAPSE_FUZZ_SECONDS per target (default 20). Skipped while scripts/fuzz.sh does not exist.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -f "$root/scripts/fuzz.sh" ]; then
  echo "fuzz: skipped (no scripts/fuzz.sh)"
  exit 0
fi
exec bash "$root/scripts/fuzz.sh" --seconds "${COLLAPSE_FUZZ_SECONDS:-20}"
