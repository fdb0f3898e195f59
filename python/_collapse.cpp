// collapse._collapse: the Python package's native part, a thin layer over the public C API
// (include/collapse/collapse.h) and nothing else, so the package is one more client of the stable
// ABI of libcollapse.so. Buffers arrive already described by the Python layer (collapse/__init__.py:
// pointer, dtype, memory kind, rows, cols, row stride), so numpy arrays, torch CPU/CUDA tensors and
// __cuda_array_interface__ objects all reach the engine as the caller's own memory, never copied
// here. The GIL is released around every call that ingests, computes or touches files.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "collapse/collapse.h"

namespace py = pybind11;

namespace {

// A failed C API call: its status and collapse_last_error(), raised in Python as the exception the
// package's error factory makes for that status (collapse/__init__.py documents the mapping).
struct StatusError {
    int status;
    std::string message;
};

py::object g_error_factory;  // (status, message) -> exception instance; set by collapse/__init__.py

void check(collapse_status s) {
    if (s != COLLAPSE_OK) throw StatusError{int(s), collapse_last_error()};
}

// (data pointer, dtype, memory, rows, cols, row_stride), as the Python layer describes a buffer.
using BufferDesc = std::tuple<uintptr_t, int, int, int64_t, int64_t, int64_t>;

collapse_buffer to_buffer(const BufferDesc& d) {
    collapse_buffer b{};
    b.data = reinterpret_cast<const void*>(std::get<0>(d));
    b.dtype = collapse_dtype(std::get<1>(d));
    b.memory = collapse_memory(std::get<2>(d));
    b.rows = std::get<3>(d);
    b.cols = std::get<4>(d);
    b.row_stride = std::get<5>(d);
    return b;
}

// The data pointers of the last ingest call's buffers, as handed to the C API (the tests' proof
// that the engine is given the caller's memory, not a copy).
std::vector<uintptr_t> g_last_pointers;

struct OptBuffer {
    std::optional<collapse_buffer> b;
    explicit OptBuffer(const std::optional<BufferDesc>& d) {
        if (d) b = to_buffer(*d);
    }
    const collapse_buffer* get() const { return b ? &*b : nullptr; }
};

void record(std::initializer_list<const collapse_buffer*> bufs) {
    g_last_pointers.clear();
    for (const collapse_buffer* b : bufs) g_last_pointers.push_back(b ? reinterpret_cast<uintptr_t>(b->data) : 0);
}

class Report {
public:
    explicit Report(collapse_report* r) : r_(r) {}
    ~Report() { collapse_report_destroy(r_); }
    Report(const Report&) = delete;
    Report& operator=(const Report&) = delete;

    std::string json() const {
        const char* s = nullptr;
        check(collapse_report_json(r_, &s));
        return s;
    }
    // None for a null metric.
    py::object scalar(const std::string& key) const {
        double v = 0;
        int is_null = 0;
        check(collapse_report_get_scalar(r_, key.c_str(), &v, &is_null));
        if (is_null) return py::none();
        return py::float_(v);
    }
    int64_t num_tokens() const {
        int64_t n = 0;
        check(collapse_report_num_tokens(r_, &n));
        return n;
    }
    py::array_t<int64_t> token_ids() const {
        py::array_t<int64_t> out(num_tokens());
        check(collapse_report_token_ids(r_, out.mutable_data(), out.size()));
        return out;
    }
    py::array_t<double> token_array(const std::string& key) const {
        py::array_t<double> out(num_tokens());
        check(collapse_report_token_array(r_, key.c_str(), out.mutable_data(), out.size()));
        return out;
    }
    void write_json(const std::string& path) const {
        collapse_status s;
        {
            py::gil_scoped_release nogil;
            s = collapse_report_write_json(r_, path.c_str());
        }
        check(s);
    }

private:
    collapse_report* r_;
};

// Options from YAML text (the engine's own parser and messages), then the keyword overrides.
collapse_options options_from(const std::string& yaml, const std::string& source, int64_t num_classes, int64_t dim) {
    collapse_options o;
    check(collapse_options_from_yaml_string(yaml.c_str(), source.c_str(), &o));
    if (num_classes > 0) o.num_classes = num_classes;
    if (dim > 0) o.dim = dim;
    return o;
}

class Session {
public:
    Session(const std::string& yaml, const std::string& source, int64_t num_classes, int64_t dim) {
        // exclude_token_ids points into this thread's storage until the next parse: create now.
        const collapse_options o = options_from(yaml, source, num_classes, dim);
        check(collapse_session_create(&o, &s_));
    }
    // Python keeps the object alive while one of its methods runs: no call is in flight here.
    ~Session() {
        if (s_) collapse_session_destroy(s_);
    }
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    // Another thread's call releases the GIL while it runs: freeing the session under it was a use
    // after free (and the engine's refusal, seen once the call had started, leaked the session).
    void close() {
        if (calls_ > 0)
            throw StatusError{COLLAPSE_ERR_STATE, "close(): another thread's call on this session is running; close it after that call returns"};
        if (s_) collapse_session_destroy(s_);
        s_ = nullptr;
    }

    void ingest_rows(const BufferDesc& x, const BufferDesc& y, const std::optional<BufferDesc>& valid,
                     const std::optional<BufferDesc>& seq, const std::optional<BufferDesc>& pos, uintptr_t stream) {
        const collapse_buffer xb = to_buffer(x), yb = to_buffer(y);
        const OptBuffer vb(valid), sb(seq), pb(pos);
        record({&xb, &yb, vb.get(), sb.get(), pb.get()});
        call([&](collapse_session* s) {
            return sb.get() ? collapse_session_ingest_tagged_rows(s, &xb, &yb, vb.get(), sb.get(), pb.get(), (void*)stream)
                            : collapse_session_ingest_rows(s, &xb, &yb, vb.get(), (void*)stream);
        });
    }
    void ingest_sequences(const BufferDesc& hidden, const BufferDesc& ids, const std::optional<BufferDesc>& mask,
                          int64_t batch, int64_t seq_len, uintptr_t stream) {
        const collapse_buffer hb = to_buffer(hidden), ib = to_buffer(ids);
        const OptBuffer mb(mask);
        record({&hb, &ib, mb.get()});
        call([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &hb, &ib, mb.get(), batch, seq_len, (void*)stream); });
    }
    void set_classifier(const BufferDesc& w, const std::optional<BufferDesc>& bias) {
        const collapse_buffer wb = to_buffer(w);
        const OptBuffer bb(bias);
        record({&wb, bb.get()});
        call([&](collapse_session* s) { return collapse_session_set_classifier(s, &wb, bb.get()); });
    }
    void sync() { call([](collapse_session* s) { return collapse_session_sync(s); }); }
    bool needs_second_pass() {
        int needed = 0;
        call([&](collapse_session* s) { return collapse_session_needs_second_pass(s, &needed); });
        return needed != 0;
    }
    void begin_second_pass() { call([](collapse_session* s) { return collapse_session_begin_second_pass(s); }); }
    void save(const std::string& p) { call([&](collapse_session* s) { return collapse_session_save(s, p.c_str()); }); }
    void load(const std::string& p) { call([&](collapse_session* s) { return collapse_session_load(s, p.c_str()); }); }
    void merge(const std::string& p) { call([&](collapse_session* s) { return collapse_session_merge(s, p.c_str()); }); }
    std::unique_ptr<Report> compute() {
        collapse_report* r = nullptr;
        call([&](collapse_session* s) { return collapse_session_compute(s, &r); });
        return std::make_unique<Report>(r);
    }
    std::unique_ptr<Report> snapshot() {
        collapse_report* r = nullptr;
        call([&](collapse_session* s) { return collapse_session_snapshot(s, &r); });
        return std::make_unique<Report>(r);
    }

private:
    collapse_session* live() const {
        if (!s_) throw StatusError{COLLAPSE_ERR_STATE, "the session is closed"};
        return s_;
    }
    // Every engine call runs without the GIL, counted in calls_ (changed only with the GIL held)
    // so that close() on another thread refuses instead of freeing the session under it.
    template <class F>
    void call(F&& f) {
        collapse_session* s = live();
        collapse_status st;
        ++calls_;
        {
            py::gil_scoped_release nogil;
            st = f(s);
        }
        --calls_;
        check(st);
    }
    collapse_session* s_ = nullptr;
    int calls_ = 0;
};

// Validates config text (the engine's parser and messages); returns nothing.
void check_config(const std::string& yaml, const std::string& source) { options_from(yaml, source, 0, 0); }

// Validates a config file by the engine's file reader (its messages name the path and line).
void check_config_file(const std::string& path) {
    collapse_options o;
    check(collapse_options_from_yaml_file(path.c_str(), &o));
}

std::unique_ptr<Report> analyze_files(const std::map<std::string, std::string>& paths, const std::optional<std::string>& yaml,
                                      const std::string& source, int64_t num_classes, int64_t batch_rows,
                                      const std::string& command) {
    collapse_analysis a{};
    a.struct_size = sizeof a;
    a.config_yaml = yaml ? yaml->c_str() : nullptr;
    a.config_source = source.c_str();
    const std::pair<const char*, const char**> fields[] = {
        {"features", &a.features},   {"labels", &a.labels},       {"valid", &a.valid},
        {"sequence_ids", &a.sequence_ids}, {"positions", &a.positions}, {"hidden", &a.hidden},
        {"input_ids", &a.input_ids}, {"attention_mask", &a.attention_mask}, {"classifier", &a.classifier},
        {"bias", &a.bias}};
    for (const auto& [name, slot] : fields) {
        auto it = paths.find(name);
        if (it != paths.end()) *slot = it->second.c_str();
    }
    for (const auto& kv : paths) {
        bool known = false;
        for (const auto& f : fields) known = known || kv.first == f.first;
        if (!known) throw StatusError{COLLAPSE_ERR_INVALID_ARGUMENT, "analyze: unknown input '" + kv.first + "'"};
    }
    a.num_classes = num_classes;
    a.batch_rows = batch_rows;
    a.command = command.c_str();
    collapse_report* r = nullptr;
    collapse_status st;
    {
        py::gil_scoped_release nogil;
        st = collapse_analyze_files(&a, &r);
    }
    check(st);
    return std::make_unique<Report>(r);
}

}  // namespace

PYBIND11_MODULE(_collapse, m) {
    m.doc() = "collapse native layer over the C API (use the collapse package, not this module)";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const StatusError& e) {
            if (g_error_factory && !g_error_factory.is_none()) {
                py::object exc = g_error_factory(e.status, e.message);
                PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
            } else {
                PyErr_SetString(PyExc_RuntimeError, e.message.c_str());
            }
        }
    });
    m.def("_set_error_factory", [](py::object f) { g_error_factory = std::move(f); });
    m.def("_last_pointers", [] { return g_last_pointers; },
          "data pointers of the last ingest/set_classifier call's buffers as handed to the C API (0: none)");
    m.def("version", [] { return std::string(collapse_version_string()); });
    m.def("status_string", [](int s) { return std::string(collapse_status_string(collapse_status(s))); });
    m.def("backend_available", [](const std::string& name) { return collapse_backend_available(name.c_str()) != 0; });
    m.def("check_config", &check_config);
    m.def("check_config_file", &check_config_file);
    m.def("analyze_files", &analyze_files);
    m.attr("sizeof_options") = sizeof(collapse_options);

    py::class_<Report>(m, "Report")
        .def("json", &Report::json)
        .def("scalar", &Report::scalar)
        .def("num_tokens", &Report::num_tokens)
        .def("token_ids", &Report::token_ids)
        .def("token_array", &Report::token_array)
        .def("write_json", &Report::write_json);

    py::class_<Session>(m, "Session")
        .def(py::init<const std::string&, const std::string&, int64_t, int64_t>())
        .def("close", &Session::close)
        .def("ingest_rows", &Session::ingest_rows)
        .def("ingest_sequences", &Session::ingest_sequences)
        .def("set_classifier", &Session::set_classifier)
        .def("sync", &Session::sync)
        .def("needs_second_pass", &Session::needs_second_pass)
        .def("begin_second_pass", &Session::begin_second_pass)
        .def("save", &Session::save)
        .def("load", &Session::load)
        .def("merge", &Session::merge)
        .def("compute", &Session::compute)
        .def("snapshot", &Session::snapshot);

    // Drop the factory before the interpreter tears down the objects it refers to.
    auto atexit = py::module_::import("atexit");
    atexit.attr("register")(py::cpp_function([] { g_error_factory = py::object(); }));
}
