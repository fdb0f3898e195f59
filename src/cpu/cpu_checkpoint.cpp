// The CPU backend's state in a checkpoint (the layout of src/core/state_sections.hpp), and the merge
// of another shard's state. Every section is checked before anything changes.
#include <cblas.h>

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
    if (within_streaming_ && within_valid_) {
        // Sigma_W's shifted scatter (upper triangle) and the reference rows it is shifted by.
        gram_flush();
        w.add("within_scatter", COLLAPSE_F64, {d_, d_}, within_.data(), within_.size() * 8);
        w.add("within_shift", COLLAPSE_F32, {V_, d_}, shift_.data(), shift_.size() * 4);
    }
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
    // Sigma_W's sections (optional: a checkpoint without them leaves nc1_* null with a note).
    const double* wsc = nullptr;
    const float* wsh = nullptr;
    if (within_streaming_ && r.has("within_scatter") && r.has("within_shift")) {
        const StateSection a = r.section("within_scatter"), b = r.section("within_shift");
        if (a.dtype_code != (uint32_t)COLLAPSE_F64 || a.shape != std::vector<int64_t>{d_, d_})
            fail(COLLAPSE_ERR_IO, r.description(), ": section within_scatter is not float64 [d, d] with d = ", d_);
        if (b.dtype_code != (uint32_t)COLLAPSE_F32 || b.shape != std::vector<int64_t>{V_, d_})
            fail(COLLAPSE_ERR_IO, r.description(), ": section within_shift is not float32 [V, d] with V = ", V_, ", d = ", d_);
        wsc = static_cast<const double*>(a.data);
        wsh = static_cast<const float*>(b.data);
        for (int64_t i = 0; i < d_; ++i)
            for (int64_t j = i; j < d_; ++j)
                if (!std::isfinite(wsc[i * d_ + j])) fail(COLLAPSE_ERR_IO, r.description(), ": section within_scatter holds a non-finite value at (", i, ", ", j, ")");
        for (int64_t k = 0; k < V_ * d_; ++k)
            if (!std::isfinite(wsh[k])) fail(COLLAPSE_ERR_IO, r.description(), ": section within_shift holds a non-finite value at row ", k / d_);
    }

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
        std::fill(within_.begin(), within_.end(), 0.0);
        std::fill(shift_.begin(), shift_.end(), 0.0f);
        within_valid_ = true;
        holdback_.clear();
        if (store_ && !has_row_store()) store_->clear();
        rows_ = Counts{};
    }
    add_row_counts(rows_, v.rows);
    const std::vector<int64_t> before = count_;  // n_c before this shard (merge)
    if (within_streaming_) {
        within_valid_ = within_valid_ && wsc != nullptr;
        if (within_valid_) {
            // This session's reference row s_c stays where it has one; the shard's scatter of a class it
            // kept (n_c >= min_samples_per_token there) is moved from its shift b_c to s_c:
            // sum (x - s)(x - s)^T = sum (x - b)(x - b)^T + D t^T + t D^T + n t t^T, t = b - s,
            // D = sum (x - b) = S_c - n b. Held-back rows enter later with the merged shift.
            for (int64_t a = 0; a < d_; ++a)
                for (int64_t b = a; b < d_; ++b) within_[(size_t)(a * d_ + b)] += wsc[a * d_ + b];
            std::vector<double> D((size_t)d_), t((size_t)d_);
            for (int64_t c = 0; c < V_; ++c) {
                const size_t o = (size_t)c * (size_t)d_;
                if (v.counts[c] == 0) continue;
                if (before[(size_t)c] == 0) {
                    std::copy(wsh + o, wsh + o + (size_t)d_, shift_.begin() + (std::ptrdiff_t)o);
                    continue;
                }
                if (v.counts[c] < cfg_.min_samples_per_token) continue;
                const double n = (double)v.counts[c];
                for (int64_t j = 0; j < d_; ++j) {
                    D[(size_t)j] = v.sums[o + (size_t)j] - n * (double)wsh[o + (size_t)j];
                    t[(size_t)j] = (double)wsh[o + (size_t)j] - (double)shift_[o + (size_t)j];
                }
                cblas_dsyr2(CblasRowMajor, CblasUpper, (int)d_, 1.0, D.data(), 1, t.data(), 1, within_.data(), (int)d_);
                cblas_dsyr(CblasRowMajor, CblasUpper, (int)d_, n, t.data(), 1, within_.data(), (int)d_);
            }
        }
    }
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
                for (size_t k = 0; k < it->second.size(); k += (size_t)d_) gram_add(it->first, it->second.data() + k);
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


// Ranks: the combined counts and sums replace this rank's own (its first-pass state has gone to the
// root), so that begin_second_pass selects the root's kept set and means.
void CpuBackend::adopt_class_sums(const int64_t* counts, const double* sums) {
    std::copy(counts, counts + V_, count_.begin());
    std::copy(sums, sums + V_ * d_, sum_.begin());
}

// The second pass's partial results: rows seen and NC4 agreements, and whichever of the kept
// set's Gram, the within-class scatter and the per-class NC4 counts this second pass makes.
void CpuBackend::save_second_pass(StateWriter& w) {
    if (!pass2_) fail(COLLAPSE_ERR_STATE, "save_second_pass: the second pass has not begun");
    const int64_t n[2] = {pass2_rows_, nc4_agree_};
    w.add("pass2_counts", COLLAPSE_I64, {2}, n, sizeof n);
    if (!gram2_.empty()) w.add("pass2_gram", COLLAPSE_F64, {d_, d_}, gram2_.data(), gram2_.size() * 8);
    if (!within2_.empty()) w.add("pass2_within", COLLAPSE_F64, {d_, d_}, within2_.data(), within2_.size() * 8);
    if (!nc4_hits2_.empty()) {
        w.add("pass2_nc4_hits", COLLAPSE_I64, {(int64_t)nc4_hits2_.size()}, nc4_hits2_.data(), nc4_hits2_.size() * 8);
        w.add("pass2_nc4_rows", COLLAPSE_I64, {(int64_t)nc4_rows2_.size()}, nc4_rows2_.data(), nc4_rows2_.size() * 8);
    }
}

void CpuBackend::merge_second_pass(const StateReader& r) {
    if (!pass2_) fail(COLLAPSE_ERR_STATE, "merge_second_pass: the second pass has not begun");
    const std::string what = r.description();
    const StateSection c = r.section("pass2_counts");
    if (c.dtype_code != (uint32_t)COLLAPSE_I64 || c.shape != std::vector<int64_t>{2})
        fail(COLLAPSE_ERR_IO, what, ": section pass2_counts is not int64 [2]");
    const int64_t* n = static_cast<const int64_t*>(c.data);
    int64_t rows = 0, agree = 0;
    if (n[0] < 0 || n[1] < 0 || n[1] > n[0] || __builtin_add_overflow(pass2_rows_, n[0], &rows) ||
        __builtin_add_overflow(nc4_agree_, n[1], &agree))
        fail(COLLAPSE_ERR_IO, what, ": section pass2_counts holds ", n[0], " rows and ", n[1], " agreements, not counts that add up");
    // Each array: present exactly when this session's second pass makes it, of its shape; all
    // checked before any is added.
    struct Part {
        const char* name;
        uint32_t dtype;
        size_t size;
        const void* data = nullptr;
    };
    Part parts[] = {{"pass2_gram", COLLAPSE_F64, gram2_.size()},
                    {"pass2_within", COLLAPSE_F64, within2_.size()},
                    {"pass2_nc4_hits", COLLAPSE_I64, nc4_hits2_.size()},
                    {"pass2_nc4_rows", COLLAPSE_I64, nc4_rows2_.size()}};
    for (Part& p : parts) {
        if ((p.size > 0) != r.has(p.name))
            fail(COLLAPSE_ERR_IO, what, p.size > 0 ? " lacks section " : " has section ", p.name, ", which this session's second pass ",
                 p.size > 0 ? "makes" : "does not make");
        if (p.size == 0) continue;
        const StateSection s = r.section(p.name);
        if (s.dtype_code != p.dtype || s.bytes != p.size * 8)
            fail(COLLAPSE_ERR_IO, what, ": section ", p.name, " has ", s.bytes, " bytes, this session's has ", p.size * 8);
        p.data = s.data;
        if (p.dtype == COLLAPSE_F64)
            for (size_t k = 0; k < p.size; ++k)
                if (!std::isfinite(static_cast<const double*>(p.data)[k])) fail(COLLAPSE_ERR_IO, what, ": section ", p.name, " holds a non-finite value at ", k);
    }
    pass2_rows_ = rows;
    nc4_agree_ = agree;
    auto add_f = [](std::vector<double>& to, const void* from) {
        for (size_t k = 0; k < to.size(); ++k) to[k] += static_cast<const double*>(from)[k];
    };
    auto add_i = [](std::vector<int64_t>& to, const void* from) {
        for (size_t k = 0; k < to.size(); ++k) to[k] += static_cast<const int64_t*>(from)[k];
    };
    if (parts[0].data) add_f(gram2_, parts[0].data);
    if (parts[1].data) add_f(within2_, parts[1].data);
    if (parts[2].data) add_i(nc4_hits2_, parts[2].data);
    if (parts[3].data) add_i(nc4_rows2_, parts[3].data);
}

}  // namespace collapse::internal
