// GPU ceilings for collapse_bench: a read kernel and cuBLAS dsyrk/dgemm, timed with CUDA events.
#include "cuda_helpers.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace bench_cuda {
namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string((int)s));
}

__global__ void read_kernel(const float4* p, size_t n4, float* out) {
    float acc = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
        const float4 v = p[i];
        acc += v.x + v.y + v.z + v.w;
    }
    // One store per thread only when the (practically impossible) sum is exactly 12345: the loads
    // cannot be removed, and almost no write traffic is added.
    if (acc == 12345.f) out[0] = acc;
}

__global__ void fill_kernel(double* p, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (double)((i * 2654435761u) % 1000u) * 1e-3 - 0.5;
}

struct Events {
    cudaEvent_t a, b;
    Events() { check(cudaEventCreate(&a), "cudaEventCreate"); check(cudaEventCreate(&b), "cudaEventCreate"); }
    ~Events() { cudaEventDestroy(a); cudaEventDestroy(b); }
    float ms() const {
        float t = 0;
        check(cudaEventSynchronize(b), "cudaEventSynchronize");
        check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
        return t;
    }
};

}  // namespace

bool device_info(std::string* name, double* mem_gib, std::string* why) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
        return false;
    }
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
    *name = p.name;
    *mem_gib = (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0);
    return true;
}

void* to_device(const void* host, size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    check(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    return p;
}

void free_device(void* p) { cudaFree(p); }

double read_gbps(const float* dev, size_t n, int reps) {
    float* out = nullptr;
    check(cudaMalloc(&out, sizeof(float)), "cudaMalloc");
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
    const size_t n4 = n / 4;
    Events ev;
    double best = 0;
    for (int r = 0; r < reps + 1; ++r) {  // the first run warms up
        check(cudaEventRecord(ev.a), "cudaEventRecord");
        read_kernel<<<sms * 8, 512>>>(reinterpret_cast<const float4*>(dev), n4, out);
        check(cudaEventRecord(ev.b), "cudaEventRecord");
        const double s = ev.ms() * 1e-3;
        if (r > 0) best = std::max(best, (double)(n4 * 16) / s / 1e9);
    }
    check(cudaGetLastError(), "read_kernel");
    cudaFree(out);
    return best;
}

double dsyrk_gflops(int d, int k, int iters, int reps) {
    cublasHandle_t h;
    check(cublasCreate(&h), "cublasCreate");
    double *a = nullptr, *c = nullptr;
    check(cudaMalloc(&a, sizeof(double) * (size_t)k * d), "cudaMalloc");
    check(cudaMalloc(&c, sizeof(double) * (size_t)d * d), "cudaMalloc");
    fill_kernel<<<256, 256>>>(a, (size_t)k * d);
    check(cudaMemset(c, 0, sizeof(double) * (size_t)d * d), "cudaMemset");
    const double one = 1.0;
    Events ev;
    double best = 0;
    for (int r = 0; r < reps + 1; ++r) {
        check(cudaEventRecord(ev.a), "cudaEventRecord");
        // Row-major k x d block A: column-major it is d x k, so C(d x d) += A A^T with op N.
        for (int i = 0; i < iters; ++i)
            check(cublasDsyrk(h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, d, k, &one, a, d, &one, c, d), "cublasDsyrk");
        check(cudaEventRecord(ev.b), "cudaEventRecord");
        const double s = ev.ms() * 1e-3;
        if (r > 0) best = std::max(best, (double)k * d * d * iters / s / 1e9);
    }
    cudaFree(a);
    cudaFree(c);
    cublasDestroy(h);
    return best;
}

double gemm_tiles_seconds(int64_t K, int64_t d, int64_t T, int reps, double* flops) {
    cublasHandle_t h;
    check(cublasCreate(&h), "cublasCreate");
    double *m = nullptr, *g = nullptr;
    check(cudaMalloc(&m, sizeof(double) * (size_t)(K * d)), "cudaMalloc");
    check(cudaMalloc(&g, sizeof(double) * (size_t)(T * T)), "cudaMalloc");
    fill_kernel<<<256, 256>>>(m, (size_t)(K * d));
    const double one = 1.0, zero = 0.0;
    const int64_t nt = (K + T - 1) / T;
    *flops = 0;
    for (int64_t bi = 0; bi < nt; ++bi)
        for (int64_t bj = bi; bj < nt; ++bj)
            *flops += 2.0 * (double)std::min(T, K - bi * T) * (double)std::min(T, K - bj * T) * (double)d;
    Events ev;
    double best = 1e300;
    for (int r = 0; r < reps + 1; ++r) {
        check(cudaEventRecord(ev.a), "cudaEventRecord");
        for (int64_t bi = 0; bi < nt; ++bi)
            for (int64_t bj = bi; bj < nt; ++bj) {
                const int64_t ni = std::min(T, K - bi * T), nj = std::min(T, K - bj * T);
                // Column-major: G(nj x ni) = Mj (nj x d) * Mi^T, both stored row-major [., d].
                check(cublasDgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)nj, (int)ni, (int)d, &one, m + bj * T * d, (int)d,
                                  m + bi * T * d, (int)d, &zero, g, (int)nj),
                      "cublasDgemm");
            }
        check(cudaEventRecord(ev.b), "cudaEventRecord");
        const double s = ev.ms() * 1e-3;
        if (r > 0) best = std::min(best, s);
    }
    cudaFree(m);
    cudaFree(g);
    cublasDestroy(h);
    return best;
}

}  // namespace bench_cuda
