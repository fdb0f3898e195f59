// A thin C++ layer over the C API: RAII handles and exceptions instead of status codes.
// Header-only, so it adds no ABI of its own: a C++ caller links the same library as a C caller.
#pragma once
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "collapse/collapse.h"

namespace collapse {

class ApiError : public std::runtime_error {
public:
    ApiError(collapse_status s, const std::string& what) : std::runtime_error(what), status_(s) {}
    collapse_status status() const noexcept { return status_; }

private:
    collapse_status status_;
};

inline void check(collapse_status s) {
    if (s != COLLAPSE_OK) throw ApiError(s, collapse_last_error());
}

inline collapse_options default_options() {
    collapse_options o;
    check(collapse_options_default(&o));
    return o;
}

// Host buffers from pointers; memory kind defaults to host.
inline collapse_buffer host_buffer(const void* data, collapse_dtype t, int64_t rows, int64_t cols = 1,
                                   int64_t row_stride = 0) {
    return collapse_buffer{data, t, COLLAPSE_MEMORY_HOST, rows, cols, row_stride};
}
inline collapse_buffer host_buffer(const float* p, int64_t rows, int64_t cols) { return host_buffer(p, COLLAPSE_F32, rows, cols); }
inline collapse_buffer host_buffer(const double* p, int64_t rows, int64_t cols) { return host_buffer(p, COLLAPSE_F64, rows, cols); }
inline collapse_buffer host_buffer(const int32_t* p, int64_t rows) { return host_buffer(p, COLLAPSE_I32, rows, 1); }
inline collapse_buffer host_buffer(const int64_t* p, int64_t rows) { return host_buffer(p, COLLAPSE_I64, rows, 1); }

class Report {
public:
    explicit Report(collapse_report* r) : r_(r, &collapse_report_destroy) {}
    collapse_report* get() const { return r_.get(); }

    // nullopt for a null metric; throws for an unknown key.
    std::optional<double> scalar(const std::string& key) const {
        double v = 0;
        int is_null = 0;
        check(collapse_report_get_scalar(r_.get(), key.c_str(), &v, &is_null));
        if (is_null) return std::nullopt;
        return v;
    }
    double value(const std::string& key) const {
        auto v = scalar(key);
        if (!v) throw ApiError(COLLAPSE_ERR_NOT_FOUND, "metric '" + key + "' is null");
        return *v;
    }
    std::vector<int64_t> token_ids() const {
        int64_t n = 0;
        check(collapse_report_num_tokens(r_.get(), &n));
        std::vector<int64_t> ids((size_t)n);
        check(collapse_report_token_ids(r_.get(), ids.data(), n));
        return ids;
    }
    std::vector<double> token_array(const std::string& key) const {
        int64_t n = 0;
        check(collapse_report_num_tokens(r_.get(), &n));
        std::vector<double> v((size_t)n);
        check(collapse_report_token_array(r_.get(), key.c_str(), v.data(), n));
        return v;
    }
    std::string json() const {
        const char* s = nullptr;
        check(collapse_report_json(r_.get(), &s));
        return s;
    }
    void write_json(const std::string& path) const { check(collapse_report_write_json(r_.get(), path.c_str())); }

private:
    std::shared_ptr<collapse_report> r_;
};

class Session {
public:
    explicit Session(const collapse_options& o) {
        collapse_session* s = nullptr;
        check(collapse_session_create(&o, &s));
        s_.reset(s);
    }
    collapse_session* get() const { return s_.get(); }

    void ingest_rows(const collapse_buffer& features, const collapse_buffer& labels,
                     const collapse_buffer* valid = nullptr, void* stream = nullptr) {
        check(collapse_session_ingest_rows(s_.get(), &features, &labels, valid, stream));
    }
    // Rows with sequence ids (and positions, or nullptr: arrival order), both in host memory.
    void ingest_tagged_rows(const collapse_buffer& features, const collapse_buffer& labels, const collapse_buffer* valid,
                            const collapse_buffer& sequence_ids, const collapse_buffer* positions = nullptr,
                            void* stream = nullptr) {
        check(collapse_session_ingest_tagged_rows(s_.get(), &features, &labels, valid, &sequence_ids, positions, stream));
    }
    void ingest_sequences(const collapse_buffer& hidden, const collapse_buffer& ids, const collapse_buffer* mask,
                          int64_t batch, int64_t seq_len, void* stream = nullptr) {
        check(collapse_session_ingest_sequences(s_.get(), &hidden, &ids, mask, batch, seq_len, stream));
    }
    void set_classifier(const collapse_buffer& w, const collapse_buffer* bias = nullptr) {
        check(collapse_session_set_classifier(s_.get(), &w, bias));
    }
    // nc5_ood_dev: the global mean [d] of an out-of-distribution input (collapse_session_set_ood_mean).
    void set_ood_mean(const std::vector<double>& mean) {
        check(collapse_session_set_ood_mean(s_.get(), mean.data(), (int64_t)mean.size()));
    }
    void sync() { check(collapse_session_sync(s_.get())); }
    bool needs_second_pass() {
        int n = 0;
        check(collapse_session_needs_second_pass(s_.get(), &n));
        return n != 0;
    }
    void begin_second_pass() { check(collapse_session_begin_second_pass(s_.get())); }
    void save(const std::string& path) { check(collapse_session_save(s_.get(), path.c_str())); }
    void load(const std::string& path) { check(collapse_session_load(s_.get(), path.c_str())); }
    void merge(const std::string& path) { check(collapse_session_merge(s_.get(), path.c_str())); }
    Report compute() {
        collapse_report* r = nullptr;
        check(collapse_session_compute(s_.get(), &r));
        return Report(r);
    }
    // First-pass metrics of the rows so far; the session goes on (collapse_session_snapshot).
    Report snapshot() {
        collapse_report* r = nullptr;
        check(collapse_session_snapshot(s_.get(), &r));
        return Report(r);
    }

private:
    struct Deleter {
        void operator()(collapse_session* s) const { collapse_session_destroy(s); }
    };
    std::unique_ptr<collapse_session, Deleter> s_;
};

}  // namespace collapse
