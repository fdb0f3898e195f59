// The CUDA backend's side of an exact row store spread over MPI ranks by class (core/backend.hpp,
// "spread"; the messages are src/mpi/mpi_state.cpp; the CPU's side is src/cpu/cpu_ranks.cpp).
// begin_rows_spread moves the device row buffer's rows to the host store (row_transport.cu, which
// keeps each class's arrival order), so that the rows leave and arrive as float64 host pieces as on
// the CPU; the owner's new store is a host RowStore too (within host_memory_limit, spilling under
// intermediate_save_dir). Its part is its classes' per-token SVDs, by per_token's own path (the
// rows back to the device a group of classes at a time, class_spectra), written in the shared
// layout (core/spread_part.hpp), and NC4 over its rows by the second pass's kernels (the CPU's
// part_nc4 sections). Variances and the streamed Gram and Sigma_W need no rows on this backend,
// so they are not in the part; with a cut kept set the Gram and Sigma_W come from the second pass
// over every rank's own rows, added on the root (save/merge_second_pass below). Sampled
// reservoirs go the CPU's way (core/reservoir_picks.hpp): the root decides the merged samples from
// the counts, each rank sends its picked reservoir rows (downloaded as float64) with their slots,
// and an owner puts its classes' merged samples back into their device reservoirs at
// spread_close, where per_token reads them; their part is the per-token SVDs. The pair-metric
// tiles are spread too (the end of this file).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/reservoir_picks.hpp"
#include "core/spread_part.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.hpp"
#include "kernels.cuh"

namespace collapse::internal::cuda {

// The exact store: Sigma_W must not need the rows at compute. It does not when it streams, and
// with a cut kept set the second pass over every rank's rows that gives the Gram gives Sigma_W
// too (Session::second_pass_gram; cuda_ingest.cu within2_); without compute_overall_metrics
// nothing streams and no second pass comes, so the store is gathered on the root as before.
// Reservoirs: no condition (Sigma_W and the Gram never come from them).
bool CudaBackend::can_spread_rows() const {
    if (spread_phase_ != SpreadPhase::None) return false;
    const bool within_without_rows =
        within_streaming_ || !cfg_.compute_class_metrics || (cfg_.compute_overall_metrics && cfg_.max_tokens_to_analyze > 0);
    return sampled_ || (exact_store_ && host_store_ && within_without_rows);
}

void CudaBackend::begin_rows_spread() {
    if (!can_spread_rows()) fail(COLLAPSE_ERR_STATE, "begin_rows_spread: no exact row store or reservoirs to spread, or they are spread already");
    DeviceGuard guard(cfg_.device_ordinal);
    if (sampled_) {
        // This session's own counts say how many rows each of its reservoirs holds (min(n_c, cap)):
        // the counts become the combined ones before its rows leave.
        spread_own_lease_ = host_.reserve(mul_bytes(V_, 8), "the class counts of V = " + std::to_string(V_) + " before the ranks' states merge",
                                          kFixNumClasses);
        spread_own_counts_ = class_counts();  // syncs
        picks_ = std::make_unique<ReservoirPicks>(V_, cfg_.svd_max_rows_per_token, cfg_.seed, host_);
    } else {
        move_store_to_host();  // syncs; every row in arrival order per class, in the host store
    }
    spread_phase_ = SpreadPhase::Gathering;
}

ReservoirPicks::RowsOf CudaBackend::own_reservoir_rows() const {
    return [this](int32_t c) { return std::min(spread_own_counts_[(size_t)c], cfg_.svd_max_rows_per_token); };
}

void CudaBackend::merge_picks(const int64_t* theirs, const std::vector<int64_t>& before) { picks_->merge(theirs, before, own_reservoir_rows()); }

void CudaBackend::spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w) {
    if (spread_phase_ != SpreadPhase::Gathering || !sampled_) fail(COLLAPSE_ERR_STATE, "spread_write_picks: no reservoirs are being spread");
    picks_->write(source, ids, own_reservoir_rows(), w);
}

void CudaBackend::spread_take_picks(const StateReader& r) {
    if (spread_phase_ != SpreadPhase::Gathering || !sampled_) fail(COLLAPSE_ERR_STATE, "spread_take_picks: no reservoirs are being spread");
    DeviceGuard guard(cfg_.device_ordinal);
    const HostBudget::Lease lease = host_.reserve(mul_bytes(V_, 8), "the combined class counts of V = " + std::to_string(V_), kFixNumClasses);
    const std::vector<int64_t> counts = class_counts();  // the combined ones by now (adopt_class_sums, or the root's merge)
    picks_->take(r, counts.data(), own_reservoir_rows());
}

// The root's combined counts and sums, downloaded, as the sections adopt_class_sums takes.
void CudaBackend::write_class_sums(StateWriter& w) {
    DeviceGuard guard(cfg_.device_ordinal);
    const HostBudget::Lease lease = host_.reserve(mul_bytes(V_, d_ + 1, 8), "the combined class counts and sums (V = " + std::to_string(V_) +
                                                                                ", d = " + std::to_string(d_) + ") on their way to the ranks",
                                                  kFixNumClasses);
    const std::vector<int64_t> counts = class_counts();  // syncs: every batch is in
    std::vector<double> sums((size_t)(V_ * d_));
    COLLAPSE_CUDA_TRY(cudaMemcpy(sums.data(), sum_.data(), sum_.bytes(), cudaMemcpyDeviceToHost));
    w.add("class_counts", COLLAPSE_I64, {V_}, counts.data(), (size_t)V_ * 8);
    w.add("class_sums", COLLAPSE_F64, {V_, d_}, sums.data(), sums.size() * 8);
}

// The class counts and sums become the combined ones (this rank's first-pass state has gone to the
// root), so that the spread's parts and begin_second_pass use the root's kept set and means. The
// rest of its state (variances, Grams) is left as it was: after this the rank computes only its
// part or its second pass, never a report.
void CudaBackend::adopt_class_sums(const int64_t* counts, const double* sums) {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are copied bit for bit");
    COLLAPSE_CUDA_TRY(cudaMemcpy(count_.data(), counts, count_.bytes(), cudaMemcpyHostToDevice));
    COLLAPSE_CUDA_TRY(cudaMemcpy(sum_.data(), sums, sum_.bytes(), cudaMemcpyHostToDevice));
}

void CudaBackend::spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const RowsFn& fn) {
    if (spread_phase_ != SpreadPhase::Gathering) fail(COLLAPSE_ERR_STATE, "spread_read: the rows are not being spread");
    max_rows = std::max<int64_t>(1, max_rows);
    if (sampled_) {
        // The picked rows of each class, downloaded from its reservoir (float32, exactly as float64).
        if (!picks_ || !picks_->taken()) fail(COLLAPSE_ERR_STATE, "spread_read: this rank has not taken its picks");
        DeviceGuard guard(cfg_.device_ordinal);
        const int64_t cap = cfg_.svd_max_rows_per_token;
        int64_t most = 0;
        for (int32_t c : ids) most = std::max(most, picks_->end(c) - picks_->begin(c));
        const HostBudget::Lease lease = host_.reserve(mul_bytes(most, 4), "the reservoir index of one class's picked rows", kFixNumClasses);
        std::vector<int32_t> index;
        for (int32_t c : ids) {
            const int64_t b = picks_->begin(c), e = picks_->end(c);
            index.clear();
            for (int64_t i = b; i < e; ++i) index.push_back((int32_t)((int64_t)c * cap + picks_->rows()[i]));
            download_rows(reservoir_.data(), index, [&](const double* x, int64_t first, int64_t m) {
                for (int64_t i = 0; i < m; i += max_rows) fn(c, x + i * d_, std::min(max_rows, m - i), picks_->slots() + b + first + i);
            });
        }
        return;
    }
    host_store_->for_each_class(ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
        for (int64_t i = 0; i < n; i += max_rows) fn(c, x + i * d_, std::min(max_rows, n - i), nullptr);
    });
}

void CudaBackend::spread_open(const std::vector<int32_t>& owned) {
    if (spread_phase_ != SpreadPhase::Gathering || spread_store_) fail(COLLAPSE_ERR_STATE, "spread_open: the rows are not being spread");
    spread_lease_ = host_.lease();
    spread_lease_.resize(mul_bytes(V_, sampled_ ? 17 : 9),
                         "the flags, combined counts" + std::string(sampled_ ? " and filled slots" : "") + " of the classes this rank owns (V = " +
                             std::to_string(V_) + ")",
                         kFixNumClasses);
    spread_counts_ = class_counts();  // the combined ones by now (adopt_class_sums, or the root's merge)
    spread_owned_.assign((size_t)V_, 0);
    int64_t rows = 0;
    for (int32_t c : owned) {
        if (c < 0 || c >= V_) fail(COLLAPSE_ERR_INTERNAL, "spread_open: class ", c, " is not in [0, ", V_, ")");
        spread_owned_[(size_t)c] = 1;
        rows += spread_counts_[(size_t)c];
    }
    if (sampled_) {
        // The merged samples of the owned classes, in host memory until spread_close puts them in
        // their reservoirs; each class's slots are made when its first rows come.
        spread_filled_.assign((size_t)V_, 0);
        spread_store_ = std::make_unique<RowStore>(V_, d_, -1, cfg_.intermediate_save_dir, RowStore::WriteFn{}, &host_);
        return;
    }
    // As on the CPU: the new store takes in memory at most what is left beside the old one, halved,
    // and spills the rest; the old store's rows in memory go to disk first when the incoming ones
    // would not fit beside them (it is being read while the new one fills).
    const int64_t index = RowStore::index_bytes(V_);
    const int64_t incoming = std::min(mul_bytes(rows, d_, 8), host_store_->memory_budget());
    if (host_store_->memory_bytes() > 0 && !host_.fits(add_bytes(add_bytes(index, incoming), load_budget()))) {
        host_store_->spill_memory();
        store_held_.update(host_store_->memory_bytes());
    }
    const int64_t memory = std::max<int64_t>(0, std::min(host_store_->memory_budget(), (host_.available() - index) / 2));
    spread_store_ = std::make_unique<RowStore>(V_, d_, memory, cfg_.intermediate_save_dir, RowStore::WriteFn{}, &host_);
}

void CudaBackend::spread_append(int32_t c, const double* x, int64_t n, const int64_t* slots) {
    if (!spread_store_) fail(COLLAPSE_ERR_INTERNAL, "spread_append: no store is open");
    if (!spread_owned_[(size_t)c]) fail(COLLAPSE_ERR_INTERNAL, "rows of class ", c, " came to a rank that does not own it");
    if (n <= 0) return;
    if (sampled_ != (slots != nullptr)) fail(COLLAPSE_ERR_INTERNAL, "spread_append: rows ", slots ? "with" : "without", " slots");
    if (slots) {
        append_sampled_rows(*spread_store_, spread_lease_, spread_filled_[(size_t)c], c, std::min(spread_counts_[(size_t)c], cfg_.svd_max_rows_per_token),
                            x, n, slots, d_);
        return;
    }
    append_owned_rows(*spread_store_, host_, spread_lease_, mul_bytes(V_, 9), c, spread_counts_[(size_t)c], x, n, d_);
}

void CudaBackend::spread_close() {
    if (!spread_store_) fail(COLLAPSE_ERR_INTERNAL, "spread_close: no store is open");
    const int64_t cap = cfg_.svd_max_rows_per_token;
    // Every row of the class, or (reservoirs) every slot of its merged sample, filled once.
    check_owned_rows(
        *spread_store_, spread_owned_, sampled_,
        [&](int32_t c) { return sampled_ ? std::min(spread_counts_[(size_t)c], cap) : spread_counts_[(size_t)c]; },
        [&](int32_t c) { return sampled_ ? spread_filled_[(size_t)c] : spread_store_->rows(c); });
    if (sampled_) {
        // The owned classes' merged samples into their reservoirs (this rank's own rows have all
        // been read by now); the other classes' reservoirs are not read again.
        DeviceGuard guard(cfg_.device_ordinal);
        int64_t most = 0;
        for (int64_t c = 0; c < V_; ++c) most = std::max(most, spread_store_->rows((int32_t)c));
        const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(most, (int64_t(16) << 20) / (d_ * 4)));
        const HostBudget::Lease lease = host_.reserve(mul_bytes(most, 8), "the reservoir slots of one class's merged sample", kFixNumClasses);
        DeviceBuffer<float> up_rows((size_t)(chunk * d_), &budget_, "merged reservoir rows (float32)");
        DeviceBuffer<int64_t> up_slots((size_t)chunk, &budget_, "merged reservoir slots");
        std::vector<int64_t> slot;
        for (int64_t c = 0; c < V_; ++c) {
            const int64_t k = spread_store_->rows((int32_t)c);
            if (!spread_owned_[(size_t)c] || k == 0) continue;
            slot.resize((size_t)k);
            for (int64_t j = 0; j < k; ++j) slot[(size_t)j] = c * cap + j;
            upload_rows(spread_store_->memory_data((int32_t)c), slot, reservoir_.data(), up_rows, up_slots);
        }
        spread_store_.reset();
        spread_counts_ = {}, spread_filled_ = {};
        picks_.reset();
        spread_own_counts_ = {}, spread_own_lease_.reset();
        spread_lease_.resize(V_, "the flags of the classes this rank owns (V = " + std::to_string(V_) + ")", kFixNumClasses);  // spread_part's classes
        spread_phase_ = SpreadPhase::Spread;
        return;
    }
    host_store_ = std::move(spread_store_);  // the old store and its spill files go
    spread_owned_ = {}, spread_counts_ = {};
    store_held_.update(host_store_->memory_bytes());
    spread_lease_.reset();
    spread_phase_ = SpreadPhase::Spread;
}

void CudaBackend::spread_part(const KeptSet& kept, const Classifier& clf, StateWriter& w) {
    if (spread_phase_ != SpreadPhase::Spread) fail(COLLAPSE_ERR_STATE, "spread_part: the rows have not been spread");
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    const size_t K = kept.ids.size();
    std::vector<int64_t> slots;
    KeptSet own = owned_classes(kept, [&](int32_t c) { return sampled_ ? (int64_t)spread_owned_[(size_t)c] : host_store_->rows(c); }, slots);
    const size_t k = own.ids.size();
    const HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes((int64_t)k, 8 + 8 + 4), mul_bytes(V_, 4)),
                                                  "this rank's part of the per-token SVDs (" + std::to_string(k) + " classes, V = " +
                                                      std::to_string(V_) + ")",
                                                  kFixKeptClasses);
    fill_slots(own, V_);
    w.add("part_slots", COLLAPSE_I64, {(int64_t)k}, slots.data(), k * 8);
    if (exact_store_ && cfg_.compute_nc4 && clf.present() && !cfg_.nc4_held_out && K > 0) {
        // NC4 over this rank's rows against every kept mean (the same sections as the CPU's part).
        int64_t n[2] = {0, 0};
        std::vector<int64_t> hits, rows;
        spread_part_nc4(kept, clf, n, hits, rows);
        w.add("part_nc4", COLLAPSE_I64, {2}, n, sizeof n);
        if (cfg_.per_class_arrays) {
            std::vector<int64_t> h(k), r(k);
            for (size_t s = 0; s < k; ++s) h[s] = hits[(size_t)slots[s]], r[s] = rows[(size_t)slots[s]];
            w.add("part_nc4_hits", COLLAPSE_I64, {(int64_t)k}, h.data(), k * 8);
            w.add("part_nc4_rows", COLLAPSE_I64, {(int64_t)k}, r.data(), k * 8);
        }
    }
    if (!cfg_.compute_token_metrics || cfg_.svd_mode == COLLAPSE_SVD_OFF) return;
    MetricValues tv;
    if (k > 0) {
        // The means as compute() makes them (the same kernel on the same combined sums).
        cudaStream_t s = stream_;
        const int64_t n = (int64_t)k;
        Lease<int32_t> ids = res_.take<int32_t>(k, "the owned classes' ids");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(ids.data(), own.ids.data(), k * 4, cudaMemcpyHostToDevice, s));
        Lease<double> mu = res_.take<double>((size_t)(n * d_), "the owned classes' means [k, d]"), var = res_.take<double>(k, "variances"),
                      weight = res_.take<double>(k, "weights");
        launch_means(sum_.data(), sqdev_.data(), shift_.data(), count_.data(), ids.data(), n, d_, cfg_.global_mean == COLLAPSE_MEAN_TOKEN_WEIGHTED,
                     mu.data(), var.data(), weight.data(), s);
        per_token(own, mu.data(), tv);
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));  // before the means' lease goes back (and `own.ids` with it)
    }
    write_token_part(w, tv.tokens, k);
}

// The owner's rows go through the second pass's kernels (NC4 only) as float64 host batches: the
// store's values are the input's exactly, as the single process's NC4 sees them. The kept means
// are the combined ones (adopt_class_sums, or the root's merge). The second pass is closed after.
void CudaBackend::spread_part_nc4(const KeptSet& kept, const Classifier& clf, int64_t n[2], std::vector<int64_t>& hits, std::vector<int64_t>& rows) {
    const int64_t K = (int64_t)kept.ids.size();
    const int64_t piece = std::max<int64_t>(1, std::min<int64_t>(cfg_.batch_rows, INT32_MAX));
    std::vector<int32_t> mine;
    for (int32_t c : kept.ids)
        if (host_store_->rows(c) > 0) mine.push_back(c);
    const HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes(piece, 4), mul_bytes(K, 16)),
                                                  "the labels of a batch of this rank's rows and the NC4 counts of K = " + std::to_string(K) + " kept classes",
                                                  kFixKeptClasses);
    begin_second_pass(kept, clf, true, false);
    struct ClosePass {
        bool& a;
        bool& b;
        ~ClosePass() { a = b = false; }  // compute() must not take this rank's second pass for the whole input's
    } const close{pass2_, pass2_nc4_};
    std::vector<int32_t> labels;
    host_store_->for_each_class(mine, load_budget(), [&](int32_t c, const double* x, int64_t m, int64_t, bool) {
        for (int64_t i = 0; i < m; i += piece) {
            const int64_t k = std::min(piece, m - i);
            labels.assign((size_t)k, c);
            BatchDesc b;
            b.features = MatrixView{x + i * d_, COLLAPSE_F64, COLLAPSE_MEMORY_HOST, k, d_, d_};
            b.labels = MatrixView{labels.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, k, 1, 1};
            ingest_second_pass(b, nullptr);
            sync();  // the store reuses its read-back buffer, and `labels` is refilled, after this
        }
    });
    unsigned long long agree = 0, seen = 0;
    COLLAPSE_CUDA_TRY(cudaMemcpy(&agree, agree_.data(), 8, cudaMemcpyDeviceToHost));
    COLLAPSE_CUDA_TRY(cudaMemcpy(&seen, pass2_rows_dev_.data(), 8, cudaMemcpyDeviceToHost));
    n[0] = (int64_t)agree, n[1] = (int64_t)seen;
    if (cfg_.per_class_arrays) {
        static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are copied bit for bit");
        hits.resize((size_t)K), rows.resize((size_t)K);
        COLLAPSE_CUDA_TRY(cudaMemcpy(hits.data(), nc4_slot_hits_.data(), (size_t)K * 8, cudaMemcpyDeviceToHost));
        COLLAPSE_CUDA_TRY(cudaMemcpy(rows.data(), nc4_slot_rows_.data(), (size_t)K * 8, cudaMemcpyDeviceToHost));
    }
}

void CudaBackend::spread_merge(const KeptSet& kept, const Classifier& clf, const StateReader& r) {
    if (spread_phase_ != SpreadPhase::Spread) fail(COLLAPSE_ERR_STATE, "spread_merge: the rows have not been spread");
    const std::string what = r.description();
    const size_t K = kept.ids.size();
    const bool tokens = cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF;
    // Every section checked before anything is added.
    if (!r.has("part_slots")) fail(COLLAPSE_ERR_IO, what, " lacks section part_slots");
    const StateSection sl = r.section("part_slots");
    if (sl.dtype_code != (uint32_t)COLLAPSE_I64 || sl.shape.size() != 1) fail(COLLAPSE_ERR_IO, what, ": section part_slots is not int64 [k]");
    const int64_t k = sl.shape[0];
    const int64_t* slot = static_cast<const int64_t*>(sl.data);
    const bool first = spread_ids_.empty() && spread_seen_.empty();
    if (!first && spread_ids_ != kept.ids) fail(COLLAPSE_ERR_INTERNAL, "spread_merge: the kept set changed since the first part");
    for (int64_t i = 0; i < k; ++i)
        if (slot[i] < 0 || slot[i] >= (int64_t)K || (i > 0 && slot[i] <= slot[i - 1]) || (!first && spread_seen_[(size_t)slot[i]]))
            fail(COLLAPSE_ERR_IO, what, ": section part_slots names kept slot ", slot[i], ", out of [0, ", K, "), not ascending, or given by another part");
    const TokenPart tp = tokens ? read_token_part(r, k) : TokenPart{};
    const bool nc4 = exact_store_ && cfg_.compute_nc4 && clf.present() && !cfg_.nc4_held_out && K > 0;  // spread_part's
    auto get = [&](const char* name, const std::vector<int64_t>& shape) {
        if (!r.has(name)) fail(COLLAPSE_ERR_IO, what, " lacks section ", name, " (was a classifier set on every rank?)");
        const StateSection x = r.section(name);
        if (x.dtype_code != (uint32_t)COLLAPSE_I64 || x.shape != shape) fail(COLLAPSE_ERR_IO, what, ": section ", name, " has another type or shape than this session's");
        return static_cast<const int64_t*>(x.data);
    };
    const int64_t* n4 = nc4 ? get("part_nc4", {2}) : nullptr;
    const int64_t* hits = nc4 && cfg_.per_class_arrays ? get("part_nc4_hits", {k}) : nullptr;
    const int64_t* hrows = nc4 && cfg_.per_class_arrays ? get("part_nc4_rows", {k}) : nullptr;
    if (n4 && (n4[0] < 0 || n4[1] < n4[0] || n4[1] > INT64_MAX - (first ? 0 : spread_nc4_rows_)))
        fail(COLLAPSE_ERR_IO, what, ": section part_nc4 holds ", n4[0], " agreements of ", n4[1], " rows");
    for (int64_t i = 0; hits && i < k; ++i)
        if (hits[i] < 0 || hrows[i] < hits[i]) fail(COLLAPSE_ERR_IO, what, ": sections part_nc4_hits/_rows hold ", hits[i], " of ", hrows[i], " at ", i);
    if (first) {
        spread_results_lease_ = host_.reserve(mul_bytes((int64_t)K, 4 + 1 + 16 + (int64_t)sizeof(TokenMetrics)),
                                              "the ranks' per-token SVDs and NC4 counts of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
        spread_ids_ = kept.ids;
        spread_seen_.assign(K, 0);
        spread_tokens_.assign(tokens ? K : 0, TokenMetrics{});
        spread_nc4_ = nc4, spread_nc4_agree_ = 0, spread_nc4_rows_ = 0;
        spread_nc4_hits_.assign(hits ? K : 0, 0), spread_nc4_class_rows_.assign(hits ? K : 0, 0);
    }
    for (int64_t i = 0; i < k; ++i) {
        const size_t s = (size_t)slot[i];
        spread_seen_[s] = 1;
        if (hits) spread_nc4_hits_[s] = hits[i], spread_nc4_class_rows_[s] = hrows[i];
        if (!tokens) continue;
        TokenMetrics& t = spread_tokens_[s];
        t.id = kept.ids[s];
        t.num_samples = kept.counts[s];
        tp.take(i, t);
    }
    if (n4) spread_nc4_agree_ += n4[0], spread_nc4_rows_ += n4[1];
}

void CudaBackend::spread_tokens(const KeptSet& kept, MetricValues& out) const {
    if (spread_ids_ != kept.ids || spread_seen_.size() != kept.ids.size())
        fail(COLLAPSE_ERR_STATE, "the kept set is not the one whose rows were spread over the ranks");
    for (size_t s = 0; s < spread_seen_.size(); ++s)
        if (!spread_seen_[s]) fail(COLLAPSE_ERR_INTERNAL, "kept class ", kept.ids[s], " is in no rank's part of the spread row store");
    host_.check(mul_bytes((int64_t)spread_tokens_.size(), (int64_t)sizeof(TokenMetrics)), "a copy of the per-token results", kFixKeptClasses);
    out.tokens = spread_tokens_;
    for (const TokenMetrics& t : spread_tokens_) out.svd_zero_matrices += t.zero_matrix ? 1 : 0;
    if (exact_store_) out.row_store = {{"spilled_bytes", host_store_->disk_bytes()}, {"spill_flushes", host_store_->flushes()}};
}

bool CudaBackend::spread_nc4(const KeptSet& kept, MetricValues& out) const {
    if (spread_phase_ != SpreadPhase::Spread || !spread_nc4_) return false;
    if (spread_ids_ != kept.ids) fail(COLLAPSE_ERR_STATE, "the kept set is not the one whose rows were spread over the ranks");
    if (spread_nc4_rows_ != kept.rows) {
        out.notes["nc4_agreement"] = "the ranks' parts saw " + std::to_string(spread_nc4_rows_) + " kept rows, the first pass " + std::to_string(kept.rows);
        return true;
    }
    out.nc4_rows = spread_nc4_rows_;
    if (spread_nc4_rows_ > 0) out.nc4_agreement = (double)spread_nc4_agree_ / (double)spread_nc4_rows_;
    if (cfg_.per_class_arrays) out.per_class.nc4_hits = spread_nc4_hits_, out.per_class.nc4_rows = spread_nc4_class_rows_;
    return true;
}

// ---- The second pass over ranks: each rank's results to the root, added there (the CPU's layout,
// core/second_pass_part.hpp), through host memory.

namespace {
// The first n values of a device buffer; H has T's size (the counters are unsigned long long,
// written as int64 bit for bit).
template <class H, class T>
std::vector<H> device_values(const DeviceBuffer<T>& b, size_t n) {
    static_assert(sizeof(T) == sizeof(H), "copied bit for bit");
    std::vector<H> h(n);
    if (n) COLLAPSE_CUDA_TRY(cudaMemcpy(h.data(), b.data(), n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// buf[0, n) += from[0, n) (read, added on the host, written back: d x d at most).
template <class T, class F>
void add_to_device(DeviceBuffer<T>& buf, const F* from, size_t n) {
    if (!from || n == 0) return;
    std::vector<T> h = device_values<T>(buf, n);
    for (size_t k = 0; k < n; ++k) h[k] += (T)from[k];
    COLLAPSE_CUDA_TRY(cudaMemcpy(buf.data(), h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
}
}  // namespace

SecondPassSizes CudaBackend::second_pass_sizes() const {
    const size_t K = kept2_.ids.size();
    const bool hits = pass2_nc4_ && cfg_.per_class_arrays;
    return {pass2_gram_ ? (size_t)(d_ * d_) : 0, within2_.data() ? (size_t)(d_ * d_) : 0, hits ? K : 0, hits ? K : 0};
}

void CudaBackend::save_second_pass(StateWriter& w) {
    if (!pass2_) fail(COLLAPSE_ERR_STATE, "save_second_pass: the second pass has not begun");
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    const SecondPassSizes n = second_pass_sizes();
    const HostBudget::Lease lease = host_.reserve(mul_bytes((int64_t)(n.gram + n.within + n.hits + n.hit_rows + 2), 8),
                                                  "this rank's second-pass results on the host", kFixKeptClasses);
    const std::vector<int64_t> rows = device_values<int64_t>(pass2_rows_dev_, 1);
    const std::vector<int64_t> agree = device_values<int64_t>(agree_, pass2_nc4_ ? 1 : 0);
    const std::vector<double> gram = device_values<double>(gram2_, n.gram), within = device_values<double>(within2_, n.within);
    const std::vector<int64_t> hits = device_values<int64_t>(nc4_slot_hits_, n.hits), hit_rows = device_values<int64_t>(nc4_slot_rows_, n.hit_rows);
    write_second_pass_part(w, {rows[0], agree.empty() ? 0 : agree[0], gram.data(), within.data(), hits.data(), hit_rows.data()}, n, d_);
}

void CudaBackend::merge_second_pass(const StateReader& r) {
    if (!pass2_) fail(COLLAPSE_ERR_STATE, "merge_second_pass: the second pass has not begun");
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    const SecondPassSizes n = second_pass_sizes();
    const HostBudget::Lease lease = host_.reserve(mul_bytes((int64_t)(std::max(n.gram, n.within) + 2), 8),
                                                  "the second-pass results being added on the root", kFixKeptClasses);
    const std::vector<int64_t> rows = device_values<int64_t>(pass2_rows_dev_, 1);
    const std::vector<int64_t> agree = device_values<int64_t>(agree_, pass2_nc4_ ? 1 : 0);
    const SecondPassPart p = read_second_pass_part(r, n, rows[0], agree.empty() ? 0 : agree[0]);
    // Every section is checked by now: add each to its device buffer.
    const int64_t counts[2] = {p.rows, p.agree};
    add_to_device(pass2_rows_dev_, &counts[0], 1);
    if (pass2_nc4_) add_to_device(agree_, &counts[1], 1);
    add_to_device(gram2_, p.gram, n.gram);
    add_to_device(within2_, p.within, n.within);
    add_to_device(nc4_slot_hits_, p.hits, n.hits);
    add_to_device(nc4_slot_rows_, p.hit_rows, n.hit_rows);
}

// ---- Pair-metric tiles spread over ranks (core/backend.hpp "pairs"; tiling, layout and merge:
// core/pair_part.hpp): the root's centred means and variances leave through host memory, every
// rank reduces its share of the tiles on its device by compute()'s own pair_tiles.

bool CudaBackend::pair_inputs(const KeptSet& kept, StateWriter& w) {
    const int64_t K = (int64_t)kept.ids.size();
    pair_spread_.reset();
    // compute()'s condition for the pair metrics.
    if (!cfg_.compute_class_metrics || K == 0 || K < cfg_.min_classes_for_gnc2) return false;
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    const HostBudget::Lease lease = host_.reserve(mul_bytes(K, d_ + 1, 8), "the pair metrics' inputs for the ranks (the centred means [K, d] of K = " +
                                                                               std::to_string(K) + " kept classes and their variances)",
                                                  kFixKeptClasses);
    const KeptMeans km = kept_means(kept);
    std::vector<double> m((size_t)(K * d_)), var((size_t)K);
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(m.data(), km.m.data(), m.size() * 8, cudaMemcpyDeviceToHost, stream_));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(var.data(), km.var.data(), var.size() * 8, cudaMemcpyDeviceToHost, stream_));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
    write_pair_inputs(w, m.data(), var.data(), K, d_, pair_tile_edge(K));
    pair_spread_ = std::make_unique<PairSpread>(kept, totals_.rows_seen);  // complete once pair_merge has taken a share
    return true;
}

void CudaBackend::pair_part(const StateReader& in, int rank, int P, StateWriter& w) {
    const PairInputs pi = read_pair_inputs(in, d_);
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    cudaStream_t s = stream_;
    const int64_t K = pi.K, d = d_;
    Lease<double> m = res_.take<double>((size_t)(K * d), "the root's centred means [K, d]"), var = res_.take<double>((size_t)K, "the root's variances"),
                  q = res_.take<double>((size_t)K, "norms"), a = res_.take<double>((size_t)K, "direction scales"),
                  zero = res_.take<double>((size_t)d, "a zero row");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(m.data(), pi.m, m.bytes(), cudaMemcpyHostToDevice, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(var.data(), pi.var, var.bytes(), cudaMemcpyHostToDevice, s));
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(zero.data(), 0, zero.bytes(), s));
    // q and a as compute() makes them from m (m - 0 is m, bit for bit; in place).
    launch_center(m.data(), zero.data(), 1.0, K, d, m.data(), q.data(), a.data(), s);
    int64_t range[3] = {0, 0, 0};
    const PairTotals t = pair_tiles(m.data(), q.data(), a.data(), var.data(), K, pi.T, rank, P, range);  // synchronises the stream
    write_pair_share(w, t, range);
}

void CudaBackend::pair_merge(const KeptSet& kept, const StateReader& r) {
    if (!pair_spread_) fail(COLLAPSE_ERR_STATE, "pair_merge: the pair inputs were not written for this kept set");
    pair_spread_->merge(kept, r);
}

}  // namespace collapse::internal::cuda
