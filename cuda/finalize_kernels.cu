// Kernels of finalisation: means, centring, the fused pair reduction after each GEMM tile,
// duality, NC4 comparison, and per-class Gram matrices for the batched eigen-solvers.
#include <cmath>

#include "core/metric_math.hpp"
#include "cuda_check.hpp"
#include "kernels.cuh"

namespace collapse::internal::cuda {

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

int blocks_for(int64_t work, int threads, int cap = 65535) {
    const int64_t b = (work + threads - 1) / threads;
    return (int)std::max<int64_t>(1, std::min<int64_t>(b, cap));
}

// Warp per kept class.
__global__ void means_kernel(const double* sum, const double* sqdev, const float* shift, const unsigned long long* count, const int32_t* ids,
                             int64_t K, int64_t d, int token_weighted, double* mu, double* var, double* weight) {
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < K; s += warps) {
        const int32_t c = ids[s];
        const double n = (double)count[c];
        double dd = 0;  // ||S - n s||^2 (core/shifted_sums.hpp: var_c about the reference row)
        for (int64_t j = lane; j < d; j += kWarp) {
            const double S = sum[(int64_t)c * d + j];
            mu[s * d + j] = S / n;
            const double e = S - n * (shift ? (double)shift[(int64_t)c * d + j] : 0.0);
            dd += e * e;
        }
        dd = warp_sum(dd);
        if (lane == 0) {
            var[s] = shifted_variance(sqdev[c], n, dd);
            weight[s] = token_weighted ? n : 1.0;
        }
    }
}

// Thread per column, classes in order: deterministic.
__global__ void column_sums_kernel(const double* x, const double* w, int64_t K, int64_t d, double* out) {
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < d; j += (int64_t)gridDim.x * blockDim.x) {
        double acc = 0;
        for (int64_t s = 0; s < K; ++s) acc += (w ? w[s] : 1.0) * x[s * d + j];
        out[j] = acc;
    }
}

__global__ void center_kernel(const double* mu, const double* mu_g_sum, double total_weight, int64_t K, int64_t d, double* m,
                              double* q, double* a) {
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < K; s += warps) {
        double acc = 0;
        for (int64_t j = lane; j < d; j += kWarp) {
            const double v = mu[s * d + j] - mu_g_sum[j] / total_weight;
            m[s * d + j] = v;
            acc += v * v;
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            q[s] = acc;
            a[s] = sqrt(acc) + kNormEps;
        }
    }
}

// Per-thread moments with the thread's first value as shift (no digits lost in the one-pass
// variance), merged with Chan's formula in a fixed order: warp, block, then the block's slot.
struct PairAcc {
    Moments l, c, dist;
    double n_cdnv, s_cdnv, skip_l, skip_cdnv, s_etf, max_etf;
};

__device__ void merge_acc(PairAcc& a, const PairAcc& b) {
    a.l.merge(b.l);
    a.c.merge(b.c);
    a.dist.merge(b.dist);
    a.s_etf += b.s_etf;
    a.max_etf = fmax(a.max_etf, b.max_etf);
    a.n_cdnv += b.n_cdnv;
    a.s_cdnv += b.s_cdnv;
    a.skip_l += b.skip_l;
    a.skip_cdnv += b.skip_cdnv;
}

__device__ PairAcc shfl_acc(const PairAcc& a, int o) {
    PairAcc r;
    r.l.n = __shfl_down_sync(0xffffffffu, a.l.n, o);
    r.l.mean = __shfl_down_sync(0xffffffffu, a.l.mean, o);
    r.l.m2 = __shfl_down_sync(0xffffffffu, a.l.m2, o);
    r.c.n = __shfl_down_sync(0xffffffffu, a.c.n, o);
    r.c.mean = __shfl_down_sync(0xffffffffu, a.c.mean, o);
    r.c.m2 = __shfl_down_sync(0xffffffffu, a.c.m2, o);
    r.n_cdnv = __shfl_down_sync(0xffffffffu, a.n_cdnv, o);
    r.s_cdnv = __shfl_down_sync(0xffffffffu, a.s_cdnv, o);
    r.skip_l = __shfl_down_sync(0xffffffffu, a.skip_l, o);
    r.skip_cdnv = __shfl_down_sync(0xffffffffu, a.skip_cdnv, o);
    r.dist.n = __shfl_down_sync(0xffffffffu, a.dist.n, o);
    r.dist.mean = __shfl_down_sync(0xffffffffu, a.dist.mean, o);
    r.dist.m2 = __shfl_down_sync(0xffffffffu, a.dist.m2, o);
    r.s_etf = __shfl_down_sync(0xffffffffu, a.s_etf, o);
    r.max_etf = __shfl_down_sync(0xffffffffu, a.max_etf, o);
    return r;
}

__global__ void pair_reduce_kernel(const double* g, int64_t i0, int64_t j0, int64_t ni, int64_t nj, const double* m, int64_t d,
                                   const double* q, const double* a, const double* var, double cdnv_power, double inv_km1, double* acc) {
    double nl = 0, sl = 0, sl2 = 0, shl = 0, nc = 0, sc = 0, sc2 = 0, shc = 0, sd = 0, sd2 = 0, shd = 0;
    PairAcc t{};
    const int64_t total = ni * nj;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e % ni, j = e / ni;  // column-major: consecutive threads read consecutive i
        const int64_t gi = i0 + i, gj = j0 + j;
        if (gi >= gj) continue;  // pairs i < j only
        const PairDistances pd = pair_distances(g[e], q[gi], q[gj], a[gi], a[gj], m + gi * d, m + gj * d, d);
        const PairTerms pt = pair_terms(g[e], q[gi], q[gj], a[gi], a[gj], var[gi], var[gj], cdnv_power, inv_km1, pd);
        if (nc == 0) shc = pt.cos, shd = pt.dist;
        nc += 1, sc += pt.cos - shc, sc2 += (pt.cos - shc) * (pt.cos - shc);
        sd += pt.dist - shd, sd2 += (pt.dist - shd) * (pt.dist - shd);
        t.s_etf += pt.etf_dev;
        t.max_etf = fmax(t.max_etf, pt.etf_dev);
        if (pt.gnc2_skip) {
            t.skip_l += 1;
        } else {
            if (nl == 0) shl = pt.log_kernel;
            nl += 1, sl += pt.log_kernel - shl, sl2 += (pt.log_kernel - shl) * (pt.log_kernel - shl);
        }
        if (pt.cdnv_skip) t.skip_cdnv += 1;
        else t.n_cdnv += 1, t.s_cdnv += pt.cdnv;
    }
    t.l = Moments::from_shifted(nl, sl, sl2, shl);
    t.c = Moments::from_shifted(nc, sc, sc2, shc);
    t.dist = Moments::from_shifted(nc, sd, sd2, shd);
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        const PairAcc other = shfl_acc(t, o);
        merge_acc(t, other);
    }
    __shared__ PairAcc sh[256 / kWarp];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) sh[warp] = t;
    __syncthreads();
    if (threadIdx.x == 0) {
        PairAcc blk = sh[0];
        for (int w = 1; w < (int)(blockDim.x / kWarp); ++w) merge_acc(blk, sh[w]);
        // This block's running state across tiles (tiles run one after another on the stream).
        double* slot = acc + (int64_t)blockIdx.x * kPairFields;
        PairAcc run;
        run.l = Moments{slot[0], slot[1], slot[2]};
        run.c = Moments{slot[3], slot[4], slot[5]};
        run.n_cdnv = slot[6], run.s_cdnv = slot[7], run.skip_l = slot[8], run.skip_cdnv = slot[9];
        run.dist = Moments{slot[10], slot[11], slot[12]};
        run.s_etf = slot[13], run.max_etf = slot[14];
        merge_acc(run, blk);
        const double vals[kPairFields] = {run.l.n, run.l.mean, run.l.m2, run.c.n, run.c.mean, run.c.m2,
                                          run.n_cdnv, run.s_cdnv, run.skip_l, run.skip_cdnv,
                                          run.dist.n, run.dist.mean, run.dist.m2, run.s_etf, run.max_etf};
        for (int k = 0; k < kPairFields; ++k) slot[k] = vals[k];
    }
}

__device__ __forceinline__ const double* w_row(const double* W, const double* mu, const int32_t* ids, int64_t s, int64_t d) {
    return W ? W + (int64_t)ids[s] * d : mu + s * d;
}

__global__ void duality_kernel(const double* W, const double* mu, const int32_t* ids, const double* m, int64_t K, int64_t d,
                               double* wm, double* ww) {
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < K; s += warps) {
        const double* w = w_row(W, mu, ids, s, d);
        double a = 0, b = 0;
        for (int64_t j = lane; j < d; j += kWarp) {
            a += w[j] * m[s * d + j];
            b += w[j] * w[j];
        }
        a = warp_sum(a);
        b = warp_sum(b);
        if (lane == 0) {
            wm[s] = a;
            ww[s] = b;
        }
    }
}

__global__ void self_duality_kernel(const double* W, const double* mu, const int32_t* ids, const double* m, int64_t K,
                                    int64_t d, double wf, double mf, double* out) {
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < K; s += warps) {
        const double* w = w_row(W, mu, ids, s, d);
        double acc = 0;
        for (int64_t j = lane; j < d; j += kWarp) {
            const double diff = w[j] / wf - m[s * d + j] / mf;
            acc += diff * diff;
        }
        acc = warp_sum(acc);
        if (lane == 0) out[s] = acc;
    }
}

// Warp per row: argmax of the logits (ties: smaller id) and argmin of ||mu||^2 - 2 x.mu.
__global__ void nc4_compare_kernel(const double* logits, const double* bias, int64_t V, const double* dots, const double* mu_sq,
                                   const int32_t* ids, int64_t K, int64_t rows, unsigned long long* agree, const int32_t* row_keys,
                                   const int32_t* kept_slot, const BatchStatus* st, unsigned long long* slot_hits,
                                   unsigned long long* slot_rows) {
    if (st && st->error) return;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; r < rows; r += warps) {
        if (row_keys && (row_keys[r] >= V || kept_slot[row_keys[r]] < 0)) continue;  // dropped or not kept
        double best = -INFINITY;
        int64_t best_c = V;
        for (int64_t c = lane; c < V; c += kWarp) {
            const double v = logits[r * V + c] + (bias ? bias[c] : 0.0);
            if (v > best) best = v, best_c = c;  // per lane, c ascends: ties keep the smaller id
        }
        double near = INFINITY;
        int64_t near_s = K;
        for (int64_t s = lane; s < K; s += kWarp) {
            const double v = mu_sq[s] - 2.0 * dots[r * K + s];
            if (v < near) near = v, near_s = s;
        }
        for (int o = kWarp / 2; o > 0; o >>= 1) {
            const double ob = __shfl_down_sync(0xffffffffu, best, o);
            const int64_t oc = __shfl_down_sync(0xffffffffu, best_c, o);
            if (ob > best || (ob == best && oc < best_c)) best = ob, best_c = oc;
            const double on = __shfl_down_sync(0xffffffffu, near, o);
            const int64_t os = __shfl_down_sync(0xffffffffu, near_s, o);
            if (on < near || (on == near && os < near_s)) near = on, near_s = os;
        }
        const bool hit = near_s < K && best_c == ids[near_s];
        if (lane == 0 && hit) atomicAdd(agree, 1ull);
        if (lane == 0 && slot_rows && row_keys) {  // per_class_arrays: by the row's class
            const int32_t slot = kept_slot[row_keys[r]];
            atomicAdd(slot_rows + slot, 1ull);
            if (hit) atomicAdd(slot_hits + slot, 1ull);
        }
    }
}

__global__ void rows_to_double_kernel(const float* src, const int32_t* index, int64_t rows, int64_t d, const double* center,
                                      double* dst) {
    const int64_t total = rows * d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / d, k = e % d;
        const int64_t sr = index ? index[r] : r;
        dst[e] = (double)src[sr * d + k] - (center ? center[k] : 0.0);
    }
}

// Block (tile x, tile y, class t): a 16 x 16 tile of the class's Gram of the smaller side, padded
// to M x M with zeros. A(t, i) is element i of "vector" t: X^T X when n > d (vectors are rows,
// elements columns), X X^T otherwise (vectors are columns of X^T, i.e. rows indexed by i).
constexpr int kGramTile = 16;
__global__ void class_gram_kernel(const float* rows, const int32_t* index, const int64_t* offset, const int64_t* n,
                                  const int32_t* center_slot, const double* mu, int64_t d, int64_t M, double* gram) {
    const int64_t t = blockIdx.z;
    const int64_t nt = n[t];
    const bool tall = nt > d;          // Gram X^T X (d x d) else X X^T (n x n)
    const int64_t m = tall ? d : nt;   // Gram size
    const int64_t inner = tall ? nt : d;
    const double* ctr = (center_slot && center_slot[t] >= 0) ? mu + (int64_t)center_slot[t] * d : nullptr;
    const int64_t gi = (int64_t)blockIdx.x * kGramTile + threadIdx.x;
    const int64_t gj = (int64_t)blockIdx.y * kGramTile + threadIdx.y;
    __shared__ double As[kGramTile][kGramTile + 1], Bs[kGramTile][kGramTile + 1];
    auto elem = [&](int64_t k, int64_t i) -> double {  // element k of vector i
        if (i >= m || k >= inner) return 0.0;
        const int64_t r = tall ? k : i, col = tall ? i : k;
        const int64_t p = offset[t] + r;  // position in the index, or the row itself without one
        const double v = (double)rows[(index ? (int64_t)index[p] : p) * d + col];
        return ctr ? v - ctr[col] : v;
    };
    double acc = 0;
    for (int64_t k0 = 0; k0 < inner; k0 += kGramTile) {
        As[threadIdx.y][threadIdx.x] = elem(k0 + threadIdx.y, (int64_t)blockIdx.x * kGramTile + threadIdx.x);
        Bs[threadIdx.y][threadIdx.x] = elem(k0 + threadIdx.y, (int64_t)blockIdx.y * kGramTile + threadIdx.x);
        __syncthreads();
        for (int k = 0; k < kGramTile; ++k) acc += As[k][threadIdx.x] * Bs[k][threadIdx.y];
        __syncthreads();
    }
    if (gi < M && gj < M) gram[t * M * M + gj * M + gi] = (gi < m && gj < m) ? acc : 0.0;
}

}  // namespace

void launch_means(const double* sum, const double* sqdev, const float* shift, const unsigned long long* count, const int32_t* ids, int64_t K,
                  int64_t d, bool token_weighted, double* mu, double* var, double* weight, cudaStream_t s) {
    means_kernel<<<blocks_for(K * kWarp, 256), 256, 0, s>>>(sum, sqdev, shift, count, ids, K, d, token_weighted ? 1 : 0, mu, var, weight);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_column_sums(const double* x, const double* w, int64_t K, int64_t d, double* out, cudaStream_t s) {
    column_sums_kernel<<<blocks_for(d, 128), 128, 0, s>>>(x, w, K, d, out);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_center(const double* mu, const double* mu_g_sum, double total_weight, int64_t K, int64_t d, double* m, double* q,
                   double* a, cudaStream_t s) {
    center_kernel<<<blocks_for(K * kWarp, 256), 256, 0, s>>>(mu, mu_g_sum, total_weight, K, d, m, q, a);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_pair_reduce(const double* g, int64_t i0, int64_t j0, int64_t ni, int64_t nj, const double* m, int64_t d, const double* q,
                        const double* a, const double* var, double cdnv_power, double inv_km1, double* acc, cudaStream_t s) {
    pair_reduce_kernel<<<kPairBlocks, 256, 0, s>>>(g, i0, j0, ni, nj, m, d, q, a, var, cdnv_power, inv_km1, acc);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_duality(const double* W, const double* mu, const int32_t* ids, const double* m, int64_t K, int64_t d, double* wm,
                    double* ww, cudaStream_t s) {
    duality_kernel<<<blocks_for(K * kWarp, 256), 256, 0, s>>>(W, mu, ids, m, K, d, wm, ww);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_self_duality(const double* W, const double* mu, const int32_t* ids, const double* m, int64_t K, int64_t d,
                         double wf, double mf, double* out, cudaStream_t s) {
    self_duality_kernel<<<blocks_for(K * kWarp, 256), 256, 0, s>>>(W, mu, ids, m, K, d, wf, mf, out);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_nc4_compare(const double* logits, const double* bias, int64_t V, const double* dots, const double* mu_sq,
                        const int32_t* ids, int64_t K, int64_t rows, unsigned long long* agree, cudaStream_t s,
                        const int32_t* row_keys, const int32_t* kept_slot, const BatchStatus* st, unsigned long long* slot_hits,
                        unsigned long long* slot_rows) {
    if (rows == 0) return;
    nc4_compare_kernel<<<blocks_for(rows * kWarp, 256), 256, 0, s>>>(logits, bias, V, dots, mu_sq, ids, K, rows, agree, row_keys,
                                                                     kept_slot, st, slot_hits, slot_rows);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_rows_to_double(const float* src, const int32_t* index, int64_t rows, int64_t d, const double* center, double* dst,
                           cudaStream_t s) {
    if (rows == 0) return;
    rows_to_double_kernel<<<blocks_for(rows * d, 256, 1 << 20), 256, 0, s>>>(src, index, rows, d, center, dst);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_class_gram(const float* rows, const int32_t* index, const int64_t* offset, const int64_t* n,
                       const int32_t* center_slot, const double* mu, int64_t count, int64_t d, int64_t M, double* gram,
                       cudaStream_t s) {
    if (count == 0) return;
    const dim3 block(kGramTile, kGramTile);
    const dim3 grid((unsigned)((M + kGramTile - 1) / kGramTile), (unsigned)((M + kGramTile - 1) / kGramTile), (unsigned)count);
    class_gram_kernel<<<grid, block, 0, s>>>(rows, index, offset, n, center_slot, mu, d, M, gram);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}


namespace {

// Thread per (window, column): the column's mean over the window's rows in row order (as the CPU's
// window_evaluate sums), then the centred values.
__global__ void window_center_kernel(const float* store, const int64_t* slots, int64_t windows, int64_t W, int64_t d, double* x) {
    const int64_t total = windows * d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t w = e / d, k = e % d;
        const int64_t* s = slots ? slots + w * W : nullptr;
        const float* rows = s ? store : store + w * W * d;  // no slots: the window's rows in order
        double mean = 0;
        for (int64_t i = 0; i < W; ++i) mean += (double)rows[(s ? s[i] : i) * d + k];
        mean /= (double)W;
        double* out = x + w * W * d;
        for (int64_t i = 0; i < W; ++i) out[i * d + k] = (double)rows[(s ? s[i] : i) * d + k] - mean;
    }
}

__global__ void window_gather_kernel(const float* store, const int64_t* slots, int64_t rows, int64_t d, float* out) {
    const int64_t total = rows * d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
        out[e] = store[slots[e / d] * d + e % d];
}

}  // namespace

void launch_window_center(const float* store, const int64_t* slots, int64_t windows, int64_t W, int64_t d, double* x, cudaStream_t s) {
    if (windows == 0 || d == 0) return;
    window_center_kernel<<<blocks_for(windows * d, 256, 1 << 20), 256, 0, s>>>(store, slots, windows, W, d, x);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_window_gather(const float* store, const int64_t* slots, int64_t rows, int64_t d, float* out, cudaStream_t s) {
    if (rows == 0 || d == 0) return;
    window_gather_kernel<<<blocks_for(rows * d, 256, 1 << 20), 256, 0, s>>>(store, slots, rows, d, out);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

// Sigma_W's streamed scatter made the scatter about the means (cuda_metrics.cu, within_scatter).
namespace {

__global__ void held_shifted_rows_kernel(const float* hold, const int32_t* index, int64_t m, int64_t hold_rows, int64_t d, const float* shift,
                                         double* x) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < m * d; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / d, k = e % d, slot = index[i], c = slot / hold_rows;
        x[e] = (double)hold[slot * d + k] - (double)shift[c * d + k];
    }
}

__global__ void unshift_rows_kernel(const double* sum, const float* shift, const unsigned long long* count, const int32_t* ids, int64_t K,
                                    int64_t d, double* e) {
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < K * d; t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t s = t / d, k = t % d, c = ids[s];
        e[t] = unshift_term(sum[c * d + k], (double)count[c], (double)shift[c * d + k]);
    }
}

}  // namespace

void launch_held_shifted_rows(const float* hold, const int32_t* index, int64_t m, int64_t hold_rows, int64_t d, const float* shift,
                              double* x, cudaStream_t s) {
    if (m <= 0 || d == 0) return;
    held_shifted_rows_kernel<<<blocks_for(m * d, 256, 1 << 20), 256, 0, s>>>(hold, index, m, hold_rows, d, shift, x);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_unshift_rows(const double* sum, const float* shift, const unsigned long long* count, const int32_t* ids, int64_t K, int64_t d,
                         double* e, cudaStream_t s) {
    if (K <= 0 || d == 0) return;
    unshift_rows_kernel<<<blocks_for(K * d, 256, 1 << 20), 256, 0, s>>>(sum, shift, count, ids, K, d, e);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

}  // namespace collapse::internal::cuda
