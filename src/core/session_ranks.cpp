// A session's part in a run spread over ranks (src/mpi/): the combined class sums for the second
// pass of every rank, and the second pass's partial results. The first-pass state itself moves
// as checkpoint sections (session_state.cpp).
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/session.hpp"

namespace collapse::internal {

namespace {
// Forwards the sections named in `keep` and drops the rest (never held).
class FilterWriter final : public StateWriter {
public:
    FilterWriter(StateWriter& out, std::vector<std::string> keep) : out_(out), keep_(std::move(keep)) {}
    void add(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, const void* data, size_t bytes) override {
        if (kept(name)) out_.add(name, t, shape, data, bytes);
    }
    void begin_section(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, size_t bytes) override {
        on_ = kept(name);
        if (on_) out_.begin_section(name, t, shape, bytes);
    }
    void append(const void* data, size_t bytes) override {
        if (on_) out_.append(data, bytes);
    }
    void end_section() override {
        if (on_) out_.end_section();
        on_ = false;
    }

private:
    bool kept(const std::string& n) const {
        for (const auto& k : keep_)
            if (k == n) return true;
        return false;
    }
    StateWriter& out_;
    std::vector<std::string> keep_;
    bool on_ = false;
};
}  // namespace

void Session::write_class_sums(StateWriter& w) {
    check_state("write_class_sums");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "write_class_sums: the session has seen no rows yet (its width is unknown)");
    backend_->sync();
    // The backend's own state writer, filtered: one layout for every backend. Only the first
    // sections are kept; the row store, when there is one, is read and dropped (the exact store
    // never needs a second pass on the CPU backend, so this is the sampled or off case).
    FilterWriter f(w, {"class_counts", "class_sums"});
    backend_->save_state(f);
}

void Session::adopt_class_sums(const StateReader& r) {
    check_state("adopt_class_sums");
    if (state_ != State::Ingest) fail(COLLAPSE_ERR_STATE, "adopt_class_sums: only before the second pass");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "adopt_class_sums: the session has no width yet");
    const std::string what = r.description();
    const StateSection c = r.section("class_counts"), s = r.section("class_sums");
    if (c.dtype_code != (uint32_t)COLLAPSE_I64 || c.shape != std::vector<int64_t>{V_})
        fail(COLLAPSE_ERR_IO, what, ": section class_counts is not int64 [V] with V = ", V_);
    if (s.dtype_code != (uint32_t)COLLAPSE_F64 || s.shape != std::vector<int64_t>{V_, d_})
        fail(COLLAPSE_ERR_IO, what, ": section class_sums is not float64 [V, d] = [", V_, ", ", d_, "]");
    const int64_t* n = static_cast<const int64_t*>(c.data);
    for (int64_t k = 0; k < V_; ++k)
        if (n[k] < 0) fail(COLLAPSE_ERR_IO, what, ": section class_counts is negative at class ", k);
    backend_->adopt_class_sums(n, static_cast<const double*>(s.data));
}

void Session::save_second_pass(StateWriter& w) {
    check_state("save_second_pass");
    if (state_ != State::SecondPass) fail(COLLAPSE_ERR_STATE, "save_second_pass: the second pass has not begun");
    backend_->sync();
    backend_->save_second_pass(w);
}

void Session::merge_second_pass(const StateReader& r) {
    check_state("merge_second_pass");
    if (state_ != State::SecondPass) fail(COLLAPSE_ERR_STATE, "merge_second_pass: the second pass has not begun");
    backend_->sync();
    backend_->merge_second_pass(r);
}

}  // namespace collapse::internal
