// Generation-time windows on the CUDA backend (core/windows.hpp decides which rows form which
// window; src/cpu/cpu_windows.cpp is the reference):
//  - window_stash: the batch's rows (any float dtype, host or device batch: the ingest's device
//    view) converted to float32 into a device slot store, on the batch's stream after its ingest;
//    the same kernel writes each row's verdict (the ingest's validate keys: sentinel = dropped; a
//    refused batch drops every row), copied back to pinned memory with an event, no host sync;
//  - window_verdicts: the verdicts whose copy has completed (event query, never a wait);
//  - window_reduce / window_evaluate: windows gathered from the store and centred on their mean in
//    float64, the smaller centred Gram (W x W, or d x d when d < W) scaled by 1 / (W - 1) by
//    cublasDgemmStridedBatched, eigenvalues by eigen_solvers.cu's solver for the size, and the
//    entropy by core/windows.hpp's window_entropy_from_eigen (the CPU's tau rule, same code).
//    window_reduce only queues: the windows' rows are copied out of the store in stream order (no
//    host sync); the queue is solved when full or at window_results (eigenvalues_batched waits for
//    its solver), whose entropies come back in call order. window_evaluate solves at once.
#include <algorithm>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/windows.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.hpp"
#include "eigen_solvers.cuh"
#include "kernels.cuh"

namespace collapse::internal::cuda {

namespace {

const char* const kFixWindows = "lower window_size or batch_rows (--batch-rows), set compute_window_metrics: false, or raise device_memory_limit";

}  // namespace

// Grows the store to `capacity` slots (by half again at least, so that a growing number of open
// windows does not copy the store every batch), keeping its rows.
void CudaBackend::window_grow(int64_t capacity, cudaStream_t s) {
    if (capacity <= win_slots_) return;
    int64_t want = std::max(capacity, win_slots_ + win_slots_ / 2);
    if (budget_.used() + mul_bytes(want, d_, 4) > budget_.limit()) want = capacity;  // room for what is needed only
    DeviceBuffer<float> grown((size_t)mul_bytes(want, d_, 1), &budget_,
                              "the rows of open windows (" + std::to_string(want) + " slots of d = " + std::to_string(d_) + " floats)",
                              kFixWindows);
    if (win_slots_ > 0) {
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(grown.data(), win_store_.data(), win_store_.bytes(), cudaMemcpyDeviceToDevice, s));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));  // before the old store is freed
    }
    win_store_ = std::move(grown);
    win_slots_ = want;
}

void CudaBackend::window_stash(const BatchDesc& b, const int64_t* slot, int64_t capacity, void*) {
    DeviceGuard guard(cfg_.device_ordinal);
    const int64_t n = b.num_rows();
    int64_t m = 0;
    for (int64_t r = 0; r < n; ++r) m += slot[r] >= 0 ? 1 : 0;
    if (m == 0) return;
    if (!win_batch_) fail(COLLAPSE_ERR_INTERNAL, "window_stash: no first-pass batch to stash rows of");
    win_batch_ = false;
    // The batch's stream (ingest picked it): its view, keys and status are read in stream order.
    cudaStream_t s = last_stream_;
    window_grow(capacity, s);
    const int i = win_next_;
    WindowStash& w = win_stash_[(size_t)i];
    if (w.pending) {  // its verdicts kept until the session asks
        COLLAPSE_CUDA_TRY(cudaEventSynchronize(w.done));
        if (!win_ready_lease_.bytes()) win_ready_lease_ = host_.lease();
        win_ready_lease_.resize(mul_bytes((int64_t)win_ready_slots_.size() + w.rows, 9), "the row verdicts of window rows", kFixBatchRows);
        take_verdicts(i, win_ready_slots_, win_ready_kept_);
    }
    // Sized for the whole batch, so that batches of one size allocate once.
    if ((int64_t)w.kept.size() < m) {
        const std::string what = "the window rows of a batch of " + std::to_string(n) + " rows";
        w.pairs.allocate((size_t)(2 * n), &budget_, &host_, what + " (row, slot)", kFixBatchRows);
        w.kept.allocate((size_t)n, &budget_, &host_, what + " (verdicts)", kFixBatchRows);
        w.pairs_dev.allocate((size_t)(2 * n), &budget_, what + " (row, slot)", kFixWindows);
        w.kept_dev.allocate((size_t)n, &budget_, what + " (verdicts)", kFixWindows);
    }
    int64_t j = 0;
    for (int64_t r = 0; r < n; ++r) {
        if (slot[r] < 0) continue;
        w.pairs[(size_t)(2 * j)] = r;
        w.pairs[(size_t)(2 * j + 1)] = slot[r];
        ++j;
    }
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w.pairs_dev.data(), w.pairs.data(), (size_t)(2 * m) * 8, cudaMemcpyHostToDevice, s));
    launch_window_stash(win_db_, w.pairs_dev.data(), m, scratch_.keys.data(), (int32_t)V_, status_.data() + win_status_, win_store_.data(),
                        w.kept_dev.data(), s);
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w.kept.data(), w.kept_dev.data(), (size_t)m, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaEventRecord(w.done, s));
    // The next batch (on any stream) reuses the scratch keys and the staging the stash reads.
    COLLAPSE_CUDA_TRY(cudaEventRecord(last_done_, s));
    mark_staging_consumed(s);  // the upload two batches on waits for the stash's reads too
    w.pending = true;
    w.rows = m;
    win_next_ = (win_next_ + 1) % kStatusSlots;
}

void CudaBackend::take_verdicts(int i, std::vector<int64_t>& slots, std::vector<uint8_t>& kept) {
    WindowStash& w = win_stash_[(size_t)i];
    for (int64_t j = 0; j < w.rows; ++j) {
        slots.push_back(w.pairs[(size_t)(2 * j + 1)]);
        kept.push_back(w.kept[(size_t)j]);
    }
    w.pending = false;
    w.rows = 0;
}

void CudaBackend::window_verdicts(std::vector<int64_t>& slots, std::vector<uint8_t>& kept) {
    DeviceGuard guard(cfg_.device_ordinal);
    slots.swap(win_ready_slots_);
    kept.swap(win_ready_kept_);
    win_ready_slots_.clear();
    win_ready_kept_.clear();
    win_ready_lease_.reset();
    for (int k = 0; k < kStatusSlots; ++k) {  // oldest first
        const int i = (win_next_ + k) % kStatusSlots;
        if (!win_stash_[(size_t)i].pending) continue;
        const cudaError_t e = cudaEventQuery(win_stash_[(size_t)i].done);
        if (e == cudaErrorNotReady) continue;
        COLLAPSE_CUDA_TRY(e);
        take_verdicts(i, slots, kept);
    }
}

// Checkpoints: the session has synchronised (save) or the store is new or idle (load); the rows
// travel one by one (a checkpoint holds fewer than W rows per open sequence).
void CudaBackend::window_put(const int64_t* slots, int64_t n, const float* rows, int64_t capacity) {
    DeviceGuard guard(cfg_.device_ordinal);
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(last_stream_));
    window_grow(capacity, stream_);
    for (int64_t i = 0; i < n; ++i)
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(win_store_.data() + slots[i] * d_, rows + i * d_, (size_t)d_ * 4, cudaMemcpyHostToDevice, stream_));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
}

void CudaBackend::window_get(const int64_t* slots, int64_t n, float* rows) {
    DeviceGuard guard(cfg_.device_ordinal);
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(last_stream_));
    for (int64_t i = 0; i < n; ++i)
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(rows + i * d_, win_store_.data() + slots[i] * d_, (size_t)d_ * 4, cudaMemcpyDeviceToHost, stream_));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
}

std::vector<double> CudaBackend::window_entropies(const float* src, const int64_t* slots, int64_t windows, int64_t W) {
    std::vector<double> out((size_t)windows);
    if (windows == 0) return out;
    DeviceGuard guard(cfg_.device_ordinal);
    // The session's stream (the pool's leases are for it), after the stashes and queue copies.
    cudaStream_t s = stream_;
    if (last_stream_ != s) COLLAPSE_CUDA_TRY(cudaStreamWaitEvent(s, last_done_, 0));
    const int64_t d = d_, M = W <= d ? W : d;
    // Per window on the device: its slots, centred rows (float64), Gram, eigenvalues, solver info.
    const int64_t per = add_bytes(add_bytes(mul_bytes(W, 8), mul_bytes(W, d, 8)), add_bytes(mul_bytes(M, M, 8), mul_bytes(M, 8) + 4));
    const int64_t cnt = std::max<int64_t>(1, std::min<int64_t>({windows, int64_t(65535), (int64_t(256) << 20) / per}));
    const HostBudget::Lease lease = host_.reserve(mul_bytes(cnt, mul_bytes(M, 8) + 4),
                                                  "the eigenvalues of " + std::to_string(cnt) + " windows (W = " + std::to_string(W) +
                                                      ", d = " + std::to_string(d) + ")",
                                                  "lower window_size, or raise host_memory_limit");
    std::vector<double> eig((size_t)(cnt * M));
    std::vector<int> info((size_t)cnt);
    const double alpha = 1.0 / (double)(W - 1), zero = 0.0;
    const std::string what = "windows of W = " + std::to_string(W) + " rows of d = " + std::to_string(d);
    for (int64_t w0 = 0; w0 < windows; w0 += cnt) {
        const int64_t c = std::min(cnt, windows - w0);
        Lease<double> x = res_.take<double>((size_t)(c * W * d), what + " (centred rows, float64)", kFixWindows);
        Lease<double> gram = res_.take<double>((size_t)(c * M * M), what + " (Grams)", kFixWindows);
        Lease<double> ev = res_.take<double>((size_t)(c * M), what + " (eigenvalues)", kFixWindows);
        Lease<int> dinfo = res_.take<int>((size_t)c, what + " (solver info)", kFixWindows);
        if (slots) {
            Lease<int64_t> dslots = res_.take<int64_t>((size_t)(c * W), what + " (slots)", kFixWindows);
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dslots.data(), slots + w0 * W, (size_t)(c * W) * 8, cudaMemcpyHostToDevice, s));
            launch_window_center(src, dslots.data(), c, W, d, x.data(), s);
        } else {
            launch_window_center(src + w0 * W * d, nullptr, c, W, d, x.data(), s);
        }
        // Covariance eigenvalues: those of Xc^T Xc / (W - 1) (W <= d) or Xc Xc^T / (W - 1); each
        // window's Xc is d x W column-major (its rows are the columns).
        if (W <= d)
            COLLAPSE_CUBLAS_TRY(cublasDgemmStridedBatched(res_.blas(s), CUBLAS_OP_T, CUBLAS_OP_N, (int)W, (int)W, (int)d, &alpha, x.data(), (int)d,
                                                          (long long)(W * d), x.data(), (int)d, (long long)(W * d), &zero, gram.data(), (int)W,
                                                          (long long)(W * W), (int)c));
        else
            COLLAPSE_CUBLAS_TRY(cublasDgemmStridedBatched(res_.blas(s), CUBLAS_OP_N, CUBLAS_OP_T, (int)d, (int)d, (int)W, &alpha, x.data(), (int)d,
                                                          (long long)(W * d), x.data(), (int)d, (long long)(W * d), &zero, gram.data(), (int)d,
                                                          (long long)(d * d), (int)c));
        eigenvalues_batched(res_, gram.data(), M, c, ev.data(), dinfo.data(), s);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(eig.data(), ev.data(), (size_t)(c * M) * 8, cudaMemcpyDeviceToHost, s));
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(info.data(), dinfo.data(), (size_t)c * sizeof(int), cudaMemcpyDeviceToHost, s));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
        for (int64_t i = 0; i < c; ++i) {
            if (info[(size_t)i] != 0)
                fail(COLLAPSE_ERR_INTERNAL, "the eigen-solver failed for window ", w0 + i, " of ", windows, " (info = ", info[(size_t)i],
                     ", W = ", W, ", d = ", d, ")");
            out[(size_t)(w0 + i)] = window_entropy_from_eigen(eig.data() + i * M, M);
        }
    }
    return out;
}

// No host sync: the windows' rows are copied out of the store on the stashes' stream (their slots
// may be reused by the next batch), the solving waits for a full queue or window_results.
void CudaBackend::window_reduce(const int64_t* slots, int64_t windows, int64_t W) {
    if (windows == 0) return;
    DeviceGuard guard(cfg_.device_ordinal);
    if (win_W_ != W) {
        window_flush();
        win_queue_cap_ = 0;  // sized for this W below
        win_W_ = W;
    }
    const int64_t d = d_;
    if (win_queue_cap_ == 0) {
        // Up to 16 MiB of rows (at least one window).
        const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(65535, (int64_t(16) << 20) / mul_bytes(W, d, 4)));
        const std::string what = "the queue of windows to reduce (" + std::to_string(cap) + " windows of W = " + std::to_string(W) +
                                 " rows of d = " + std::to_string(d) + ")";
        win_queue_host_.allocate((size_t)(cap * W), &budget_, &host_, what + ", their slots", kFixBatchRows);
        win_queue_slots_.allocate((size_t)(cap * W), &budget_, what + ", their slots", kFixWindows);
        win_queue_.allocate((size_t)mul_bytes(cap * W, d, 1), &budget_, what, kFixWindows);
        win_queue_cap_ = cap;
    }
    cudaStream_t s = last_stream_;
    for (int64_t w0 = 0; w0 < windows;) {
        if (win_queued_ == win_queue_cap_) window_flush();
        const int64_t c = std::min(windows - w0, win_queue_cap_ - win_queued_);
        int64_t* h = win_queue_host_.data() + win_queued_ * W;
        int64_t* dev = win_queue_slots_.data() + win_queued_ * W;
        std::copy(slots + w0 * W, slots + (w0 + c) * W, h);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dev, h, (size_t)(c * W) * 8, cudaMemcpyHostToDevice, s));
        launch_window_gather(win_store_.data(), dev, c * W, d, win_queue_.data() + win_queued_ * W * d, s);
        // A flush (session's stream) and the next batch's stash (any stream) come after the copies.
        COLLAPSE_CUDA_TRY(cudaEventRecord(last_done_, s));
        win_queued_ += c;
        w0 += c;
    }
}

void CudaBackend::window_flush() {
    if (win_queued_ == 0) return;
    const std::vector<double> e = window_entropies(win_queue_.data(), nullptr, win_queued_, win_W_);
    win_queued_ = 0;
    if (!win_out_lease_.bytes()) win_out_lease_ = host_.lease();
    win_out_lease_.resize(mul_bytes((int64_t)(win_out_.size() + e.size()), 8), "the entropies of reduced windows",
                          "lower batch_rows (--batch-rows), or raise host_memory_limit");
    win_out_.insert(win_out_.end(), e.begin(), e.end());
}

std::vector<double> CudaBackend::window_results() {
    window_flush();
    std::vector<double> out;
    out.swap(win_out_);
    win_out_lease_.reset();
    return out;
}

std::vector<double> CudaBackend::window_evaluate(const int64_t* slots, int64_t windows, int64_t W) {
    return window_entropies(win_store_.data(), slots, windows, W);
}

}  // namespace collapse::internal::cuda
