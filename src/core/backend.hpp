// The one interface both backends implement. The CPU backend (src/cpu/) is the reference; the
// CUDA backend (cuda/) must give the same numbers (docs/METRICS.md, "Accuracy contract").
//
// Where each metric is computed:
//   counts, kept-class selection, report assembly  -> src/core/session.cpp, src/report/report.cpp
//   per-class sums, Gram, row store, reservoirs    -> <backend>::ingest
//   pair metrics, UNC3, NC3, NC4, SVD entropies    -> <backend>::compute (CPU: src/cpu/cpu_metrics.cpp)
//   anchor metrics (Sigma_W, d x d products)       -> ingest (Sigma_W's shifted scatter) and compute, finished by
//                                                     core/metric_summary.cpp finish_anchor_metrics
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "base/error.hpp"
#include "core/batch.hpp"
#include "core/config.hpp"
#include "core/metrics.hpp"
#include "core/state_io.hpp"

namespace collapse::internal {

// Kept classes (docs/METRICS.md, "Inputs and notation"): ids ascending, their counts, and a V-long lookup (slot or -1).
struct KeptSet {
    std::vector<int32_t> ids;
    std::vector<int64_t> counts;
    std::vector<int32_t> slot;  // [V]
    int64_t rows = 0;
};

// Classifier W [V, d] and bias [V] (empty: none), in double on the host.
struct Classifier {
    std::vector<double> weight;
    std::vector<double> bias;
    bool present() const { return !weight.empty(); }
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual const char* name() const = 0;

    // First pass. Validates the whole batch before changing anything; on error throws and leaves the
    // state as it was. `stream` is the caller's CUDA stream (NULL: the backend's own); the CPU
    // backend ignores it. A device-side error may surface at a later call (see sync()).
    virtual void ingest(const BatchDesc& batch, void* stream) = 0;
    // Row counts (rows_seen, rows_masked, rows_ignored, rows_excluded, rows_nonfinite) so far.
    virtual Counts row_counts() = 0;
    // n_c for every class, on the host.
    virtual std::vector<int64_t> class_counts() = 0;
    // Waits for outstanding work and throws a deferred error. A no-op on the CPU.
    virtual void sync() {}

    // What the backend can answer without seeing the rows again.
    virtual bool has_row_store() const = 0;
    // NC4 comes from rows the backend holds at compute(), so the second pass is not needed for it:
    // the exact row store on the CPU; on CUDA, while every row is still in the device row buffer.
    virtual bool nc4_from_rows() const { return has_row_store(); }

    // Second pass (NC4, or the Gram of a kept set only known at the end).
    virtual void begin_second_pass(const KeptSet& kept, const Classifier& clf, bool nc4, bool gram) = 0;
    virtual void ingest_second_pass(const BatchDesc& batch, void* stream) = 0;

    // Every metric of the kept set. May be called more than once (intermediate saves).
    virtual MetricValues compute(const KeptSet& kept, const Classifier& clf) = 0;

    // --- Generation-time windows (core/windows.hpp decides which rows form which window; the
    // backend holds their rows in a store of float32 slots and computes the entropies). ---
    virtual bool supports_windows() const { return false; }
    // Per batch row, 1 when the last first-pass batch kept the row (mask, ignore_index, excluded
    // ids, non-finite skip): true when the backend knows at once (CPU); false when the verdicts
    // come later through window_verdicts (CUDA: they are only known on the device).
    virtual bool last_batch_kept(std::vector<uint8_t>& kept) { return false; }
    // Verdicts of stashed rows that became known since the last call (slot, kept).
    virtual void window_verdicts(std::vector<int64_t>& slots, std::vector<uint8_t>& kept) {}
    // Bytes the store takes for `capacity` slots (the session counts them before a batch).
    virtual int64_t window_store_bytes(int64_t capacity) const { return 0; }
    // Copies batch row r's features (as float32) to slot[r] where slot[r] >= 0, the store grown to
    // `capacity` slots; ordered after the batch's ingest on `stream` (no host sync).
    virtual void window_stash(const BatchDesc& batch, const int64_t* slot, int64_t capacity, void* stream) { windows_unsupported(); }
    // Host rows [n, d] into / out of slots (checkpoints).
    virtual void window_put(const int64_t* slots, int64_t n, const float* rows, int64_t capacity) { windows_unsupported(); }
    virtual void window_get(const int64_t* slots, int64_t n, float* rows) { windows_unsupported(); }
    // Entropies of windows (slots[i W .. (i + 1) W) = window i, rows in window order).
    // window_reduce may run asynchronously; its entropies come back, in call order, from
    // window_results (which waits for them). window_evaluate answers at once and keeps nothing.
    virtual void window_reduce(const int64_t* slots, int64_t windows, int64_t W) { windows_unsupported(); }
    virtual std::vector<double> window_results() { return {}; }
    virtual std::vector<double> window_evaluate(const int64_t* slots, int64_t windows, int64_t W) {
        windows_unsupported();
    }
    [[noreturn]] void windows_unsupported() const {
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "window metrics are not implemented on the ", name(), " backend yet");
    }

    // The accumulated state as the arrays of core/state_sections.hpp (the session writes its own
    // meta): load replaces the state, merge adds another shard's; both check everything first.
    virtual void save_state(StateWriter& w) = 0;
    virtual void load_state(const StateReader& r, bool merge) = 0;

    // The global mean [d] of an out-of-distribution input for nc5_ood_dev (docs/METRICS.md, "Anchor
    // metrics"); empty: none. The session sets it before compute.
    std::vector<double> ood_mean;

    // --- Ranks (src/mpi/): a rank whose first-pass state went to the root runs its second pass on
    // its own rows with the combined class counts and sums (so its kept set and means are the
    // root's); the second pass's partial results (rows seen, NC4 agreements, the kept Gram) then go
    // to the root and are added there. ---
    // The root writes its combined class_counts and class_sums sections (core/state_sections.hpp)
    // and every other rank adopts them.
    virtual void write_class_sums(StateWriter& w) { ranks_unsupported(); }
    virtual void adopt_class_sums(const int64_t* counts, const double* sums) { ranks_unsupported(); }
    virtual void save_second_pass(StateWriter& w) { ranks_unsupported(); }
    virtual void merge_second_pass(const StateReader& r) { ranks_unsupported(); }
    [[noreturn]] void ranks_unsupported() const {
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "a second pass spread over MPI ranks is not implemented on the ", name(), " backend yet");
    }

    // --- The exact row store spread over ranks by class (src/mpi/, core/session_ranks.cpp): the
    // first-pass states go to the root without their rows; every kept class gets an owner rank,
    // which receives the class's rows from every rank in rank order (its arrival order in one
    // process) and computes what needs them (within variances, per-token SVDs, NC4, the Gram and
    // Sigma_W's scatter of a cut kept set); the root adds these parts and compute() takes them in
    // place of its row store. Sampled reservoirs go the same way, only the rows of each class's
    // merged sample, and their part is the per-token SVDs. A backend without it combines as before
    // (the store to the root). ---
    virtual bool can_spread_rows() const { return false; }
    // From now on save_state writes no row store and load_state expects none.
    virtual void begin_rows_spread() { ranks_unsupported(); }
    // The rows have moved to their owners (spread_close): the state is no longer one process's.
    virtual bool rows_spread() const { return false; }
    // This rank's rows of classes `ids` (ascending), in pieces of at most max_rows rows; slots:
    // null (the exact store: rows in arrival order), or (reservoirs) each row's place in its
    // class's merged sample.
    using RowsFn = std::function<void(int32_t c, const double* rows, int64_t n, const int64_t* slots)>;
    virtual void spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const RowsFn& fn) { ranks_unsupported(); }
    // The new store of the classes this rank owns, filled in rank order, then put in the old one's place.
    virtual void spread_open(const std::vector<int32_t>& owned) { ranks_unsupported(); }
    virtual void spread_append(int32_t c, const double* rows, int64_t n, const int64_t* slots) { ranks_unsupported(); }
    virtual void spread_close() { ranks_unsupported(); }
    // Sampled reservoirs (spread_samples): the root decides every class's merged sample as it
    // merges the states without rows (load_state in rank order, as a checkpoint merge would pick
    // the rows: (merge source, row) pairs); spread_write_picks gives the picks of one merge source
    // (0: the root's own) among the classes `ids`, spread_take_picks gives them to that rank,
    // whose spread_read then sends only those rows, each with its slot in the merged sample.
    virtual bool spread_samples() const { return false; }
    virtual void spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w) { ranks_unsupported(); }
    virtual void spread_take_picks(const StateReader& r) { ranks_unsupported(); }
    // This rank's part for the kept classes it owns (its store holds all of their rows; the class
    // counts and sums are the combined ones), and the root's sum of every rank's part.
    virtual void spread_part(const KeptSet& kept, const Classifier& clf, StateWriter& w) { ranks_unsupported(); }
    virtual void spread_merge(const KeptSet& kept, const Classifier& clf, const StateReader& r) { ranks_unsupported(); }

    // --- Pair-metric tiles spread over ranks (src/mpi/): the root writes what every rank needs
    // (pair_inputs: the centred kept means, their variances, the tile edge; false: no pair metrics),
    // every rank reduces its contiguous share of the tiles (pair_part, by pair count in tile order;
    // the single process is the share of rank 0 of 1), the root merges the shares in rank order
    // (pair_merge) and compute() takes them for this kept set. ---
    virtual bool can_spread_pairs() const { return false; }
    virtual bool pair_inputs(const KeptSet& kept, StateWriter& w) { return false; }  // only asked when can_spread_pairs
    virtual void pair_part(const StateReader& inputs, int rank, int P, StateWriter& w) { ranks_unsupported(); }
    virtual void pair_merge(const KeptSet& kept, const StateReader& part) { ranks_unsupported(); }
};

class HostBudget;  // core/host_budget.hpp
// budget: the session's account of host memory (null: the backend makes one from cfg).
std::unique_ptr<Backend> make_cpu_backend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget = nullptr);
// The CUDA backend, from the module libcollapse_cuda.so (src/core/backend_registry.cpp; inside the
// module: cuda/). Without a module or a usable device: COLLAPSE_ERR_NO_CUDA saying which is missing.
// budget: the session's account of host memory, as for the CPU backend (null: one made from cfg).
std::unique_ptr<Backend> make_cuda_backend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget = nullptr);
bool cuda_backend_available();
void require_cuda_backend();  // throws COLLAPSE_ERR_NO_CUDA naming the reason

}  // namespace collapse::internal
