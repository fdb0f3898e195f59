// The CPU backend's state in a checkpoint, and the merge of another shard's state. Every section is
// checked against this session's V and d before anything changes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "core/error.hpp"
#include "core/sampling.hpp"
#include "cpu/cpu_backend.hpp"
#include "io/checkpoint_file.hpp"

namespace collapse {

namespace {

const io::CheckpointSection& expect(const io::CheckpointSection& s, collapse_dtype t, const std::vector<int64_t>& shape,
                                    const std::string& path) {
    if (s.dtype_code != (uint32_t)t || s.shape != shape) {
        std::string want, got;
        for (int64_t v : shape) want += (want.empty() ? "" : ", ") + std::to_string(v);
        for (int64_t v : s.shape) got += (got.empty() ? "" : ", ") + std::to_string(v);
        fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": section ", s.name, " has shape [", got, "] and type ", dtype_name((collapse_dtype)s.dtype_code),
             ", this session expects [", want, "] ", dtype_name(t));
    }
    return s;
}

}  // namespace

void CpuBackend::save_state(io::CheckpointWriter& w) {
    const int64_t rows[4] = {rows_.rows_seen, rows_.rows_masked, rows_.rows_excluded, rows_.rows_nonfinite};
    w.add("rows", COLLAPSE_I64, {4}, rows, sizeof rows);
    w.add("class_counts", COLLAPSE_I64, {V_}, count_.data(), count_.size() * 8);
    w.add("class_sums", COLLAPSE_F64, {V_, d_}, sum_.data(), sum_.size() * 8);
    w.add("class_sqnorms", COLLAPSE_F64, {V_}, sqnorm_.data(), sqnorm_.size() * 8);
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
    if (store_) {
        // Row store / reservoirs: offsets [V + 1] and the rows class after class (spilled rows are
        // copied in: a checkpoint stands alone).
        std::vector<int64_t> off((size_t)V_ + 1, 0);
        std::vector<int32_t> all;
        for (int64_t c = 0; c < V_; ++c) {
            off[(size_t)c + 1] = off[(size_t)c] + store_->rows((int32_t)c);
            if (store_->rows((int32_t)c) > 0) all.push_back((int32_t)c);
        }
        w.add("store_offsets", COLLAPSE_I64, {V_ + 1}, off.data(), off.size() * 8);
        w.begin_section("store_rows", COLLAPSE_F64, {off.back(), d_}, (size_t)(off.back() * d_) * 8);
        store_->for_each_class(all, load_budget(), [&](int32_t, const double* x, int64_t n, int64_t, bool) { w.append(x, (size_t)(n * d_) * 8); });
        w.end_section();
    }
}

void CpuBackend::load_state(const io::CheckpointReader& r, bool merge) {
    const std::string& path = r.path();
    // Check every section first: a refused checkpoint changes nothing.
    const auto rows = expect(r.section("rows"), COLLAPSE_I64, {4}, path);
    const auto counts = expect(r.section("class_counts"), COLLAPSE_I64, {V_}, path);
    const auto sums = expect(r.section("class_sums"), COLLAPSE_F64, {V_, d_}, path);
    const auto sq = expect(r.section("class_sqnorms"), COLLAPSE_F64, {V_}, path);
    if (gram_streaming_ != r.has("gram"))
        fail(COLLAPSE_ERR_IO, "checkpoint ", path, gram_streaming_ ? " has no overall Gram" : " has an overall Gram",
             ", this session's configuration ", gram_streaming_ ? "streams one" : "does not");
    if ((store_ != nullptr) != r.has("store_rows"))
        fail(COLLAPSE_ERR_IO, "checkpoint ", path, store_ ? " has no" : " has", " row store, this session's svd_mode ",
             store_ ? "needs one" : "keeps none");
    io::CheckpointSection gram, hids, hcounts, hrows, soff, srows;
    if (gram_streaming_) {
        gram = expect(r.section("gram"), COLLAPSE_F64, {d_, d_}, path);
        hids = r.section("holdback_ids");
        const int64_t H = hids.shape.empty() ? 0 : hids.shape[0];
        expect(hids, COLLAPSE_I64, {H}, path);
        hcounts = expect(r.section("holdback_counts"), COLLAPSE_I64, {H}, path);
        hrows = r.section("holdback_rows");
        int64_t total = 0;
        for (int64_t i = 0; i < H; ++i) total += static_cast<const int64_t*>(hcounts.data)[i];
        expect(hrows, COLLAPSE_F64, {total, d_}, path);
    }
    const int64_t* off = nullptr;
    if (store_) {
        soff = expect(r.section("store_offsets"), COLLAPSE_I64, {V_ + 1}, path);
        off = static_cast<const int64_t*>(soff.data);
        for (int64_t c = 0; c < V_; ++c)
            if (off[c] < 0 || off[c + 1] < off[c])
                fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": section store_offsets is not ascending at class ", c);
        srows = r.section("store_rows");
        expect(srows, COLLAPSE_F64, {off[V_], d_}, path);
    }
    // Reservoirs and held-back rows stay in memory; the exact store spills what does not fit.
    const int64_t extra = (int64_t)hrows.bytes + (has_row_store() ? 0 : (int64_t)srows.bytes);
    if (resident_bytes() + extra > cfg_.host_memory_limit)
        fail(COLLAPSE_ERR_OUT_OF_MEMORY, "loading checkpoint ", path, " needs ", format_bytes(resident_bytes() + extra),
             " of host memory, more than host_memory_limit = ", format_bytes(cfg_.host_memory_limit));

    // The exact store first: it is the only part that can fail (a full disk while spilling), and
    // then it is rolled back, so a refused checkpoint changes nothing.
    if (has_row_store()) {
        if (!merge) store_->clear();  // resume: a fresh session, nothing to keep
        const RowStore::Mark mark = store_->mark([&] {
            int64_t add = 0;
            for (int64_t c = 0; c < V_; ++c) add += store_->growth((int32_t)c, off[c + 1] - off[c]);
            return add;
        });
        try {
            const double* src = static_cast<const double*>(srows.data);
            for (int64_t c = 0; c < V_; ++c) {
                const int64_t n = off[c + 1] - off[c];
                if (n == 0) continue;
                store_->make_room([&] { return store_->growth((int32_t)c, n); });
                std::memcpy(store_->append((int32_t)c, n), src + off[c] * d_, (size_t)(n * d_) * 8);
                r.release(srows, (size_t)(off[c] * d_) * 8, (size_t)(n * d_) * 8);
            }
        } catch (...) {
            store_->rollback(mark);
            throw;
        }
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
    const int64_t* rv = static_cast<const int64_t*>(rows.data);
    rows_.rows_seen += rv[0], rows_.rows_masked += rv[1], rows_.rows_excluded += rv[2], rows_.rows_nonfinite += rv[3];
    const int64_t* cn = static_cast<const int64_t*>(counts.data);
    const std::vector<int64_t> before = count_;  // n_c before this shard (merge)
    for (int64_t c = 0; c < V_; ++c) count_[(size_t)c] += cn[c];
    const double* sv = static_cast<const double*>(sums.data);
    for (size_t k = 0; k < sum_.size(); ++k) sum_[k] += sv[k];
    const double* qv = static_cast<const double*>(sq.data);
    for (int64_t c = 0; c < V_; ++c) sqnorm_[(size_t)c] += qv[c];

    if (gram_streaming_) {
        const double* gv = static_cast<const double*>(gram.data);
        for (size_t k = 0; k < gram_.size(); ++k) gram_[k] += gv[k];
        // Held-back rows: a class that now reaches min_samples_per_token sends every held row (of
        // both shards) to the Gram, as one run over all rows would have.
        const int64_t H = hids.shape[0];
        const double* hr = static_cast<const double*>(hrows.data);
        for (int64_t i = 0; i < H; ++i) {
            const int32_t c = (int32_t)static_cast<const int64_t*>(hids.data)[i];
            const int64_t n = static_cast<const int64_t*>(hcounts.data)[i];
            auto& h = holdback_[c];
            h.insert(h.end(), hr, hr + n * d_);
            hr += n * d_;
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
    if (store_ && !has_row_store()) {
        const double* rowsp = static_cast<const double*>(srows.data);
        const int64_t cap = cfg_.svd_max_rows_per_token;
        for (int64_t c = 0; c < V_; ++c) {
            const int64_t n = off[c + 1] - off[c];
            if (n == 0) continue;
            const double* src = rowsp + off[c] * d_;
            const int64_t ka = store_->memory_rows((int32_t)c);
            if (ka + n <= cap) {
                std::memcpy(store_->append((int32_t)c, n), src, (size_t)(n * d_) * 8);
                continue;
            }
            // Two reservoirs of one class: a weighted sample without replacement (Efraimidis and
            // Spirakis) where each kept row stands for n_seen / n_kept rows of its shard, keyed by a
            // hash of (seed, class, shard, row) so that the result is reproducible.
            const int64_t na = before[(size_t)c], nb = cn[c];
            struct Cand {
                double key;
                const double* row;
            };
            std::vector<Cand> cand;
            auto add = [&](const double* base, int64_t k, int64_t seen, uint64_t shard) {
                const double w = (double)seen / (double)std::max<int64_t>(k, 1);
                for (int64_t j = 0; j < k; ++j) {
                    const double u = ((double)(mix64(cfg_.seed ^ mix64(((uint64_t)c << 20) ^ (shard << 62) ^ (uint64_t)j)) >> 11) + 0.5) * 0x1.0p-53;
                    cand.push_back({std::pow(u, 1.0 / w), base + j * d_});
                }
            };
            const std::vector<double> mine(store_->memory_data((int32_t)c), store_->memory_data((int32_t)c) + ka * d_);
            add(mine.data(), ka, na, 0);
            add(src, n, nb, 1);
            std::stable_sort(cand.begin(), cand.end(), [](const Cand& x, const Cand& y) { return x.key > y.key; });
            RowVector kept;
            for (int64_t j = 0; j < cap && j < (int64_t)cand.size(); ++j) kept.insert(kept.end(), cand[(size_t)j].row, cand[(size_t)j].row + d_);
            store_->assign((int32_t)c, std::move(kept));
        }
    }
}

}  // namespace collapse
