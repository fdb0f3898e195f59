// GPU side of collapse_bench (built only when the CUDA language is enabled): device memory for the
// inputs and the device ceilings of the three CUDA figures. Plain C++ declarations, so
// cuda_bench.cpp needs no CUDA header. Every function throws std::runtime_error on a CUDA / cuBLAS / cuSOLVER failure.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace bench_cuda {

// Name of device 0, its memory in GiB; false (and *why) when no device answers.
bool device_info(std::string* name, double* mem_gib, std::string* why);
// Total device memory as cudaMemGetInfo reports it (what CudaBackend's default budget is 90% of).
int64_t device_total_bytes();

// Device memory (cudaMalloc) and copies.
void* alloc_device(size_t bytes);
void* to_device(const void* host, size_t bytes);
void free_device(void* p);
// Copies `bytes` from the host to dev + offset (the inputs come from SynthGenerator on the host).
void copy_to_device(void* dev, size_t offset, const void* host, size_t bytes);

// A non-blocking stream owned by the bench (handed to Session::ingest_rows as void*).
void* create_stream();
void destroy_stream(void* s);

// Ceiling of figure 1: cudaMemcpyAsync device-to-device of the whole `bytes` buffer at src into a
// second buffer, one warm-up then best of `reps`, timed with events. GB/s counted as
// (bytes read + bytes written) / time = 2 * bytes / time.
double d2d_copy_gbps(const void* src, size_t bytes, int reps);

// Ceiling of figure 2: the pair-metric tile loop of CudaBackend::compute alone. A random K x d
// double matrix (row-major), for every upper-triangle tile pair i0 <= j0 (edge T):
// cublasDgemm(OP_T, OP_N, ni, nj, d, M + i0*d, d, M + j0*d, d, tile, ni), on one stream, timed with
// events around the whole loop. One warm-up, then best of `reps`: seconds. *flops = sum over the
// tiles of 2*ni*nj*d, *tiles = the number of GEMMs.
double pair_gemm_seconds(int64_t K, int64_t d, int64_t T, int reps, double* flops, int64_t* tiles);

// Part of figure 4's floor: NC4's logits GEMMs of the second pass alone, cublasDgemm(OP_T, OP_N, m,
// nr, k) over n columns in chunks of `chunk` (the engine's nc4 chunk), random float64 operands,
// events around the loop, one warm-up then best of `reps`: seconds.
double chunked_gemm_seconds(int64_t m, int64_t chunk, int64_t k, int64_t n, int reps);

// Ceiling of figure 3: the batched eigen-solver calls of CudaBackend::per_token alone.
// One group per Gram size M (a power of two); m[i] = min(rows, d) of its i-th class: the matrix is
// random symmetric in its top-left m x m block and zero elsewhere (the engine's zero padding).
// A group is cut into chunks of min(count, 256 MiB / (M*M*8)) matrices, as the engine does, and each
// chunk is one call: M <= 32 cusolverDnDsyevjBatched, M <= 512 cusolverDnXsyevBatched, else one
// cusolverDnXsyevd per matrix. Only the solver calls are inside the events (workspace queries,
// allocations and the matrix fill are not). One warm-up, then best of `reps`: seconds of all calls.
struct EigGroup {
    int64_t M = 0;
    std::vector<int> m;
};
struct EigTiming {
    double seconds = 0;                 // best total
    std::vector<double> group_seconds;  // per group, from the best repetition
    std::vector<int64_t> group_calls;   // solver calls per group
};
EigTiming eig_solver_seconds(const std::vector<EigGroup>& groups, int reps);

}  // namespace bench_cuda
