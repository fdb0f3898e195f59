// The CPU backend's state in a checkpoint (the layout of src/core/state_sections.hpp), and the merge
// of another shard's state. Every section is checked before anything changes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "base/error.hpp"
#include "core/state_sections.hpp"
#include "cpu/cpu_backend.hpp"

namespace collapse::internal {

void CpuBackend::save_state(StateWriter& w) {
    write_state_core(w, rows_, V_, d_, count_.data(), sum_.data(), sqnorm_.data());
    if (gram_streaming_) {
        gram_flush();
        w.add("gram", COLLAPSE_F64, {d_, d_}, gram_.data(), gram_.size() * 8);
        // Rows of classes below min_samples_per_token, by class.
        std::vector<int64_t> ids;
        for (const auto& h : holdback_) ids.push_back(h.first);
        std::sort(ids.begin(), ids.end());
        std::vector<int64_t> nrows;
        int64_t total = 0;
        for (int64_t c : ids) nrows.push_back((int64_t)holdback_.at((int32_t)c).size() / d_), total += nrows.back();
        w.add("holdback_ids", COLLAPSE_I64, {(int64_t)ids.size()}, ids.data(), ids.size() * 8);
        w.add("holdback_counts", COLLAPSE_I64, {(int64_t)ids.size()}, nrows.data(), nrows.size() * 8);
        w.begin_section("holdback_rows", COLLAPSE_F64, {total, d_}, (size_t)(total * d_) * 8);
        for (int64_t c : ids) {
            const auto& h = holdback_.at((int32_t)c);
            w.append(h.data(), h.size() * 8);
        }
        w.end_section();
    }
    if (store_) write_store(w, *store_, V_, d_, load_budget());  // spilled rows are copied in: a checkpoint stands alone
}

void CpuBackend::load_state(const StateReader& r, bool merge) {
    // Check every section first: a refused checkpoint changes nothing.
    const StateView v =
        read_state(r, V_, d_, cfg_, gram_streaming_, store_ != nullptr, has_row_store() ? 0 : cfg_.svd_max_rows_per_token);
    const int64_t* off = v.store_offsets;
    // Reservoirs and held-back rows stay in memory (the exact store spills what does not fit), and
    // the counts before this shard are copied: counted before any of it is allocated.
    const int64_t extra = add_bytes(mul_bytes(v.holdback_total, d_, 8) + mul_bytes(v.holdback_classes, 64),
                                    has_row_store() || !off ? 0 : mul_bytes(off[V_], d_, 8));
    budget_->check(add_bytes(extra, mul_bytes(V_, 8)), "loading " + r.description() + " (its reservoirs, held-back rows and V-long counts)",
                   "raise host_memory_limit (or use svd_mode: exact, whose rows spill to disk)");
    const HostBudget::Lease counts_copy = budget_->reserve(mul_bytes(V_, 8), "the counts before " + r.description());

    // The exact store first: it is the only part that can fail (a full disk while spilling), and
    // then it is rolled back, so a refused checkpoint changes nothing.
    if (has_row_store()) {
        if (!merge) store_->clear();  // resume: a fresh session, nothing to keep
        load_store(r, v, *store_, V_, d_);
    }

    if (!merge) {
        std::fill(count_.begin(), count_.end(), 0);
        std::fill(sum_.begin(), sum_.end(), 0.0);
        std::fill(sqnorm_.begin(), sqnorm_.end(), 0.0);
        std::fill(gram_.begin(), gram_.end(), 0.0);
        holdback_.clear();
        if (store_ && !has_row_store()) store_->clear();
        rows_ = Counts{};
    }
    add_row_counts(rows_, v.rows);
    const std::vector<int64_t> before = count_;  // n_c before this shard (merge)
    for (int64_t c = 0; c < V_; ++c) count_[(size_t)c] += v.counts[c];
    for (size_t k = 0; k < sum_.size(); ++k) sum_[k] += v.sums[k];
    for (int64_t c = 0; c < V_; ++c) sqnorm_[(size_t)c] += v.sqnorms[c];

    if (gram_streaming_) {
        for (int64_t a = 0; a < d_; ++a)  // upper triangle only: the lower one is not part of the format
            for (int64_t b = a; b < d_; ++b) gram_[(size_t)(a * d_ + b)] += v.gram[a * d_ + b];
        // Held-back rows: a class that now reaches min_samples_per_token sends every held row (of
        // both shards) to the Gram, as one run over all rows would have.
        const double* hr = v.holdback_rows;
        for (int64_t i = 0; i < v.holdback_classes; ++i) {
            auto& h = holdback_[(int32_t)v.holdback_ids[i]];
            h.insert(h.end(), hr, hr + v.holdback_counts[i] * d_);
            hr += v.holdback_counts[i] * d_;
        }
        for (auto it = holdback_.begin(); it != holdback_.end();) {
            if (count_[(size_t)it->first] >= cfg_.min_samples_per_token) {
                for (size_t k = 0; k < it->second.size(); k += (size_t)d_) gram_add_row(it->second.data() + k);
                it = holdback_.erase(it);
            } else {
                ++it;
            }
        }
        gram_flush();
    }
    if (store_ && !has_row_store()) {  // reservoirs
        const int64_t cap = cfg_.svd_max_rows_per_token;
        for (int64_t c = 0; c < V_; ++c) {
            const int64_t n = off[c + 1] - off[c];
            if (n == 0) continue;
            const double* src = v.store_rows + off[c] * d_;
            const int64_t ka = store_->memory_rows((int32_t)c);
            if (ka + n <= cap)
                std::memcpy(store_->append((int32_t)c, n), src, (size_t)(n * d_) * 8);
            else
                store_->assign((int32_t)c, merge_reservoirs(cfg_.seed, (int32_t)c, cap, d_, store_->memory_data((int32_t)c), ka, before[(size_t)c],
                                                            src, n, v.counts[c]));
        }
    }
    held_.update(held_rows_bytes());
}

}  // namespace collapse::internal
