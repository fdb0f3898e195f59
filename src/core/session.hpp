// A session: one analysis. Validates arguments, owns the backend, the classifier and the counts,
// selects the kept classes and assembles the report.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.hpp"
#include "core/checkpoint_meta.hpp"
#include "core/config.hpp"
#include "core/host_budget.hpp"
#include "core/metrics.hpp"
#include "core/state_io.hpp"
#include "core/windows.hpp"

namespace collapse::internal {

// docs/METRICS.md "Kept classes": not excluded, n_c >= min_samples_per_token, then the
// max_tokens_to_analyze most frequent (ties: smaller id).
KeptSet select_kept(const std::vector<int64_t>& counts, const Config& cfg, Counts* class_counts);

class Session {
public:
    explicit Session(const Config& cfg);
    ~Session();

    void ingest_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid, void* stream);
    // Rows with a sequence id and a position each (collapse_session_ingest_tagged_rows).
    void ingest_tagged_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid,
                            const collapse_buffer* sequence_ids, const collapse_buffer* positions, void* stream);
    void ingest_sequences(const collapse_buffer* hidden, const collapse_buffer* ids, const collapse_buffer* mask,
                          int64_t batch, int64_t seq_len, void* stream);
    void set_classifier(const collapse_buffer* weight, const collapse_buffer* bias);
    // The global mean [d] of a second, out-of-distribution input (nc5_ood_dev; the plain mean of its
    // rows, no labels). Of width d (before the width is known, rows of another width are refused);
    // kept in checkpoints.
    void set_ood_mean(const double* mean, int64_t dim);
    const std::vector<double>& ood_mean() const { return ood_mean_; }
    void sync();
    bool needs_second_pass() const;
    void begin_second_pass();
    // Every metric of everything seen so far (src/report/ makes the JSON report of it).
    // final = true ends the session (compute is allowed once). final = false in the first pass is a
    // snapshot (below); it is what the driver's intermediate saves use.
    Result compute(bool final = true);
    // A live snapshot (collapse_session_snapshot): every first-pass metric of the rows ingested so
    // far; the session goes on ingesting, and nothing it accumulates is consumed. Metrics that need
    // the second pass (second_pass_nc4, second_pass_gram) are null with kSnapshotNote; no second
    // pass is started. First pass only: COLLAPSE_ERR_STATE in the second pass or after compute.
    Result snapshot();
    static constexpr const char* kSnapshotNote = "needs the second pass; not in a snapshot";

    const Config& config() const { return cfg_; }
    // host_memory_limit's account: what the session and its backend hold now.
    const HostBudget& host_budget() const { return *budget_; }
    Counts row_counts() const;
    int64_t dim() const { return d_; }
    bool in_second_pass() const { return state_ == State::SecondPass; }
    // Row (or sequence) number of the next batch's first row in the caller's input, so that errors
    // name the row of the file rather than of the batch, and the sequences layout numbers its
    // sequences (windows). The CLI sets it per batch; otherwise it starts at 0 and moves past each
    // accepted (or skipped) batch, so the i-th sequence a session takes is sequence i.
    void set_row_offset(int64_t offset) { row_offset_ = offset; }
    // Input position after the last accepted first-pass batch (row offset + its rows or sequences).
    int64_t input_position() const { return position_; }

    // The first-pass state (src/core/session_state.cpp; the checkpoint file around it is
    // src/io/session_checkpoint.hpp): the meta, then the backend's arrays. load_state replaces the
    // state of a session that has seen no rows; merge adds a shard's. Refused, with the difference
    // named and nothing changed, when V, d, a state-affecting config key or the classifier differ
    // or the content is inconsistent.
    CheckpointMeta checkpoint_meta() const;
    void save_state(StateWriter& w);
    void load_state(const StateReader& r, const CheckpointMeta& meta, bool merge);
    // Ranks (src/mpi/, src/core/session_ranks.cpp). After the first-pass states went to the root:
    // class_sums writes the combined class_counts and class_sums sections (the root's), and a rank
    // adopts them before begin_second_pass so that its kept set and means are the root's. The
    // second pass's partial results out (every rank) and in (the root, in rank order).
    void write_class_sums(StateWriter& w);
    void adopt_class_sums(const StateReader& r);
    void save_second_pass(StateWriter& w);
    void merge_second_pass(const StateReader& r);
    bool has_backend() const { return backend_ != nullptr; }
    // After an exchange between ranks failed partway (src/mpi/), the session holds part of another
    // rank's state (adopted sums, part of a merge or a spread): every call but destroy is refused,
    // naming `why`.
    void set_unusable(const std::string& why) { unusable_ = why; }
    // The exact row store spread over ranks by class (Backend, "spread"; src/mpi/ moves the rows).
    // can_spread_rows: first pass, and the backend keeps an exact row store (or reservoirs) it can spread.
    // spread_owners (the root's combined counts; src/mpi/ broadcasts the result): the kept ids,
    // and each one's owner rank among P (the largest work first, each to the rank with the least
    // work so far). spread_open takes the classes this rank owns, spread_append their rows (in
    // rank order; reservoir rows with their slots), spread_close puts the new store in the old one's place.
    bool can_spread_rows() const;
    void begin_rows_spread();
    std::vector<int32_t> spread_owners(int P, std::vector<int32_t>& ids);
    void spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const Backend::RowsFn& fn);
    void spread_open(const std::vector<int32_t>& owned);
    void spread_append(int32_t c, const double* rows, int64_t n, const int64_t* slots);
    // Sampled reservoirs (Backend, "spread_samples"): the root's picks of merge source `source`
    // among the kept classes `ids`, and a rank's taking of its own.
    bool spread_samples() const;
    void spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w);
    void spread_take_picks(const StateReader& r);
    void spread_close();
    void save_spread_part(StateWriter& w);
    void merge_spread_part(const StateReader& r);
    // Pair-metric tiles spread over ranks (Backend, "pairs"; src/mpi/ moves the inputs and shares):
    // can_spread_pairs on every rank; the root's save_pair_inputs (false: no pair metrics), every
    // rank's save_pair_part of those inputs, the root's merge_pair_part of each share in rank order.
    bool can_spread_pairs() const;
    bool save_pair_inputs(StateWriter& w);
    void save_pair_part(const StateReader& inputs, int rank, int P, StateWriter& w);
    void merge_pair_part(const StateReader& r);
    // The account itself, for components that hold copies on the session's behalf (src/mpi/).
    std::shared_ptr<HostBudget> budget_account() const { return budget_; }

    // A first-pass batch the caller skipped under continue_on_error: positions [first, end). Counted,
    // and the input position moves past it, so a resumed run neither re-runs nor re-counts it; the
    // ranges are kept in checkpoints so a second pass can skip the same rows.
    void skip_batch(int64_t first, int64_t end, int64_t rows);
    int64_t failed_batches() const { return batches_failed_; }
    int64_t skipped_rows() const { return rows_skipped_; }
    const std::vector<std::pair<int64_t, int64_t>>& skipped_ranges() const { return skipped_; }
    // What the rows come from (the driver's input description, JSON text): kept in checkpoints so
    // that a resume can refuse another input. "" when unknown (C API sessions).
    void set_input_identity(std::string identity) { input_identity_ = std::move(identity); }
    const std::string& input_identity() const { return input_identity_; }
    // A loaded checkpoint was made with a classifier that this session has not been given.
    bool expects_classifier() const { return !checkpoint_classifier_.empty() && !clf_.present(); }
    const std::string& checkpoint_classifier_hash() const { return checkpoint_classifier_; }

private:
    enum class State { Ingest, SecondPass, Done };
    void check_state(const char* call) const;
    bool second_pass_nc4() const;
    bool second_pass_gram() const;
    void ensure_backend(int64_t d);
    void ingest(const BatchDesc& b, void* stream, const RowTags* tags = nullptr);
    bool windows_for(bool explicit_tags);
    void pump_windows();
    WindowResult window_result();
    KeptSet kept_classes(Counts* class_counts, HostBudget::Lease& lease);

    Config cfg_;
    int64_t V_;
    int64_t d_;
    // host_memory_limit's account, shared with the backend: declared before everything it counts.
    std::shared_ptr<HostBudget> budget_;
    std::unique_ptr<Backend> backend_;
    Classifier clf_;
    std::vector<double> ood_mean_;  // [d] or empty (set_ood_mean)
    HostBudget::Lease clf_lease_;
    int64_t rows_before_backend_ = 0;
    int64_t row_offset_ = 0;
    int64_t position_ = 0;
    int64_t batches_failed_ = 0;
    int64_t rows_skipped_ = 0;
    std::vector<std::pair<int64_t, int64_t>> skipped_;
    std::string input_identity_;
    std::string checkpoint_classifier_;  // classifier hash of loaded/merged checkpoints ("" = none known)
    // Generation-time windows (core/windows.hpp): created by the first tagged batch it takes.
    std::unique_ptr<WindowTracker> windows_;
    std::string windows_note_;  // why windows are off although rows carried ids
    State state_ = State::Ingest;
    std::string unusable_;  // set_unusable
    double ingest_seconds_ = 0, second_pass_seconds_ = 0;
    int64_t batches_ = 0;
};

}  // namespace collapse::internal
