#!/usr/bin/env bash
# CI stage "release": the Release build into build/ (the CUDA backend and its tests are compiled
# when nvcc is found; they skip without a device) and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/build.sh" -DCOLLAPSE_BUILD_TESTS=ON
cd "$root/build"
ctest --output-on-failure -j2 --timeout 900
