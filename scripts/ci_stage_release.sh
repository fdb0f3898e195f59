#!/usr/bin/env bash
# CI stage "release": the Release build into build/ (the CUDA backend and its tests are compiled
# when nvcc is found; they skip without a device) and the whole test suite; then the Python package,
# installed by the README's command into a fresh venv (the install test; no package index) and its
# tests (tests/python, against build/collapse).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/build.sh" -DCOLLAPSE_BUILD_TESTS=ON
cd "$root/build"
ctest --output-on-failure -j2 --timeout 900
venv="$root/build/pyvenv"
rm -rf "$venv"
/usr/bin/python3 -m venv --system-site-packages "$venv"
(cd "$root" && COLLAPSE_PY_BUILD_DIR="$root/build/python" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$venv/bin/pip" install --no-build-isolation --no-index --quiet .)
cd /tmp && COLLAPSE_CLI="$root/build/collapse" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/python"
