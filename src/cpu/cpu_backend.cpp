// CPU ingest: validate, group the batch's rows by class, sum each class's rows once, then commit.
#include "cpu/cpu_backend.hpp"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/sampling.hpp"
#include "core/shifted_sums.hpp"
#include "cpu/blas_threads.hpp"
#include "cpu/row_kernels.hpp"

namespace collapse::internal {

namespace {

constexpr int64_t kGramBlockRows = 256;
constexpr int64_t kThreadedRowBytes = 1024;  // rows shorter than this are summed on one thread
// A class's entry in holdback_ besides its rows: the hash node and its share of the buckets.
constexpr int64_t kHoldbackEntryBytes = 64;

// The capacity a vector of `cap` elements, `size` of them used, gets for `add` more: the vectors
// that grow with rows are reserved to this explicitly, so that what is counted is what is allocated.
size_t grown_capacity(size_t size, size_t cap, size_t add) {
    const size_t need = size + add;
    return need <= cap ? cap : std::max(need, 2 * cap);
}

// Per-batch scratch of n rows of V classes, besides the staged sums: the accepted rows and the
// class order (per row), and per run (class present in the batch, at most min(n, V)) run_label_ and
// bucket_ (grown by doubling), run_begin_, stage_sq_, stage_slot_ and each thread's sums of squares.
int64_t batch_index_bytes(int64_t n, int64_t V, int64_t d) {
    const int64_t per_run = 2 * (4 + 8) + 3 * 8 + 8 * (int64_t)omp_get_max_threads();
    return add_bytes(add_bytes(mul_bytes(n, 8 + 4 + 8), mul_bytes(std::min(n, V) + 1, per_run)), 8 * d);
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget) {
    return std::make_unique<CpuBackend>(cfg, num_classes, dim, std::move(budget));
}

CpuBackend::CpuBackend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget)
    : cfg_(cfg), budget_(budget ? std::move(budget) : HostBudget::from_config(cfg)), V_(num_classes), d_(dim) {
    // Without max_tokens_to_analyze the kept set's rows are known as they stream; with it, the
    // Gram comes from the row store or a second pass (docs/METRICS.md, "The overall Gram while streaming").
    gram_streaming_ = cfg.compute_overall_metrics && cfg.max_tokens_to_analyze == 0;
    shifted_ = cfg.compute_class_metrics;
    within_streaming_ = gram_streaming_ && shifted_;
    // Everything that grows with V and d is counted before any of it exists (the row store's index
    // too, which the store reserves itself below): one stray label can make V large enough for
    // these alone to pass the limit.
    const bool keep_rows = cfg.svd_mode != COLLAPSE_SVD_OFF && cfg.compute_token_metrics;
    const std::string what = "the CPU backend's per-class state for V = " + std::to_string(V_) + " classes of width d = " + std::to_string(d_) +
                             " (class sums " + format_bytes(mul_bytes(V_, d_, 8)) + ", counts, norms and flags " + format_bytes(mul_bytes(V_, 21)) +
                             (keep_rows ? ", the row store's index " + format_bytes(RowStore::index_bytes(V_)) : std::string()) +
                             (gram_streaming_ ? ", the d x d Gram" : "") +
                             (shifted_ ? ", the classes' [V, d] float32 reference rows" : "") + (within_streaming_ ? ", Sigma_W's d x d scatter" : "") + ")";
    budget_->check(add_bytes(fixed_bytes(), keep_rows ? RowStore::index_bytes(V_) : 0), what, kFixNumClasses);
    fixed_ = budget_->reserve(fixed_bytes(), what, kFixNumClasses);
    held_ = budget_->lease();
    scratch_ = budget_->lease();
    stage_sums_ = budget_->lease();
    pass2_lease_ = budget_->lease();
    window_lease_ = budget_->lease();
    excluded_.assign((size_t)V_, 0);
    for (int64_t e : cfg.exclude_token_ids)
        if (e >= 0 && e < V_) excluded_[(size_t)e] = 1;
    count_.assign((size_t)V_, 0);
    sum_.assign((size_t)(V_ * d_), 0.0);
    sqdev_.assign((size_t)V_, 0.0);
    run_of_label_.assign((size_t)V_, -1);
    if (gram_streaming_) gram_.assign((size_t)(d_ * d_), 0.0);
    if (shifted_) shift_.assign((size_t)(V_ * d_), 0.0f);
    if (within_streaming_) within_.assign((size_t)(d_ * d_), 0.0);
    // The exact row store keeps half of what is left (after its own index) in memory and spills
    // the rest under intermediate_save_dir; the other half is for batches and finalisation. Its
    // index is counted by the store itself.
    if (keep_rows) {
        const int64_t spill_budget =
            cfg.svd_mode == COLLAPSE_SVD_EXACT ? std::max<int64_t>(0, (budget_->available() - RowStore::index_bytes(V_)) / 2) : -1;
        store_ = std::make_unique<RowStore>(V_, d_, spill_budget, cfg.intermediate_save_dir, RowStore::WriteFn{}, budget_.get());
    }
}

// sum_ [V, d]; count_, sqdev_ (8 bytes a class), excluded_ (1), run_of_label_ (4); the Gram and
// its block of rows waiting for dsyrk.
int64_t CpuBackend::fixed_bytes() const {
    const int64_t gram = gram_streaming_ ? add_bytes(mul_bytes(d_, d_, 8), mul_bytes(kGramBlockRows, d_ * 8 + 4)) : 0;
    const int64_t within = add_bytes(shifted_ ? mul_bytes(V_, d_, 4) : 0, within_streaming_ ? mul_bytes(d_, d_, 8) : 0);
    return add_bytes(add_bytes(add_bytes(mul_bytes(V_, d_, 8), mul_bytes(V_, 21)), gram), within);
}

// The rows this backend holds between batches: the row store's memory (capacity) and the rows
// held back from the Gram.
int64_t CpuBackend::held_rows_bytes() const {
#ifndef NDEBUG
    if (holdback_bytes_ != holdback_bytes_walked())
        fail(COLLAPSE_ERR_INTERNAL, "held-back rows: running count ", holdback_bytes_, " bytes, the map holds ", holdback_bytes_walked());
#endif
    return (store_ ? store_->memory_bytes() : 0) + holdback_bytes_;
}

int64_t CpuBackend::holdback_bytes_walked() const {
    int64_t held = 0;
    for (const auto& h : holdback_) held += (int64_t)h.second.capacity() * 8 + kHoldbackEntryBytes;
    return held;
}

std::vector<double>& CpuBackend::holdback_entry(int32_t c) {
    const auto [it, added] = holdback_.try_emplace(c);
    if (added) holdback_bytes_ += kHoldbackEntryBytes;
    return it->second;
}

void CpuBackend::holdback_reserve(int32_t c, size_t capacity) {
    std::vector<double>& h = holdback_entry(c);
    const size_t before = h.capacity();
    h.reserve(capacity);
    holdback_bytes_ += ((int64_t)h.capacity() - (int64_t)before) * 8;
}

void CpuBackend::holdback_append(int32_t c, const double* x, int64_t values) {
    std::vector<double>& h = holdback_entry(c);
    const size_t before = h.capacity();
    h.insert(h.end(), x, x + values);
    holdback_bytes_ += ((int64_t)h.capacity() - (int64_t)before) * 8;
}

void CpuBackend::holdback_erase(std::unordered_map<int32_t, std::vector<double>>::iterator it) {
    holdback_bytes_ -= (int64_t)it->second.capacity() * 8 + kHoldbackEntryBytes;
    holdback_.erase(it);
}

void CpuBackend::holdback_clear() {
    holdback_.clear();
    holdback_bytes_ = 0;
}

int64_t CpuBackend::resident_bytes() const {
    return fixed_.bytes() + held_.bytes() + scratch_.bytes() + stage_sums_.bytes() + pass2_lease_.bytes() +
           (store_ ? RowStore::index_bytes(V_) : 0);
}

// Bytes finalisation may bring back from the spilled row store at once: a sixth of what is free.
// A group of classes is in memory with the SVD's copy of one of them, and LAPACK's workspace and
// BLAS's buffers come on top (measured on a 1 GiB dump: peak RSS grows by about twice the group).
int64_t CpuBackend::load_budget() const { return std::max<int64_t>(d_ * 8, budget_->available() / 6); }

// Groups the accepted rows by class (counting sort, stable) and sums each class's rows into the
// staging area: one pass over the features, no state touched.
void CpuBackend::stage(const BatchDesc& b, const AcceptedRows& rows) {
    const int64_t n = (int64_t)rows.label.size();
    // Counting sort by label, stable, in O(rows): run_of_label_ maps a label to its run while the
    // batch is grouped and is reset to -1 afterwards, so it costs nothing per class of V.
    run_label_.clear();
    bucket_.clear();
    for (int64_t i = 0; i < n; ++i) {
        int32_t& r = run_of_label_[(size_t)rows.label[(size_t)i]];
        if (r < 0) {
            r = (int32_t)run_label_.size();
            run_label_.push_back(rows.label[(size_t)i]);
            bucket_.push_back(0);
        }
        ++bucket_[(size_t)r];
    }
    run_begin_.assign(run_label_.size() + 1, 0);
    for (size_t k = 0; k < run_label_.size(); ++k) run_begin_[k + 1] = run_begin_[k] + bucket_[k];
    std::copy(run_begin_.begin(), run_begin_.end() - 1, bucket_.begin());  // next free place per run
    order_.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) order_[(size_t)bucket_[(size_t)run_of_label_[(size_t)rows.label[(size_t)i]]]++] = i;

    // Sum each class's rows in one sequential pass over the batch (hardware prefetch keeps the
    // reads at memory speed; visiting rows class by class was twice as slow). A class seen once is
    // not staged: commit adds its row straight from the input, since most classes of a large
    // vocabulary are singletons and staging them would double the traffic.
    const size_t runs = run_label_.size();
    stage_sq_.assign(runs, 0.0);
    stage_slot_.assign(runs, -1);
    int64_t staged = 0;
    for (size_t k = 0; k < runs; ++k)
        if (run_begin_[k + 1] - run_begin_[k] > 1) stage_slot_[k] = staged++;
    if ((size_t)(staged * d_) > stage_sum_.size()) {
        stage_sums_.resize(mul_bytes(staged, d_, 8), "the sums of a batch's " + std::to_string(staged) + " classes seen more than once", kFixBatchRows);
        stage_sum_.resize((size_t)(staged * d_));
    }
    std::fill(stage_sum_.begin(), stage_sum_.begin() + staged * d_, 0.0);
    for (int32_t k = 0; k < (int32_t)runs; ++k) run_of_label_[(size_t)run_label_[(size_t)k]] = k;
    // A class's reference row is its first row (in class order, as commit and the CUDA ingest take
    // them). Set for classes without rows only: if the batch is refused, nothing uses it.
    if (shifted_)
        for (size_t k = 0; k < runs; ++k) {
            const int32_t c = run_label_[k];
            if (count_[(size_t)c] > 0) continue;
            const void* x = b.features.row(rows.feature_row[(size_t)order_[(size_t)run_begin_[k]]]);
            float* sc = shift_.data() + (size_t)c * (size_t)d_;
            for (int64_t j = 0; j < d_; ++j) sc[j] = shift_value(load_as_double(x, b.features.dtype, j));
        }
    // Classes are split between threads (run k to thread k mod T): each class is still summed by
    // one thread in row order, so the result does not depend on the thread count. Short rows are
    // faster on one thread (every thread scans all labels).
    const bool threaded = (int64_t)dtype_size(b.features.dtype) * d_ >= kThreadedRowBytes;
#pragma omp parallel if (threaded)
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        std::vector<double> sq(runs, 0.0);
        // One owned row of look-ahead: its staging row (scattered, often not cached) is prefetched
        // while the previous row is summed.
        int64_t prev = -1;
        double* prev_acc = nullptr;
        auto sum_prev = [&](const double* next_acc) {
            const int32_t c = rows.label[(size_t)prev], k = run_of_label_[(size_t)c];
            sq[(size_t)k] += cpu::accumulate_row(b.features.row(rows.feature_row[(size_t)prev]), b.features.dtype, d_, prev_acc,
                                                 nullptr, next_acc, shifted_ ? shift_.data() + (size_t)c * (size_t)d_ : nullptr);
        };
        for (int64_t i = 0; i < n; ++i) {
            const int32_t k = run_of_label_[(size_t)rows.label[(size_t)i]];
            if (k % T != t) continue;
            double* acc = stage_slot_[(size_t)k] >= 0 ? stage_sum_.data() + stage_slot_[(size_t)k] * d_ : nullptr;
            if (prev >= 0) sum_prev(acc);
            prev = i;
            prev_acc = acc;
        }
        if (prev >= 0) sum_prev(nullptr);
        for (size_t k = (size_t)t; k < runs; k += (size_t)T) stage_sq_[k] = sq[k];
    }
    for (int32_t c : run_label_) run_of_label_[(size_t)c] = -1;
}

void CpuBackend::ingest(const BatchDesc& b, void*) {
    refuse_if_spread("it takes no more first-pass rows");
    pair_spread_.reset();  // the ranks' pair shares are of the rows before these
    if (b.features.memory != COLLAPSE_MEMORY_HOST)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the cpu backend takes host buffers; this batch is in device memory (use backend: cuda)");
    const int64_t n = b.num_rows();
    if (batch_index_bytes(n, V_, d_) > scratch_.bytes())
        scratch_.resize(batch_index_bytes(n, V_, d_), "the scratch of a batch of " + std::to_string(n) + " rows", kFixBatchRows);
    // float64 values can be finite yet beyond float32 (or square to infinity only at 1e154): check
    // them element by element; other types are caught by their sums of squares below.
    AcceptedRows rows = accept_rows(b, V_, excluded_, cfg_.ignore_index, cfg_.nonfinite_policy, /*check_finite=*/b.features.dtype == COLLAPSE_F64);
    stage(b, rows);
    // A non-finite value makes its class's sum of squares non-finite (double cannot overflow on
    // sums of float squares), so one check per class finds every bad row without a second read.
    bool finite = true;
    for (double s : stage_sq_) finite = finite && std::isfinite(s);
    if (!finite) {
        // The rows are accepted again while the first list still exists.
        const HostBudget::Lease again = budget_->reserve(mul_bytes(n, 8 + 4), "re-checking a batch of " + std::to_string(n) + " rows for non-finite values",
                                                         kFixBatchRows);
        rows = accept_rows(b, V_, excluded_, cfg_.ignore_index, cfg_.nonfinite_policy, /*check_finite=*/true);  // throws under "error"
        stage(b, rows);
    }
    if (has_row_store())  // spill before anything changes: a disk error refuses the batch whole
        store_->make_room([&] {
            int64_t add = 0;
            for (size_t k = 0; k < run_label_.size(); ++k) add += store_->growth(run_label_[k], run_begin_[k + 1] - run_begin_[k]);
            return add;
        });
    held_.update(held_rows_bytes());  // a flush may have given memory back
    if (has_row_store() && store_->memory_bytes() > 0 && !budget_->fits(growth())) {
        // Short of host memory as a whole (not only of the store's share): the rows in memory go
        // to disk first.
        store_->spill_memory();
        held_.update(held_rows_bytes());
    }
    held_.resize(add_bytes(held_.bytes(), growth()), "this batch's rows (reservoirs, the exact row store and rows waiting for min_samples_per_token)",
                 "lower batch_rows (--batch-rows: the exact store takes a batch's rows in memory before it spills them), "
                 "svd_max_rows_per_token or min_samples_per_token, or raise host_memory_limit");
    commit(b, rows);
    held_.update(held_rows_bytes());
    rows_.rows_seen += rows.rows_seen;
    rows_.rows_masked += rows.rows_masked;
    rows_.rows_ignored += rows.rows_ignored;
    rows_.rows_excluded += rows.rows_excluded;
    rows_.rows_nonfinite += rows.rows_nonfinite;
    // The kept rows, for the window tracker's verdicts (last_batch_kept); counted with the scratch.
    last_rows_ = std::move(rows.feature_row);
    last_n_ = n;
    last_sequences_ = b.sequences;
    last_seq_len_ = b.seq_len;
}

// Bytes the staged batch adds when committed: stored rows and held-back Gram rows, plus, at the
// peak, the largest vector that moves (a vector that grows holds its old and new block at once).
int64_t CpuBackend::growth() const {
    int64_t bytes = 0, moving = 0;
    for (size_t k = 0; k < run_label_.size(); ++k) {
        const int32_t c = run_label_[k];
        const int64_t n0 = count_[(size_t)c], len = run_begin_[k + 1] - run_begin_[k];
        if (store_) {
            const int64_t n = cfg_.svd_mode == COLLAPSE_SVD_EXACT ? len : std::max<int64_t>(0, std::min(len, cfg_.svd_max_rows_per_token - n0));
            const int64_t g = store_->growth(c, n);
            bytes += g;
            if (g > 0) moving = std::max(moving, store_->capacity_bytes(c));
        }
        const int64_t held = gram_streaming_ ? std::max<int64_t>(0, std::min(len, cfg_.min_samples_per_token - 1 - n0)) : 0;
        if (held > 0) {
            const auto it = holdback_.find(c);
            const size_t size = it == holdback_.end() ? 0 : it->second.size(), cap = it == holdback_.end() ? 0 : it->second.capacity();
            const size_t grown = grown_capacity(size, cap, (size_t)(held * d_));
            bytes += (int64_t)(grown - cap) * 8 + (it == holdback_.end() ? kHoldbackEntryBytes : 0);
            if (grown > cap) moving = std::max(moving, (int64_t)cap * 8);
        }
    }
    return bytes + moving;
}

// A row of class c for the Gram; with Sigma_W streaming, the same block (its rows' classes kept
// beside it) is shifted in place by each row's reference row after the Gram's dsyrk and goes to
// the within scatter: one block of memory for both.
void CpuBackend::gram_add(int32_t c, const double* x) {
    if (gram_block_.empty()) gram_block_.resize((size_t)(kGramBlockRows * d_)), gram_block_class_.resize((size_t)kGramBlockRows);
    std::memcpy(gram_block_.data() + gram_block_rows_ * d_, x, (size_t)d_ * sizeof(double));
    gram_block_class_[(size_t)gram_block_rows_] = c;
    if (++gram_block_rows_ == kGramBlockRows) gram_flush();
}

void CpuBackend::gram_flush() {
    if (gram_block_rows_ == 0) return;
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)gram_block_rows_, 1.0, gram_block_.data(),
                (int)d_, 1.0, gram_.data(), (int)d_);
    if (within_streaming_) {
        for (int64_t r = 0; r < gram_block_rows_; ++r) {
            double* x = gram_block_.data() + r * d_;
            const float* sc = shift_.data() + (size_t)gram_block_class_[(size_t)r] * (size_t)d_;
            for (int64_t j = 0; j < d_; ++j) x[j] -= (double)sc[j];
        }
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)gram_block_rows_, 1.0, gram_block_.data(), (int)d_, 1.0,
                    within_.data(), (int)d_);
    }
    gram_block_rows_ = 0;
}

// Room in holdback_ for the rows of class c (len in this batch) that wait for min_samples_per_token:
// the vector grows once, as growth() counted it.
void CpuBackend::gram_reserve(int32_t c, int64_t len) {
    const int64_t held = std::max<int64_t>(0, std::min(len, cfg_.min_samples_per_token - 1 - count_[(size_t)c]));
    if (held == 0) return;
    const std::vector<double>& h = holdback_entry(c);
    holdback_reserve(c, grown_capacity(h.size(), h.capacity(), (size_t)(held * d_)));
}

// Row x, class c's i-th (0-based), for the Gram: held back while the class has fewer than
// min_samples_per_token rows; the row that reaches it brings the held rows in before itself.
void CpuBackend::gram_row(int32_t c, int64_t i, const double* x) {
    const int64_t min_n = cfg_.min_samples_per_token;
    if (i + 1 < min_n) {
        holdback_append(c, x, d_);
        return;
    }
    if (i + 1 == min_n) {
        auto it = holdback_.find(c);
        if (it != holdback_.end()) {
            for (size_t r = 0; r < it->second.size(); r += (size_t)d_) gram_add(c, it->second.data() + r);
            holdback_erase(it);
        }
    }
    gram_add(c, x);
}

// Everything below runs only after the batch is known to be good: from here on nothing throws
// except std::bad_alloc.
void CpuBackend::commit(const BatchDesc& b, const AcceptedRows& rows) {
    const size_t runs = run_label_.size();
    const bool keep_rows = store_ != nullptr;
    const bool exact = cfg_.svd_mode == COLLAPSE_SVD_EXACT;
    const int64_t cap = cfg_.svd_max_rows_per_token;
    // Sums: every class's row of sum_ is its own, so classes go to threads freely.
#pragma omp parallel for schedule(static) if ((int64_t)dtype_size(b.features.dtype) * d_ >= kThreadedRowBytes)
    for (int64_t k = 0; k < (int64_t)runs; ++k) {
        const int32_t c = run_label_[(size_t)k];
        double* s = sum_.data() + (size_t)c * (size_t)d_;
        if (stage_slot_[(size_t)k] >= 0)
            cpu::add_into(s, stage_sum_.data() + stage_slot_[(size_t)k] * d_, d_);
        else
            cpu::accumulate_row(b.features.row(rows.feature_row[(size_t)order_[(size_t)run_begin_[(size_t)k]]]), b.features.dtype, d_, s);
        sqdev_[(size_t)c] += stage_sq_[(size_t)k];
    }
    if (!gram_streaming_ && !keep_rows) {
        for (size_t k = 0; k < runs; ++k) count_[(size_t)run_label_[k]] += run_begin_[k + 1] - run_begin_[k];
        return;
    }
    // Rows in class order, for the Gram (with the rows held back below min_samples_per_token) and
    // the row store: positions depend on each class's count. The Gram's dsyrk calls are small.
    const OneBlasThread one_blas(gram_streaming_);
    constexpr int64_t kCommitAhead = 4;
    const int64_t row_bytes = d_ * (int64_t)dtype_size(b.features.dtype);
    auto convert = [&](int64_t p, double* xr) {
        // Rows are visited in class order, scattered over the batch: the row a few places ahead
        // is fetched while this one is converted (a profile put 58% of the conversion's samples on
        // the instruction after its load).
        if (p + kCommitAhead < run_begin_[runs]) {
            const char* ahead = static_cast<const char*>(b.features.row(rows.feature_row[(size_t)order_[(size_t)(p + kCommitAhead)]]));
            for (int64_t e = 0; e < row_bytes; e += 64) __builtin_prefetch(ahead + e);
        }
        cpu::convert_row(b.features.row(rows.feature_row[(size_t)order_[(size_t)p]]), b.features.dtype, d_, xr);
    };
    if (keep_rows && exact) {
        // Exact: each class's rows go straight into the store, converted once, and the Gram reads
        // them there. Thread 0 converts class after class while thread 1 follows a class behind
        // with the Gram (its dsyrk is half of ingest's work at d = 64 and would otherwise leave the
        // second core idle); both visit classes and rows in the same order as one thread would, so
        // the Gram is the same to the bit whatever the thread count.
        // (Thread 0 grows one class's vector while thread 1 reads another's: distinct vectors.)
        std::atomic<size_t> converted{0};  // runs whose rows are in the store
        // Thread 1 sleeps when it catches up (spinning there cost as much CPU as the Gram itself):
        // thread 0 wakes it after a class only while it waits. Both flags are seq_cst, so either
        // thread 0 sees `waiting` or thread 1 sees the new count before it sleeps.
        std::atomic<bool> waiting{false};
        std::mutex wait_mutex;
        std::condition_variable wake;
        auto stored = [&](size_t k) {  // the batch's rows of run k, once appended: the last ones in memory
            const int32_t c = run_label_[k];
            return store_->memory_data(c) + (store_->memory_rows(c) - (run_begin_[k + 1] - run_begin_[k])) * d_;
        };
        // A failed allocation in either thread (bad_alloc, rethrown outside the parallel region):
        // the other one stops too instead of waiting for rows that will not come.
        std::atomic<bool> failed{false};
        auto wake_gram = [&] {
            if (!waiting.load()) return;
            const std::lock_guard<std::mutex> lock(wait_mutex);
            wake.notify_one();
        };
        auto convert_runs = [&] {
            for (size_t k = 0; k < runs && !failed.load(); ++k) {
                double* dst = store_->append(run_label_[k], run_begin_[k + 1] - run_begin_[k]);
                for (int64_t p = run_begin_[k]; p < run_begin_[k + 1]; ++p) convert(p, dst + (p - run_begin_[k]) * d_);
                converted.store(k + 1);
                wake_gram();
            }
        };
        auto gram_runs = [&] {
            for (size_t k = 0; k < runs; ++k) {
                if (converted.load() <= k) {
                    std::unique_lock<std::mutex> lock(wait_mutex);
                    waiting.store(true);
                    wake.wait(lock, [&] { return converted.load() > k || failed.load(); });
                    waiting.store(false);
                    if (failed.load()) return;
                }
                const int32_t c = run_label_[k];
                const int64_t len = run_begin_[k + 1] - run_begin_[k];
                const double* x = stored(k);
                gram_reserve(c, len);
                for (int64_t r = 0; r < len; ++r) gram_row(c, count_[(size_t)c] + r, x + r * d_);
            }
            gram_flush();
        };
        if (!gram_streaming_) {
            convert_runs();
        } else {
            std::exception_ptr errs[2];
            auto guarded = [&](int t, const auto& work) {
                try {
                    work();
                } catch (...) {
                    errs[t] = std::current_exception();
                    failed.store(true);
                    const std::lock_guard<std::mutex> lock(wait_mutex);
                    wake.notify_one();
                }
            };
#pragma omp parallel num_threads(2) if (omp_get_max_threads() > 1)
            {
                const int t = omp_get_thread_num();
                if (t == 0) guarded(0, convert_runs);
                if (t == 1 || omp_get_num_threads() == 1) guarded(1, gram_runs);
            }
            for (const std::exception_ptr& e : errs)
                if (e) std::rethrow_exception(e);
        }
        for (size_t k = 0; k < runs; ++k) count_[(size_t)run_label_[k]] += run_begin_[k + 1] - run_begin_[k];
        return;
    }
    std::vector<double> xd((size_t)d_);
    for (size_t k = 0; k < runs; ++k) {
        const int32_t c = run_label_[k];
        // Sampled: the slots this batch fills (the reservoir's first svd_max_rows_per_token rows)
        // are added at once, as growth() counted them.
        const int64_t len = run_begin_[k + 1] - run_begin_[k];
        if (gram_streaming_) gram_reserve(c, len);
        if (keep_rows && count_[(size_t)c] < cap) store_->append(c, std::min(len, cap - count_[(size_t)c]));
        for (int64_t p = run_begin_[k]; p < run_begin_[k + 1]; ++p) {
            convert(p, xd.data());
            const int64_t i = count_[(size_t)c]++;  // this row is the class's i-th (0-based)
            if (gram_streaming_) gram_row(c, i, xd.data());
            if (!keep_rows) continue;
            // Sampled: the reservoir slot of this row, shared with the CUDA backend.
            const int64_t slot = reservoir_slot(cfg_.seed, c, i, cap);
            if (slot >= 0) std::memcpy(store_->memory_data(c) + slot * d_, xd.data(), (size_t)d_ * sizeof(double));
        }
    }
    if (gram_streaming_) gram_flush();
}

void CpuBackend::begin_second_pass(const KeptSet& kept, const Classifier& clf, bool nc4, bool gram) {
    const size_t K = kept.ids.size();
    // The kept set's copy (with its V-long slot table), the kept means and the second Gram (and
    // Sigma_W's scatter of the kept set about the final means).
    const bool within = gram && cfg_.compute_class_metrics;
    const int64_t bytes = add_bytes(add_bytes(mul_bytes(V_, 4), mul_bytes((int64_t)K, 8 * d_ + 4 + 8 + 8 + (cfg_.per_class_arrays ? 16 : 0))),
                                    mul_bytes(gram ? 1 + within : 0, d_, 8 * d_));
    pass2_lease_.resize(bytes, "the second pass's kept set of K = " + std::to_string(K) + " classes (their means [K, d], the V-long slot table" +
                             (gram ? ", the d x d Gram)" : ")"),
                  kFixKeptClasses);
    pass2_ = true;
    pass2_nc4_ = nc4 && clf.present();
    pass2_gram_ = gram;
    kept2_ = kept;
    clf2_ = &clf;
    mu2_.assign(K * (size_t)d_, 0.0);
    mu2_sq_.assign(K, 0.0);
    for (size_t s = 0; s < K; ++s) {
        const int32_t c = kept.ids[s];
        double q = 0;
        for (int64_t j = 0; j < d_; ++j) {
            const double v = sum_[(size_t)c * (size_t)d_ + (size_t)j] / (double)count_[(size_t)c];
            mu2_[s * (size_t)d_ + (size_t)j] = v;
            q += v * v;
        }
        mu2_sq_[s] = q;
    }
    if (pass2_gram_) gram2_.assign((size_t)(d_ * d_), 0.0);
    if (within) within2_.assign((size_t)(d_ * d_), 0.0);
    pass2_rows_ = 0;
    nc4_agree_ = 0;
    nc4_hits2_.assign(cfg_.per_class_arrays && pass2_nc4_ ? K : 0, 0);
    nc4_rows2_.assign(nc4_hits2_.size(), 0);
}

void CpuBackend::ingest_second_pass(const BatchDesc& b, void*) {
    if (b.features.memory != COLLAPSE_MEMORY_HOST)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the cpu backend takes host buffers; this batch is in device memory");
    const int64_t cap = kGramBlockRows;
    const int64_t n = b.num_rows();
    const bool within = !within2_.empty();
    const HostBudget::Lease scratch = budget_->reserve(add_bytes(mul_bytes(n, 12), mul_bytes(cap, d_ * (within ? 16 : 8) + 4)),
                                                       "the second pass's scratch for a batch of " + std::to_string(n) + " rows", kFixBatchRows);
    const AcceptedRows rows = accept_rows(b, V_, excluded_, cfg_.ignore_index, cfg_.nonfinite_policy, true);
    // Kept rows only, converted to double in blocks.
    std::vector<double> block;
    std::vector<int32_t> block_slot((size_t)cap);  // each row's kept slot (NC4 hits by class)
    const bool by_class = !nc4_hits2_.empty();
    int64_t nblock = 0;
    block.resize((size_t)(cap * d_));
    std::vector<double> centred(within ? (size_t)(cap * d_) : 0);
    // NC4 gathers the batch's kept rows into its own larger blocks (one GEMM against W per block).
    std::optional<Nc4Blocks> nc4;
    if (pass2_nc4_ && !kept2_.ids.empty())
        nc4.emplace(*budget_, d_, *clf2_, V_, mu2_, mu2_sq_, kept2_.ids, (int64_t)rows.label.size(), by_class ? nc4_hits2_.data() : nullptr);
    auto flush = [&]() {
        if (nblock == 0) return;
        if (within)
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)nblock, 1.0, centred.data(), (int)d_, 1.0, within2_.data(),
                        (int)d_);
        if (pass2_gram_)
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)nblock, 1.0, block.data(), (int)d_, 1.0,
                        gram2_.data(), (int)d_);
        if (nc4) nc4->add(block.data(), nblock, block_slot.data());
        pass2_rows_ += nblock;
        nblock = 0;
    };
    for (size_t i = 0; i < rows.label.size(); ++i) {
        const int32_t slot = kept2_.slot[(size_t)rows.label[i]];
        if (slot < 0) continue;
        double* x = block.data() + nblock * d_;
        cpu::convert_row(b.features.row(rows.feature_row[i]), b.features.dtype, d_, x);
        if (within) {
            const double* mu = mu2_.data() + (size_t)slot * (size_t)d_;
            for (int64_t j = 0; j < d_; ++j) centred[(size_t)(nblock * d_ + j)] = x[j] - mu[j];
        }
        block_slot[(size_t)nblock] = slot;
        if (by_class) ++nc4_rows2_[(size_t)slot];
        if (++nblock == cap) flush();
    }
    flush();
    if (nc4) nc4_agree_ += nc4->finish();
}

}  // namespace collapse::internal
