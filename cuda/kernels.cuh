// Launchers of the CUDA backend's kernels (bodies in ingest_kernels.cu and finalize_kernels.cu).
// Every launcher checks the launch; every kernel that changes accumulated state first reads the
// batch's status and does nothing when the batch was refused (a bad batch is a no-op).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "collapse/collapse.h"

namespace collapse::internal::cuda {

// A batch as the kernels see it (device pointers, element strides).
struct DeviceBatch {
    const void* features = nullptr;
    collapse_dtype fdtype = COLLAPSE_F32;
    int64_t fstride = 0;
    const void* labels = nullptr;
    collapse_dtype ldtype = COLLAPSE_I32;
    int64_t lstride = 0;
    const void* valid = nullptr;
    collapse_dtype vdtype = COLLAPSE_U8;
    int64_t vstride = 0;
    bool sequences = false;
    int64_t seq_len = 0;
    int64_t rows = 0;  // batch rows (after the shift for sequences)
    int64_t d = 0;
};

// Per-batch outcome, written on the device and read back asynchronously (pinned mirror).
struct BatchStatus {
    unsigned long long bad_label_row;   // smallest batch row with a label outside [0, V), or ~0
    long long bad_label_value;
    unsigned long long nonfinite_row;   // smallest batch row with a non-finite value (policy error), or ~0
    long long nonfinite_col;
    double nonfinite_value;
    unsigned long long masked, excluded, nonfinite_skipped, accepted;
    unsigned long long ignored;         // label = ignore_index (unmasked rows)
    int store_overflow;  // exact row store would exceed its capacity
    int error;           // nonzero: the batch is a no-op
};

struct IngestParams {
    int64_t V = 0;
    const uint8_t* excluded = nullptr;   // [V]
    int nonfinite_skip = 0;              // nonfinite_policy: skip_row
    int32_t sentinel = 0;                // key of dropped rows (= V)
    int use_ignore = 0;                  // ignore_index set: rows with that label are dropped and counted
    long long ignore_index = 0;
};

void launch_reset_status(BatchStatus* st, cudaStream_t s);
// One warp per row: mask, ignore_index, label range, exclusion, finiteness (in the order of
// src/core/batch.cpp accept_rows; 16-byte loads where rows are aligned) -> keys[r] (label or
// sentinel), vals[r] = feature row; the status counters merged once per block.
void launch_validate(const DeviceBatch& b, const IngestParams& p, int32_t* keys, int32_t* vals, BatchStatus* st, cudaStream_t s);
// Fills the row/value of the first error, checks the row store's capacity, sets st->error.
void launch_finish_status(const DeviceBatch& b, BatchStatus* st, const unsigned long long* store_count,
                          unsigned long long store_capacity, cudaStream_t s);

struct ClassState {
    double* sum;                       // [V, d]
    double* sqdev;                     // [V] sum of ||x - s_c||^2 (core/shifted_sums.hpp)
    unsigned long long* count;         // [V]
    const float* shift = nullptr;      // [V, d] reference rows s_c (null: the zero row)
};

// Sorted rows in chunks of 64 positions x 1024 columns; per run piece: fp64 register sums, then one
// read-modify-write of the class's sum slice: plain for a run within the chunk, atomicAdd for a run
// cut by a chunk boundary.
void launch_class_sums(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, ClassState cs,
                       const BatchStatus* st, cudaStream_t s);

struct RowSinks {
    // exact row store: rows appended in sorted order at *store_count, as float32, or with
    // store_raw16 as the batch's own 2-byte elements (float16/bfloat16 kept exactly)
    void* store = nullptr;
    bool store_raw16 = false;
    int32_t* store_labels = nullptr;
    unsigned long long* store_count = nullptr;
    // sampled reservoirs [V, cap, d] and the winner of each slot in this batch
    float* reservoir = nullptr;
    long long* winner = nullptr;       // [V, cap], -1 between batches
    int64_t cap = 0;
    uint64_t seed = 0;
    // the first (min_samples - 1) rows of every class, for the Gram correction
    float* hold = nullptr;
    int64_t hold_rows = 0;             // min_samples - 1
    // each class's reference row s_c [V, d]: its first row, written when the class has none yet
    float* shift = nullptr;
};

// Places rows into the row store / reservoirs / hold area / reference rows. Reads the class counts before this batch,
// so it runs before launch_count_update. Both find a sorted row's run start by binary search in keys.
void launch_place_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, const unsigned long long* count,
                       RowSinks sinks, const BatchStatus* st, cudaStream_t s);
void launch_count_update(const int32_t* keys, int64_t n, int32_t sentinel, unsigned long long* count, unsigned long long* store_count,
                         bool exact_store, const BatchStatus* st, cudaStream_t s);

// Accepted rows (sorted order) converted to float into x [n, d]; dropped rows become zero rows, and
// so do rows of classes outside the kept set when kept_slot ([V], -1 = not kept) is given.
void launch_gather_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, float* x,
                        cudaStream_t s, const int32_t* kept_slot = nullptr);
// Adds the number of rows of kept classes to *counter, unless the batch was refused.
void launch_count_kept(const int32_t* keys, int64_t n, int32_t sentinel, const int32_t* kept_slot, unsigned long long* counter,
                       const BatchStatus* st, cudaStream_t s);
// Sigma_W's rows: x [m, d] (float64) = sorted rows p0 .. p0 + m - 1 less their class's reference row
// shift[c] (float32 [V, d]) or, with kept_slot, their kept class's mean[kept_slot[c]] (float64 [K, d]);
// zero rows for dropped rows, classes outside kept_slot, and every row of a refused batch (so that
// a cublasDsyrk of x into the accumulator adds nothing then).
void launch_centered_rows(const DeviceBatch& b, const int32_t* keys, const int32_t* vals, int32_t sentinel, int64_t p0, int64_t m,
                          const float* shift, const double* mean, const int32_t* kept_slot, const BatchStatus* st, double* x, cudaStream_t s);
// acc64 += acc32 (d*d), unless the batch was refused.
void launch_add_gram(const float* g32, double* g64, int64_t n, const BatchStatus* st, cudaStream_t s);

// Generation-time windows: batch rows pairs[2i] -> window store slots pairs[2i + 1] (float32 [*, d]),
// kept[i] = 1 when the ingest kept the row (keys from launch_validate; 0 for every row of a refused batch).
void launch_window_stash(const DeviceBatch& b, const int64_t* pairs, int64_t m, const int32_t* keys, int32_t sentinel,
                         const BatchStatus* st, float* store, uint8_t* kept, cudaStream_t s);
// Window w's rows store[slots[w W + i]] (slots null: rows w W .. w W + W - 1 of store) centred on
// their float64 mean: x [windows, W, d] (float64).
void launch_window_center(const float* store, const int64_t* slots, int64_t windows, int64_t W, int64_t d, double* x, cudaStream_t s);
// out [rows, d] = store[slots[r]] (float32 rows copied).
void launch_window_gather(const float* store, const int64_t* slots, int64_t rows, int64_t d, float* out, cudaStream_t s);

// ---- finalisation ----
// For kept slot s (class ids[s]): mu [K, d], var [K], weight[s] (1 or n_c).
// var from the sums of squares about the reference rows shift [V, d] (null: the zero row).
void launch_means(const double* sum, const double* sqdev, const float* shift, const unsigned long long* count, const int32_t* ids, int64_t K,
                  int64_t d, bool token_weighted, double* mu, double* var, double* weight, cudaStream_t s);
// Sigma_W's scatter from the streamed one (core/shifted_sums.hpp): x [m, d] = the held rows
// hold[index[i]] (index = c * hold_rows + r) less shift[c], and e [K, d] = (S_c - n_c s_c) / sqrt(n_c)
// for the kept classes ids (unshift_scatter's rows); both subtracted by cublasDsyrk.
void launch_held_shifted_rows(const float* hold, const int32_t* index, int64_t m, int64_t hold_rows, int64_t d, const float* shift,
                              double* x, cudaStream_t s);
void launch_unshift_rows(const double* sum, const float* shift, const unsigned long long* count, const int32_t* ids, int64_t K, int64_t d,
                         double* e, cudaStream_t s);
// out[j] = sum_s w[s] * x[s, j] (w may be null: all ones), column by column, in a fixed order.
void launch_column_sums(const double* x, const double* w, int64_t K, int64_t d, double* out, cudaStream_t s);
// m = mu - mu_g / total_weight; q = ||m||^2; a = ||m|| + 1e-8.
void launch_center(const double* mu, const double* mu_g_sum, double total_weight, int64_t K, int64_t d, double* m,
                   double* q, double* a, cudaStream_t s);
// Pair terms of one GEMM tile g (column-major ni x nj, g[i + j*ni] = m_{i0+i} . m_{j0+j}; the
// centred means m [K, d] for the pairs whose expanded distances would cancel), reduced
// per block and merged into that block's slot acc[block * kPairFields + f] = {log-kernel moments
// (n, mean, m2), cosine moments (n, mean, m2), cdnv count, cdnv sum, skipped log pairs, skipped
// cdnv pairs, anchor distance moments (n, mean, m2), sum and maximum of |u_i . u_j + 1/(K-1)|};
// slots start at zero, tiles run one after another, the host merges the slots in order.
constexpr int kPairFields = 15;
constexpr int kPairBlocks = 264;
void launch_pair_reduce(const double* g, int64_t i0, int64_t j0, int64_t ni, int64_t nj, const double* m, int64_t d, const double* q,
                        const double* a, const double* var, double cdnv_power, double inv_km1, double* acc, cudaStream_t s);

// Per kept class: wm[s] = w_c . m_s, ww[s] = ||w_c||^2 (w from W rows ids[s], or from mu when W is null).
void launch_duality(const double* W, const double* mu, const int32_t* ids, const double* m, int64_t K, int64_t d,
                    double* wm, double* ww, cudaStream_t s);
// out[s] = sum_j (w/wf - m/mf)^2 for NC3.
void launch_self_duality(const double* W, const double* mu, const int32_t* ids, const double* m, int64_t K, int64_t d,
                         double wf, double mf, double* out, cudaStream_t s);

// NC4 for a block of rows: logits [rows, V] (column-major V x rows), dots [rows, K]; agreement count added.
// Rows whose key (row_keys, may be null) is the sentinel or not kept are skipped, and so is
// everything when the batch was refused (st may be null). With slot_rows (and row_keys), each
// counted row adds 1 to slot_rows[its kept slot] and, when it agrees, to slot_hits[slot].
void launch_nc4_compare(const double* logits, const double* bias, int64_t V, const double* dots, const double* mu_sq,
                        const int32_t* ids, int64_t K, int64_t rows, unsigned long long* agree, cudaStream_t s,
                        const int32_t* row_keys = nullptr, const int32_t* kept_slot = nullptr, const BatchStatus* st = nullptr,
                        unsigned long long* slot_hits = nullptr, unsigned long long* slot_rows = nullptr);
// float rows (gathered by index) -> double [rows, d]
void launch_rows_to_double(const float* src, const int32_t* index, int64_t rows, int64_t d, const double* center,
                           double* dst, cudaStream_t s);

// Per-class Gram of the smaller side into a padded batch [count, M, M] (column-major, zero padded).
// Class t has rows index[offset[t] .. offset[t] + n[t]) of `rows` (float [*, d]), minus center[t] if given;
// index null: rows offset[t] .. offset[t] + n[t].
void launch_class_gram(const float* rows, const int32_t* index, const int64_t* offset, const int64_t* n,
                       const int32_t* center_slot, const double* mu, int64_t count, int64_t d, int64_t M, double* gram,
                       cudaStream_t s);

}  // namespace collapse::internal::cuda
