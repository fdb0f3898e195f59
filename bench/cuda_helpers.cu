// GPU side of collapse_bench: device memory for the inputs and the ceilings of the three CUDA figures (D2D copy
// bandwidth, the pair-metric tile GEMMs, the per-token batched eigen-solvers), timed with events.
#include "cuda_helpers.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace bench_cuda {
namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string((int)s));
}
void check(cusolverStatus_t s, const char* what) {
    if (s != CUSOLVER_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuSOLVER status " + std::to_string((int)s));
}

__host__ __device__ inline unsigned long long mix(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
// Uniform in [-1, 1) from a 64-bit hash.
__device__ inline double unit(unsigned long long h) { return (double)(h >> 11) * 0x1p-52 - 1.0; }

// The ceilings' own matrices (not the engine's inputs, which come from SynthGenerator): values
// that cuBLAS and cuSOLVER time the same whatever they are.
__global__ void fill_f64_kernel(double* p, size_t n, unsigned long long seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = unit(mix(seed ^ (i * 0xd1b54a32d192ed03ull)));
}
// count column-major M x M matrices: random symmetric in the top-left m[t] x m[t] block, 0 elsewhere.
__global__ void fill_sym_kernel(double* a, const int* m, int64_t count, int64_t M, unsigned long long seed) {
    const size_t total = (size_t)count * (size_t)M * (size_t)M;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x) {
        const int64_t t = (int64_t)(k / ((size_t)M * M)), e = (int64_t)(k % ((size_t)M * M));
        const int64_t i = e % M, j = e / M, lo = i < j ? i : j, hi = i < j ? j : i;
        const int mt = m[t];
        a[k] = (i < mt && j < mt) ? unit(mix(seed ^ ((unsigned long long)t * 0x9e3779b97f4a7c15ull) ^ (unsigned long long)(lo * M + hi)))
                                  : 0.0;
    }
}

unsigned grid_for(size_t n) { return (unsigned)std::max<size_t>(1, std::min<size_t>((n + 255) / 256, 65536)); }

struct Events {
    cudaEvent_t a = nullptr, b = nullptr;
    Events() {
        check(cudaEventCreate(&a), "cudaEventCreate");
        check(cudaEventCreate(&b), "cudaEventCreate");
    }
    ~Events() {
        cudaEventDestroy(a);
        cudaEventDestroy(b);
    }
    Events(const Events&) = delete;
    Events& operator=(const Events&) = delete;
    double seconds() const {
        float t = 0;
        check(cudaEventSynchronize(b), "cudaEventSynchronize");
        check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
        return (double)t * 1e-3;
    }
};

// RAII device allocation for the helpers' own scratch.
template <class T>
struct Dev {
    T* p = nullptr;
    explicit Dev(size_t n) { check(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc"); }
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
};

struct Stream {
    cudaStream_t s = nullptr;
    Stream() { check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
    ~Stream() { cudaStreamDestroy(s); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
};

// A cuBLAS handle on a stream, in the engine's default math mode (allow_tf32: false).
struct Cublas {
    cublasHandle_t h = nullptr;
    explicit Cublas(cudaStream_t s) {
        check(cublasCreate(&h), "cublasCreate");
        check(cublasSetStream(h, s), "cublasSetStream");
        check(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    }
    ~Cublas() { cublasDestroy(h); }
    Cublas(const Cublas&) = delete;
    Cublas& operator=(const Cublas&) = delete;
};

}  // namespace

bool device_info(std::string* name, double* mem_gib, std::string* why) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        *why = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
        return false;
    }
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
    *name = p.name;
    *mem_gib = (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0);
    return true;
}

int64_t device_total_bytes() {
    size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    return (int64_t)total_b;
}

void* alloc_device(size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
}

void* to_device(const void* host, size_t bytes) {
    void* p = alloc_device(bytes);
    check(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    return p;
}

void free_device(void* p) { cudaFree(p); }

void copy_to_device(void* dev, size_t offset, const void* host, size_t bytes) {
    check(cudaMemcpy(static_cast<unsigned char*>(dev) + offset, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
}

void* create_stream() {
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    return s;
}

void destroy_stream(void* s) {
    if (s) cudaStreamDestroy(static_cast<cudaStream_t>(s));
}

double d2d_copy_gbps(const void* src, size_t bytes, int reps) {
    Dev<unsigned char> dst(bytes);
    Stream st;
    Events ev;
    double best = 1e300;
    for (int r = 0; r <= reps; ++r) {  // r = 0 warms up
        check(cudaEventRecord(ev.a, st.s), "cudaEventRecord");
        check(cudaMemcpyAsync(dst.p, src, bytes, cudaMemcpyDeviceToDevice, st.s), "cudaMemcpyAsync D2D");
        check(cudaEventRecord(ev.b, st.s), "cudaEventRecord");
        const double s = ev.seconds();
        if (r > 0) best = std::min(best, s);
    }
    return 2.0 * (double)bytes / best / 1e9;
}

double pair_gemm_seconds(int64_t K, int64_t d, int64_t T, int reps, double* flops, int64_t* tiles) {
    Stream st;
    const Cublas blas(st.s);
    const cublasHandle_t h = blas.h;
    const int64_t te = std::min(T, K);
    Dev<double> m((size_t)(K * d)), tile((size_t)(te * te));
    fill_f64_kernel<<<grid_for((size_t)(K * d)), 256>>>(m.p, (size_t)(K * d), 0x5eedull);
    check(cudaGetLastError(), "fill_f64_kernel");
    check(cudaDeviceSynchronize(), "fill_f64_kernel");
    *flops = 0;
    *tiles = 0;
    for (int64_t i0 = 0; i0 < K; i0 += T)
        for (int64_t j0 = i0; j0 < K; j0 += T) {
            *flops += 2.0 * (double)std::min(T, K - i0) * (double)std::min(T, K - j0) * (double)d;
            ++*tiles;
        }
    const double one = 1.0, zero = 0.0;
    Events ev;
    double best = 1e300;
    for (int r = 0; r <= reps; ++r) {
        check(cudaEventRecord(ev.a, st.s), "cudaEventRecord");
        for (int64_t i0 = 0; i0 < K; i0 += T)
            for (int64_t j0 = i0; j0 < K; j0 += T) {
                const int64_t ni = std::min(T, K - i0), nj = std::min(T, K - j0);
                check(cublasDgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)ni, (int)nj, (int)d, &one, m.p + i0 * d, (int)d, m.p + j0 * d,
                                  (int)d, &zero, tile.p, (int)ni),
                      "cublasDgemm");
            }
        check(cudaEventRecord(ev.b, st.s), "cudaEventRecord");
        const double s = ev.seconds();
        if (r > 0) best = std::min(best, s);
    }
    return best;
}

double chunked_gemm_seconds(int64_t m, int64_t chunk, int64_t k, int64_t n, int reps) {
    Stream st;
    const Cublas blas(st.s);
    const cublasHandle_t h = blas.h;
    chunk = std::max<int64_t>(1, std::min(chunk, n));
    Dev<double> a((size_t)(m * k)), b((size_t)(chunk * k)), c((size_t)(m * chunk));
    fill_f64_kernel<<<grid_for((size_t)(m * k)), 256>>>(a.p, (size_t)(m * k), 0xa11ull);
    fill_f64_kernel<<<grid_for((size_t)(chunk * k)), 256>>>(b.p, (size_t)(chunk * k), 0xb22ull);
    check(cudaGetLastError(), "fill_f64_kernel");
    check(cudaDeviceSynchronize(), "fill_f64_kernel");
    const double one = 1.0, zero = 0.0;
    Events ev;
    double best = 1e300;
    for (int r = 0; r <= reps; ++r) {
        check(cudaEventRecord(ev.a, st.s), "cudaEventRecord");
        for (int64_t r0 = 0; r0 < n; r0 += chunk) {
            const int64_t nr = std::min(chunk, n - r0);
            check(cublasDgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)nr, (int)k, &one, a.p, (int)k, b.p, (int)k, &zero, c.p, (int)m),
                  "cublasDgemm");
        }
        check(cudaEventRecord(ev.b, st.s), "cudaEventRecord");
        const double s = ev.seconds();
        if (r > 0) best = std::min(best, s);
    }
    return best;
}

EigTiming eig_solver_seconds(const std::vector<EigGroup>& groups, int reps) {
    Stream st;
    cusolverDnHandle_t h = nullptr;
    cusolverDnParams_t params = nullptr;
    check(cusolverDnCreate(&h), "cusolverDnCreate");
    struct Guard {
        cusolverDnHandle_t h;
        cusolverDnParams_t* p;
        ~Guard() {
            if (*p) cusolverDnDestroyParams(*p);
            cusolverDnDestroy(h);
        }
    } guard{h, &params};
    check(cusolverDnCreateParams(&params), "cusolverDnCreateParams");
    check(cusolverDnSetStream(h, st.s), "cusolverDnSetStream");

    // The engine's chunking: per = max(1, min(count, 256 MiB / (M*M*8))).
    struct Chunk {
        size_t group;
        int64_t M, first, cnt;
    };
    std::vector<Chunk> chunks;
    size_t max_elems = 1, max_cnt = 1;
    for (size_t g = 0; g < groups.size(); ++g) {
        const int64_t M = groups[g].M, count = (int64_t)groups[g].m.size();
        const int64_t per = std::max<int64_t>(1, std::min<int64_t>(count, (int64_t(256) << 20) / (M * M * 8)));
        for (int64_t f = 0; f < count; f += per) {
            const int64_t cnt = std::min(per, count - f);
            chunks.push_back({g, M, f, cnt});
            max_elems = std::max(max_elems, (size_t)(cnt * M * M));
            max_cnt = std::max(max_cnt, (size_t)cnt);
        }
    }
    Dev<double> a(max_elems), w(max_elems);  // w needs cnt * M <= cnt * M * M
    Dev<int> info(max_cnt), msize(max_cnt);
    // Workspaces, sized before any timing (the engine queries and allocates per chunk; not timed here).
    size_t dev_ws = 1, host_ws = 1;
    int jac_lwork = 1;
    syevjInfo_t jac = nullptr;
    check(cusolverDnCreateSyevjInfo(&jac), "cusolverDnCreateSyevjInfo");
    struct JacGuard {
        syevjInfo_t j;
        ~JacGuard() { cusolverDnDestroySyevjInfo(j); }
    } jguard{jac};
    for (const Chunk& c : chunks) {
        if (c.M <= 32) {
            int lw = 0;
            check(cusolverDnDsyevjBatched_bufferSize(h, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, (int)c.M, a.p, (int)c.M, w.p,
                                                     &lw, jac, (int)c.cnt),
                  "cusolverDnDsyevjBatched_bufferSize");
            jac_lwork = std::max(jac_lwork, lw);
        } else if (c.M <= 512) {
            size_t db = 0, hb = 0;
            check(cusolverDnXsyevBatched_bufferSize(h, params, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, c.M, CUDA_R_64F, a.p,
                                                    c.M, CUDA_R_64F, w.p, CUDA_R_64F, &db, &hb, c.cnt),
                  "cusolverDnXsyevBatched_bufferSize");
            dev_ws = std::max(dev_ws, db), host_ws = std::max(host_ws, hb);
        } else {
            size_t db = 0, hb = 0;
            check(cusolverDnXsyevd_bufferSize(h, params, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, c.M, CUDA_R_64F, a.p, c.M,
                                              CUDA_R_64F, w.p, CUDA_R_64F, &db, &hb),
                  "cusolverDnXsyevd_bufferSize");
            dev_ws = std::max(dev_ws, db), host_ws = std::max(host_ws, hb);
        }
    }
    Dev<double> jac_work((size_t)jac_lwork);
    Dev<unsigned char> work(dev_ws);
    std::vector<unsigned char> host_work(host_ws);

    EigTiming best;
    best.seconds = 1e300;
    Events ev;
    for (int r = 0; r <= reps; ++r) {  // r = 0 warms up (lazy module loading, solver set-up)
        EigTiming cur;
        cur.group_seconds.assign(groups.size(), 0.0);
        cur.group_calls.assign(groups.size(), 0);
        for (size_t ci = 0; ci < chunks.size(); ++ci) {
            const Chunk& c = chunks[ci];
            const std::vector<int>& m = groups[c.group].m;
            check(cudaMemcpyAsync(msize.p, m.data() + c.first, (size_t)c.cnt * sizeof(int), cudaMemcpyHostToDevice, st.s), "cudaMemcpyAsync");
            fill_sym_kernel<<<grid_for((size_t)(c.cnt * c.M * c.M)), 256, 0, st.s>>>(a.p, msize.p, c.cnt, c.M,
                                                                                      0xabcdull + (unsigned long long)ci);
            check(cudaGetLastError(), "fill_sym_kernel");
            check(cudaEventRecord(ev.a, st.s), "cudaEventRecord");
            if (c.M <= 32) {
                check(cusolverDnDsyevjBatched(h, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, (int)c.M, a.p, (int)c.M, w.p,
                                              jac_work.p, jac_lwork, info.p, jac, (int)c.cnt),
                      "cusolverDnDsyevjBatched");
                cur.group_calls[c.group] += 1;
            } else if (c.M <= 512) {
                check(cusolverDnXsyevBatched(h, params, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, c.M, CUDA_R_64F, a.p, c.M,
                                             CUDA_R_64F, w.p, CUDA_R_64F, work.p, dev_ws, host_work.data(), host_ws, info.p, c.cnt),
                      "cusolverDnXsyevBatched");
                cur.group_calls[c.group] += 1;
            } else {
                for (int64_t i = 0; i < c.cnt; ++i) {
                    check(cusolverDnXsyevd(h, params, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, c.M, CUDA_R_64F,
                                           a.p + i * c.M * c.M, c.M, CUDA_R_64F, w.p + i * c.M, CUDA_R_64F, work.p, dev_ws,
                                           host_work.data(), host_ws, info.p + i),
                          "cusolverDnXsyevd");
                    cur.group_calls[c.group] += 1;
                }
            }
            check(cudaEventRecord(ev.b, st.s), "cudaEventRecord");
            const double s = ev.seconds();
            cur.group_seconds[c.group] += s;
            cur.seconds += s;
        }
        if (r > 0 && cur.seconds < best.seconds) best = cur;
    }
    if (chunks.empty()) best.seconds = 0;
    return best;
}

}  // namespace bench_cuda
