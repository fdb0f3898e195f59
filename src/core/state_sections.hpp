// A session's accumulated state as named arrays (after the session's own "meta"), in one layout
// for every backend, so that the state of either backend loads into or merges with the other. The
// backends convert from and to their own representation (src/cpu/cpu_checkpoint.cpp,
// cuda/cuda_checkpoint.cu); the arrays go through StateWriter / StateReader (core/state_io.hpp),
// which a checkpoint file implements (src/io/checkpoint_file.hpp).
//
//   rows             i64 [5]        rows seen, masked, excluded, non-finite, ignored (label = ignore_index);
//                                   a checkpoint written before ignore_index existed has the first
//                                   four only ([4]: it ignored no row) and loads as such
//   class_counts     i64 [V]        sum = seen - masked - excluded - non-finite - ignored; 0 for excluded ids
//   class_sums       f64 [V, d]
//   class_sqnorms    f64 [V]        sum of ||x||^2 per class
//   with the class metrics: within_shift, class_sqdev and (streamed) within_scatter, the sums
//                                   about each class's reference row (core/shifted_sums.hpp)
//   with a streamed overall Gram (compute_overall_metrics, no max_tokens_to_analyze):
//   gram             f64 [d, d]     row-major, upper triangle (the lower one is ignored): the rows of
//                                   classes that reached min_samples_per_token
//   holdback_ids     i64 [H]        the classes with 0 < count < min_samples_per_token, ascending
//   holdback_counts  i64 [H]        their rows (all of them: class_counts of the class)
//   holdback_rows    f64 [sum, d]   those rows, class after class, in arrival order
//   with a row store (svd_mode exact) or reservoirs (sampled):
//   store_offsets    i64 [V + 1]    class c's rows are store_rows[offsets[c], offsets[c + 1]);
//                                   offsets[0] = 0, ascending; exact: class_counts rows per class,
//                                   sampled: min(count, svd_max_rows_per_token)
//   store_rows       f64 [total, d] exact: every row in arrival order; sampled: reservoir slots 0..k-1
//
// Every value is checked before anything changes (read_state): a state whose checksums are
// valid but whose content is not (a crafted or buggy file) is refused naming the check.
#pragma once
#include <cstdint>
#include <string>

#include "core/config.hpp"
#include "core/metrics.hpp"
#include "core/row_store.hpp"
#include "core/state_io.hpp"

namespace collapse::internal {

// Pointers into the reader's arrays, every one checked against this session's V, d and
// configuration (read_state throws Error(COLLAPSE_ERR_IO) naming the section and the check).
struct StateView {
    Counts rows;  // the row counts of section rows
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
    StateSection store_section;  // to release its pages as they are taken in
};
// keeps_rows: the session has a row store (exact: reservoir_cap = 0, every counted row is in it) or
// reservoirs (reservoir_cap = svd_max_rows_per_token rows at most per class). cfg gives
// min_samples_per_token (the held-back classes) and exclude_token_ids.
StateView read_state(const StateReader& r, int64_t V, int64_t d, const Config& cfg, bool gram_streaming, bool keeps_rows,
                     int64_t reservoir_cap);

// The "rows" array alone (five, or four, non-negative counts, consistent among themselves), for the checks a
// session makes before it creates a backend; class_sums must be float64 [V, d], so that the
// backend a load creates is never larger than the state it loads.
Counts read_state_rows(const StateReader& r, int64_t V, int64_t d);

// The sections up to class_sqnorms, from host arrays.
void write_state_core(StateWriter& w, const Counts& rows, int64_t V, int64_t d, const int64_t* counts, const double* sums,
                      const double* sqnorms);

// store_offsets and store_rows from a row store (spilled rows read back under load_budget bytes).
void write_store(StateWriter& w, const RowStore& store, int64_t V, int64_t d, int64_t load_budget);

// The state's store rows appended to `store` (spilling as it needs), each checked finite as it is
// copied; if the disk refuses or a row is not finite, the store is rolled back to what it held and
// the error propagates.
void load_store(const StateReader& r, const StateView& v, RowStore& store, int64_t V, int64_t d);

// Two reservoirs of one class merged: every row (mine first) when both fit in `cap`, else a
// weighted sample without replacement (Efraimidis and Spirakis) of `cap` rows, where each kept row
// stands for seen / kept rows of its shard, keyed by a hash of (seed, class, shard, row) so that
// the result is reproducible. The picks depend on the counts alone: indices into mine's rows
// followed by theirs (at < kept_mine: mine's row at), in the merged order; MPI ranks decide the
// sample with them before any row moves (cpu_checkpoint.cpp, src/mpi/).
std::vector<int64_t> merge_reservoir_picks(uint64_t seed, int32_t c, int64_t cap, int64_t kept_mine, int64_t seen_mine, int64_t kept_theirs,
                                           int64_t seen_theirs);
RowVector merge_reservoirs(uint64_t seed, int32_t c, int64_t cap, int64_t d, const double* mine, int64_t kept_mine, int64_t seen_mine,
                           const double* theirs, int64_t kept_theirs, int64_t seen_theirs);

}  // namespace collapse::internal
