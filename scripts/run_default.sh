#!/usr/bin/env bash
# One command from a fresh Debian 12 machine: install packages, build, and analyse the built-in
# synthetic data set. Prints where the report went and its headline numbers.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/install_deps.sh"
bash "$root/scripts/build.sh" -DCOLLAPSE_BUILD_TESTS=OFF -DCOLLAPSE_BUILD_BENCH=OFF
"$root/build/collapse" analyze --synthetic --output "$root/collapse_report.json" "$@"
