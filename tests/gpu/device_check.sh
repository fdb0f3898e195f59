#!/usr/bin/env bash
# Everything GPU-related, on a machine with a GPU, in one call (< 8 minutes): configure for sm_90,
# build, run the CUDA tests, compute-sanitizer memcheck and racecheck on a small case, and
# collapse_bench --backend cuda --quick. Prints a short table last. Results also go to $OUT (when
# set) for bench/results/. Prerequisite: tests/gpu/prepare_carry.sh run beforehand, .carry carried.
# SKIP_SANITIZERS=1 skips step 4 (a short rerun after a fix, when device time is short).
set -uo pipefail
SECONDS=0
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/build-gpu/out}"
mkdir -p "$out"
prefix="$root/.carry/prefix"
export PATH="/usr/local/cuda/bin:$PATH"
declare -A result

# 1. The project's Debian packages, unpacked into a prefix (not into /).
if [ -d .carry/debs ]; then
  mkdir -p "$prefix"
  for f in .carry/debs/*.deb; do dpkg -x "$f" "$prefix"; done
fi
libdirs="$prefix/usr/lib/x86_64-linux-gnu:$prefix/usr/lib/x86_64-linux-gnu/openblas-pthread:$prefix/usr/lib/x86_64-linux-gnu/lapack:$prefix/usr/lib/x86_64-linux-gnu/blas"
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
export PKG_CONFIG_PATH="$prefix/usr/lib/x86_64-linux-gnu/pkgconfig:$prefix/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
export PKG_CONFIG_SYSROOT_DIR="$prefix"
# OpenMPI from the prefix (relocated by OPAL_PREFIX; Debian's mpicc/mpirun names are alternatives
# that dpkg -x does not make, hence the .openmpi names). plm isolated: one node, no ssh needed.
mpi_flags=()
if [ -x "$prefix/usr/bin/mpicc.openmpi" ]; then
  export OPAL_PREFIX="$prefix/usr" PATH="$prefix/usr/bin:$PATH" OMPI_MCA_plm=isolated
  mpi_flags=(-DCOLLAPSE_MPI=ON -DMPI_C_COMPILER="$prefix/usr/bin/mpicc.openmpi" -DMPIEXEC_EXECUTABLE="$prefix/usr/bin/mpirun.openmpi")
fi
[ -d .carry/data ] && export COLLAPSE_REAL_DATA_DIR="$root/.carry/data"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  nvcc --version | tail -2 | head -1 | sed 's/^/nvcc: /'
} | tee -a "$out/summary.txt"

# 2. Configure and build.
t0=$(date +%s)
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCOLLAPSE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$prefix/usr;$prefix/usr/share/cmake;$prefix/usr/lib/x86_64-linux-gnu/cmake" \
  -DCMAKE_INCLUDE_PATH="$prefix/usr/include;$prefix/usr/include/x86_64-linux-gnu/openblas-pthread" \
  -DCMAKE_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu;$prefix/usr/lib/x86_64-linux-gnu/openblas-pthread" \
  -DCMAKE_CXX_FLAGS="-I$prefix/usr/include -I$prefix/usr/include/x86_64-linux-gnu/openblas-pthread" \
  -DCMAKE_CUDA_FLAGS="-I$prefix/usr/include" "${mpi_flags[@]}" > "$out/build.log" 2>&1 \
  && cmake --build build-gpu -j"$(nproc)" >> "$out/build.log" 2>&1
build_rc=$?
result[build]=$([ $build_rc -eq 0 ] && echo "ok ($(( $(date +%s) - t0 )) s)" || echo "FAILED (see build.log)")
tail -20 "$out/build.log"

if [ $build_rc -eq 0 ]; then
  # 3. The CUDA tests, then the CPU tests as a sanity check of the build.
  (cd build-gpu && timeout 120 ./tests/test_cuda > "$out/test_cuda.log" 2>&1)
  result[cuda_tests]=$([ $? -eq 0 ] && echo "pass: $(grep -c '^\[       OK' "$out/test_cuda.log" || true) ok" || echo "FAILED: $(grep -c '^\[  FAILED' "$out/test_cuda.log") failed")
  grep -E "^\[  FAILED|Failure|error" "$out/test_cuda.log" | head -20
  # 4. Sanitizers on a small case (racecheck sees shared-memory hazards only; initcheck finds
  #    reads of memory nothing wrote). Each bounded so that the whole script stays under 8 minutes.
  small='Table/CudaVsCpu.SameReport/d31_f16:CudaBackend.DeviceSide*:CudaBackend.RowBufferMovesToHostAndSpills:CudaBackend.NoAllocationsAfterWarmUp:Modes/CudaCheckpoint.*/exact:Table/DeviceTokenSvd.EntropiesMatchCpuAndBruteForce/f16_d24:DeviceTokenSvd.MixedDtypesSwitchTheBufferToFloat32:Table/DeviceNc4.MatchesCpuAndBruteForce/f32_d16_bias:CudaLoadState.ReplaceDropsTheDeviceRows:CudaBackend.NonFiniteRowsOnBothScanPaths'
  for tool in memcheck racecheck initcheck; do
    if [ $SECONDS -gt 400 ] || [ -n "${SKIP_SANITIZERS:-}" ]; then result[$tool]="skipped (time budget)"; continue; fi
    (cd build-gpu && timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 ./tests/test_cuda --gtest_filter="$small" > "$out/$tool.log" 2>&1)
    rc=$?; result[$tool]=$([ $rc -eq 0 ] && echo "clean" || echo "rc=$rc (see $tool.log)")
  done
  # 5. Benchmarks against the measured ceilings.
  [ $SECONDS -gt 450 ] && echo "note: little time left for the bench"
  (cd build-gpu && timeout 90 ./bench/collapse_bench --backend cuda --quick --json "$out/bench_cuda.json" > "$out/bench_cuda.txt" 2>&1)
  result[bench]=$([ $? -eq 0 ] && echo "ok (bench_cuda.txt)" || echo "FAILED (bench_cuda.txt)")
  tail -25 "$out/bench_cuda.txt"
  # C1 (issue 11): the ingest ratio to the D2D copy next to the bytes-moved model's bound, same run.
  result[c1_ingest]="$(grep '^cuda-ingest' "$out/bench_cuda.txt" | grep -o 'ratio=[0-9.]*') of D2D; model: $(grep -o 'bound on the ratio [^;]*' "$out/bench_cuda.txt" | head -1)"
  # 5b. Issue 11's end-to-end figure at its own size (300k x 1024 fp16, V = 32000, exact + classifier
  #     + NC4, file in the page cache -> report, next to its floor; goal <= 1.0 s), and the device
  #     per-token SVD tests on their own (also in step 3) so that their log stands apart.
  (cd build-gpu && timeout 60 ./tests/test_cuda --gtest_filter='*DeviceTokenSvd*:CudaBackend.RowBufferMovesToHostAndSpills:CudaBackend.NoAllocationsAfterWarmUp:Modes/CudaSnapshot.*' > "$out/test_token_svd_device.log" 2>&1)
  result[token_svd_tests]=$([ $? -eq 0 ] && echo "pass: $(grep -c '^\[       OK' "$out/test_token_svd_device.log" || true) ok" || echo "FAILED (test_token_svd_device.log)")
  # 5c. NC4 from the device-resident rows (no second pass), Grams > 512 through the batched solver,
  #     load_state (replace) dropping the device rows: their own log too.
  (cd build-gpu && timeout 60 ./tests/test_cuda --gtest_filter='*DeviceNc4*:CudaLoadState.*:DeviceTokenSvd.GramsLargerThan512MatchCpu:CudaPerClass.*' > "$out/test_nc4_device.log" 2>&1)
  result[nc4_device_tests]=$([ $? -eq 0 ] && echo "pass: $(grep -c '^\[       OK' "$out/test_nc4_device.log" || true) ok" || echo "FAILED (test_nc4_device.log)")
  # 5d. MPI on the CUDA backend (mpirun -np 2 and 3 on device 0 against one process: the exact store,
  #     the reservoirs and the pair tiles spread over the ranks, the second pass): only when MPI was
  #     found (build-gpu/tests/test_mpi) and mpirun runs here.
  if [ ! -x build-gpu/tests/test_mpi ]; then result[mpi_cuda]="MISSING: no build-gpu/tests/test_mpi (MPI not found: was prepare_carry.sh run?)"; else
    (cd build-gpu && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 240 ./tests/test_mpi --gtest_filter='MpiCli.Cuda*' > "$out/test_mpi_cuda.log" 2>&1)
    result[mpi_cuda]=$([ $? -eq 0 ] && echo "pass: $(grep -c '^\[       OK' "$out/test_mpi_cuda.log" || true) ok, $(grep -c '^\[  SKIPPED' "$out/test_mpi_cuda.log" || true) skipped" || echo "FAILED (test_mpi_cuda.log)")
  fi
  if [ $SECONDS -gt 470 ]; then result[e2e]="skipped (time budget)"; else
    (cd build-gpu && timeout 150 ./bench/collapse_bench --backend cuda --only e2e --scratch "${TMPDIR:-/tmp}" --json "$out/bench_e2e.json" > "$out/bench_e2e.txt" 2>&1)
    rc=$?; result[e2e]=$([ $rc -eq 0 ] && echo "$(grep -o 'file->report seconds= *[0-9.]*' "$out/bench_e2e.txt") (bench_e2e.txt)" || echo "rc=$rc (bench_e2e.txt)")
    tail -4 "$out/bench_e2e.txt"
  fi
  # 6. collapse_llama2c's CUDA engine: selfcheck, forward vs CPU and dataset, greedy text, bench.
  if [ $SECONDS -gt 480 ]; then result[llama2c]="skipped (time budget)"; else
    OUT="$out" timeout 300 tests/gpu/llama2c_check.sh build-gpu > "$out/llama2c.txt" 2>&1
    rc=$?; result[llama2c]=$([ $rc -eq 0 ] && echo "pass (llama2c.txt)" || echo "rc=$rc: $(grep -c '^FAIL' "$out/llama2c.txt") failed (llama2c.txt)")
    grep -E '^(PASS|FAIL)' "$out/llama2c.txt"
  fi
  # 7. The Python package's torch CUDA tensor path (tests/python/test_api.py -k cuda: the other
  #    files need matplotlib and nothing of CUDA), when this machine's
  #    python3 has torch with CUDA, and pybind11 (its CMake files: python3 -m pybind11 --cmakedir)
  #    pytest and wheel, its own or else the carried ones (Debian's, pure Python, on PYTHONPATH).
  pyextra=""
  if ! python3 -c "import pybind11, pytest, wheel" 2>/dev/null && [ -d "$prefix/usr/lib/python3/dist-packages/pybind11" ]; then
    pyextra="$prefix/usr/lib/python3/dist-packages"
  fi
  if [ $SECONDS -gt 500 ]; then result[python_cuda]="skipped (time budget)"
  elif PYTHONPATH="$pyextra" python3 -c "import torch, pybind11, pytest, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    rm -rf build-gpu/pylib
    COLLAPSE_CUDA=ON COLLAPSE_PY_BUILD_DIR="$root/build-gpu/python" pybind11_ROOT="$(PYTHONPATH="$pyextra" python3 -m pybind11 --cmakedir)" \
      COLLAPSE_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH=$prefix/usr;$prefix/usr/share/cmake;$prefix/usr/lib/x86_64-linux-gnu/cmake -DCMAKE_INCLUDE_PATH=$prefix/usr/include;$prefix/usr/include/x86_64-linux-gnu/openblas-pthread -DCMAKE_LIBRARY_PATH=$prefix/usr/lib/x86_64-linux-gnu;$prefix/usr/lib/x86_64-linux-gnu/openblas-pthread -DCMAKE_CXX_FLAGS=-I$prefix/usr/include -DCMAKE_CUDA_FLAGS=-I$prefix/usr/include" \
      PYTHONPATH="$pyextra" timeout 300 python3 -m pip install --no-build-isolation --no-index --no-deps --target build-gpu/pylib . > "$out/python_cuda.log" 2>&1 \
      && (cd /tmp && PYTHONPATH="$root/build-gpu/pylib${pyextra:+:$pyextra}" timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda -rs "$root/tests/python/test_api.py" >> "$out/python_cuda.log" 2>&1)
    rc=$?; result[python_cuda]=$([ $rc -eq 0 ] && echo "$(tail -1 "$out/python_cuda.log")" || echo "rc=$rc (python_cuda.log)")
  else result[python_cuda]="skipped (no python3 with torch CUDA and pybind11)"; fi
fi

echo
echo "== device check =="
for k in build cuda_tests memcheck racecheck initcheck bench c1_ingest token_svd_tests nc4_device_tests mpi_cuda e2e llama2c python_cuda; do printf "%-11s %s\n" "$k" "${result[$k]:-not run}"; done | tee -a "$out/summary.txt"
