#include "monitor.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace llama2c {

namespace {

void check(collapse_status s, const char* what) {
    if (s != COLLAPSE_OK)
        throw std::runtime_error(std::string(what) + ": " + collapse_status_string(s) + ": " + collapse_last_error());
}

// A report freed on every path.
struct ReportHandle {
    collapse_report* r = nullptr;
    ~ReportHandle() { collapse_report_destroy(r); }
};

// "key=value" of a scalar, or "" when the report lacks it (e.g. windows before any is complete).
std::string scalar(const collapse_report* r, const char* key, const char* label) {
    double v = 0;
    int is_null = 0;
    if (collapse_report_get_scalar(r, key, &v, &is_null) != COLLAPSE_OK) return std::string();
    char buf[96];
    if (is_null) std::snprintf(buf, sizeof buf, " %s=null", label);
    else if (v == std::floor(v) && std::fabs(v) < 1e15) std::snprintf(buf, sizeof buf, " %s=%.0f", label, v);
    else std::snprintf(buf, sizeof buf, " %s=%.4f", label, v);
    return buf;
}

}  // namespace

Monitor::Monitor(const Model& model, const std::string& config_path, collapse_backend backend) {
    const Config& c = model.config;
    collapse_options o;
    check(collapse_options_default(&o), "collapse options");
    if (!config_path.empty()) check(collapse_options_from_yaml_file(config_path.c_str(), &o), config_path.c_str());
    // The model fixes V and d; a config that says otherwise is a mistake worth stopping for.
    if (o.num_classes != 0 && o.num_classes != c.vocab_size)
        throw std::runtime_error(config_path + ": num_classes " + std::to_string(o.num_classes) + " differs from the model's vocab_size " +
                                 std::to_string(c.vocab_size));
    if (o.dim != 0 && o.dim != c.dim)
        throw std::runtime_error(config_path + ": dim " + std::to_string(o.dim) + " differs from the model's dim " + std::to_string(c.dim));
    o.num_classes = c.vocab_size;
    o.dim = c.dim;
    o.backend = backend;
    check(collapse_session_create(&o, &session_), "collapse_session_create");
    dim_ = c.dim;
    const collapse_buffer w{model.weights.wcls.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, c.vocab_size, c.dim, 0};
    try {
        check(collapse_session_set_classifier(session_, &w, nullptr), "collapse_session_set_classifier");
    } catch (...) {
        collapse_session_destroy(session_);
        throw;
    }
}

Monitor::~Monitor() { collapse_session_destroy(session_); }

void Monitor::ingest(const float* features, const int32_t* labels, collapse_memory memory, int n, const int32_t* sequence_ids,
                     const int64_t* positions, void* stream) {
    if (n == 0) return;
    const collapse_buffer f{features, COLLAPSE_F32, memory, n, dim_, 0};
    const collapse_buffer y{labels, COLLAPSE_I32, memory, n, 1, 0};
    const auto t0 = std::chrono::steady_clock::now();
    const collapse_buffer s{sequence_ids, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
    const collapse_buffer p{positions, COLLAPSE_I64, COLLAPSE_MEMORY_HOST, n, 1, 0};
    check(collapse_session_ingest_tagged_rows(session_, &f, &y, nullptr, &s, &p, stream), "collapse_session_ingest_tagged_rows");
    rows_ += n;
    ingest_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string Monitor::snapshot_line() {
    ReportHandle r;
    check(collapse_session_snapshot(session_, &r.r), "collapse_session_snapshot");
    std::string line = "rows=" + std::to_string(rows_);
    line += scalar(r.r, "counts.rows_kept", "rows_kept");
    line += scalar(r.r, "counts.classes_kept", "classes_kept");
    line += scalar(r.r, "overall_svd_entropy", "overall_svd_entropy");
    line += scalar(r.r, "overall_gnc2", "gnc2");
    line += scalar(r.r, "window_summary.overall_avg_svd_entropy", "window_avg_svd_entropy");
    return line;
}

int64_t Monitor::finish(const std::string& output) {
    ReportHandle r;
    check(collapse_session_compute(session_, &r.r), "collapse_session_compute");
    if (!output.empty()) check(collapse_report_write_json(r.r, output.c_str()), output.c_str());
    double kept = 0;
    int is_null = 0;
    check(collapse_report_get_scalar(r.r, "counts.rows_kept", &kept, &is_null), "counts.rows_kept");
    return (int64_t)kept;
}

}  // namespace llama2c
