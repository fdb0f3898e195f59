// Kernels of the ingest path: validation, grouping helpers, class sums, row placement, Gram rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>

#include "base/dtype.hpp"
#include "core/sampling.hpp"
#include "cuda_check.hpp"
#include "kernels.cuh"

namespace collapse::internal::cuda {

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ double load_feature(const void* p, collapse_dtype t, int64_t i) {
    switch (t) {
        case COLLAPSE_F32: return (double)static_cast<const float*>(p)[i];
        case COLLAPSE_F64: return static_cast<const double*>(p)[i];
        case COLLAPSE_F16: return (double)half_to_float(static_cast<const uint16_t*>(p)[i]);
        case COLLAPSE_BF16: return (double)bf16_to_float(static_cast<const uint16_t*>(p)[i]);
        default: return 0.0;
    }
}

__device__ __forceinline__ int64_t load_int(const void* p, collapse_dtype t, int64_t i) {
    switch (t) {
        case COLLAPSE_I32: return static_cast<const int32_t*>(p)[i];
        case COLLAPSE_I64: return static_cast<const int64_t*>(p)[i];
        case COLLAPSE_U8:
        case COLLAPSE_BOOL: return static_cast<const uint8_t*>(p)[i];
        default: return 0;
    }
}

__device__ __forceinline__ int64_t feature_row(const DeviceBatch& b, int64_t r) {
    if (!b.sequences) return r;
    return (r / (b.seq_len - 1)) * b.seq_len + r % (b.seq_len - 1);
}

// Element index of row r's label / mask: y = I[:, 1:] for sequences.
__device__ __forceinline__ int64_t label_element(const DeviceBatch& b, int64_t r, int64_t stride) {
    if (!b.sequences) return r * stride;
    return (r / (b.seq_len - 1)) * stride + r % (b.seq_len - 1) + 1;
}

__device__ __forceinline__ const void* row_ptr(const DeviceBatch& b, int64_t fr) {
    return static_cast<const uint8_t*>(b.features) + (size_t)(fr * b.fstride) * dtype_size(b.fdtype);
}

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

__global__ void reset_status_kernel(BatchStatus* st) {
    st->bad_label_row = ULLONG_MAX;
    st->bad_label_value = 0;
    st->nonfinite_row = ULLONG_MAX;
    st->nonfinite_col = -1;
    st->nonfinite_value = 0;
    st->masked = st->excluded = st->nonfinite_skipped = st->accepted = st->ignored = 0;
    st->store_overflow = 0;
    st->error = 0;
}

__global__ void validate_kernel(DeviceBatch b, IngestParams p, int32_t* keys, int32_t* vals, BatchStatus* st) {
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; r < b.rows; r += warps) {
        int32_t key = p.sentinel;
        const bool valid = !b.valid || load_int(b.valid, b.vdtype, label_element(b, r, b.vstride)) != 0;
        const int64_t y = valid ? load_int(b.labels, b.ldtype, label_element(b, r, b.lstride)) : 0;
        const int64_t fr = feature_row(b, r);
        bool check = false;
        if (!valid) {
            if (lane == 0) atomicAdd(&st->masked, 1ull);
        } else if (p.use_ignore && y == p.ignore_index) {
            if (lane == 0) atomicAdd(&st->ignored, 1ull);
        } else if (y < 0 || y >= p.V) {
            if (lane == 0) atomicMin(&st->bad_label_row, (unsigned long long)r);
        } else if (p.excluded[y]) {
            if (lane == 0) atomicAdd(&st->excluded, 1ull);
        } else {
            check = true;
        }
        if (check) {
            // The warp scans the row for inf/nan.
            const void* row = row_ptr(b, fr);
            bool bad = false;
            // Not finite, or (float64 input) beyond the float32 range the rows are kept in.
            for (int64_t k = lane; k < b.d; k += kWarp) bad = bad || !(fabs(load_feature(row, b.fdtype, k)) <= (double)FLT_MAX);
            bad = __any_sync(0xffffffffu, bad);
            if (bad) {
                if (lane == 0) {
                    if (p.nonfinite_skip) atomicAdd(&st->nonfinite_skipped, 1ull);
                    else atomicMin(&st->nonfinite_row, (unsigned long long)r);
                }
            } else {
                key = (int32_t)y;
                if (lane == 0) atomicAdd(&st->accepted, 1ull);
            }
        }
        if (lane == 0) {
            keys[r] = key;
            vals[r] = (int32_t)fr;
        }
    }
}

__global__ void finish_status_kernel(DeviceBatch b, BatchStatus* st, const unsigned long long* store_count,
                                     unsigned long long store_capacity) {
    if (st->bad_label_row != ULLONG_MAX) {
        const int64_t r = (int64_t)st->bad_label_row;
        st->bad_label_value = load_int(b.labels, b.ldtype, label_element(b, r, b.lstride));
        st->error = 1;
    }
    if (st->nonfinite_row != ULLONG_MAX) {
        const int64_t r = (int64_t)st->nonfinite_row;
        const void* row = row_ptr(b, feature_row(b, r));
        for (int64_t k = 0; k < b.d; ++k) {
            const double v = load_feature(row, b.fdtype, k);
            if (!(fabs(v) <= (double)FLT_MAX)) {
                st->nonfinite_col = k;
                st->nonfinite_value = v;
                break;
            }
        }
        st->error = 1;
    }
    if (store_count && *store_count + st->accepted > store_capacity) {
        st->store_overflow = 1;
        st->error = 1;
    }
}

__global__ void run_heads_kernel(const int32_t* keys, int64_t n, int32_t* head) {
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < n; p += (int64_t)gridDim.x * blockDim.x)
        head[p] = (p == 0 || keys[p] != keys[p - 1]) ? (int32_t)p : 0;
}

constexpr int kSumThreads = 128;
constexpr int kSumRows = 64;

// Block (chunk x, column group y): rows [x*kSumRows, ...) of the sorted batch, one column per thread.
__global__ void class_sums_kernel(DeviceBatch b, const int32_t* keys, const int32_t* vals, int32_t sentinel, ClassState cs,
                                  const BatchStatus* st) {
    if (st->error) return;
    const int64_t p0 = (int64_t)blockIdx.x * kSumRows;
    const int64_t p1 = min(p0 + kSumRows, b.rows);
    const int64_t col = (int64_t)blockIdx.y * kSumThreads + threadIdx.x;
    const bool active = col < b.d;
    const int lane = threadIdx.x % kWarp;
    int64_t p = p0;
    while (p < p1) {
        const int32_t c = keys[p];
        if (c == sentinel) break;  // dropped rows sort last
        double acc = 0, sq = 0;
        // The class's reference row (place_rows wrote it for a class new in this batch).
        const double s = cs.shift && active ? (double)cs.shift[(int64_t)c * b.d + col] : 0.0;
        int64_t q = p;
        for (; q < p1 && keys[q] == c; ++q) {
            if (active) {
                const double v = load_feature(row_ptr(b, vals[q]), b.fdtype, col);
                acc += v;
                const double dv = v - s;
                sq += dv * dv;
            }
        }
        if (active) atomicAdd(&cs.sum[(int64_t)c * b.d + col], acc);
        sq = warp_sum(sq);
        if (lane == 0) atomicAdd(&cs.sqdev[c], sq);
        p = q;
    }
}

// One warp per sorted row: exact store / hold rows (slots are unique), and reservoir candidates.
__global__ void place_rows_kernel(DeviceBatch b, const int32_t* keys, const int32_t* vals, const int32_t* run_start,
                                  int32_t sentinel, const unsigned long long* count, RowSinks sk, const BatchStatus* st,
                                  int phase) {
    if (st->error) return;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const unsigned long long base = sk.store_count ? *sk.store_count : 0;
    for (int64_t p = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; p < b.rows; p += warps) {
        const int32_t c = keys[p];
        if (c == sentinel) return;  // sorted: the rest are dropped rows
        const int64_t i = (int64_t)count[c] + (p - run_start[p]);  // this row is the class's i-th
        const void* row = row_ptr(b, vals[p]);
        if (phase == 0) {
            if (sk.store && sk.store_raw16) {
                uint16_t* dst = static_cast<uint16_t*>(sk.store) + (size_t)(base + p) * b.d;
                const uint16_t* src = static_cast<const uint16_t*>(row);
                for (int64_t k = lane; k < b.d; k += kWarp) dst[k] = src[k];
                if (lane == 0) sk.store_labels[base + p] = c;
            } else if (sk.store) {
                float* dst = static_cast<float*>(sk.store) + (size_t)(base + p) * b.d;
                for (int64_t k = lane; k < b.d; k += kWarp) dst[k] = (float)load_feature(row, b.fdtype, k);
                if (lane == 0) sk.store_labels[base + p] = c;
            }
            if (sk.shift && i == 0) {  // as shift_value (core/shifted_sums.hpp): accepted rows are finite
                float* dst = sk.shift + (size_t)c * b.d;
                for (int64_t k = lane; k < b.d; k += kWarp) dst[k] = (float)load_feature(row, b.fdtype, k);
            }
            if (sk.hold && i < sk.hold_rows) {
                float* dst = sk.hold + ((size_t)c * sk.hold_rows + i) * b.d;
                for (int64_t k = lane; k < b.d; k += kWarp) dst[k] = (float)load_feature(row, b.fdtype, k);
            }
            if (sk.reservoir && lane == 0) {
                const int64_t slot = reservoir_slot(sk.seed, c, i, sk.cap);
                if (slot >= 0) atomicMax(&sk.winner[(size_t)c * sk.cap + slot], (long long)i);
            }
        } else if (sk.reservoir) {
            // Phase 1: the last row of the batch that chose a slot writes it (sequential semantics);
            // phase 2 resets the winners.
            const int64_t slot = reservoir_slot(sk.seed, c, i, sk.cap);
            if (slot < 0) continue;
            long long* w = &sk.winner[(size_t)c * sk.cap + slot];
            if (phase == 1 && *w == (long long)i) {
                float* dst = sk.reservoir + ((size_t)c * sk.cap + slot) * b.d;
                for (int64_t k = lane; k < b.d; k += kWarp) dst[k] = (float)load_feature(row, b.fdtype, k);
            }
            if (phase == 2 && lane == 0) *w = -1;
        }
    }
}

__global__ void count_update_kernel(const int32_t* keys, const int32_t* run_start, int64_t n, int32_t sentinel,
                                    unsigned long long* count, unsigned long long* store_count, int exact_store,
                                    const BatchStatus* st) {
    if (st->error) return;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < n; p += (int64_t)gridDim.x * blockDim.x) {
        const int32_t c = keys[p];
        if (c == sentinel) continue;
        const bool last = (p + 1 == n) || keys[p + 1] != c;
        if (last) atomicAdd(&count[c], (unsigned long long)(p - run_start[p] + 1));
    }
    if (exact_store && blockIdx.x == 0 && threadIdx.x == 0) {
        // Only one thread updates the store count; it is read by the next batch's kernels.
        *store_count += st->accepted;
    }
}

__global__ void gather_rows_kernel(DeviceBatch b, const int32_t* keys, const int32_t* vals, int32_t sentinel, float* x,
                                   const int32_t* kept_slot) {
    const int64_t total = b.rows * b.d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = e / b.d, k = e % b.d;
        const bool drop = keys[p] == sentinel || (kept_slot && kept_slot[keys[p]] < 0);
        x[e] = drop ? 0.0f : (float)load_feature(row_ptr(b, vals[p]), b.fdtype, k);
    }
}

__global__ void centered_rows_kernel(DeviceBatch b, const int32_t* keys, const int32_t* vals, int32_t sentinel, int64_t p0, int64_t m,
                                     const float* shift, const double* mean, const int32_t* kept_slot, const BatchStatus* st, double* x) {
    const int64_t total = m * b.d;
    const bool refused = st->error != 0;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = p0 + e / b.d, k = e % b.d;
        const int32_t c = keys[p];
        const int32_t slot = c == sentinel ? -1 : kept_slot ? kept_slot[c] : c;
        double v = 0;
        if (!refused && slot >= 0) {
            const double xv = load_feature(row_ptr(b, vals[p]), b.fdtype, k);
            // Less the reference row, as float32 like the hold area whose rows come out again
            // (cuda_metrics.cu, streamed_within); less the mean in float64.
            v = mean ? xv - mean[(int64_t)slot * b.d + k] : (double)(float)xv - (double)shift[(int64_t)c * b.d + k];
        }
        x[e] = v;
    }
}

__global__ void count_kept_kernel(const int32_t* keys, int64_t n, int32_t sentinel, const int32_t* kept_slot,
                                  unsigned long long* counter, const BatchStatus* st) {
    if (st->error) return;
    unsigned long long mine = 0;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < n; p += (int64_t)gridDim.x * blockDim.x)
        mine += (keys[p] != sentinel && kept_slot[keys[p]] >= 0) ? 1 : 0;
    if (mine) atomicAdd(counter, mine);
}

__global__ void add_gram_kernel(const float* g32, double* g64, int64_t n, const BatchStatus* st) {
    if (st->error) return;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        g64[e] += (double)g32[e];
}

int blocks_for(int64_t work, int threads, int cap = 65535) {
    const int64_t b = (work + threads - 1) / threads;
    return (int)std::max<int64_t>(1, std::min<int64_t>(b, cap));
}

}  // namespace

void launch_reset_status(BatchStatus* st, cudaStream_t s) {
    reset_status_kernel<<<1, 1, 0, s>>>(st);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_validate(const DeviceBatch& b, const IngestParams& p, int32_t* keys, int32_t* vals, BatchStatus* st, cudaStream_t s) {
    if (b.rows == 0) return;
    validate_kernel<<<blocks_for(b.rows * kWarp, 256), 256, 0, s>>>(b, p, keys, vals, st);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_finish_status(const DeviceBatch& b, BatchStatus* st, const unsigned long long* store_count,
                          unsigned long long store_capacity, cudaStream_t s) {
    finish_status_kernel<<<1, 1, 0, s>>>(b, st, store_count, store_capacity);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_run_heads(const int32_t* keys, int64_t n, int32_t* head, cudaStream_t s) {
    if (n == 0) return;
    run_heads_kernel<<<blocks_for(n, 256), 256, 0, s>>>(keys, n, head);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_class_sums(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, ClassState cs,
                       const BatchStatus* st, cudaStream_t s) {
    if (b.rows == 0) return;
    const dim3 grid((unsigned)((b.rows + kSumRows - 1) / kSumRows), (unsigned)((b.d + kSumThreads - 1) / kSumThreads));
    class_sums_kernel<<<grid, kSumThreads, 0, s>>>(b, keys, vals, sentinel, cs, st);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_place_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, const int32_t* run_start,
                       int32_t sentinel, const unsigned long long* count, RowSinks sinks, const BatchStatus* st,
                       cudaStream_t s) {
    if (b.rows == 0 || (!sinks.store && !sinks.hold && !sinks.reservoir && !sinks.shift)) return;
    const int grid = blocks_for(b.rows * kWarp, 256);
    place_rows_kernel<<<grid, 256, 0, s>>>(b, keys, vals, run_start, sentinel, count, sinks, st, 0);
    COLLAPSE_CUDA_CHECK_LAUNCH();
    if (sinks.reservoir) {
        place_rows_kernel<<<grid, 256, 0, s>>>(b, keys, vals, run_start, sentinel, count, sinks, st, 1);
        COLLAPSE_CUDA_CHECK_LAUNCH();
        place_rows_kernel<<<grid, 256, 0, s>>>(b, keys, vals, run_start, sentinel, count, sinks, st, 2);
        COLLAPSE_CUDA_CHECK_LAUNCH();
    }
}

void launch_count_update(const int32_t* keys, const int32_t* run_start, int64_t n, int32_t sentinel,
                         unsigned long long* count, unsigned long long* store_count, bool exact_store,
                         const BatchStatus* st, cudaStream_t s) {
    count_update_kernel<<<blocks_for(std::max<int64_t>(n, 1), 256), 256, 0, s>>>(keys, run_start, n, sentinel, count,
                                                                                 store_count, exact_store ? 1 : 0, st);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_gather_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, float* x,
                        cudaStream_t s, const int32_t* kept_slot) {
    if (b.rows == 0) return;
    gather_rows_kernel<<<blocks_for(b.rows * b.d, 256, 1 << 20), 256, 0, s>>>(b, keys, vals, sentinel, x, kept_slot);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_centered_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, int64_t p0, int64_t m,
                          const float* shift, const double* mean, const int32_t* kept_slot, const BatchStatus* st, double* x, cudaStream_t s) {
    if (m <= 0 || b.d == 0) return;
    centered_rows_kernel<<<blocks_for(m * b.d, 256, 1 << 20), 256, 0, s>>>(b, keys, vals, sentinel, p0, m, shift, mean, kept_slot, st, x);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_count_kept(const int32_t* keys, int64_t n, int32_t sentinel, const int32_t* kept_slot, unsigned long long* counter,
                       const BatchStatus* st, cudaStream_t s) {
    if (n == 0) return;
    count_kept_kernel<<<blocks_for(n, 256, 1024), 256, 0, s>>>(keys, n, sentinel, kept_slot, counter, st);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_add_gram(const float* g32, double* g64, int64_t n, const BatchStatus* st, cudaStream_t s) {
    add_gram_kernel<<<blocks_for(n, 256, 1 << 16), 256, 0, s>>>(g32, g64, n, st);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}


namespace {

// Window rows: batch row pairs[2i] (its feature row converted to float32 as the ingest converts it)
// into slot pairs[2i + 1] of the window store; kept[i] = the row's verdict (its key is a class and
// the batch was not refused).
__global__ void window_stash_kernel(DeviceBatch b, const int64_t* pairs, int64_t m, const int32_t* keys, int32_t sentinel,
                                    const BatchStatus* st, float* store, uint8_t* kept) {
    const int64_t cols = b.d > 0 ? b.d : 1;  // a verdict for every row, even of zero width
    const int64_t total = m * cols;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / cols, k = e % cols, r = pairs[2 * i];
        if (k < b.d) store[pairs[2 * i + 1] * b.d + k] = (float)load_feature(row_ptr(b, feature_row(b, r)), b.fdtype, k);
        if (k == 0) kept[i] = (!st->error && keys[r] != sentinel) ? 1 : 0;
    }
}

}  // namespace

void launch_window_stash(const DeviceBatch& b, const int64_t* pairs, int64_t m, const int32_t* keys, int32_t sentinel,
                         const BatchStatus* st, float* store, uint8_t* kept, cudaStream_t s) {
    if (m == 0) return;
    window_stash_kernel<<<blocks_for(m * std::max<int64_t>(b.d, 1), 256, 1 << 20), 256, 0, s>>>(b, pairs, m, keys, sentinel, st, store, kept);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

}  // namespace collapse::internal::cuda
