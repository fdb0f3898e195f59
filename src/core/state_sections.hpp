// A session's accumulated state as checkpoint sections (after the session's own "meta"), in one
// layout for every backend, so that a checkpoint of either backend loads into or merges with the
// other. The backends convert from and to their own representation (src/cpu/cpu_checkpoint.cpp,
// cuda/cuda_checkpoint.cu).
//
//   rows             i64 [4]        rows seen, masked, excluded, non-finite
//   class_counts     i64 [V]
//   class_sums       f64 [V, d]
//   class_sqnorms    f64 [V]        sum of ||x||^2 per class
//   with a streamed overall Gram (compute_overall_metrics, no max_tokens_to_analyze):
//   gram             f64 [d, d]     row-major, upper triangle (the lower one is ignored): the rows of
//                                   classes that reached min_samples_per_token
//   holdback_ids     i64 [H]        classes still below min_samples_per_token, ascending
//   holdback_counts  i64 [H]        their rows (all of them)
//   holdback_rows    f64 [sum, d]   those rows, class after class, in arrival order
//   with a row store (svd_mode exact) or reservoirs (sampled):
//   store_offsets    i64 [V + 1]    class c's rows are store_rows[offsets[c], offsets[c + 1])
//   store_rows       f64 [total, d] exact: every row in arrival order; sampled: reservoir slots 0..k-1
#pragma once
#include <cstdint>
#include <string>

#include "core/metrics.hpp"
#include "core/row_store.hpp"
#include "io/checkpoint_file.hpp"

namespace collapse::internal {

// Pointers into a checkpoint's mapping, every section checked against this session's V, d and
// configuration (read_state throws Error(COLLAPSE_ERR_IO) naming the section and the difference).
struct StateView {
    const int64_t* rows = nullptr;
    const int64_t* counts = nullptr;
    const double* sums = nullptr;
    const double* sqnorms = nullptr;
    const double* gram = nullptr;
    int64_t holdback_classes = 0;
    const int64_t* holdback_ids = nullptr;
    const int64_t* holdback_counts = nullptr;
    const double* holdback_rows = nullptr;
    int64_t holdback_total = 0;
    const int64_t* store_offsets = nullptr;
    const double* store_rows = nullptr;
    io::CheckpointSection store_section;  // to release its pages as they are taken in
};
// keeps_rows: the session has a row store (exact: reservoir_cap = 0, every counted row is in it) or
// reservoirs (reservoir_cap = svd_max_rows_per_token rows at most per class).
StateView read_state(const io::CheckpointReader& r, int64_t V, int64_t d, bool gram_streaming, bool keeps_rows, int64_t reservoir_cap);

// The sections up to class_sqnorms, from host arrays.
void write_state_core(io::CheckpointWriter& w, const Counts& rows, int64_t V, int64_t d, const int64_t* counts, const double* sums,
                      const double* sqnorms);

// store_offsets and store_rows from a row store (spilled rows read back under load_budget bytes).
void write_store(io::CheckpointWriter& w, const RowStore& store, int64_t V, int64_t d, int64_t load_budget);

// The checkpoint's store rows appended to `store` (spilling as it needs); if the disk refuses, the
// store is rolled back to what it held and the error propagates.
void load_store(const io::CheckpointReader& r, const StateView& v, RowStore& store, int64_t V, int64_t d);

// Two reservoirs of one class merged: a weighted sample without replacement (Efraimidis and
// Spirakis) of at most `cap` rows, where each kept row stands for seen / kept rows of its shard,
// keyed by a hash of (seed, class, shard, row) so that the result is reproducible.
RowVector merge_reservoirs(uint64_t seed, int32_t c, int64_t cap, int64_t d, const double* mine, int64_t kept_mine, int64_t seen_mine,
                           const double* theirs, int64_t kept_theirs, int64_t seen_theirs);

}  // namespace collapse::internal
