#!/usr/bin/env bash
# Configures and builds into build/ (extra arguments go to cmake). CUDA is used when nvcc is found.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# The CUDA toolkit's usual prefix, so that COLLAPSE_CUDA=AUTO finds nvcc when it is not on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
mkdir -p build
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build -j"$(nproc)"
