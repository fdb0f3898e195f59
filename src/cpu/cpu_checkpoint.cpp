// The CPU backend's state in a checkpoint (the layout of src/core/state_sections.hpp), and the merge
// of another shard's state. Every section is checked before anything changes.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "base/error.hpp"
#include "core/second_pass_part.hpp"
#include "core/shifted_sums.hpp"
#include "core/state_sections.hpp"
#include "cpu/cpu_backend.hpp"

namespace collapse::internal {

void CpuBackend::save_state(StateWriter& w) {
    // The reference rows, the sums of squares about them and Sigma_W's shifted scatter (upper triangle).
    if (within_streaming_) gram_flush();
    write_shifted_state(w, *budget_, rows_, V_, d_, count_.data(), sum_.data(), shifted_ ? shift_.data() : nullptr, sqdev_.data(),
                        within_streaming_ && within_valid_ ? within_.data() : nullptr);
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
    // Rows spread over ranks (cpu_ranks.cpp): the state goes to the root without them.
    if (store_ && spread_phase_ == SpreadPhase::None) write_store(w, *store_, V_, d_, load_budget());  // spilled rows are copied in: a checkpoint stands alone
}

void CpuBackend::load_state(const StateReader& r, bool merge) {
    refuse_if_spread(merge ? "no checkpoint can be merged into it" : "no checkpoint can be loaded into it");
    // Check every section first: a refused checkpoint changes nothing.
    const StateView v =
        read_state(r, V_, d_, cfg_, gram_streaming_, store_ != nullptr && spread_phase_ == SpreadPhase::None, has_row_store() ? 0 : cfg_.svd_max_rows_per_token);
    const int64_t* off = v.store_offsets;
    // Reservoirs and held-back rows stay in memory (the exact store spills what does not fit), and
    // the counts before this shard are copied: counted before any of it is allocated.
    const int64_t extra = add_bytes(mul_bytes(v.holdback_total, d_, 8) + mul_bytes(v.holdback_classes, 64),
                                    has_row_store() || !off ? 0 : mul_bytes(off[V_], d_, 8));
    budget_->check(add_bytes(add_bytes(extra, mul_bytes(V_, 8)), merge_shifted_bytes(V_, d_, within_streaming_)),
                   "loading " + r.description() + " (its reservoirs, held-back rows and V-long counts)",
                   "raise host_memory_limit (or use svd_mode: exact, whose rows spill to disk)");
    const HostBudget::Lease counts_copy = budget_->reserve(mul_bytes(V_, 8), "the counts before " + r.description());
    // The reference-row sections (optional: without class_sqdev the sums of squares are about the
    // zero row; without within_scatter nc1_* are null with a note).
    const ShiftedSections shifted = read_shifted_sections(r, V_, d_);
    const bool within_merge = within_streaming_ && (within_valid_ || !merge) && shifted.scatter != nullptr;

    // The exact store first: it is the only part that can fail (a full disk while spilling), and
    // then it is rolled back, so a refused checkpoint changes nothing.
    if (has_row_store() && spread_phase_ == SpreadPhase::None) {
        if (!merge) store_->clear();  // resume: a fresh session, nothing to keep
        load_store(r, v, *store_, V_, d_);
    }

    if (!merge) {
        std::fill(count_.begin(), count_.end(), 0);
        std::fill(sum_.begin(), sum_.end(), 0.0);
        std::fill(sqdev_.begin(), sqdev_.end(), 0.0);
        std::fill(gram_.begin(), gram_.end(), 0.0);
        std::fill(within_.begin(), within_.end(), 0.0);
        std::fill(shift_.begin(), shift_.end(), 0.0f);
        within_valid_ = true;
        holdback_clear();
        if (store_ && !has_row_store()) store_->clear();
        rows_ = Counts{};
    }
    const std::vector<int64_t> before = count_;  // n_c before this shard (merge)
    // Reservoirs spread over ranks: the merged sample decided from the counts, no row here
    // (cpu_ranks.cpp); first, as it is the part that can be refused (host_memory_limit).
    if (spread_samples() && spread_phase_ == SpreadPhase::Gathering) merge_picks(v.counts, before);
    add_row_counts(rows_, v.rows);
    // This session's reference row s_c stays where it has one (a class new here takes the shard's);
    // the shard's sums of squares and scatter move to it. Held-back rows enter later, with the merged rows.
    within_valid_ = within_merge;
    merge_shifted_state(*budget_, V_, d_, cfg_.min_samples_per_token, before.data(), v, shifted, shifted_ ? shift_.data() : nullptr,
                        sqdev_.data(), within_merge ? within_.data() : nullptr);
    for (int64_t c = 0; c < V_; ++c) count_[(size_t)c] += v.counts[c];
    for (size_t k = 0; k < sum_.size(); ++k) sum_[k] += v.sums[k];

    if (gram_streaming_) {
        for (int64_t a = 0; a < d_; ++a)  // upper triangle only: the lower one is not part of the format
            for (int64_t b = a; b < d_; ++b) gram_[(size_t)(a * d_ + b)] += v.gram[a * d_ + b];
        // Held-back rows: a class that now reaches min_samples_per_token sends every held row (of
        // both shards) to the Gram, as one run over all rows would have.
        const double* hr = v.holdback_rows;
        for (int64_t i = 0; i < v.holdback_classes; ++i) {
            holdback_append((int32_t)v.holdback_ids[i], hr, v.holdback_counts[i] * d_);
            hr += v.holdback_counts[i] * d_;
        }
        for (auto it = holdback_.begin(); it != holdback_.end();) {
            if (count_[(size_t)it->first] >= cfg_.min_samples_per_token) {
                for (size_t k = 0; k < it->second.size(); k += (size_t)d_) gram_add(it->first, it->second.data() + k);
                const auto next = std::next(it);
                holdback_erase(it);
                it = next;
            } else {
                ++it;
            }
        }
        gram_flush();
    }
    if (store_ && !has_row_store() && spread_phase_ == SpreadPhase::None) {  // reservoirs
        const int64_t cap = cfg_.svd_max_rows_per_token;
        for (int64_t c = 0; c < V_; ++c) {
            const int64_t n = off[c + 1] - off[c];
            if (n == 0) continue;
            const double* src = v.store_rows + off[c] * d_;
            store_->assign((int32_t)c, merge_reservoirs(cfg_.seed, (int32_t)c, cap, d_, store_->memory_data((int32_t)c),
                                                        store_->memory_rows((int32_t)c), before[(size_t)c], src, n, v.counts[c]));
        }
    }
    held_.update(held_rows_bytes());
}


// Ranks: the root's combined counts and sums, as the sections adopt_class_sums takes.
void CpuBackend::write_class_sums(StateWriter& w) {
    w.add("class_counts", COLLAPSE_I64, {V_}, count_.data(), (size_t)V_ * 8);
    w.add("class_sums", COLLAPSE_F64, {V_, d_}, sum_.data(), (size_t)(V_ * d_) * 8);
}

// Ranks: the combined counts and sums replace this rank's own (its first-pass state has gone to the
// root), so that begin_second_pass selects the root's kept set and means.
void CpuBackend::adopt_class_sums(const int64_t* counts, const double* sums) {
    std::copy(counts, counts + V_, count_.begin());
    std::copy(sums, sums + V_ * d_, sum_.begin());
}

// The second pass's partial results (core/second_pass_part.hpp): rows seen and NC4 agreements, and
// whichever of the kept set's Gram, the within-class scatter and the per-class NC4 counts this
// second pass makes.
SecondPassSizes CpuBackend::second_pass_sizes() const {
    return {gram2_.size(), within2_.size(), nc4_hits2_.size(), nc4_rows2_.size()};
}

void CpuBackend::save_second_pass(StateWriter& w) {
    if (!pass2_) fail(COLLAPSE_ERR_STATE, "save_second_pass: the second pass has not begun");
    write_second_pass_part(w, {pass2_rows_, nc4_agree_, gram2_.data(), within2_.data(), nc4_hits2_.data(), nc4_rows2_.data()},
                           second_pass_sizes(), d_);
}

void CpuBackend::merge_second_pass(const StateReader& r) {
    if (!pass2_) fail(COLLAPSE_ERR_STATE, "merge_second_pass: the second pass has not begun");
    const SecondPassPart p = read_second_pass_part(r, second_pass_sizes(), pass2_rows_, nc4_agree_);
    pass2_rows_ += p.rows;
    nc4_agree_ += p.agree;
    auto add = [](auto& to, const auto* from) {
        if (from)
            for (size_t k = 0; k < to.size(); ++k) to[k] += from[k];
    };
    add(gram2_, p.gram);
    add(within2_, p.within);
    add(nc4_hits2_, p.hits);
    add(nc4_rows2_, p.hit_rows);
}

}  // namespace collapse::internal
