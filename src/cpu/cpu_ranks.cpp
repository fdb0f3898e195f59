// The CPU backend's side of an exact row store spread over MPI ranks by class (core/backend.hpp,
// "spread"; the messages are src/mpi/mpi_state.cpp): this rank's rows read out of its store, the
// new store of the classes it owns filled in rank order, its part of the metrics that need the
// rows (computed by compute()'s own functions on those classes), and the root's sum of the parts
// that compute() then takes in place of the row store. Sampled reservoirs go the same way: the
// root decides the merged samples from the counts as it merges the states (merge_picks; the
// bookkeeping is core/reservoir_picks.hpp's, shared with the CUDA backend), each rank sends its
// picked rows with their slots, and the parts hold the per-token SVDs only. The pair-metric
// tiles' tiling, layout and merge are core/pair_part.hpp's.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>

#include "base/error.hpp"
#include "core/pair_part.hpp"
#include "core/spread_part.hpp"
#include "core/state_sections.hpp"
#include "cpu/cpu_backend.hpp"

namespace collapse::internal {

void CpuBackend::refuse_if_spread(const char* what) const { internal::refuse_if_spread(spread_phase_ == SpreadPhase::Spread, what); }

void CpuBackend::begin_rows_spread() {
    if (!can_spread_rows()) fail(COLLAPSE_ERR_STATE, "begin_rows_spread: no row store or reservoirs to spread, or they are spread already");
    spread_phase_ = SpreadPhase::Gathering;
    picks_ = std::make_unique<ReservoirPicks>(V_, cfg_.svd_max_rows_per_token, cfg_.seed, *budget_);
}

ReservoirPicks::RowsOf CpuBackend::own_reservoir_rows() const {
    return [this](int32_t c) { return store_->memory_rows(c); };
}

void CpuBackend::merge_picks(const int64_t* theirs, const std::vector<int64_t>& before) { picks_->merge(theirs, before, own_reservoir_rows()); }

void CpuBackend::spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w) {
    if (spread_phase_ != SpreadPhase::Gathering || !spread_samples()) fail(COLLAPSE_ERR_STATE, "spread_write_picks: no reservoirs are being spread");
    picks_->write(source, ids, own_reservoir_rows(), w);
}

void CpuBackend::spread_take_picks(const StateReader& r) {
    if (spread_phase_ != SpreadPhase::Gathering || !spread_samples()) fail(COLLAPSE_ERR_STATE, "spread_take_picks: no reservoirs are being spread");
    picks_->take(r, count_.data(), own_reservoir_rows());  // count_ is the combined one by now (adopt_class_sums)
}

void CpuBackend::spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const RowsFn& fn) {
    if (spread_phase_ != SpreadPhase::Gathering) fail(COLLAPSE_ERR_STATE, "spread_read: the rows are not being spread");
    max_rows = std::max<int64_t>(1, max_rows);
    if (!spread_samples()) {
        store_->for_each_class(ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
            for (int64_t i = 0; i < n; i += max_rows) fn(c, x + i * d_, std::min(max_rows, n - i), nullptr);
        });
        return;
    }
    // Reservoirs (in memory): the picked rows of each class, copied together a piece at a time.
    if (!picks_ || !picks_->taken()) fail(COLLAPSE_ERR_STATE, "spread_read: this rank has not taken its picks");
    int64_t most = 0;
    for (int32_t c : ids) most = std::max(most, std::min(max_rows, picks_->end(c) - picks_->begin(c)));
    const HostBudget::Lease lease = budget_->reserve(mul_bytes(most, d_, 8), "a piece of reservoir rows for their owner", kFixNumClasses);
    std::vector<double> buf((size_t)(most * d_));
    for (int32_t c : ids) {
        const int64_t b = picks_->begin(c), e = picks_->end(c);
        for (int64_t i = b; i < e; i += max_rows) {
            const int64_t n = std::min(max_rows, e - i);
            for (int64_t k = 0; k < n; ++k)
                std::memcpy(buf.data() + k * d_, store_->memory_data(c) + picks_->rows()[i + k] * d_, (size_t)d_ * 8);
            fn(c, buf.data(), n, picks_->slots() + i);
        }
    }
}

void CpuBackend::spread_open(const std::vector<int32_t>& owned) {
    if (spread_phase_ != SpreadPhase::Gathering || spread_store_) fail(COLLAPSE_ERR_STATE, "spread_open: the rows are not being spread");
    spread_lease_ = budget_->lease();
    spread_lease_.resize(V_, "the flags of the classes this rank owns (V = " + std::to_string(V_) + ")", kFixNumClasses);
    spread_owned_.assign((size_t)V_, 0);
    int64_t rows = 0;
    for (int32_t c : owned) {
        if (c < 0 || c >= V_) fail(COLLAPSE_ERR_INTERNAL, "spread_open: class ", c, " is not in [0, ", V_, ")");
        spread_owned_[(size_t)c] = 1;
        rows += count_[(size_t)c];
    }
    if (spread_samples()) {
        // The merged samples of the owned classes, in memory as reservoirs are; each class's slots
        // are allocated when its first rows come (spread_append counts them).
        spread_lease_.resize(mul_bytes(V_, 9), "the flags and filled slots of the classes this rank owns (V = " + std::to_string(V_) + ")",
                             kFixNumClasses);
        spread_filled_.assign((size_t)V_, 0);
        spread_store_ = std::make_unique<RowStore>(V_, d_, -1, cfg_.intermediate_save_dir, RowStore::WriteFn{}, budget_.get());
        return;
    }
    // The new store takes in memory at most what is left beside the old one, halved as the first
    // store does, and spills the rest under intermediate_save_dir. The old store's rows in memory
    // go to disk first when the incoming ones would not fit beside them (spread_append cannot
    // spill it: the old store is being read then).
    const int64_t index = RowStore::index_bytes(V_);
    const int64_t incoming = std::min(mul_bytes(rows, d_, 8), store_->memory_budget());
    if (store_->memory_bytes() > 0 && !budget_->fits(add_bytes(add_bytes(index, incoming), load_budget()))) {
        store_->spill_memory();
        held_.update(held_rows_bytes());
    }
    const int64_t memory = std::max<int64_t>(0, std::min(store_->memory_budget(), (budget_->available() - index) / 2));
    spread_store_ = std::make_unique<RowStore>(V_, d_, memory, cfg_.intermediate_save_dir, RowStore::WriteFn{}, budget_.get());
}

void CpuBackend::spread_append(int32_t c, const double* x, int64_t n, const int64_t* slots) {
    if (!spread_store_) fail(COLLAPSE_ERR_INTERNAL, "spread_append: no store is open");
    if (!spread_owned_[(size_t)c]) fail(COLLAPSE_ERR_INTERNAL, "rows of class ", c, " came to a rank that does not own it");
    if (n <= 0) return;
    if (spread_samples() != (slots != nullptr)) fail(COLLAPSE_ERR_INTERNAL, "spread_append: rows ", slots ? "with" : "without", " slots");
    if (slots) {
        // A reservoir's rows each go to their slot in the class's merged sample.
        append_sampled_rows(*spread_store_, spread_lease_, spread_filled_[(size_t)c], c, std::min(count_[(size_t)c], cfg_.svd_max_rows_per_token), x, n,
                            slots, d_);
        return;
    }
    append_owned_rows(*spread_store_, *budget_, spread_lease_, V_, c, count_[(size_t)c], x, n, d_);
}

void CpuBackend::spread_close() {
    if (!spread_store_) fail(COLLAPSE_ERR_INTERNAL, "spread_close: no store is open");
    const bool sampled = spread_samples();
    // Every row of the class, or (reservoirs) every slot of its merged sample, filled once.
    check_owned_rows(
        *spread_store_, spread_owned_, sampled,
        [&](int32_t c) { return sampled ? std::min(count_[(size_t)c], cfg_.svd_max_rows_per_token) : count_[(size_t)c]; },
        [&](int32_t c) { return sampled ? spread_filled_[(size_t)c] : spread_store_->rows(c); });
    store_ = std::move(spread_store_);  // the old store and its spill files go
    spread_owned_ = {}, spread_filled_ = {};
    picks_.reset();
    held_.update(held_rows_bytes());
    spread_lease_.reset();
    spread_phase_ = SpreadPhase::Spread;
}

void CpuBackend::spread_part(const KeptSet& kept, const Classifier& clf, StateWriter& w) {
    if (spread_phase_ != SpreadPhase::Spread) fail(COLLAPSE_ERR_STATE, "spread_part: the rows have not been spread");
    const size_t K = kept.ids.size(), d = (size_t)d_;
    // Reservoirs give only the per-token SVDs (variances, NC4 and Grams come without them).
    const bool exact = has_row_store();
    const bool nc4 = exact && cfg_.compute_nc4 && clf.present() && !cfg_.nc4_held_out && K > 0;
    std::vector<int64_t> slots;
    KeptSet own = owned_classes(kept, [&](int32_t c) { return store_->rows(c); }, slots);
    const size_t k = own.ids.size();
    const HostBudget::Lease lease = budget_->reserve(
        add_bytes(add_bytes(mul_bytes((int64_t)(nc4 ? K + k : k), d_, 8), mul_bytes(V_, 4)),
                  add_bytes(mul_bytes((int64_t)k, 64 + (int64_t)sizeof(TokenMetrics)), mul_bytes(2, d_ * d_, 8))),
        "this rank's part of the row-store metrics (the means of its " + std::to_string(k) + " classes and of the K = " + std::to_string(K) +
            " kept ones, the d x d Gram and scatter)",
        kFixKeptClasses);
    fill_slots(own, V_);
    // The means as compute() makes them (the same expression, so the same bits).
    auto means = [&](const std::vector<int32_t>& ids) {
        std::vector<double> mu(ids.size() * d);
        for (size_t s = 0; s < ids.size(); ++s) {
            const double n = (double)count_[(size_t)ids[s]];
            for (size_t j = 0; j < d; ++j) mu[s * d + j] = sum_[(size_t)ids[s] * d + j] / n;
        }
        return mu;
    };
    const std::vector<double> mu = means(own.ids);
    w.add("part_slots", COLLAPSE_I64, {(int64_t)k}, slots.data(), k * 8);
    if (exact) {
        std::vector<double> var(k, 0.0);
        store_variances(own, mu, var);
        w.add("part_var", COLLAPSE_F64, {(int64_t)k}, var.data(), k * 8);
    }
    if (cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF) {
        MetricValues tv;
        if (k > 0) token_metrics(own, mu, tv);
        write_token_part(w, tv.tokens, k);  // the layout the CUDA backend writes too
    }
    if (nc4) {
        // NC4 over this rank's rows against every kept mean: the other classes have no rows here.
        MetricValues nv;
        nc4_from_store(kept, clf, means(kept.ids), nv);
        // agreement = agree / rows in float64: exact back to the count below 2^51 rows.
        const int64_t n[2] = {nv.nc4_rows > 0 ? (int64_t)std::llround(*nv.nc4_agreement * (double)nv.nc4_rows) : 0, nv.nc4_rows};
        w.add("part_nc4", COLLAPSE_I64, {2}, n, sizeof n);
        if (cfg_.per_class_arrays) {
            std::vector<int64_t> hits(k), rows(k);
            for (size_t s = 0; s < k; ++s) hits[s] = nv.per_class.nc4_hits[(size_t)slots[s]], rows[s] = nv.per_class.nc4_rows[(size_t)slots[s]];
            w.add("part_nc4_hits", COLLAPSE_I64, {(int64_t)k}, hits.data(), k * 8);
            w.add("part_nc4_rows", COLLAPSE_I64, {(int64_t)k}, rows.data(), k * 8);
        }
    }
    // The Gram and Sigma_W's scatter where compute() takes them from the rows (a cut kept set).
    if (exact && cfg_.compute_overall_metrics && !gram_streaming_ && K > 0) {
        std::vector<double> g(d * d, 0.0);
        store_gram(own.ids, g);
        w.add("part_gram", COLLAPSE_F64, {d_, d_}, g.data(), g.size() * 8);
    }
    if (exact && cfg_.compute_class_metrics && !within_streaming_ && K >= 2) {
        std::vector<double> s(d * d, 0.0);
        store_scatter(own, mu, s);
        w.add("part_within", COLLAPSE_F64, {d_, d_}, s.data(), s.size() * 8);
    }
}

void CpuBackend::spread_merge(const KeptSet& kept, const Classifier& clf, const StateReader& r) {
    if (spread_phase_ != SpreadPhase::Spread) fail(COLLAPSE_ERR_STATE, "spread_merge: the rows have not been spread");
    const std::string what = r.description();
    const size_t K = kept.ids.size(), d = (size_t)d_;
    const bool tokens = cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF;
    const bool exact = has_row_store();  // spread_part's parts
    const bool nc4 = exact && cfg_.compute_nc4 && clf.present() && !cfg_.nc4_held_out && K > 0;
    const bool gram = exact && cfg_.compute_overall_metrics && !gram_streaming_ && K > 0;
    const bool within = exact && cfg_.compute_class_metrics && !within_streaming_ && K >= 2;
    // Every section checked before anything is added.
    auto get = [&](const char* name, collapse_dtype t, const std::vector<int64_t>& shape) {
        if (!r.has(name)) fail(COLLAPSE_ERR_IO, what, " lacks section ", name, std::string(name).rfind("part_nc4", 0) == 0 ? " (was a classifier set on every rank?)" : "");
        const StateSection s = r.section(name);
        if (s.dtype_code != (uint32_t)t || s.shape != shape) fail(COLLAPSE_ERR_IO, what, ": section ", name, " has another type or shape than this session's");
        return s.data;
    };
    const StateSection sl = r.section("part_slots");
    if (sl.dtype_code != (uint32_t)COLLAPSE_I64 || sl.shape.size() != 1) fail(COLLAPSE_ERR_IO, what, ": section part_slots is not int64 [k]");
    const int64_t k = sl.shape[0];
    const int64_t* slot = static_cast<const int64_t*>(sl.data);
    if (!spread_) {
        spread_results_lease_ = budget_->reserve(
            add_bytes(mul_bytes((int64_t)K, 8 + 1 + 16 + (int64_t)sizeof(TokenMetrics)), mul_bytes((gram ? 1 : 0) + (within ? 1 : 0), d_ * d_, 8)),
            "the ranks' parts of the row-store metrics for K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
        auto s = std::make_unique<SpreadResults>();
        s->ids = kept.ids;
        s->seen.assign(K, 0);
        s->var.assign(K, 0.0);
        if (tokens) s->tokens.assign(K, TokenMetrics{});
        s->nc4 = nc4;
        if (nc4 && cfg_.per_class_arrays) s->nc4_hits.assign(K, 0), s->nc4_class_rows.assign(K, 0);
        if (gram) s->gram.assign(d * d, 0.0);
        if (within) s->within.assign(d * d, 0.0);
        spread_ = std::move(s);
    }
    SpreadResults& sr = *spread_;
    if (sr.ids != kept.ids) fail(COLLAPSE_ERR_INTERNAL, "spread_merge: the kept set changed since the first part");
    for (int64_t i = 0; i < k; ++i)
        if (slot[i] < 0 || slot[i] >= (int64_t)K || sr.seen[(size_t)slot[i]])
            fail(COLLAPSE_ERR_IO, what, ": section part_slots names kept slot ", slot[i], ", out of [0, ", K, ") or given by another part");
    const double* var = exact ? static_cast<const double*>(get("part_var", COLLAPSE_F64, {k})) : nullptr;
    for (int64_t i = 0; var && i < k; ++i)
        if (!(var[i] >= 0) || !std::isfinite(var[i])) fail(COLLAPSE_ERR_IO, what, ": section part_var holds ", var[i], " at ", i);
    const TokenPart tp = tokens ? read_token_part(r, k) : TokenPart{};
    const int64_t* n4 = nc4 ? static_cast<const int64_t*>(get("part_nc4", COLLAPSE_I64, {2})) : nullptr;
    const int64_t* hits = nc4 && cfg_.per_class_arrays ? static_cast<const int64_t*>(get("part_nc4_hits", COLLAPSE_I64, {k})) : nullptr;
    const int64_t* hrows = nc4 && cfg_.per_class_arrays ? static_cast<const int64_t*>(get("part_nc4_rows", COLLAPSE_I64, {k})) : nullptr;
    if (n4 && (n4[0] < 0 || n4[1] < n4[0] || n4[1] > INT64_MAX - sr.nc4_rows))
        fail(COLLAPSE_ERR_IO, what, ": section part_nc4 holds ", n4[0], " agreements of ", n4[1], " rows");
    const double* g = gram ? static_cast<const double*>(get("part_gram", COLLAPSE_F64, {d_, d_})) : nullptr;
    const double* wi = within ? static_cast<const double*>(get("part_within", COLLAPSE_F64, {d_, d_})) : nullptr;
    for (const double* a : {g, wi})
        if (a)
            for (size_t x = 0; x < d * d; ++x)
                if (!std::isfinite(a[x])) fail(COLLAPSE_ERR_IO, what, ": a d x d section holds a non-finite value at ", x);

    for (int64_t i = 0; i < k; ++i) {
        const size_t s = (size_t)slot[i];
        sr.seen[s] = 1;
        if (var) sr.var[s] = var[i];
        if (tokens) {
            TokenMetrics& t = sr.tokens[s];
            t.id = kept.ids[s];
            t.num_samples = kept.counts[s];
            tp.take(i, t);
        }
        if (hits) sr.nc4_hits[s] = hits[i], sr.nc4_class_rows[s] = hrows[i];
    }
    if (n4) sr.nc4_agree += n4[0], sr.nc4_rows += n4[1];
    if (g)
        for (size_t x = 0; x < d * d; ++x) sr.gram[x] += g[x];
    if (wi)
        for (size_t x = 0; x < d * d; ++x) sr.within[x] += wi[x];
}

void CpuBackend::spread_results(const KeptSet& kept, std::vector<double>* var, MetricValues* out) const {
    const SpreadResults& sr = *spread_;
    if (sr.ids != kept.ids) fail(COLLAPSE_ERR_STATE, "the kept set is not the one whose rows were spread over the ranks");
    for (size_t s = 0; s < sr.seen.size(); ++s)
        if (!sr.seen[s]) fail(COLLAPSE_ERR_INTERNAL, "kept class ", kept.ids[s], " is in no rank's part of the spread row store");
    if (var) *var = sr.var;
    if (out) {
        out->tokens = sr.tokens;
        for (const TokenMetrics& t : sr.tokens) out->svd_zero_matrices += t.zero_matrix ? 1 : 0;
    }
}

// --- Pair-metric tiles spread over ranks (core/backend.hpp, "pairs"; the layout and the merge
// are core/pair_part.hpp's). ---

bool CpuBackend::pair_inputs(const KeptSet& kept, StateWriter& w) {
    const int64_t K = (int64_t)kept.ids.size();
    pair_spread_.reset();
    // compute()'s condition for the pair metrics.
    if (!cfg_.compute_class_metrics || K == 0 || K < cfg_.min_classes_for_gnc2) return false;
    const HostBudget::Lease lease = budget_->reserve(
        add_bytes(mul_bytes(K, 2 * d_ + 1, 8), mul_bytes((int64_t)kept.ids.size(), 4)),
        "the pair metrics' inputs for the ranks (the means of K = " + std::to_string(K) + " kept classes, twice [K, d])", kFixKeptClasses);
    std::vector<double> mu, var, m;
    class_means(kept, mu, var, m);
    write_pair_inputs(w, m.data(), var.data(), K, d_, pair_tile_edge(K));
    pair_spread_ = std::make_unique<PairSpread>(kept);  // complete once pair_merge has taken a share
    return true;
}

void CpuBackend::pair_part(const StateReader& in, int rank, int P, StateWriter& w) {
    const PairInputs pi = read_pair_inputs(in, d_);
    int64_t range[3] = {0, 0, 0};
    const PairTotals a = pair_tiles(pi.m, pi.var, pi.K, pi.T, rank, P, range);
    write_pair_share(w, a, range);
}

void CpuBackend::pair_merge(const KeptSet& kept, const StateReader& r) {
    if (!pair_spread_) fail(COLLAPSE_ERR_STATE, "pair_merge: the pair inputs were not written for this kept set");
    pair_spread_->merge(kept, r);
}

}  // namespace collapse::internal
