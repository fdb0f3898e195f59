// Session checkpoints: a "meta" section (JSON: format, V, d, backend, the state-affecting config,
// the classifier's hash, the input position, batches) and the backend's state sections, in the
// crash-safe container of src/io/checkpoint_file.hpp.
#include <cstring>
#include <string>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "core/session.hpp"
#include "io/checkpoint_file.hpp"

namespace collapse::internal {

namespace {

constexpr const char* kFormat = "collapse-session-checkpoint";

// The keys whose value changes what is accumulated: a checkpoint can only continue or merge into a
// session that agrees on all of them. (Finalisation options such as cdnv_power may differ.)
const char* const kStateKeys[] = {"num_classes", "dim", "exclude_token_ids", "min_samples_per_token", "max_tokens_to_analyze",
                                  "compute_token_metrics", "compute_overall_metrics", "svd_mode", "svd_max_rows_per_token",
                                  "seed", "nonfinite_policy"};

nlohmann::json state_config(const Config& c) {
    const nlohmann::json all = to_json(c);
    nlohmann::json out;
    for (const char* k : kStateKeys) out[k] = all[k];
    return out;
}

}  // namespace

// FNV-1a over the classifier's doubles: enough to tell two classifiers apart.
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

namespace {

nlohmann::json read_meta(const io::CheckpointReader& r) {
    const io::CheckpointSection m = r.section("meta");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(std::string(static_cast<const char*>(m.data), m.bytes));
    } catch (const std::exception& e) {
        fail(COLLAPSE_ERR_IO, "checkpoint ", r.path(), ": meta section is not JSON: ", e.what());
    }
    if (!j.is_object() || j.value("format", "") != kFormat)
        fail(COLLAPSE_ERR_IO, "checkpoint ", r.path(), " is not a collapse session checkpoint");
    return j;
}

}  // namespace

Config Session::checkpoint_config(const std::string& path) {
    io::CheckpointReader r(path);
    const nlohmann::json meta = read_meta(r);
    return parse_yaml(meta["config"].dump(), path + " (config)");
}

void Session::save_checkpoint(const std::string& path) {
    check_state("save_checkpoint");
    if (state_ != State::Ingest) fail(COLLAPSE_ERR_STATE, "save_checkpoint: only the first pass can be checkpointed");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "save_checkpoint: the session has seen no rows yet (its width is unknown)");
    backend_->sync();
    nlohmann::json meta;
    meta["format"] = kFormat;
    meta["version"] = 1;
    meta["engine_version"] = COLLAPSE_VERSION_STRING;
    meta["num_classes"] = V_;
    meta["dim"] = d_;
    meta["backend"] = backend_->name();
    meta["state_config"] = state_config(cfg_);
    meta["config"] = to_json(cfg_);
    // The classifier's identity survives a session that never saw it (collapse merge).
    const std::string hash = clf_.present() ? std::to_string(classifier_hash(clf_)) : checkpoint_classifier_;
    meta["classifier_hash"] = hash.empty() ? nlohmann::json(nullptr) : nlohmann::json(hash);
    meta["batches_failed"] = batches_failed_;
    meta["input_position"] = position_;
    meta["batches"] = batches_;
    meta["rows_before_backend"] = rows_before_backend_;
    const std::string text = meta.dump();
    io::CheckpointWriter w(path);
    w.add("meta", COLLAPSE_U8, {(int64_t)text.size()}, text.data(), text.size());
    backend_->save_state(w);
    w.commit();
}

void Session::restore(const std::string& path, bool merge) {
    check_state(merge ? "merge_checkpoint" : "load_checkpoint");
    if (state_ != State::Ingest) fail(COLLAPSE_ERR_STATE, "checkpoints load into the first pass only");
    io::CheckpointReader r(path);
    const nlohmann::json meta = read_meta(r);
    if (meta["num_classes"].get<int64_t>() != V_)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", path, " has V = ", meta["num_classes"].get<int64_t>(), ", this session V = ", V_);
    const int64_t d = meta["dim"].get<int64_t>();
    if (d_ > 0 && d != d_) fail(COLLAPSE_ERR_SHAPE, "checkpoint ", path, " has d = ", d, ", this session d = ", d_);
    const nlohmann::json mine = state_config(cfg_);
    for (const char* k : kStateKeys)
        if (k != std::string("dim") && meta["state_config"][k] != mine[k])
            fail(COLLAPSE_ERR_CONFIG, "checkpoint ", path, " was made with ", k, " = ", meta["state_config"][k].dump(),
                 ", this session has ", k, " = ", mine[k].dump());
    // Its classifier against this session's, or against the checkpoints already loaded or merged.
    const std::string theirs = meta["classifier_hash"].is_string() ? meta["classifier_hash"].get<std::string>() : "";
    const std::string ours = clf_.present() ? std::to_string(classifier_hash(clf_)) : checkpoint_classifier_;
    if (!theirs.empty() && !ours.empty() && theirs != ours)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", path, " was made with a different classifier (hash ", theirs, ", ",
             clf_.present() ? "this session's classifier" : "the checkpoints already merged", ": ", ours, ")");
    if (!merge && backend_ && row_counts().rows_seen > 0)
        fail(COLLAPSE_ERR_STATE, "load_checkpoint: the session has already ingested rows; load into a new session or merge");
    const bool created = !backend_;
    ensure_backend(d);
    try {
        backend_->load_state(r, merge);
    } catch (...) {
        if (created) {
            backend_.reset();
            d_ = cfg_.dim;
        }
        throw;
    }
    if (!theirs.empty()) checkpoint_classifier_ = theirs;
    if (!merge) {
        batches_failed_ = meta.value("batches_failed", int64_t(0));
        position_ = meta.value("input_position", int64_t(0));
        batches_ = meta.value("batches", int64_t(0));
        rows_before_backend_ = meta.value("rows_before_backend", int64_t(0));
    } else {
        batches_ += meta.value("batches", int64_t(0));
        batches_failed_ += meta.value("batches_failed", int64_t(0));
        rows_before_backend_ += meta.value("rows_before_backend", int64_t(0));
    }
}

void Session::load_checkpoint(const std::string& path) { restore(path, false); }
void Session::merge_checkpoint(const std::string& path) { restore(path, true); }

}  // namespace collapse::internal
