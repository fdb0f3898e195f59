// The CUDA backend of collapse_llama2c: llama2.c's forward pass, batched over sequence slots, on the
// engine's own stream. cuBLAS (fp32, pedantic math: no TF32) for the projections and the classifier;
// hand-written kernels for everything between them. Kernel order of one step (n rows, L layers):
//
//   upload slot/token/pos (pinned staging, cudaMemcpyAsync)
//   norm:   x = emb[token]; xb = rmsnorm(x) * rms_att[0]                    grid n,           block 128
//   for each layer l:
//     gemm:   qkv = xb Wqkv[l]^T        ([q; k; v] rows fused, like the CPU engine)
//     rope:   rotate q (in place) and k; k, v into the slot's cache at pos  grid n,           block 128
//     attn:   att_out = softmax(q k^T / sqrt(hs)) v over positions 0..pos   grid (heads, n),  block 128
//     gemm:   tmp = att_out Wo[l]^T
//     norm:   x += tmp; xb = rmsnorm(x) * rms_ffn[l]                        grid n,           block 128
//     gemm:   h13 = xb [W1; W3][l]^T
//     swiglu: hb = silu(h13[:, :H]) * h13[:, H:]                            grid n*H/256,     block 256
//     gemm:   tmp = hb W2[l]^T
//     norm:   x += tmp; xb = rmsnorm(x) * (rms_att[l+1] or rms_final -> hidden)
//   gemm:   logits = hidden Wcls^T
//
// sample() adds one kernel (grid n, block 256) and is the only place besides download() that waits.
// Arithmetic mirrors llama2.c (and cpu_engine.cpp) operation by operation; what differs is only the
// order of the long sums (block reductions, cuBLAS), i.e. float rounding.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.hpp"

namespace llama2c {

namespace {

std::string cuda_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

void cuda_try(cudaError_t e, const char* call) {
    if (e != cudaSuccess) {
        (void)cudaGetLastError();  // clear a non-sticky error so later calls do not report it again
        throw std::runtime_error(std::string("cuda engine: ") + call + " failed: " + cuda_text(e));
    }
}

void cublas_try(cublasStatus_t s, const char* call) {
    if (s != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error(std::string("cuda engine: ") + call + " failed: " + cublasGetStatusString(s));
}

#define LLAMA_CUDA_TRY(call) cuda_try((call), #call)
#define LLAMA_CUBLAS_TRY(call) cublas_try((call), #call)
// After a kernel launch: launch-configuration errors surface here (faults surface at the next wait).
#define LLAMA_CUDA_CHECK_LAUNCH(kernel) cuda_try(cudaGetLastError(), "launch of " kernel)

// ---------------------------------------------------------------------------------------------------
// Kernels

constexpr int kNormThreads = 128;
constexpr int kRopeThreads = 128;
constexpr int kAttnThreads = 128;
constexpr int kSwigluThreads = 256;
constexpr int kSampleThreads = 256;

struct SumOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduction over the block (blockDim.x a multiple of 32); every thread returns the same value (each
// combines the warp partials in the same order). `scratch` is 32 shared floats; the leading barrier
// lets consecutive calls reuse it.
template <class Op>
__device__ float block_reduce(float v, Op op, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < warps; ++w) v = op(v, scratch[w]);
    return v;
}

// One block per row r. The residual row x[r] becomes emb[token[r]] (token != null) or x[r] + delta[r]
// (delta != null) or stays; then out[r] = w * (x[r] / rms(x[r])), llama2.c's RMSNorm (eps 1e-5).
// Each thread reads back only the x elements it wrote itself.
__global__ void residual_rmsnorm_kernel(float* __restrict__ x, const float* __restrict__ delta, const int32_t* __restrict__ token,
                                        const float* __restrict__ emb, const float* __restrict__ w, float* __restrict__ out,
                                        int dim) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    float* xr = x + (size_t)r * dim;
    const float* src = token ? emb + (size_t)token[r] * dim : nullptr;
    const float* dr = delta ? delta + (size_t)r * dim : nullptr;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v;
        if (src) {
            v = src[j];
            xr[j] = v;
        } else if (dr) {
            v = xr[j] + dr[j];
            xr[j] = v;
        } else {
            v = xr[j];
        }
        ss += v * v;
    }
    ss = block_reduce(ss, SumOp{}, scratch);
    const float scale = 1.0f / sqrtf(ss / (float)dim + 1e-5f);
    float* o = out + (size_t)r * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = w[j] * (scale * xr[j]);
}

// One block per row r: RoPE on the pairs (2i, 2i+1) of q (in place) and of k (the first kv_dim
// entries), frequency index (2i mod head_size)/2, angles from the host table rope[pos][hs/2]
// (cos, sin), exactly llama2.c's; k and v go to the slot's cache at the row's position.
// qkv rows are [q (dim) | k (kv_dim) | v (kv_dim)].
__global__ void rope_cache_kernel(float* __restrict__ qkv, const int32_t* __restrict__ slot, const int32_t* __restrict__ pos,
                                  const float2* __restrict__ rope, float* __restrict__ kcache, float* __restrict__ vcache,
                                  int dim, int kv_dim, int head_size, int seq_len) {
    const int r = blockIdx.x;
    const int p = pos[r];
    float* q = qkv + (size_t)r * (dim + 2 * kv_dim);
    const float* k = q + dim;
    const float* v = k + kv_dim;
    const float2* cs = rope + (size_t)p * (head_size / 2);
    const size_t at = ((size_t)slot[r] * seq_len + p) * kv_dim;
    float* kc = kcache + at;
    float* vc = vcache + at;
    for (int pair = threadIdx.x; pair < dim / 2; pair += blockDim.x) {
        const int i = 2 * pair;
        const float2 f = cs[(i % head_size) / 2];
        const float q0 = q[i], q1 = q[i + 1];
        q[i] = q0 * f.x - q1 * f.y;
        q[i + 1] = q0 * f.y + q1 * f.x;
        if (i < kv_dim) {
            const float k0 = k[i], k1 = k[i + 1];
            kc[i] = k0 * f.x - k1 * f.y;
            kc[i + 1] = k0 * f.y + k1 * f.x;
        }
    }
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) vc[j] = v[j];
}

// Shared floats the attention kernel needs: scores [seq_len], q [hs], partial outputs [G * hs].
inline size_t attention_smem_bytes(int seq_len, int head_size) {
    return sizeof(float) * ((size_t)seq_len + head_size + (size_t)std::max(kAttnThreads, head_size));
}

// One block per (head h, row r): scores of q_h against the slot's keys at positions 0..pos (kv head
// h / kv_mul: GQA), softmax, weighted sum of the values. The output sum runs over G = blockDim/hs
// interleaved position groups per output element (all threads busy for small heads), then the G
// partials are added in order.
__global__ void attention_kernel(const float* __restrict__ qkv, const int32_t* __restrict__ slot, const int32_t* __restrict__ pos,
                                 const float* __restrict__ kcache, const float* __restrict__ vcache, float* __restrict__ out,
                                 int dim, int kv_dim, int head_size, int kv_mul, int seq_len) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    const int h = blockIdx.x, r = blockIdx.y;
    const int T = pos[r] + 1;
    float* att = smem;
    float* q = att + seq_len;
    float* part = q + head_size;
    const float* qg = qkv + (size_t)r * (dim + 2 * kv_dim) + (size_t)h * head_size;
    for (int i = threadIdx.x; i < head_size; i += blockDim.x) q[i] = qg[i];
    __syncthreads();
    const size_t base = (size_t)slot[r] * seq_len * kv_dim + (size_t)(h / kv_mul) * head_size;
    const float* kb = kcache + base;
    const float* vb = vcache + base;
    const float scale = 1.0f / sqrtf((float)head_size);
    float mx = -INFINITY;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const float* k = kb + (size_t)t * kv_dim;
        float s = 0.0f;
        for (int i = 0; i < head_size; ++i) s += q[i] * k[i];
        s *= scale;
        att[t] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_reduce(mx, MaxOp{}, scratch);
    float sum = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const float e = expf(att[t] - mx);
        att[t] = e;
        sum += e;
    }
    sum = block_reduce(sum, SumOp{}, scratch);  // its barriers also publish att[]
    const int groups = blockDim.x >= head_size ? blockDim.x / head_size : 1;
    for (int w = threadIdx.x; w < groups * head_size; w += blockDim.x) {
        const int g = w / head_size, i = w - g * head_size;
        float acc = 0.0f;
        for (int t = g; t < T; t += groups) acc += (att[t] / sum) * vb[(size_t)t * kv_dim + i];
        part[w] = acc;
    }
    __syncthreads();
    float* o = out + (size_t)r * dim + (size_t)h * head_size;
    for (int i = threadIdx.x; i < head_size; i += blockDim.x) {
        float acc = part[i];
        for (int g = 1; g < groups; ++g) acc += part[g * head_size + i];
        o[i] = acc;
    }
}

// out[r, j] = silu(h13[r, j]) * h13[r, H + j] over n*H elements (h13 rows are [w1 x | w3 x]).
__global__ void swiglu_kernel(const float* __restrict__ h13, float* __restrict__ out, int hidden, int64_t total) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / hidden, j = e - r * hidden;
        const float a = h13[r * 2 * hidden + j];
        out[e] = a * (1.0f / (1.0f + expf(-a))) * h13[r * 2 * hidden + hidden + j];
    }
}

// One block per row: next[r] = argmax (first index of the maximum) when temperature == 0, else
// llama2.c's sample_mult on softmax(logits / temperature): the first index whose running CDF
// exceeds coin[r] (V - 1 if rounding leaves the total below the coin). Each thread owns a contiguous
// chunk of the vocabulary and walks it in order; thread 0 combines the chunks in order, so the sums
// are sequential within chunks and across them.
__global__ void sample_kernel(const float* __restrict__ logits, int V, float temperature, const float* __restrict__ coin,
                              int32_t* __restrict__ next) {
    __shared__ float s_val[kSampleThreads];
    __shared__ int s_idx[kSampleThreads];
    __shared__ float s_bcast;
    __shared__ int s_winner;
    const int r = blockIdx.x, t = threadIdx.x;
    const float* l = logits + (size_t)r * V;
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int begin = min(V, t * chunk), end = min(V, begin + chunk);
    if (temperature == 0.0f) {
        float bv = -INFINITY;
        int bi = INT_MAX;
        if (begin < end) {
            bi = begin;
            bv = l[begin];
            for (int v = begin + 1; v < end; ++v)
                if (l[v] > bv) bv = l[v], bi = v;
        }
        s_val[t] = bv;
        s_idx[t] = bi;
        __syncthreads();
        if (t == 0) {
            float best = s_val[0];
            int besti = s_idx[0];
            for (int w = 1; w < blockDim.x; ++w)
                if (s_idx[w] != INT_MAX && s_val[w] > best) best = s_val[w], besti = s_idx[w];
            next[r] = besti;
        }
        return;
    }
    // 1. max of logits / temperature
    float mx = -INFINITY;
    for (int v = begin; v < end; ++v) mx = fmaxf(mx, l[v] / temperature);
    s_val[t] = mx;
    __syncthreads();
    if (t == 0) {
        float m = s_val[0];
        for (int w = 1; w < blockDim.x; ++w) m = fmaxf(m, s_val[w]);
        s_bcast = m;
    }
    __syncthreads();
    mx = s_bcast;
    // 2. the normaliser
    float part = 0.0f;
    for (int v = begin; v < end; ++v) part += expf(l[v] / temperature - mx);
    __syncthreads();  // everyone has read s_bcast
    s_val[t] = part;
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (int w = 0; w < blockDim.x; ++w) s += s_val[w];
        s_bcast = s;
        s_winner = INT_MAX;
    }
    __syncthreads();
    const float sum = s_bcast;
    // 3. each chunk's probability mass, exclusive prefix over the chunks in order
    float mass = 0.0f;
    for (int v = begin; v < end; ++v) mass += expf(l[v] / temperature - mx) / sum;
    s_val[t] = mass;
    __syncthreads();
    if (t == 0) {
        float acc = 0.0f;
        for (int w = 0; w < blockDim.x; ++w) {
            const float m = s_val[w];
            s_val[w] = acc;
            acc += m;
        }
    }
    __syncthreads();
    // 4. the first crossing within each chunk; the smallest index wins
    const float c = coin[r];
    float cdf = s_val[t];
    for (int v = begin; v < end; ++v) {
        cdf += expf(l[v] / temperature - mx) / sum;
        if (c < cdf) {
            atomicMin(&s_winner, v);
            break;
        }
    }
    __syncthreads();
    if (t == 0) next[r] = s_winner == INT_MAX ? V - 1 : s_winner;
}

// ---------------------------------------------------------------------------------------------------
// Owning buffers

// Device array; allocation failures name the buffer, the bytes asked and the engine's total.
template <class T>
class DeviceArray {
public:
    DeviceArray() = default;
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    ~DeviceArray() {
        if (p_) cudaFree(p_);
    }
    void allocate(size_t count, const char* what, size_t total_bytes) {
        const size_t bytes = std::max<size_t>(1, count) * sizeof(T);
        const cudaError_t e = cudaMalloc((void**)&p_, bytes);
        if (e != cudaSuccess) {
            p_ = nullptr;
            (void)cudaGetLastError();
            size_t free_b = 0, total_b = 0;
            (void)cudaMemGetInfo(&free_b, &total_b);
            (void)cudaGetLastError();
            throw std::runtime_error("cuda engine: cudaMalloc of " + std::to_string(bytes) + " bytes for " + what + " failed: " +
                                     cuda_text(e) + " (the engine needs " + std::to_string(total_bytes) + " bytes in all; " +
                                     std::to_string(free_b) + " of " + std::to_string(total_b) + " bytes free on the device)");
        }
        count_ = count;
    }
    T* get() const { return p_; }
    size_t size() const { return count_; }

private:
    T* p_ = nullptr;
    size_t count_ = 0;
};

// Pinned host array (the staging of asynchronous copies).
template <class T>
class PinnedArray {
public:
    PinnedArray() = default;
    PinnedArray(const PinnedArray&) = delete;
    PinnedArray& operator=(const PinnedArray&) = delete;
    ~PinnedArray() {
        if (p_) cudaFreeHost(p_);
    }
    void allocate(size_t count, const char* what) {
        const size_t bytes = std::max<size_t>(1, count) * sizeof(T);
        const cudaError_t e = cudaMallocHost((void**)&p_, bytes);
        if (e != cudaSuccess) {
            p_ = nullptr;
            (void)cudaGetLastError();
            throw std::runtime_error("cuda engine: cudaMallocHost of " + std::to_string(bytes) + " bytes for " + what +
                                     " failed: " + cuda_text(e));
        }
    }
    T* get() const { return p_; }

private:
    T* p_ = nullptr;
};

struct StreamHolder {
    cudaStream_t s = nullptr;
    ~StreamHolder() {
        if (s) {
            cudaStreamSynchronize(s);
            cudaStreamDestroy(s);
        }
    }
};
struct EventHolder {
    cudaEvent_t e = nullptr;
    ~EventHolder() {
        if (e) cudaEventDestroy(e);
    }
};
struct CublasHolder {
    cublasHandle_t h = nullptr;
    ~CublasHolder() {
        if (h) cublasDestroy(h);
    }
};

// ---------------------------------------------------------------------------------------------------
// The engine

void check_size(const std::vector<float>& v, size_t expect, const char* name) {
    if (v.size() != expect)
        throw std::runtime_error(std::string("cuda engine: weights.") + name + " has " + std::to_string(v.size()) +
                                 " floats, the config needs " + std::to_string(expect));
}

constexpr size_t kCublasWorkspaceBytes = size_t(32) << 20;  // cuBLAS's recommendation for Hopper

class CudaEngine final : public Engine {
public:
    CudaEngine(const Model& model, int max_batch) : cfg_(model.config), B_(max_batch) {
        const Config& c = cfg_;
        // Validation first: nothing is allocated for a model or batch we cannot run.
        if (max_batch < 1 || max_batch > 65535)  // 65535: the attention grid's y extent
            throw std::runtime_error("cuda engine: max_batch must be in [1, 65535], got " + std::to_string(max_batch));
        if (c.dim < 1 || c.hidden_dim < 1 || c.n_layers < 0 || c.n_heads < 1 || c.n_kv_heads < 1 || c.vocab_size < 1 ||
            c.seq_len < 1 || c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || c.head_size() % 2 != 0)
            throw std::runtime_error("cuda engine: unsupported config (dim " + std::to_string(c.dim) + ", n_heads " +
                                     std::to_string(c.n_heads) + ", n_kv_heads " + std::to_string(c.n_kv_heads) + ")");
        const size_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size, KV = c.kv_dim(), S = c.seq_len,
                     hs = c.head_size(), B = max_batch;
        const Weights& w = model.weights;
        check_size(w.token_embedding, V * D, "token_embedding");
        check_size(w.rms_att, L * D, "rms_att");
        check_size(w.wq, L * D * D, "wq");
        check_size(w.wk, L * KV * D, "wk");
        check_size(w.wv, L * KV * D, "wv");
        check_size(w.wo, L * D * D, "wo");
        check_size(w.rms_ffn, L * D, "rms_ffn");
        check_size(w.w1, L * H * D, "w1");
        check_size(w.w2, L * D * H, "w2");
        check_size(w.w3, L * H * D, "w3");
        check_size(w.rms_final, D, "rms_final");
        const bool own_cls = !(c.shared_classifier && w.wcls.empty());
        if (own_cls) check_size(w.wcls, V * D, "wcls");

        int devices = 0;
        const cudaError_t de = cudaGetDeviceCount(&devices);
        if (de != cudaSuccess || devices == 0) {
            (void)cudaGetLastError();
            throw std::runtime_error("cuda engine: no usable CUDA device (" +
                                     (de != cudaSuccess ? cuda_text(de) : std::string("0 devices")) + ")");
        }
        smem_ = attention_smem_bytes(c.seq_len, (int)hs);
        int dev = 0, smem_max = 0;
        LLAMA_CUDA_TRY(cudaGetDevice(&dev));
        LLAMA_CUDA_TRY(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if (smem_ + 32 * sizeof(float) > (size_t)smem_max)
            throw std::runtime_error("cuda engine: attention over seq_len " + std::to_string(c.seq_len) + " needs " +
                                     std::to_string(smem_) + " bytes of shared memory per block, the device allows " +
                                     std::to_string(smem_max));
        if (smem_ > 48 * 1024)
            LLAMA_CUDA_TRY(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_));

        // Every device buffer, allocated once here.
        const size_t QKV = D + 2 * KV;
        const size_t floats = V * D + (own_cls ? V * D : 0) + 2 * L * D + L * QKV * D + L * D * D + L * 2 * H * D +
                              L * D * H + D + S * hs + 2 * L * B * S * KV + B * (4 * D + QKV + 3 * H + V + 1);
        const size_t total = floats * sizeof(float) + 4 * B * sizeof(int32_t) + kCublasWorkspaceBytes;
        emb_.allocate(V * D, "token_embedding", total);
        if (own_cls) wcls_.allocate(V * D, "wcls", total);
        rms_att_.allocate(L * D, "rms_att", total);
        rms_ffn_.allocate(L * D, "rms_ffn", total);
        rms_final_.allocate(D, "rms_final", total);
        wqkv_.allocate(L * QKV * D, "wq|wk|wv", total);
        wo_.allocate(L * D * D, "wo", total);
        w13_.allocate(L * 2 * H * D, "w1|w3", total);
        w2_.allocate(L * D * H, "w2", total);
        rope_.allocate(S * hs / 2, "RoPE table", total);
        kcache_.allocate(L * B * S * KV, "key cache", total);
        vcache_.allocate(L * B * S * KV, "value cache", total);
        x_.allocate(B * D, "residual", total);
        xb_.allocate(B * D, "normed", total);
        qkv_.allocate(B * QKV, "qkv", total);
        att_out_.allocate(B * D, "attention output", total);
        tmp_.allocate(B * D, "projection", total);
        h13_.allocate(B * 2 * H, "w1|w3 output", total);
        hb_.allocate(B * H, "swiglu output", total);
        hidden_.allocate(B * D, "hidden", total);
        logits_.allocate(B * V, "logits", total);
        coin_.allocate(B, "coins", total);
        meta_.allocate(3 * B, "slot/token/pos", total);
        next_.allocate(B, "sampled tokens", total);
        workspace_.allocate(kCublasWorkspaceBytes, "cuBLAS workspace", total);
        for (auto& st : stage_) st.allocate(3 * B, "slot/token/pos staging");
        coin_stage_.allocate(B, "coin staging");
        next_stage_.allocate(B, "sampled staging");

        LLAMA_CUDA_TRY(cudaStreamCreateWithFlags(&stream_.s, cudaStreamNonBlocking));
        for (auto& ev : staged_) LLAMA_CUDA_TRY(cudaEventCreateWithFlags(&ev.e, cudaEventDisableTiming));
        LLAMA_CUBLAS_TRY(cublasCreate(&cublas_.h));
        // The stream first: cublasSetStream resets the workspace to cuBLAS's own pool.
        LLAMA_CUBLAS_TRY(cublasSetStream(cublas_.h, stream_.s));
        LLAMA_CUBLAS_TRY(cublasSetWorkspace(cublas_.h, workspace_.get(), kCublasWorkspaceBytes));
        // fp32 throughout, no TF32 even when NVIDIA_TF32_OVERRIDE asks for it: matches the CPU to rounding.
        LLAMA_CUBLAS_TRY(cublasSetMathMode(cublas_.h, CUBLAS_PEDANTIC_MATH));

        try {
            upload(model, own_cls);
        } catch (...) {
            cudaStreamSynchronize(stream_.s);  // no copy may still read or write when the buffers go
            throw;
        }
        filled_.assign(B, 0);
        seen_.assign(B, -1);
    }

    // Weights in the fused layouts, the RoPE table, zeroed caches. Pageable copies (they return once
    // the source is staged); waits at the end.
    void upload(const Model& model, bool own_cls) {
        const Config& c = cfg_;
        const Weights& w = model.weights;
        const size_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size, KV = c.kv_dim(), S = c.seq_len,
                     hs = c.head_size(), QKV = D + 2 * KV;
        const cudaStream_t s = stream_.s;
        auto up = [&](float* dst, const float* src, size_t count) {
            LLAMA_CUDA_TRY(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyHostToDevice, s));
        };
        up(emb_.get(), w.token_embedding.data(), V * D);
        if (own_cls) up(wcls_.get(), w.wcls.data(), V * D);
        up(rms_att_.get(), w.rms_att.data(), L * D);
        up(rms_ffn_.get(), w.rms_ffn.data(), L * D);
        up(rms_final_.get(), w.rms_final.data(), D);
        up(wo_.get(), w.wo.data(), L * D * D);
        up(w2_.get(), w.w2.data(), L * D * H);
        for (size_t l = 0; l < L; ++l) {
            float* qkv = wqkv_.get() + l * QKV * D;
            up(qkv, w.wq.data() + l * D * D, D * D);
            up(qkv + D * D, w.wk.data() + l * KV * D, KV * D);
            up(qkv + (D + KV) * D, w.wv.data() + l * KV * D, KV * D);
            float* f = w13_.get() + l * 2 * H * D;
            up(f, w.w1.data() + l * H * D, H * D);
            up(f + H * D, w.w3.data() + l * H * D, H * D);
        }
        // RoPE angles computed on the host exactly as llama2.c does (float powf, cosf, sinf).
        std::vector<float2> rope(S * hs / 2);
        for (size_t p = 0; p < S; ++p)
            for (size_t i = 0; i < hs; i += 2) {
                const float freq = 1.0f / std::pow(10000.0f, (float)i / (float)hs);
                const float val = (float)p * freq;
                rope[p * hs / 2 + i / 2] = make_float2(std::cos(val), std::sin(val));
            }
        LLAMA_CUDA_TRY(cudaMemcpyAsync(rope_.get(), rope.data(), rope.size() * sizeof(float2), cudaMemcpyHostToDevice, s));
        LLAMA_CUDA_TRY(cudaMemsetAsync(kcache_.get(), 0, kcache_.size() * sizeof(float), s));
        LLAMA_CUDA_TRY(cudaMemsetAsync(vcache_.get(), 0, vcache_.size() * sizeof(float), s));
        LLAMA_CUDA_TRY(cudaStreamSynchronize(s));  // the local `rope` table goes out of scope
    }

    // Queued work may still use the buffers: wait before the members are freed.
    ~CudaEngine() override {
        if (stream_.s) cudaStreamSynchronize(stream_.s);
    }

    const char* name() const override { return "cuda"; }

    // Zeroes the caches (on the stream, asynchronously) and forgets every slot's positions.
    void reset() override {
        LLAMA_CUDA_TRY(cudaMemsetAsync(kcache_.get(), 0, kcache_.size() * sizeof(float), stream_.s));
        LLAMA_CUDA_TRY(cudaMemsetAsync(vcache_.get(), 0, vcache_.size() * sizeof(float), stream_.s));
        std::fill(filled_.begin(), filled_.end(), 0);
        n_ = 0;
        sampled_n_ = 0;
    }

    void step(const int32_t* slot, const int32_t* token, const int32_t* pos, int n) override {
        const Config& c = cfg_;
        // Validate everything before anything changes (a refused step leaves the engine as it was).
        if (n < 0 || n > B_)
            throw std::runtime_error("cuda engine: step of " + std::to_string(n) + " rows, max_batch is " + std::to_string(B_));
        if (n > 0 && (!slot || !token || !pos)) throw std::runtime_error("cuda engine: step with a null slot, token or pos array");
        ++stamp_;
        const auto bad = [](int i, const std::string& what) {
            throw std::runtime_error("cuda engine: row " + std::to_string(i) + " of the step: " + what);
        };
        for (int i = 0; i < n; ++i) {
            if (slot[i] < 0 || slot[i] >= B_)
                bad(i, "slot " + std::to_string(slot[i]) + " out of range [0, " + std::to_string(B_) + ")");
            if (seen_[(size_t)slot[i]] == stamp_) bad(i, "slot " + std::to_string(slot[i]) + " appears twice");
            seen_[(size_t)slot[i]] = stamp_;
            if (token[i] < 0 || token[i] >= c.vocab_size)
                bad(i, "token " + std::to_string(token[i]) + " out of range [0, " + std::to_string(c.vocab_size) + ")");
            if (pos[i] < 0 || pos[i] >= c.seq_len)
                bad(i, "position " + std::to_string(pos[i]) + " out of range [0, " + std::to_string(c.seq_len) + ")");
            if (pos[i] > filled_[(size_t)slot[i]])
                bad(i, "position " + std::to_string(pos[i]) + " but slot " + std::to_string(slot[i]) + " holds only positions below " +
                           std::to_string(filled_[(size_t)slot[i]]) + " (its cache is filled in position order)");
        }
        n_ = n;
        sampled_n_ = 0;
        if (n == 0) return;
        const cudaStream_t s = stream_.s;

        // Upload through pinned staging, double-buffered: wait (normally not at all) until the copy
        // that last read this half has run, so the host never overwrites bytes still in flight.
        const int half = parity_;
        parity_ ^= 1;
        LLAMA_CUDA_TRY(cudaEventSynchronize(staged_[half].e));
        int32_t* st = stage_[half].get();
        std::memcpy(st, slot, sizeof(int32_t) * (size_t)n);
        std::memcpy(st + n, token, sizeof(int32_t) * (size_t)n);
        std::memcpy(st + 2 * n, pos, sizeof(int32_t) * (size_t)n);
        LLAMA_CUDA_TRY(cudaMemcpyAsync(meta_.get(), st, sizeof(int32_t) * 3 * (size_t)n, cudaMemcpyHostToDevice, s));
        LLAMA_CUDA_TRY(cudaEventRecord(staged_[half].e, s));
        for (int i = 0; i < n; ++i) filled_[(size_t)slot[i]] = pos[i] + 1;  // positions above are stale now
        const int32_t* d_slot = meta_.get();
        const int32_t* d_tok = d_slot + n;
        const int32_t* d_pos = d_slot + 2 * n;

        const int D = c.dim, H = c.hidden_dim, L = c.n_layers, KV = c.kv_dim(), hs = c.head_size(), QKV = D + 2 * KV;
        const size_t cache_layer = (size_t)B_ * c.seq_len * KV;
        // First norm: x = emb[token], normed with the first layer's attention weight (or the final one).
        residual_rmsnorm_kernel<<<n, kNormThreads, 0, s>>>(x_.get(), nullptr, d_tok, emb_.get(),
                                                           L > 0 ? rms_att_.get() : rms_final_.get(),
                                                           L > 0 ? xb_.get() : hidden_.get(), D);
        LLAMA_CUDA_CHECK_LAUNCH("residual_rmsnorm_kernel (embedding)");
        const int64_t swiglu_total = (int64_t)n * H;
        const int swiglu_blocks = (int)std::min<int64_t>((swiglu_total + kSwigluThreads - 1) / kSwigluThreads, 65535);
        for (int l = 0; l < L; ++l) {
            gemm(wqkv_.get() + (size_t)l * QKV * D, xb_.get(), qkv_.get(), QKV, D, n);
            float* kc = kcache_.get() + (size_t)l * cache_layer;
            float* vc = vcache_.get() + (size_t)l * cache_layer;
            rope_cache_kernel<<<n, kRopeThreads, 0, s>>>(qkv_.get(), d_slot, d_pos, rope_.get(), kc, vc, D, KV, hs, c.seq_len);
            LLAMA_CUDA_CHECK_LAUNCH("rope_cache_kernel");
            attention_kernel<<<dim3(c.n_heads, n), kAttnThreads, smem_, s>>>(qkv_.get(), d_slot, d_pos, kc, vc, att_out_.get(), D, KV,
                                                                             hs, c.n_heads / c.n_kv_heads, c.seq_len);
            LLAMA_CUDA_CHECK_LAUNCH("attention_kernel");
            gemm(wo_.get() + (size_t)l * D * D, att_out_.get(), tmp_.get(), D, D, n);
            residual_rmsnorm_kernel<<<n, kNormThreads, 0, s>>>(x_.get(), tmp_.get(), nullptr, nullptr, rms_ffn_.get() + (size_t)l * D,
                                                               xb_.get(), D);
            LLAMA_CUDA_CHECK_LAUNCH("residual_rmsnorm_kernel (ffn)");
            gemm(w13_.get() + (size_t)l * 2 * H * D, xb_.get(), h13_.get(), 2 * H, D, n);
            swiglu_kernel<<<swiglu_blocks, kSwigluThreads, 0, s>>>(h13_.get(), hb_.get(), H, swiglu_total);
            LLAMA_CUDA_CHECK_LAUNCH("swiglu_kernel");
            gemm(w2_.get() + (size_t)l * D * H, hb_.get(), tmp_.get(), D, H, n);
            const bool last = l + 1 == L;
            residual_rmsnorm_kernel<<<n, kNormThreads, 0, s>>>(x_.get(), tmp_.get(), nullptr, nullptr,
                                                               last ? rms_final_.get() : rms_att_.get() + (size_t)(l + 1) * D,
                                                               last ? hidden_.get() : xb_.get(), D);
            LLAMA_CUDA_CHECK_LAUNCH("residual_rmsnorm_kernel (next layer)");
        }
        gemm(wcls_.get() ? wcls_.get() : emb_.get(), hidden_.get(), logits_.get(), c.vocab_size, D, n);
    }

    const float* hidden() const override { return hidden_.get(); }
    const float* logits() const override { return logits_.get(); }
    collapse_memory memory() const override { return COLLAPSE_MEMORY_DEVICE; }
    void* stream() const override { return (void*)stream_.s; }

    void sample(float temperature, const float* coin, int32_t* next, int n) override {
        if (n < 0 || n > n_)
            throw std::runtime_error("cuda engine: sample of " + std::to_string(n) + " rows after a step of " + std::to_string(n_));
        if (!(temperature >= 0.0f) || std::isinf(temperature))
            throw std::runtime_error("cuda engine: temperature must be finite and >= 0, got " + std::to_string(temperature));
        if (n > 0 && !next) throw std::runtime_error("cuda engine: sample with a null output array");
        if (temperature > 0.0f && n > 0) {
            if (!coin) throw std::runtime_error("cuda engine: sample at temperature > 0 needs coins");
            for (int i = 0; i < n; ++i)
                if (!(coin[i] >= 0.0f && coin[i] < 1.0f))
                    throw std::runtime_error("cuda engine: coin " + std::to_string(i) + " is " + std::to_string(coin[i]) +
                                             ", not in [0, 1)");
        }
        if (n == 0) return;
        const cudaStream_t s = stream_.s;
        // The staging buffers are free: the previous sample() waited for its copies.
        if (temperature > 0.0f) {
            std::memcpy(coin_stage_.get(), coin, sizeof(float) * (size_t)n);
            LLAMA_CUDA_TRY(cudaMemcpyAsync(coin_.get(), coin_stage_.get(), sizeof(float) * (size_t)n, cudaMemcpyHostToDevice, s));
        }
        sample_kernel<<<n, kSampleThreads, 0, s>>>(logits_.get(), cfg_.vocab_size, temperature, coin_.get(), next_.get());
        LLAMA_CUDA_CHECK_LAUNCH("sample_kernel");
        LLAMA_CUDA_TRY(cudaMemcpyAsync(next_stage_.get(), next_.get(), sizeof(int32_t) * (size_t)n, cudaMemcpyDeviceToHost, s));
        LLAMA_CUDA_TRY(cudaStreamSynchronize(s));
        std::memcpy(next, next_stage_.get(), sizeof(int32_t) * (size_t)n);
        sampled_n_ = n;
    }

    const int32_t* sampled() const override { return next_.get(); }

    void download(float* hidden, float* logits, int n) const override {
        if (n < 0 || n > n_)
            throw std::runtime_error("cuda engine: download of " + std::to_string(n) + " rows after a step of " + std::to_string(n_));
        const cudaStream_t s = stream_.s;
        if (hidden && n > 0)
            LLAMA_CUDA_TRY(cudaMemcpyAsync(hidden, hidden_.get(), sizeof(float) * (size_t)n * cfg_.dim, cudaMemcpyDeviceToHost, s));
        if (logits && n > 0)
            LLAMA_CUDA_TRY(
                cudaMemcpyAsync(logits, logits_.get(), sizeof(float) * (size_t)n * cfg_.vocab_size, cudaMemcpyDeviceToHost, s));
        LLAMA_CUDA_TRY(cudaStreamSynchronize(s));
    }

private:
    // Y[n, out] = X[n, in] W[out, in]^T, all row-major: in cuBLAS's column-major terms
    // Y^T (out x n) = op_T(W^T stored in x out) * X^T (in x n).
    void gemm(const float* W, const float* X, float* Y, int out, int in, int n) {
        const float one = 1.0f, zero = 0.0f;
        LLAMA_CUBLAS_TRY(cublasSgemm(cublas_.h, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &one, W, in, X, in, &zero, Y, out));
    }

    Config cfg_;
    int B_;
    int n_ = 0;           // rows of the last step
    int sampled_n_ = 0;   // rows of the last sample
    int parity_ = 0;      // staging half of the next step
    int64_t stamp_ = 0;   // duplicate-slot detection without clearing
    size_t smem_ = 0;     // attention kernel's dynamic shared memory
    std::vector<int> filled_;      // per slot: positions 0..filled-1 are in its cache
    std::vector<int64_t> seen_;    // per slot: the stamp of the step that named it
    // Destroyed in reverse order: buffers, then events, the cuBLAS handle, its workspace, the stream
    // last (its holder waits for it; the engine's destructor has waited already).
    StreamHolder stream_;
    DeviceArray<unsigned char> workspace_;
    CublasHolder cublas_;
    EventHolder staged_[2];
    DeviceArray<float> emb_, wcls_, rms_att_, rms_ffn_, rms_final_, wqkv_, wo_, w13_, w2_;
    DeviceArray<float2> rope_;
    DeviceArray<float> kcache_, vcache_, x_, xb_, qkv_, att_out_, tmp_, h13_, hb_, hidden_, logits_, coin_;
    DeviceArray<int32_t> meta_, next_;
    PinnedArray<int32_t> stage_[2];
    PinnedArray<float> coin_stage_;
    PinnedArray<int32_t> next_stage_;
};

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(const Model& model, int max_batch) { return std::make_unique<CudaEngine>(model, max_batch); }

bool cuda_engine_built() { return true; }

}  // namespace llama2c
