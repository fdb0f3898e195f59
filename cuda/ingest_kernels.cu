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

// Whether a batch's feature rows start on 16-byte boundaries (base pointer and row pitch), so that
// a row can be read with 16-byte vector loads.
__device__ __forceinline__ bool rows_aligned16(const DeviceBatch& b) {
    return (((uintptr_t)b.features | (uintptr_t)(b.fstride * (int64_t)dtype_size(b.fdtype))) & 15u) == 0;
}

// True when a 16-byte word of features holds a value that is not finite or (float64) beyond the
// float32 range: on the bits for the 2- and 4-byte types (all-ones exponent), as load_feature's
// !(|v| <= FLT_MAX) decides for them.
__device__ __forceinline__ bool word_bad(const uint4& w, collapse_dtype t) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
    bool bad = false;
    if (t == COLLAPSE_F16 || t == COLLAPSE_BF16) {
        const uint32_t m = t == COLLAPSE_F16 ? 0x7C00u : 0x7F80u;
#pragma unroll
        for (int i = 0; i < 4; ++i) bad |= ((u[i] & m) == m) | (((u[i] >> 16) & m) == m);
    } else if (t == COLLAPSE_F32) {
#pragma unroll
        for (int i = 0; i < 4; ++i) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
    } else {  // float64
        double v[2];
        memcpy(v, &w, 16);
        bad = !(fabs(v[0]) <= (double)FLT_MAX) || !(fabs(v[1]) <= (double)FLT_MAX);
    }
    return bad;
}

// This lane's share of the finiteness scan of one row (the warp ORs the lanes): 16-byte loads,
// four in flight per lane, when the rows are aligned; element loads for the tail and otherwise.
__device__ __forceinline__ bool lane_row_bad(const DeviceBatch& b, const void* row, bool aligned, int lane) {
    bool bad = false;
    int64_t k0 = 0;  // first element left to the element loads
    if (aligned) {
        const int64_t esz = (int64_t)dtype_size(b.fdtype), words = b.d * esz / 16;
        const uint4* w = static_cast<const uint4*>(row);
        int64_t v = lane;
        for (; v + 3 * kWarp < words; v += 4 * kWarp) {
            const uint4 a0 = __ldg(w + v), a1 = __ldg(w + v + kWarp), a2 = __ldg(w + v + 2 * kWarp), a3 = __ldg(w + v + 3 * kWarp);
            bad |= word_bad(a0, b.fdtype) | word_bad(a1, b.fdtype) | word_bad(a2, b.fdtype) | word_bad(a3, b.fdtype);
        }
        for (; v < words; v += kWarp) bad |= word_bad(__ldg(w + v), b.fdtype);
        k0 = words * 16 / esz;
    }
    for (int64_t k = k0 + lane; k < b.d; k += kWarp) bad |= !(fabs(load_feature(row, b.fdtype, k)) <= (double)FLT_MAX);
    return bad;
}

// Counters of one validate block, in shared memory: merged into the status with one atomic per
// counter and block (not one per row: 16384 same-address atomics per batch serialised in L2).
struct BlockCounts {
    unsigned long long masked, ignored, excluded, nonfinite_skipped, accepted, bad_label_row, nonfinite_row;
};

__global__ void validate_kernel(DeviceBatch b, IngestParams p, int32_t* keys, int32_t* vals, BatchStatus* st) {
    __shared__ BlockCounts bc;
    if (threadIdx.x == 0) bc = BlockCounts{0, 0, 0, 0, 0, ULLONG_MAX, ULLONG_MAX};
    __syncthreads();
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const bool aligned = rows_aligned16(b);
    // Lane 0's tallies of this warp's rows (every branch below is uniform over the warp).
    unsigned long long masked = 0, ignored = 0, excluded = 0, skipped = 0, accepted = 0;
    unsigned long long bad_label = ULLONG_MAX, nonfinite = ULLONG_MAX;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; r < b.rows; r += warps) {
        int32_t key = p.sentinel;
        const bool valid = !b.valid || load_int(b.valid, b.vdtype, label_element(b, r, b.vstride)) != 0;
        const int64_t y = valid ? load_int(b.labels, b.ldtype, label_element(b, r, b.lstride)) : 0;
        const int64_t fr = feature_row(b, r);
        if (!valid) {
            ++masked;
        } else if (p.use_ignore && y == p.ignore_index) {
            ++ignored;
        } else if (y < 0 || y >= p.V) {
            bad_label = min(bad_label, (unsigned long long)r);
        } else if (p.excluded[y]) {
            ++excluded;
        } else if (__any_sync(0xffffffffu, lane_row_bad(b, row_ptr(b, fr), aligned, lane))) {
            // Not finite, or (float64 input) beyond the float32 range the rows are kept in.
            if (p.nonfinite_skip) ++skipped;
            else nonfinite = min(nonfinite, (unsigned long long)r);
        } else {
            key = (int32_t)y;
            ++accepted;
        }
        if (lane == 0) {
            keys[r] = key;
            vals[r] = (int32_t)fr;
        }
    }
    if (lane == 0) {
        if (masked) atomicAdd(&bc.masked, masked);
        if (ignored) atomicAdd(&bc.ignored, ignored);
        if (excluded) atomicAdd(&bc.excluded, excluded);
        if (skipped) atomicAdd(&bc.nonfinite_skipped, skipped);
        if (accepted) atomicAdd(&bc.accepted, accepted);
        if (bad_label != ULLONG_MAX) atomicMin(&bc.bad_label_row, bad_label);
        if (nonfinite != ULLONG_MAX) atomicMin(&bc.nonfinite_row, nonfinite);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (bc.masked) atomicAdd(&st->masked, bc.masked);
        if (bc.ignored) atomicAdd(&st->ignored, bc.ignored);
        if (bc.excluded) atomicAdd(&st->excluded, bc.excluded);
        if (bc.nonfinite_skipped) atomicAdd(&st->nonfinite_skipped, bc.nonfinite_skipped);
        if (bc.accepted) atomicAdd(&st->accepted, bc.accepted);
        if (bc.bad_label_row != ULLONG_MAX) atomicMin(&st->bad_label_row, bc.bad_label_row);
        if (bc.nonfinite_row != ULLONG_MAX) atomicMin(&st->nonfinite_row, bc.nonfinite_row);
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

// Where the run of equal keys holding sorted position p begins: a binary search of the sorted keys
// (about log2(n) cached loads), in place of a run-head pass and a max-scan per batch.
__device__ __forceinline__ int64_t run_begin(const int32_t* keys, int64_t p) {
    const int32_t c = keys[p];
    int64_t lo = 0, hi = p;  // the first position with key c is in [lo, hi]
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < c) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Class sums: a block owns kSumRows sorted positions and kSumCols columns, kSumCols / kSumThreads
// = 8 per thread (one 16-byte load of fp16/bf16). Per class run piece of the block: float64 sums in
// registers, then one read-modify-write of the piece's slice of the class's sum row. A run that lies
// wholly within the block's positions (most runs: Zipf batches are mostly 1-4 row classes) belongs to
// this block alone, so its slice is updated with plain vector loads and stores; only a run cut by a
// block boundary takes atomicAdd. sqdev gets one warp-summed atomicAdd per warp and piece.
constexpr int kSumThreads = 128;
constexpr int kSumPer = 8;
constexpr int kSumCols = kSumThreads * kSumPer;
constexpr int kSumRows = 64;

// v[0..7] = the row's elements col0 .. col0 + 7 (0 past d): one 16-byte (fp16/bf16) or two/four
// (f32/f64) vector loads when the rows are 16-byte aligned and all 8 are in range.
template <collapse_dtype t>
__device__ __forceinline__ void load8(const void* row, int64_t col0, int64_t d, bool aligned, double (&v)[kSumPer]) {
    if (aligned && col0 + kSumPer <= d) {
        if constexpr (t == COLLAPSE_F16 || t == COLLAPSE_BF16) {
            const uint4 w = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + col0));
            const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint16_t lo = (uint16_t)(u[i] & 0xFFFFu), hi = (uint16_t)(u[i] >> 16);
                v[2 * i] = (double)(t == COLLAPSE_F16 ? half_to_float(lo) : bf16_to_float(lo));
                v[2 * i + 1] = (double)(t == COLLAPSE_F16 ? half_to_float(hi) : bf16_to_float(hi));
            }
            return;
        }
        if constexpr (t == COLLAPSE_F32) {
            const float4* f = reinterpret_cast<const float4*>(static_cast<const float*>(row) + col0);
            const float4 a = __ldg(f), c = __ldg(f + 1);
            v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = c.x, v[5] = c.y, v[6] = c.z, v[7] = c.w;
            return;
        }
        if constexpr (t == COLLAPSE_F64) {
            const double2* f = reinterpret_cast<const double2*>(static_cast<const double*>(row) + col0);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const double2 a = __ldg(f + i);
                v[2 * i] = a.x, v[2 * i + 1] = a.y;
            }
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < kSumPer; ++i) v[i] = col0 + i < d ? load_feature(row, t, col0 + i) : 0.0;
}

// One instance per feature dtype (t = b.fdtype): the loads and conversions compile to one path.
template <collapse_dtype t>
__global__ void class_sums_kernel(DeviceBatch b, const int32_t* keys, const int32_t* vals, int32_t sentinel, ClassState cs,
                                  const BatchStatus* st) {
    if (st->error) return;
    __shared__ int32_t s_key[kSumRows], s_val[kSumRows];
    const int64_t p0 = (int64_t)blockIdx.x * kSumRows;
    const int m = (int)min((int64_t)kSumRows, b.rows - p0);
    for (int j = threadIdx.x; j < m; j += blockDim.x) s_key[j] = keys[p0 + j], s_val[j] = vals[p0 + j];
    // The keys just outside the block: a run reaching past either end is shared with a neighbour.
    const int32_t before = p0 > 0 ? keys[p0 - 1] : -1, after = p0 + m < b.rows ? keys[p0 + m] : -1;
    __syncthreads();
    const int64_t col0 = (int64_t)blockIdx.y * kSumCols + (int64_t)threadIdx.x * kSumPer;
    const bool active = col0 < b.d;
    const int n_here = active ? (int)min((int64_t)kSumPer, b.d - col0) : 0;
    const bool aligned = rows_aligned16(b);
    // Slices of sum (float64) and shift (float32) rows at col0 are 16-byte aligned when d is even / a
    // multiple of 4 (cudaMalloc'ed bases).
    const bool sum_vec = n_here == kSumPer && b.d % 2 == 0, shift_vec = n_here == kSumPer && b.d % 4 == 0;
    const int lane = threadIdx.x % kWarp;
    int j = 0;
    while (j < m) {
        const int32_t c = s_key[j];
        if (c == sentinel) break;  // dropped rows sort last
        int q = j + 1;
        while (q < m && s_key[q] == c) ++q;
        const bool owned = (j > 0 || before != c) && (q < m || after != c);
        double acc[kSumPer] = {}, sq = 0;
        float sh[kSumPer] = {};
        if (active) {
            double* srow = cs.sum + (int64_t)c * b.d + col0;
            const bool vec = owned && sum_vec;
            // An owned slice is read before the rows, so that its load overlaps theirs.
            double2 old[kSumPer / 2];
            if (vec)
#pragma unroll
                for (int i = 0; i < kSumPer / 2; ++i) old[i] = reinterpret_cast<const double2*>(srow)[i];
            // The class's reference row (place_rows wrote it for a class new in this batch).
            if (cs.shift) {
                const float* hrow = cs.shift + (int64_t)c * b.d + col0;
                if (shift_vec) {
                    const float4 a = reinterpret_cast<const float4*>(hrow)[0], e = reinterpret_cast<const float4*>(hrow)[1];
                    sh[0] = a.x, sh[1] = a.y, sh[2] = a.z, sh[3] = a.w, sh[4] = e.x, sh[5] = e.y, sh[6] = e.z, sh[7] = e.w;
                } else {
#pragma unroll
                    for (int i = 0; i < kSumPer; ++i)  // constant indices keep the arrays in registers
                        if (i < n_here) sh[i] = hrow[i];
                }
            }
            for (int r = j; r < q; ++r) {
                double v[kSumPer];
                load8<t>(row_ptr(b, s_val[r]), col0, b.d, aligned, v);
#pragma unroll
                for (int i = 0; i < kSumPer; ++i) {
                    acc[i] += v[i];
                    const double dv = v[i] - (double)sh[i];  // 0 past d: both are 0 there
                    sq += dv * dv;
                }
            }
            if (vec) {
#pragma unroll
                for (int i = 0; i < kSumPer / 2; ++i)
                    reinterpret_cast<double2*>(srow)[i] = make_double2(old[i].x + acc[2 * i], old[i].y + acc[2 * i + 1]);
            } else {
#pragma unroll
                for (int i = 0; i < kSumPer; ++i) {
                    if (i >= n_here) continue;
                    if (owned) srow[i] += acc[i];
                    else atomicAdd(srow + i, acc[i]);
                }
            }
        }
        sq = warp_sum(sq);
        if (lane == 0 && sq != 0.0) atomicAdd(&cs.sqdev[c], sq);
        j = q;
    }
}

// One warp per sorted row: exact store / hold rows (slots are unique), and reservoir candidates.
__global__ void place_rows_kernel(DeviceBatch b, const int32_t* keys, const int32_t* vals, int32_t sentinel,
                                  const unsigned long long* count, RowSinks sk, const BatchStatus* st, int phase) {
    if (st->error) return;
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const unsigned long long base = sk.store_count ? *sk.store_count : 0;
    for (int64_t p = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; p < b.rows; p += warps) {
        const int32_t c = keys[p];
        if (c == sentinel) return;  // sorted: the rest are dropped rows
        // This row is the class's i-th; needed for the hold area, the reservoirs, and the reference
        // row of a class new in this batch (the search is skipped for every other row).
        const unsigned long long seen = count[c];
        const bool need_i = sk.hold || sk.reservoir || (sk.shift && seen == 0);
        const int64_t i = need_i ? (int64_t)seen + (p - run_begin(keys, p)) : -1;
        const void* row = row_ptr(b, vals[p]);
        if (phase == 0) {
            if (sk.store && sk.store_raw16) {
                uint16_t* dst = static_cast<uint16_t*>(sk.store) + (size_t)(base + p) * b.d;
                const uint16_t* src = static_cast<const uint16_t*>(row);
                int64_t k0 = 0;
                if (b.d % 8 == 0 && rows_aligned16(b)) {  // both rows 16-byte aligned: 8 elements a load
                    for (int64_t w = lane; w < b.d / 8; w += kWarp)
                        reinterpret_cast<uint4*>(dst)[w] = __ldg(reinterpret_cast<const uint4*>(src) + w);
                    k0 = b.d;
                }
                for (int64_t k = k0 + lane; k < b.d; k += kWarp) dst[k] = src[k];
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

__global__ void count_update_kernel(const int32_t* keys, int64_t n, int32_t sentinel,
                                    unsigned long long* count, unsigned long long* store_count, int exact_store,
                                    const BatchStatus* st) {
    if (st->error) return;
    for (int64_t p = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; p < n; p += (int64_t)gridDim.x * blockDim.x) {
        const int32_t c = keys[p];
        if (c == sentinel) continue;
        const bool last = (p + 1 == n) || keys[p + 1] != c;
        if (last) atomicAdd(&count[c], (unsigned long long)(p - run_begin(keys, p) + 1));
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

void launch_class_sums(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, ClassState cs,
                       const BatchStatus* st, cudaStream_t s) {
    if (b.rows == 0) return;
    const dim3 grid((unsigned)((b.rows + kSumRows - 1) / kSumRows), (unsigned)((b.d + kSumCols - 1) / kSumCols));
    switch (b.fdtype) {
        case COLLAPSE_F16: class_sums_kernel<COLLAPSE_F16><<<grid, kSumThreads, 0, s>>>(b, keys, vals, sentinel, cs, st); break;
        case COLLAPSE_BF16: class_sums_kernel<COLLAPSE_BF16><<<grid, kSumThreads, 0, s>>>(b, keys, vals, sentinel, cs, st); break;
        case COLLAPSE_F32: class_sums_kernel<COLLAPSE_F32><<<grid, kSumThreads, 0, s>>>(b, keys, vals, sentinel, cs, st); break;
        default: /* float64: batch.cpp admits only the four float dtypes */ class_sums_kernel<COLLAPSE_F64><<<grid, kSumThreads, 0, s>>>(b, keys, vals, sentinel, cs, st); break;
    }
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

void launch_place_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, const unsigned long long* count,
                       RowSinks sinks, const BatchStatus* st, cudaStream_t s) {
    if (b.rows == 0 || (!sinks.store && !sinks.hold && !sinks.reservoir && !sinks.shift)) return;
    const int grid = blocks_for(b.rows * kWarp, 256);
    place_rows_kernel<<<grid, 256, 0, s>>>(b, keys, vals, sentinel, count, sinks, st, 0);
    COLLAPSE_CUDA_CHECK_LAUNCH();
    if (sinks.reservoir) {
        place_rows_kernel<<<grid, 256, 0, s>>>(b, keys, vals, sentinel, count, sinks, st, 1);
        COLLAPSE_CUDA_CHECK_LAUNCH();
        place_rows_kernel<<<grid, 256, 0, s>>>(b, keys, vals, sentinel, count, sinks, st, 2);
        COLLAPSE_CUDA_CHECK_LAUNCH();
    }
}

void launch_count_update(const int32_t* keys, int64_t n, int32_t sentinel, unsigned long long* count, unsigned long long* store_count,
                         bool exact_store, const BatchStatus* st, cudaStream_t s) {
    count_update_kernel<<<blocks_for(std::max<int64_t>(n, 1), 256), 256, 0, s>>>(keys, n, sentinel, count,
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
