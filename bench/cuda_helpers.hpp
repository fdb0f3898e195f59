// GPU side of collapse_bench (built only when the CUDA language is enabled): device copies of the
// inputs and the device ceilings. Plain C++ declarations, so collapse_bench.cpp needs no CUDA header.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace bench_cuda {

// Name of device 0 and its memory in GiB; false (and *why) when no device answers.
bool device_info(std::string* name, double* mem_gib, std::string* why);
// cudaMalloc + cudaMemcpy of `bytes` bytes; throws std::runtime_error on failure.
void* to_device(const void* host, size_t bytes);
void free_device(void* p);
// Best of `reps` runs of a read-only kernel (float4 loads, summed) over n floats at dev: GB/s read.
double read_gbps(const float* dev, size_t n, int reps);
// cublasDsyrk (upper, k x d block, C += A^T A) repeated `iters` times, best of `reps`: GFLOP/s
// counted as k*d*d per call.
double dsyrk_gflops(int d, int k, int iters, int reps);
// cublasDgemm over the upper-triangle tiles (edge T) of M M^T for a K x d matrix: seconds of the
// best of `reps` runs; *flops = sum over tiles of 2*ni*nj*d.
double gemm_tiles_seconds(int64_t K, int64_t d, int64_t T, int reps, double* flops);

}  // namespace bench_cuda
