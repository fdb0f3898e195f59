// The C boundary: every entry point runs its body through translate(), which turns exceptions
// into a status and the thread-local last-error text, and clears that text on success.
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "core/config.hpp"
#include "base/error.hpp"
#include "core/session.hpp"
#include "driver/analysis.hpp"
#include "driver/row_source.hpp"
#include "io/session_checkpoint.hpp"
#include "io/tensor_file.hpp"
#include "report/report.hpp"

struct collapse_session {
    collapse::internal::Session impl;
    // Held for the duration of one call (SessionCall): a call from a second thread while one runs is
    // refused with COLLAPSE_ERR_STATE instead of corrupting the session. A flag, not a lock: a
    // server that wants to share a session serialises its calls itself; nothing here ever waits.
    std::atomic<bool> busy{false};
    explicit collapse_session(const collapse::internal::Config& c) : impl(c) {}
};

struct collapse_report {
    nlohmann::json doc;
    mutable std::string text;  // doc serialised, filled on demand by collapse_report_json
    mutable std::once_flag text_once;  // readers on several threads fill text once (collapse.h, Threads)
    std::vector<int64_t> token_ids;
};

namespace {

thread_local std::string g_last_error;

template <class F>
collapse_status translate(F&& body) noexcept {
    try {
        body();
        g_last_error.clear();
        return COLLAPSE_OK;
    } catch (const collapse::internal::Error& e) {
        g_last_error = e.what();
        return e.status();
    } catch (const std::bad_alloc&) {
        g_last_error = "out of memory (allocation failed)";
        return COLLAPSE_ERR_OUT_OF_MEMORY;
    } catch (const std::exception& e) {
        g_last_error = std::string("internal error: ") + e.what();
        return COLLAPSE_ERR_INTERNAL;
    } catch (...) {
        g_last_error = "internal error: unknown exception";
        return COLLAPSE_ERR_INTERNAL;
    }
}

void require(const void* p, const char* what) {
    if (!p) collapse::internal::fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, " is NULL");
}

constexpr const char* kSessionBusy =
    "the session is in use by another thread (calls on one session must not overlap; see Threads in collapse.h)";

// Every session entry point holds one for its body: requires a session and takes its busy flag, or
// fails with COLLAPSE_ERR_STATE (changing nothing) when another thread's call holds it.
class SessionCall {
public:
    explicit SessionCall(collapse_session* s) : s_(s) {
        require(s, "session");
        bool idle = false;
        if (!s->busy.compare_exchange_strong(idle, true, std::memory_order_acquire))
            collapse::internal::fail(COLLAPSE_ERR_STATE, kSessionBusy);
    }
    ~SessionCall() { s_->busy.store(false, std::memory_order_release); }
    SessionCall(const SessionCall&) = delete;
    SessionCall& operator=(const SessionCall&) = delete;

private:
    collapse_session* s_;
};

}  // namespace

extern "C" {

const char* collapse_version_string(void) { return COLLAPSE_VERSION_STRING; }

const char* collapse_status_string(collapse_status s) {
    switch (s) {
        case COLLAPSE_OK: return "success";
        case COLLAPSE_ERR_INVALID_ARGUMENT: return "invalid argument";
        case COLLAPSE_ERR_CONFIG: return "invalid configuration";
        case COLLAPSE_ERR_IO: return "input/output error";
        case COLLAPSE_ERR_BAD_INPUT: return "bad input data";
        case COLLAPSE_ERR_SHAPE: return "shape mismatch";
        case COLLAPSE_ERR_STATE: return "call out of order";
        case COLLAPSE_ERR_OUT_OF_MEMORY: return "memory limit exceeded";
        case COLLAPSE_ERR_NO_CUDA: return "CUDA backend not available";
        case COLLAPSE_ERR_NOT_FOUND: return "not found";
        case COLLAPSE_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char* collapse_last_error(void) { return g_last_error.c_str(); }

int collapse_backend_available(const char* name) {
    if (!name) return 0;
    if (std::strcmp(name, "cpu") == 0) return 1;
    if (std::strcmp(name, "cuda") == 0) return collapse::internal::cuda_backend_available() ? 1 : 0;
    return 0;
}

// What the header's macros call: the caller's struct is struct_size bytes (its sizeof).
collapse_status collapse_options_init(collapse_options* options, size_t struct_size) {
    return translate([&] {
        require(options, "options");
        collapse::internal::write_options(collapse::internal::Config{}, options, struct_size);
    });
}

namespace {
// The YAML readers' common end: the token ids that options.exclude_token_ids points to are kept
// per thread until the thread's next call. A server reads its config on one thread and creates
// sessions on others, so a thread's last ids outlive the thread (moved to a list kept for the
// process: the ids of each thread that ever read a config with some).
struct YamlStorage {
    std::vector<int64_t> ids;
    ~YamlStorage() {
        if (ids.empty()) return;
        static std::mutex m;
        static auto* kept = new std::vector<std::vector<int64_t>>;  // never freed: reachable
        const std::lock_guard<std::mutex> lock(m);
        kept->push_back(std::move(ids));
    }
};

void options_from_config(collapse::internal::Config c, collapse_options* options, size_t struct_size) {
    thread_local YamlStorage storage;
    collapse::internal::check_options_size(struct_size);
    std::vector<int64_t> ids = std::move(c.exclude_token_ids);
    c.exclude_token_ids.clear();
    collapse::internal::write_options(c, options, struct_size);
    storage.ids = std::move(ids);  // the previous call's ids are freed here
    options->exclude_token_ids = storage.ids.empty() ? nullptr : storage.ids.data();
    options->num_exclude_token_ids = (int64_t)storage.ids.size();
}

void refuse_special_tokens(const collapse::internal::Config& c, const char* path) {
    // The special ids come from a tokenizer, which only the command line reads.
    if (c.exclude_special_tokens)
        collapse::internal::fail(COLLAPSE_ERR_CONFIG, path, ": exclude_special_tokens: true needs a tokenizer (collapse analyze ",
                                 "--tokenizer); through the C API list the ids in exclude_token_ids");
}
}  // namespace

collapse_status collapse_options_from_yaml_file_sized(const char* path, collapse_options* options, size_t struct_size) {
    return translate([&] {
        require(path, "path");
        require(options, "options");
        collapse::internal::Config c = collapse::internal::load_yaml_file(path);
        refuse_special_tokens(c, path);
        options_from_config(std::move(c), options, struct_size);
    });
}

// The functions of the macros' names, for programs built against collapse 0.1.0 (their calls are
// to these symbols): they fill the 0.1.0 struct, and a newer caller reaches them only by address.
collapse_status(collapse_options_default)(collapse_options* options) {
    return collapse_options_init(options, collapse::internal::kOptionsSize010);
}
collapse_status(collapse_options_from_yaml_file)(const char* path, collapse_options* options) {
    return collapse_options_from_yaml_file_sized(path, options, collapse::internal::kOptionsSize010);
}
collapse_status(collapse_options_from_yaml_string)(const char* text, const char* source, collapse_options* options) {
    return collapse_options_from_yaml_string_sized(text, source, options, collapse::internal::kOptionsSize010);
}

collapse_status collapse_session_create(const collapse_options* options, collapse_session** out) {
    return translate([&] {
        require(options, "options");
        require(out, "out");
        // This version's struct or an older caller's (whose later fields take their defaults).
        collapse::internal::check_options_size(options->struct_size);
        if (options->num_exclude_token_ids > 0) require(options->exclude_token_ids, "options.exclude_token_ids");
        *out = new collapse_session(collapse::internal::from_options(*options));
    });
}

void collapse_session_destroy(collapse_session* session) {
    if (!session) return;
    // Destroying a session while another thread's call runs on it is the caller's error; when it is
    // seen, leak the session rather than free memory that call is using, and say so.
    bool idle = false;
    if (!session->busy.compare_exchange_strong(idle, true, std::memory_order_acquire)) {
        g_last_error = std::string("collapse_session_destroy: not destroyed, ") + kSessionBusy;
        return;
    }
    delete session;
}

collapse_status collapse_session_ingest_rows(collapse_session* s, const collapse_buffer* features,
                                             const collapse_buffer* labels, const collapse_buffer* valid, void* stream) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.ingest_rows(features, labels, valid, stream);
    });
}

collapse_status collapse_session_ingest_tagged_rows(collapse_session* s, const collapse_buffer* features,
                                                    const collapse_buffer* labels, const collapse_buffer* valid,
                                                    const collapse_buffer* sequence_ids, const collapse_buffer* positions,
                                                    void* stream) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.ingest_tagged_rows(features, labels, valid, sequence_ids, positions, stream);
    });
}

collapse_status collapse_session_ingest_sequences(collapse_session* s, const collapse_buffer* hidden,
                                                  const collapse_buffer* input_ids, const collapse_buffer* mask,
                                                  int64_t batch, int64_t seq_len, void* stream) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.ingest_sequences(hidden, input_ids, mask, batch, seq_len, stream);
    });
}

collapse_status collapse_session_set_classifier(collapse_session* s, const collapse_buffer* weight,
                                                const collapse_buffer* bias) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.set_classifier(weight, bias);
    });
}

collapse_status collapse_session_set_ood_mean(collapse_session* s, const double* mean, int64_t dim) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.set_ood_mean(mean, dim);
    });
}

collapse_status collapse_session_sync(collapse_session* s) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.sync();
    });
}

collapse_status collapse_session_needs_second_pass(collapse_session* s, int* needed) {
    return translate([&] {
        const SessionCall call(s);
        require(needed, "needed");
        *needed = s->impl.needs_second_pass() ? 1 : 0;
    });
}

collapse_status collapse_session_begin_second_pass(collapse_session* s) {
    return translate([&] {
        const SessionCall call(s);
        s->impl.begin_second_pass();
    });
}

collapse_status collapse_session_save(collapse_session* s, const char* path) {
    return translate([&] {
        const SessionCall call(s);
        require(path, "path");
        collapse::internal::io::save_checkpoint(s->impl, path);
    });
}

collapse_status collapse_session_load(collapse_session* s, const char* path) {
    return translate([&] {
        const SessionCall call(s);
        require(path, "path");
        collapse::internal::io::load_checkpoint(s->impl, path);
    });
}

collapse_status collapse_session_merge(collapse_session* s, const char* path) {
    return translate([&] {
        const SessionCall call(s);
        require(path, "path");
        collapse::internal::io::merge_checkpoint(s->impl, path);
    });
}

namespace {
// The report of a result; *out only once everything has succeeded.
void make_report(const collapse::internal::Session& session, const collapse::internal::Result& res, collapse_report** out) {
    auto r = std::make_unique<collapse_report>();
    r->doc = collapse::internal::build_report(session.config(), res);
    for (const auto& t : res.metrics.tokens) r->token_ids.push_back(t.id);
    *out = r.release();
}
}  // namespace

collapse_status collapse_session_compute(collapse_session* s, collapse_report** out) {
    return translate([&] {
        const SessionCall call(s);
        require(out, "out");
        make_report(s->impl, s->impl.compute(true), out);
    });
}

collapse_status collapse_session_snapshot(collapse_session* s, collapse_report** out) {
    return translate([&] {
        const SessionCall call(s);
        require(out, "out");
        make_report(s->impl, s->impl.snapshot(), out);
    });
}

void collapse_report_destroy(collapse_report* r) { delete r; }

collapse_status collapse_report_get_scalar(const collapse_report* r, const char* key, double* value, int* is_null) {
    return translate([&] {
        require(r, "report");
        require(key, "key");
        require(value, "value");
        bool null = false;
        if (!collapse::internal::report_scalar(r->doc, key, value, &null))
            collapse::internal::fail(COLLAPSE_ERR_NOT_FOUND, "report has no scalar '", key, "'");
        if (is_null) *is_null = null ? 1 : 0;
    });
}

collapse_status collapse_report_num_tokens(const collapse_report* r, int64_t* count) {
    return translate([&] {
        require(r, "report");
        require(count, "count");
        *count = (int64_t)r->token_ids.size();
    });
}

collapse_status collapse_report_token_ids(const collapse_report* r, int64_t* out, int64_t capacity) {
    return translate([&] {
        require(r, "report");
        const auto& ids = r->token_ids;
        if (capacity < (int64_t)ids.size())
            collapse::internal::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "capacity ", capacity, " is less than the ", ids.size(), " tokens");
        if (!ids.empty()) require(out, "out");
        std::copy(ids.begin(), ids.end(), out);
    });
}

collapse_status collapse_report_token_array(const collapse_report* r, const char* key, double* out, int64_t capacity) {
    return translate([&] {
        require(r, "report");
        require(key, "key");
        const auto& ids = r->token_ids;
        if (capacity < (int64_t)ids.size())
            collapse::internal::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "capacity ", capacity, " is less than the ", ids.size(), " tokens");
        static const char* const keys[] = {"svd_entropy", "effective_rank", "normalized_entropy", "num_samples", "svd_rows"};
        // The per-class arrays (options.per_class_arrays; docs/METRICS.md "Anchor metrics").
        static const char* const per_class[] = {"mean_norm", "within_variance", "duality_cos", "duality_dot", "nc4_hit_rate", "nc4_rows"};
        bool known = false, is_per_class = false;
        for (const char* k : keys) known = known || std::strcmp(k, key) == 0;
        for (const char* k : per_class) is_per_class = is_per_class || std::strcmp(k, key) == 0;
        if (!known && !is_per_class)
            collapse::internal::fail(COLLAPSE_ERR_NOT_FOUND, "unknown per-token key '", key,
                           "' (svd_entropy, effective_rank, normalized_entropy, num_samples, svd_rows; with per_class_arrays: "
                           "mean_norm, within_variance, duality_cos, duality_dot, nc4_hit_rate, nc4_rows)");
        const auto& ta = r->doc["token_analysis"];
        if (is_per_class && !ids.empty() && !ta[std::to_string(ids[0])].contains(key))
            collapse::internal::fail(COLLAPSE_ERR_NOT_FOUND, "per-token key '", key,
                                     "' is a per-class array, which this report does not have (set options.per_class_arrays = 1)");
        if (!ids.empty()) require(out, "out");
        for (size_t i = 0; i < ids.size(); ++i) {
            const auto& v = ta[std::to_string(ids[i])][key];
            out[i] = v.is_null() ? std::nan("") : v.get<double>();
        }
    });
}

collapse_status collapse_report_json(const collapse_report* r, const char** json) {
    return translate([&] {
        require(r, "report");
        require(json, "json");
        std::call_once(r->text_once, [r] { r->text = collapse::internal::json_text(r->doc, 2); });
        *json = r->text.c_str();
    });
}

collapse_status collapse_report_write_json(const collapse_report* r, const char* path) {
    return translate([&] {
        require(r, "report");
        require(path, "path");
        collapse::internal::write_report_file(r->doc, path);
    });
}


collapse_status collapse_options_from_yaml_string_sized(const char* text, const char* source, collapse_options* options,
                                                       size_t struct_size) {
    return translate([&] {
        require(text, "text");
        require(options, "options");
        const char* src = source ? source : "config";
        collapse::internal::Config c = collapse::internal::parse_yaml(text, src);
        refuse_special_tokens(c, src);
        options_from_config(std::move(c), options, struct_size);
    });
}

collapse_status collapse_analyze_files(const collapse_analysis* a, collapse_report** out) {
    namespace ci = collapse::internal;
    return translate([&] {
        require(a, "analysis");
        require(out, "out");
        if (a->struct_size != sizeof(collapse_analysis))
            ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "collapse_analysis.struct_size is ", a->struct_size, ", expected ",
                     sizeof(collapse_analysis));
        auto given = [](const char* p) { return p && *p; };
        auto npy = [&](const char* p) { return given(p) ? std::optional<ci::io::Tensor>(ci::io::open_npy(p)) : std::nullopt; };
        const bool rows = given(a->features) || given(a->labels) || given(a->valid);
        const bool seqs = given(a->hidden) || given(a->input_ids) || given(a->attention_mask);
        if (rows == seqs)
            ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, rows ? "both the rows layout (features/labels/valid) and the sequence layout "
                                                           "(hidden/input_ids/attention_mask) were given: choose one"
                                                         : "no input: give features and labels, or hidden and input_ids");
        if (seqs && (given(a->sequence_ids) || given(a->positions)))
            ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "sequence_ids/positions are for the rows layout; the sequence layout tags its rows itself");
        if (given(a->positions) && !given(a->sequence_ids)) ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "positions needs sequence_ids");
        if (given(a->bias) && !given(a->classifier)) ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "bias needs a classifier");
        const char* config_source = a->config_source ? a->config_source : "config";
        ci::Config cfg = a->config_yaml ? ci::parse_yaml(a->config_yaml, config_source) : ci::Config{};
        refuse_special_tokens(cfg, config_source);
        if (a->batch_rows < 0 || a->num_classes < 0)
            ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, a->batch_rows < 0 ? "batch_rows" : "num_classes", " must be >= 0");
        if (a->batch_rows > 0) cfg.batch_rows = a->batch_rows;

        std::unique_ptr<ci::driver::RowSource> src;
        if (rows) {
            if (!given(a->features) || !given(a->labels)) ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the rows layout needs both features and labels");
            src = ci::driver::tensor_rows(ci::io::open_npy(a->features), ci::io::open_npy(a->labels), npy(a->valid), "npy",
                                          npy(a->sequence_ids), npy(a->positions));
        } else {
            if (!given(a->hidden) || !given(a->input_ids)) ci::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the sequence layout needs both hidden and input_ids");
            src = ci::driver::tensor_sequences(ci::io::open_npy(a->hidden), ci::io::open_npy(a->input_ids), npy(a->attention_mask), "npy");
        }
        const std::optional<ci::io::Tensor> w = npy(a->classifier), bias = npy(a->bias);
        if (w && w->shape.size() != 2)
            ci::fail(COLLAPSE_ERR_SHAPE, "classifier '", w->name, "' must be 2-D, has ", w->shape.size(), " dimensions");
        const int64_t V = ci::driver::resolve_num_classes(a->num_classes, cfg.num_classes, w ? &*w : nullptr, *src);
        cfg.num_classes = V;
        ci::Session session(cfg);
        if (w) {
            const collapse_buffer wb{w->data(), w->dtype, COLLAPSE_MEMORY_HOST, w->shape[0], w->shape[1], 0};
            std::optional<collapse_buffer> bb;
            if (bias) bb = collapse_buffer{bias->data(), bias->dtype, COLLAPSE_MEMORY_HOST, bias->numel(), 1, 0};
            session.set_classifier(&wb, bb ? &*bb : nullptr);
        }
        ci::driver::AnalysisOptions opt;
        if (a->command) opt.command = a->command;
        ci::driver::AnalysisOutcome res = ci::driver::run_analysis(session, *src, opt);
        auto r = std::make_unique<collapse_report>();
        r->doc = std::move(res.report);
        for (const auto& t : res.result.metrics.tokens) r->token_ids.push_back(t.id);
        *out = r.release();
    });
}

}  // extern "C"

#include "api/session_call.hpp"

namespace collapse::internal {

collapse_status run_session_call(collapse_session* s, const std::function<void(Session&)>& body) noexcept {
    return translate([&] {
        const SessionCall call(s);
        body(s->impl);
    });
}

collapse_status run_call(const std::function<void()>& body) noexcept { return translate(body); }

}  // namespace collapse::internal
