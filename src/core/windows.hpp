// Generation-time window entropy (docs/METRICS.md, "Generation-time window entropy (per sequence)"):
// the backend-independent bookkeeping. The tracker decides which rows form which window; the
// backend (core/backend.hpp, "windows" hooks) holds the pending rows and computes the entropies.
//
// Streaming rule (memory O(open windows x W x d), never O(rows)):
//  - per sequence a frontier F = the smallest position not seen yet; a row of any filter status
//    (kept, masked, ignored, excluded, non-finite) counts as seen;
//  - kept rows below F are final: as soon as W final kept rows wait (in (position, arrival) order)
//    the first W of them form the next window, which is reduced and its rows freed;
//  - rows beyond F (out of order, or after a gap) wait; at compute everything is final and the rest
//    is sorted and windowed, so the result is exactly METRICS.md's definition;
//  - a duplicate (sequence, position) is a tie (input order), accepted when it lands in the
//    unreduced part: position >= the largest position inside a reduced window of its sequence. Else
//    the whole batch is refused (every row is checked, whatever its filter status, so that the
//    answer does not depend on verdicts the CUDA backend only learns later);
//  - sequences of the sequences layout come whole: they are closed after their batch (their
//    trailing partial window is dropped at once) and refuse later rows.
// A row's filter verdict may come later than the row (CUDA): the row is stashed with its verdict
// pending, and a window never forms past a row whose verdict is unknown.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "collapse/collapse.h"
#include "core/host_budget.hpp"
#include "core/metrics.hpp"
#include "core/state_io.hpp"

namespace collapse::internal {

// Sequence id and position of each row of one batch.
struct RowTags {
    int64_t rows = 0;
    // Tagged rows: host buffers [rows] or [rows, 1], int32 or int64 (pos may be null: arrival order).
    const void* seq = nullptr;
    collapse_dtype seq_dtype = COLLAPSE_I64;
    int64_t seq_stride = 1;
    const void* pos = nullptr;
    collapse_dtype pos_dtype = COLLAPSE_I64;
    int64_t pos_stride = 1;
    // Sequences layout: row r is sequence first_seq + r / per_seq, position r % per_seq; closed after the batch.
    bool implicit = false;
    int64_t first_seq = 0, per_seq = 0;
    int64_t sequence(int64_t r) const;
    int64_t position(int64_t r) const;  // -1 when not given
};

// Checks the C API's tag buffers against a batch of `rows` rows: host memory, int32/int64, shape
// [rows] or [rows, 1], positions >= 0 (the error names the row, counted from row_offset as the
// batch's other messages do, and the value).
RowTags describe_tags(const collapse_buffer* sequence_ids, const collapse_buffer* positions, int64_t rows, int64_t row_offset);
RowTags implicit_tags(int64_t first_sequence, int64_t batch, int64_t rows_per_sequence);

// H of one window from the eigenvalues (ascending) of its M x M centred Gram or covariance: the
// eigenvalues above the noise floor tau = M * DBL_EPSILON * lambda_max (as the per-token SVD's,
// core/metric_summary.hpp), p = lambda / sum, H = -sum p ln(p + 1e-10); none above -> 0.
double window_entropy_from_eigen(const double* eig_ascending, int64_t M);

// The per-sequence values and the summary of METRICS.md from each sequence's window entropies.
void finish_window_result(WindowResult& r);

class WindowTracker {
public:
    WindowTracker(int64_t window_size, std::shared_ptr<HostBudget> budget);
    int64_t window_size() const { return W_; }

    // One batch, validated against the state (nothing changes).
    struct Plan {
        int64_t rows = 0;
        std::vector<int64_t> seq;  // per row: index into the sequences (new ones numbered after)
        std::vector<int64_t> pos;  // per row: resolved position
        std::vector<int64_t> new_ids;
        bool close = false;
        int64_t growth_bytes = 0;  // bound on the bookkeeping the batch adds
    };
    Plan plan(const RowTags& tags, int64_t row_offset) const;
    // Registers a planned batch. kept: per row 1/0 when the verdicts are known, else null (they come
    // through verdicts()). Returns per row the slot its features go to (-1: not stashed).
    std::vector<int64_t> commit(const Plan& p, const uint8_t* kept);
    // Late verdicts of stashed rows.
    void verdicts(const int64_t* slots, const uint8_t* kept, int64_t n);
    // Slots the backend's store must hold (every slot handed out is below it).
    int64_t slot_capacity() const { return slot_capacity_; }
    // Windows complete and final since the last call: their slots, W per window in window order.
    // They count as reduced (their entropies come through add_entropies in the same order) and their
    // slots are free again.
    std::vector<int64_t> take_ready();
    void add_entropies(const std::vector<double>& e);
    int64_t windows_reduced() const { return next_window_; }
    int64_t entropies_known() const { return (int64_t)entropy_.size(); }
    // As if the input ended now (nothing changes): the slots of each sequence's remaining complete
    // windows, W per window; every verdict must be known.
    std::vector<int64_t> rest_windows() const;
    // The result, given the entropies of rest_windows() in order.
    WindowResult result(const std::vector<double>& rest) const;
    bool empty() const { return seqs_.empty(); }
    int64_t pending_rows() const;
    int64_t unknown_verdicts() const { return unknown_; }

    // Checkpoints (core/state_sections.hpp lists the window_* arrays). save: `rows` gives the pending
    // rows' features in the order of pending_slots(). load/merge: the whole content is checked
    // against d and this tracker before anything changes; the returned slots (one per loaded
    // pending row, in file order) are where the caller puts the file's rows. Every verdict must be
    // known and every ready window taken before save.
    std::vector<int64_t> pending_slots() const;
    void save(StateWriter& w, int64_t d, const std::vector<float>& rows) const;
    static bool in_state(const StateReader& r);
    // Checks the state as load would, changing nothing.
    void check(const StateReader& r, int64_t d, bool merge) const { (void)read_state(r, d, merge); }
    std::vector<int64_t> load(const StateReader& r, int64_t d, bool merge);
    static const float* state_rows(const StateReader& r);

private:
    struct Pending {
        int64_t slot;
        bool known;  // verdict known (then kept: dropped rows are removed)
    };
    struct Seq {
        int64_t id = 0;
        int64_t tokens = 0;       // kept rows (n_s)
        int64_t frontier = 0;     // smallest position not seen
        int64_t seen = 0;         // rows seen (arrival order position of the next positionless row)
        int64_t max_reduced = -1; // largest position inside a reduced window
        bool closed = false;
        std::set<int64_t> above;  // seen positions > frontier
        std::map<std::pair<int64_t, int64_t>, Pending> pending;  // (position, arrival) -> row
        std::vector<int64_t> windows;  // window ids (index into entropy_), in order
    };
    std::vector<Seq> read_state(const StateReader& r, int64_t d, bool merge) const;
    void mark(int64_t s) { dirty_.insert(s); }
    void free_slot(int64_t slot) { free_.push_back(slot); }
    int64_t new_slot();
    void account();

    int64_t W_;
    std::shared_ptr<HostBudget> budget_;
    HostBudget::Lease lease_;
    std::vector<Seq> seqs_;
    std::unordered_map<int64_t, int64_t> index_;  // id -> index into seqs_
    struct RowKey {
        int64_t seq, pos, arrival;
    };
    std::unordered_map<int64_t, RowKey> slot_row_;  // rows whose verdict is pending: slot -> where
    std::set<int64_t> dirty_;
    std::vector<int64_t> free_;
    int64_t slot_capacity_ = 0;
    int64_t next_arrival_ = 0;
    int64_t next_window_ = 0;
    int64_t unknown_ = 0;
    std::vector<double> entropy_;
    int64_t pending_total_ = 0, above_total_ = 0;
};

}  // namespace collapse::internal
