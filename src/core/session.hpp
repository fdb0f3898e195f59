// A session: one analysis. Validates arguments, owns the backend, the classifier and the counts,
// selects the kept classes and assembles the report.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/backend.hpp"
#include "core/config.hpp"
#include "core/metrics.hpp"

namespace collapse::internal {

// METRICS.md "kept classes": not excluded, n_c >= min_samples_per_token, then the
// max_tokens_to_analyze most frequent (ties: smaller id).
KeptSet select_kept(const std::vector<int64_t>& counts, const Config& cfg, Counts* class_counts);

struct ReportData {
    nlohmann::json doc;
    std::string text;  // doc serialised, filled on demand
    std::vector<int64_t> token_ids;
};

class Session {
public:
    explicit Session(const Config& cfg);
    ~Session();

    void ingest_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid, void* stream);
    void ingest_sequences(const collapse_buffer* hidden, const collapse_buffer* ids, const collapse_buffer* mask,
                          int64_t batch, int64_t seq_len, void* stream);
    void set_classifier(const collapse_buffer* weight, const collapse_buffer* bias);
    void sync();
    bool needs_second_pass() const;
    void begin_second_pass();
    // The report of everything seen so far. final = true ends the session (compute is allowed once).
    std::unique_ptr<ReportData> compute(bool final = true);

    const Config& config() const { return cfg_; }
    Counts row_counts() const;
    int64_t dim() const { return d_; }
    bool in_second_pass() const { return state_ == State::SecondPass; }
    // Row (or sequence) number of the next batch's first row in the caller's input, so that errors
    // name the row of the file rather than of the batch (the CLI sets it; 0 by default).
    void set_row_offset(int64_t offset) { row_offset_ = offset; }
    // Input position after the last accepted first-pass batch (row offset + its rows or sequences).
    int64_t input_position() const { return position_; }

    // Checkpoints (src/core/checkpoint.cpp). save: the whole first-pass state, atomically.
    // load: replaces the state of a session that has seen no rows. merge: adds a shard's state.
    // Refused, with the difference named, when V, d, a state-affecting config key or the
    // classifier differ.
    void save_checkpoint(const std::string& path);
    void load_checkpoint(const std::string& path);
    void merge_checkpoint(const std::string& path);
    // Batches the caller skipped under continue_on_error: kept in checkpoints so a resumed run
    // reports the same count.
    void note_failed_batch() { ++batches_failed_; }
    int64_t failed_batches() const { return batches_failed_; }
    // The config stored in a checkpoint (to create the session that loads or merges it).
    static Config checkpoint_config(const std::string& path);

private:
    enum class State { Ingest, SecondPass, Done };
    void check_state(const char* call) const;
    bool second_pass_nc4() const;
    bool second_pass_gram() const;
    void ensure_backend(int64_t d);
    void ingest(const BatchDesc& b, void* stream);

    Config cfg_;
    int64_t V_;
    int64_t d_;
    std::unique_ptr<Backend> backend_;
    Classifier clf_;
    int64_t rows_before_backend_ = 0;
    int64_t row_offset_ = 0;
    int64_t position_ = 0;
    int64_t batches_failed_ = 0;
    std::string checkpoint_classifier_;  // classifier hash of loaded/merged checkpoints ("" = none known)
    void restore(const std::string& path, bool merge);
    State state_ = State::Ingest;
    double ingest_seconds_ = 0, second_pass_seconds_ = 0;
    int64_t batches_ = 0;
};

}  // namespace collapse::internal
