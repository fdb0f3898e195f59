// A session's state out and in, through StateWriter / StateReader (core/state_io.hpp): the meta
// (core/checkpoint_meta.hpp) and the backend's arrays (core/state_sections.hpp). The checkpoint
// file around them is src/io/session_checkpoint.cpp.
#include <cmath>
#include <string>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "core/checkpoint_meta.hpp"
#include "core/session.hpp"
#include "core/state_sections.hpp"

namespace collapse::internal {

const std::vector<std::string>& state_config_keys() {
    static const std::vector<std::string> keys = {"num_classes", "dim", "exclude_token_ids", "min_samples_per_token",
                                                  "max_tokens_to_analyze", "compute_token_metrics", "compute_overall_metrics",
                                                  "svd_mode", "svd_max_rows_per_token", "seed", "nonfinite_policy"};
    return keys;
}

bool state_config_differs(const Config& a, const Config& b, std::string* key, std::string* value_a, std::string* value_b) {
    const nlohmann::json ja = to_json(a), jb = to_json(b);
    for (const std::string& k : state_config_keys())
        if (k != "dim" && ja[k] != jb[k]) {
            *key = k, *value_a = ja[k].dump(), *value_b = jb[k].dump();
            return true;
        }
    return false;
}

uint64_t classifier_hash(const Classifier& clf) {
    uint64_t h = 1469598103934665603ull;
    auto feed = [&](const std::vector<double>& v) {
        const unsigned char* p = reinterpret_cast<const unsigned char*>(v.data());
        for (size_t i = 0; i < v.size() * sizeof(double); ++i) h = (h ^ p[i]) * 1099511628211ull;
    };
    feed(clf.weight);
    feed(clf.bias);
    return h;
}

CheckpointMeta Session::checkpoint_meta() const {
    check_state("save_checkpoint");
    if (state_ != State::Ingest) fail(COLLAPSE_ERR_STATE, "save_checkpoint: only the first pass can be checkpointed");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "save_checkpoint: the session has seen no rows yet (its width is unknown)");
    if (backend_->rows_spread())
        fail(COLLAPSE_ERR_STATE, "save_checkpoint: the session's exact row store has been spread over MPI ranks by class "
                                 "(collapse_session_mpi_combine), so its state is no longer one process's; checkpoint before the combine");
    CheckpointMeta m;
    m.num_classes = V_;
    m.dim = d_;
    m.backend = backend_->name();
    m.config = cfg_;
    // The classifier's identity survives a session that never saw it (collapse merge).
    m.classifier_hash = clf_.present() ? std::to_string(classifier_hash(clf_)) : checkpoint_classifier_;
    m.batches_failed = batches_failed_;
    m.input_position = position_;
    m.batches = batches_;
    m.rows_before_backend = rows_before_backend_;
    m.rows_skipped = rows_skipped_;
    m.skipped_ranges = skipped_;
    m.input_identity = input_identity_;
    return m;
}

void Session::save_state(StateWriter& w) {
    (void)checkpoint_meta();  // the same refusals
    backend_->sync();
    backend_->save_state(w);
    // The out-of-distribution mean (nc5_ood_dev) travels with the state.
    if (!ood_mean_.empty()) w.add("ood_mean", COLLAPSE_F64, {d_}, ood_mean_.data(), ood_mean_.size() * 8);
    if (windows_) {
        // Open windows: every verdict in and every complete window reduced first.
        pump_windows();
        windows_->add_entropies(backend_->window_results());
        const std::vector<int64_t> slots = windows_->pending_slots();
        const HostBudget::Lease lease = budget_->reserve(mul_bytes((int64_t)slots.size(), d_, 4),
                                                         "the rows of " + std::to_string(slots.size()) + " open window rows for the checkpoint");
        std::vector<float> rows(slots.size() * (size_t)d_);
        backend_->window_get(slots.data(), (int64_t)slots.size(), rows.data());
        windows_->save(w, d_, rows);
    }
}

void Session::load_state(const StateReader& r, const CheckpointMeta& meta, bool merge) {
    check_state(merge ? "merge_checkpoint" : "load_checkpoint");
    if (state_ != State::Ingest) fail(COLLAPSE_ERR_STATE, "checkpoints load into the first pass only");
    const std::string what = r.description();
    if (meta.num_classes != V_)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, " has V = ", meta.num_classes, ", this session V = ", V_);
    if (meta.config.num_classes != meta.num_classes)
        fail(COLLAPSE_ERR_IO, what, ": its meta says V = ", meta.num_classes, " but its config has num_classes = ", meta.config.num_classes);
    const int64_t d = meta.dim;
    if (d <= 0 || (meta.config.dim != 0 && meta.config.dim != d))
        fail(COLLAPSE_ERR_IO, what, ": its meta says d = ", d, " (config dim = ", meta.config.dim, "), not a width > 0 that agrees");
    if (d_ > 0 && d != d_) fail(COLLAPSE_ERR_SHAPE, what, " has d = ", d, ", this session d = ", d_);
    std::string key, theirs_value, ours_value;
    if (state_config_differs(meta.config, cfg_, &key, &theirs_value, &ours_value))
        fail(COLLAPSE_ERR_CONFIG, what, " was made with ", key, " = ", theirs_value, ", this session has ", key, " = ", ours_value);
    const struct {
        const char* name;
        int64_t value;
    } counters[] = {{"batches_failed", meta.batches_failed},
                    {"input_position", meta.input_position},
                    {"batches", meta.batches},
                    {"rows_before_backend", meta.rows_before_backend},
                    {"rows_skipped", meta.rows_skipped}};
    for (const auto& c : counters)
        if (c.value < 0) fail(COLLAPSE_ERR_IO, what, ": its meta has ", c.name, " = ", c.value, ", which cannot be negative");
    // Skipped ranges lie before the input position (skip_batch moves the position past them).
    for (size_t i = 0; i < meta.skipped_ranges.size(); ++i) {
        const auto& s = meta.skipped_ranges[i];
        if (s.first < 0 || s.second < s.first || s.second > meta.input_position)
            fail(COLLAPSE_ERR_IO, what, ": its meta's skipped range ", i, " [", s.first, ", ", s.second,
                 ") is not a range of positions before input_position = ", meta.input_position);
    }
    // Its classifier against this session's, or against the checkpoints already loaded or merged.
    const std::string& theirs = meta.classifier_hash;
    const std::string ours = clf_.present() ? std::to_string(classifier_hash(clf_)) : checkpoint_classifier_;
    if (!theirs.empty() && !ours.empty() && theirs != ours)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, " was made with a different classifier (hash ", theirs, ", ",
             clf_.present() ? "this session's classifier" : "the checkpoints already merged", ": ", ours, ")");
    if (!merge && backend_ && row_counts().rows_seen > 0)
        fail(COLLAPSE_ERR_STATE, "load_checkpoint: the session has already ingested rows; load into a new session or merge");
    // Its out-of-distribution mean: one of width d, finite, and in a merge the same as this session's.
    std::vector<double> ood;
    if (r.has("ood_mean")) {
        const StateSection sec = r.section("ood_mean");
        if (sec.dtype_code != (uint32_t)COLLAPSE_F64 || sec.shape != std::vector<int64_t>{d})
            fail(COLLAPSE_ERR_IO, what, ": section ood_mean is not [", d, "] float64");
        const double* x = static_cast<const double*>(sec.data);
        for (int64_t j = 0; j < d; ++j)
            if (!std::isfinite(x[j])) fail(COLLAPSE_ERR_IO, what, ": section ood_mean holds a non-finite value at ", j);
        ood.assign(x, x + d);
        if (merge && !ood_mean_.empty() && ood != ood_mean_)
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, " has another out-of-distribution mean (nc5_ood_dev) than this session's");
    }

    // Before a backend is created for it (its size follows V and d) and before anything changes:
    // the arrays' shape, and totals that a merge adds to this session's without overflow.
    const Counts rows = read_state_rows(r, V_, d);
    if (merge) {
        const Counts mine = backend_ ? backend_->row_counts() : Counts{};
        int64_t sum;
        const struct {
            const char* name;
            int64_t a, b;
        } totals[] = {{"rows seen", mine.rows_seen, rows.rows_seen},
                      {"batches", batches_, meta.batches},
                      {"batches_failed", batches_failed_, meta.batches_failed},
                      {"rows_before_backend", rows_before_backend_, meta.rows_before_backend},
                      {"rows_skipped", rows_skipped_, meta.rows_skipped}};
        for (const auto& t : totals)
            if (__builtin_add_overflow(t.a, t.b, &sum))
                fail(COLLAPSE_ERR_IO, what, ": merging its ", t.name, " (", t.b, ") into this session's (", t.a, ") overflows a 64-bit count");
    }

    const bool created = !backend_;
    ensure_backend(d);
    const bool windows = WindowTracker::in_state(r);
    try {
        if (windows) {
            // Checked whole before the backend takes its arrays: the two change together.
            if (cfg_.compute_window_metrics == 0)
                fail(COLLAPSE_ERR_CONFIG, what, " holds open windows (window_* sections) but this session has compute_window_metrics: false");
            if (!backend_->supports_windows()) backend_->windows_unsupported();
            if (windows_) {
                pump_windows();
                windows_->add_entropies(backend_->window_results());
                windows_->check(r, d, merge);
            } else {
                WindowTracker(cfg_.window_size, budget_).check(r, d, merge);
            }
        }
        backend_->load_state(r, merge);
    } catch (...) {
        if (created) {
            backend_.reset();
            d_ = cfg_.dim;
        }
        throw;
    }
    if (windows) {
        if (!windows_) windows_ = std::make_unique<WindowTracker>(cfg_.window_size, budget_);
        const std::vector<int64_t> slots = windows_->load(r, d, merge);
        backend_->window_put(slots.data(), (int64_t)slots.size(), WindowTracker::state_rows(r), windows_->slot_capacity());
    }
    if (!theirs.empty()) checkpoint_classifier_ = theirs;
    if (!ood.empty()) ood_mean_ = std::move(ood);
    if (!merge) {
        batches_failed_ = meta.batches_failed;
        position_ = meta.input_position;
        batches_ = meta.batches;
        rows_before_backend_ = meta.rows_before_backend;
        rows_skipped_ = meta.rows_skipped;
        skipped_ = meta.skipped_ranges;
        input_identity_ = meta.input_identity;
        row_offset_ = position_;  // a resumed C API caller's next sequence continues the numbering
    } else {
        // A shard's positions are positions of its own input: its skipped ranges are kept for the
        // count, and the merged state's input is no longer one identifiable input.
        batches_ += meta.batches;
        batches_failed_ += meta.batches_failed;
        rows_before_backend_ += meta.rows_before_backend;
        rows_skipped_ += meta.rows_skipped;
        skipped_.insert(skipped_.end(), meta.skipped_ranges.begin(), meta.skipped_ranges.end());
        if (input_identity_ != meta.input_identity) input_identity_.clear();
    }
}

}  // namespace collapse::internal
