#!/usr/bin/env bash
# One command: install packages, build everything, run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/install_deps.sh"
bash "$root/scripts/build.sh" -DCOLLAPSE_BUILD_TESTS=ON
cd "$root/build"
ctest --output-on-failure -j2 --timeout 900
