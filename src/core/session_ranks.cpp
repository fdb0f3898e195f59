// A session's part in a run spread over ranks (src/mpi/): the combined class sums for the second
// pass of every rank, and the second pass's partial results; the exact row store spread over the
// ranks by class (the owners, the rows in and out, each rank's part of the row-store metrics);
// the pair-metric tiles spread over the ranks.
// The first-pass state itself moves as checkpoint sections (session_state.cpp).
#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/session.hpp"

namespace collapse::internal {

void Session::write_class_sums(StateWriter& w) {
    check_state("write_class_sums");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "write_class_sums: the session has seen no rows yet (its width is unknown)");
    backend_->sync();
    backend_->write_class_sums(w);
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

bool Session::can_spread_rows() const { return backend_ && state_ == State::Ingest && backend_->can_spread_rows(); }

void Session::begin_rows_spread() {
    check_state("begin_rows_spread");
    if (!can_spread_rows()) fail(COLLAPSE_ERR_STATE, "begin_rows_spread: the session keeps no exact row store in its first pass");
    backend_->sync();
    backend_->begin_rows_spread();
}

std::vector<int32_t> Session::spread_owners(int P, std::vector<int32_t>& ids) {
    check_state("spread_owners");
    if (!backend_ || P < 1) fail(COLLAPSE_ERR_STATE, "spread_owners: no backend, or no ranks");
    HostBudget::Lease kept_lease;
    const KeptSet kept = kept_classes(nullptr, kept_lease);
    const size_t K = kept.ids.size();
    const HostBudget::Lease lease = budget_->reserve(add_bytes(mul_bytes((int64_t)K, 8 + 8 + 4), mul_bytes(P, 8)),
                                                     "the owner ranks of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    // A class's work: its SVD (n min(n, d)) and, when its rows are NC4's, the logits (n V) and the
    // distances to the K means. Largest first, each to the least loaded rank (lowest on ties).
    // Reservoirs: at most svd_max_rows_per_token rows a class, and only the SVDs.
    const bool sampled = backend_->spread_samples();
    const bool nc4 = cfg_.compute_nc4 && clf_.present() && !cfg_.nc4_held_out && !sampled;
    std::vector<double> work(K);
    for (size_t s = 0; s < K; ++s) {
        const double n = sampled ? (double)std::min(kept.counts[s], cfg_.svd_max_rows_per_token) : (double)kept.counts[s];
        work[s] = n * (std::min<double>(n, (double)d_) + (nc4 ? (double)(V_ + (int64_t)K) : 0.0));
    }
    std::vector<size_t> order(K);
    std::iota(order.begin(), order.end(), size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return work[a] > work[b]; });
    std::vector<double> load((size_t)P, 0.0);
    std::vector<int32_t> owner(K, 0);
    for (size_t s : order) {
        const size_t r = (size_t)(std::min_element(load.begin(), load.end()) - load.begin());
        owner[s] = (int32_t)r;
        load[r] += work[s];
    }
    ids = kept.ids;
    return owner;
}

void Session::spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const Backend::RowsFn& fn) {
    check_state("spread_read");
    backend_->spread_read(ids, max_rows, fn);
}

void Session::spread_open(const std::vector<int32_t>& owned) {
    check_state("spread_open");
    backend_->spread_open(owned);
}

void Session::spread_append(int32_t c, const double* rows, int64_t n, const int64_t* slots) {
    if (c < 0 || c >= V_ || n < 0) fail(COLLAPSE_ERR_INTERNAL, "spread_append: class ", c, " or ", n, " rows out of range");
    backend_->spread_append(c, rows, n, slots);
}

bool Session::spread_samples() const { return backend_ && backend_->spread_samples(); }

void Session::spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w) {
    check_state("spread_write_picks");
    backend_->spread_write_picks(source, ids, w);
}

void Session::spread_take_picks(const StateReader& r) {
    check_state("spread_take_picks");
    backend_->spread_take_picks(r);
}

void Session::spread_close() { backend_->spread_close(); }

void Session::save_spread_part(StateWriter& w) {
    check_state("save_spread_part");
    HostBudget::Lease kept_lease;
    backend_->spread_part(kept_classes(nullptr, kept_lease), clf_, w);
}

void Session::merge_spread_part(const StateReader& r) {
    check_state("merge_spread_part");
    HostBudget::Lease kept_lease;
    backend_->spread_merge(kept_classes(nullptr, kept_lease), clf_, r);
}

bool Session::can_spread_pairs() const { return backend_ && backend_->can_spread_pairs(); }

bool Session::save_pair_inputs(StateWriter& w) {
    check_state("save_pair_inputs");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "save_pair_inputs: the session has seen no rows yet");
    backend_->sync();
    HostBudget::Lease kept_lease;
    return backend_->pair_inputs(kept_classes(nullptr, kept_lease), w);
}

void Session::save_pair_part(const StateReader& inputs, int rank, int P, StateWriter& w) {
    check_state("save_pair_part");
    if (!backend_) fail(COLLAPSE_ERR_STATE, "save_pair_part: the session has seen no rows yet");
    backend_->pair_part(inputs, rank, P, w);
}

void Session::merge_pair_part(const StateReader& r) {
    check_state("merge_pair_part");
    HostBudget::Lease kept_lease;
    backend_->pair_merge(kept_classes(nullptr, kept_lease), r);
}

}  // namespace collapse::internal
