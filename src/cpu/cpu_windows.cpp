// Generation-time windows on the CPU: pending rows as float32 slots, each window's entropy from the
// eigenvalues of its centred W x W Gram or d x d covariance (the smaller), in float64 with LAPACK.
// window_reduce copies a ready group of windows out of the store and hands it to one background
// thread: an inference loop's ingest then does not wait for the eigenvalues (about 0.2 ms per
// 64 x 64 window, 2-3% of a small model's decode step). window_results waits for them, in order.
#include <cblas.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/windows.hpp"
#include "cpu/cpu_backend.hpp"

namespace collapse::internal {

namespace {

// Slots per chunk: the store grows by chunks without moving rows; a chunk is at most 256 rows and
// about 256 KiB, so that a small limit is not spent on slots a few sequences never use.
int64_t chunk_rows(int64_t d) { return std::max<int64_t>(1, std::min<int64_t>(256, (int64_t(256) << 10) / (4 * std::max<int64_t>(d, 1)))); }

// A window's scratch: the centred rows (W x d) and their mean, the Gram or covariance (M x M), its
// eigenvalues and dsyevd's workspace (2M + 1 doubles).
int64_t window_scratch_bytes(int64_t W, int64_t d) {
    const int64_t M = std::min(W, d);
    return add_bytes(mul_bytes(W + 1, d, 8), add_bytes(mul_bytes(M, M, 8), mul_bytes(3 * M + 2, 8)));
}

struct WindowScratch {
    WindowScratch(int64_t W, int64_t d)
        : x((size_t)(W * d)), g((size_t)(std::min(W, d) * std::min(W, d))), eig((size_t)std::min(W, d)), mean((size_t)d) {}
    std::vector<double> x, g, eig, mean;
};

// The entropy of one window: row(i) gives its i-th row of d floats.
template <class RowOf>
double window_entropy(RowOf row, int64_t W, int64_t d, WindowScratch& s) {
    const int64_t M = std::min(W, d);
    std::fill(s.mean.begin(), s.mean.end(), 0.0);
    for (int64_t i = 0; i < W; ++i) {
        const float* r = row(i);
        for (int64_t k = 0; k < d; ++k) s.mean[(size_t)k] += (double)r[k];
    }
    for (double& m : s.mean) m /= (double)W;
    for (int64_t i = 0; i < W; ++i) {
        const float* r = row(i);
        for (int64_t k = 0; k < d; ++k) s.x[(size_t)(i * d + k)] = (double)r[k] - s.mean[(size_t)k];
    }
    // Covariance eigenvalues: those of Xc Xc^T / (W - 1) (W <= d) or Xc^T Xc / (W - 1).
    const double scale = 1.0 / (double)(W - 1);
    if (W <= d)
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)W, (int)d, scale, s.x.data(), (int)d, 0.0, s.g.data(), (int)W);
    else
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)W, scale, s.x.data(), (int)d, 0.0, s.g.data(), (int)d);
    symmetric_eigenvalues(s.g.data(), M, s.eig.data(), "a window's covariance");
    return window_entropy_from_eigen(s.eig.data(), M);
}

// Bytes of windows waiting for the worker before window_reduce waits for it instead.
constexpr int64_t kWindowQueueBytes = int64_t(64) << 20;

}  // namespace

// One background thread that reduces groups of windows in the order they were handed over. Every
// budget lease is taken and given back on the session's thread (HostBudget is not thread-safe):
// a finished job keeps its lease until collect().
class WindowWorker {
public:
    struct Job {
        std::vector<float> rows;  // windows x W x d
        int64_t windows = 0;
        HostBudget::Lease lease;
        std::vector<double> entropies;
        bool done = false;
    };

    WindowWorker(int64_t W, int64_t d, HostBudget::Lease scratch_lease)
        : W_(W), d_(d), scratch_lease_(std::move(scratch_lease)), thread_([this] { run(); }) {}
    ~WindowWorker() {
        {
            std::lock_guard<std::mutex> g(m_);
            stop_ = true;
        }
        cv_.notify_all();
        thread_.join();
    }
    int64_t W() const { return W_; }
    int64_t queued_bytes() const { return queued_bytes_; }

    void submit(std::unique_ptr<Job> j) {
        queued_bytes_ += j->lease.bytes();
        {
            std::lock_guard<std::mutex> g(m_);
            jobs_.push_back(std::move(j));
        }
        cv_.notify_all();
    }
    // Appends the entropies of the finished jobs at the front, in order, and gives their memory
    // back; with wait, waits for all of them first. A failure on the worker is thrown here.
    void collect(std::vector<double>& out, bool wait) {
        std::unique_lock<std::mutex> g(m_);
        if (wait) done_cv_.wait(g, [this] { return error_ || jobs_.empty() || jobs_.back()->done; });
        if (error_) std::rethrow_exception(error_);
        while (!jobs_.empty() && jobs_.front()->done) {
            std::unique_ptr<Job> j = std::move(jobs_.front());
            jobs_.pop_front();
            out.insert(out.end(), j->entropies.begin(), j->entropies.end());
            queued_bytes_ -= j->lease.bytes();
            --next_;
        }
    }

private:
    void run() {
        WindowScratch scratch(W_, d_);
        std::unique_lock<std::mutex> g(m_);
        for (;;) {
            cv_.wait(g, [this] { return stop_ || next_ < jobs_.size(); });
            if (stop_) return;
            Job* j = jobs_[next_].get();  // jobs_ only loses finished jobs at its front
            g.unlock();
            std::exception_ptr failure;
            try {
                j->entropies.resize((size_t)j->windows);
                for (int64_t w = 0; w < j->windows; ++w) {
                    const float* base = j->rows.data() + w * W_ * d_;
                    j->entropies[(size_t)w] = window_entropy([&](int64_t i) { return base + i * d_; }, W_, d_, scratch);
                }
            } catch (...) {
                failure = std::current_exception();
            }
            g.lock();
            j->done = true;
            if (failure) error_ = failure;
            ++next_;  // an index into jobs_: collect() lowers it for each job it takes off the front
            done_cv_.notify_all();
        }
    }

    const int64_t W_, d_;
    HostBudget::Lease scratch_lease_;
    int64_t queued_bytes_ = 0;  // session thread only
    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    std::deque<std::unique_ptr<Job>> jobs_;  // submitted, oldest first; finished ones until collect()
    size_t next_ = 0;                        // index in jobs_ of the next job to run
    bool stop_ = false;
    std::exception_ptr error_;
    std::thread thread_;  // last: starts when everything above exists
};

void WindowWorkerStop::operator()(WindowWorker* w) const { delete w; }

float* CpuBackend::window_row(int64_t slot) const {
    const int64_t c = chunk_rows(d_);
    return const_cast<float*>(window_chunks_[(size_t)(slot / c)].data()) + (slot % c) * d_;
}

int64_t CpuBackend::window_store_bytes(int64_t capacity) const {
    const int64_t c = chunk_rows(d_);
    return mul_bytes((capacity + c - 1) / c, mul_bytes(c, d_, 4));
}

void CpuBackend::window_grow(int64_t capacity) {
    const int64_t c = chunk_rows(d_);
    const int64_t chunks = (capacity + c - 1) / c;
    if (chunks <= (int64_t)window_chunks_.size()) return;
    window_lease_.resize(window_store_bytes(capacity),
                         "the rows of open windows (" + std::to_string(capacity) + " slots of d = " + std::to_string(d_) + " floats)",
                         "lower window_size or batch_rows (--batch-rows), or raise host_memory_limit");
    while ((int64_t)window_chunks_.size() < chunks) window_chunks_.emplace_back((size_t)(c * d_));
}

bool CpuBackend::last_batch_kept(std::vector<uint8_t>& kept) {
    kept.assign((size_t)last_n_, 0);
    for (int64_t fr : last_rows_) {
        const int64_t r = last_sequences_ ? (fr / last_seq_len_) * (last_seq_len_ - 1) + fr % last_seq_len_ : fr;
        kept[(size_t)r] = 1;
    }
    return true;
}

void CpuBackend::window_stash(const BatchDesc& b, const int64_t* slot, int64_t capacity, void*) {
    window_grow(capacity);
    const int64_t n = b.num_rows();
    for (int64_t r = 0; r < n; ++r) {
        if (slot[r] < 0) continue;
        float* dst = window_row(slot[r]);
        const void* src = b.features.row(b.feature_row(r));
        if (b.features.dtype == COLLAPSE_F32) {
            std::memcpy(dst, src, (size_t)d_ * sizeof(float));
        } else {
            for (int64_t k = 0; k < d_; ++k) dst[k] = (float)load_as_double(src, b.features.dtype, k);
        }
    }
}

void CpuBackend::window_put(const int64_t* slots, int64_t n, const float* rows, int64_t capacity) {
    window_grow(capacity);
    for (int64_t i = 0; i < n; ++i) std::memcpy(window_row(slots[i]), rows + i * d_, (size_t)d_ * sizeof(float));
}

void CpuBackend::window_get(const int64_t* slots, int64_t n, float* rows) {
    for (int64_t i = 0; i < n; ++i) std::memcpy(rows + i * d_, window_row(slots[i]), (size_t)d_ * sizeof(float));
}

std::vector<double> CpuBackend::window_evaluate(const int64_t* slots, int64_t windows, int64_t W) {
    std::vector<double> out((size_t)windows);
    if (windows == 0) return out;
    // One window after another: small Grams and dsyevd calls on OpenMP threads fight OpenBLAS's
    // own threads (stories260k's 2891 windows: 1.3 s on one thread, 7.9 s on two).
    const HostBudget::Lease lease = budget_->reserve(window_scratch_bytes(W, d_),
                                                     "one window's covariance (W = " + std::to_string(W) + ", d = " + std::to_string(d_) + ")",
                                                     "lower window_size, or raise host_memory_limit");
    WindowScratch scratch(W, d_);
    for (int64_t w = 0; w < windows; ++w) {
        const int64_t* s = slots + w * W;
        out[(size_t)w] = window_entropy([&](int64_t i) { return window_row(s[i]); }, W, d_, scratch);
    }
    return out;
}

void CpuBackend::window_reduce(const int64_t* slots, int64_t windows, int64_t W) {
    if (windows == 0) return;
    if (window_worker_ && window_worker_->W() != W) {  // a merge brought another window size
        window_worker_->collect(window_out_, true);
        window_worker_.reset();
    }
    if (!window_worker_) {
        const int64_t scratch = window_scratch_bytes(W, d_);
        if (budget_->fits(scratch))
            window_worker_.reset(new WindowWorker(
                W, d_, budget_->reserve(scratch, "the window worker's covariance scratch (W = " + std::to_string(W) + ")")));
    }
    const int64_t bytes = mul_bytes(windows * W, d_, 4);
    if (window_worker_) {
        window_worker_->collect(window_out_, window_worker_->queued_bytes() + bytes > kWindowQueueBytes);
        if (budget_->fits(bytes)) {
            auto job = std::make_unique<WindowWorker::Job>();
            job->lease = budget_->reserve(bytes, "windows waiting for the window worker");
            job->windows = windows;
            job->rows.resize((size_t)(windows * W * d_));
            for (int64_t i = 0; i < windows * W; ++i)
                std::memcpy(job->rows.data() + i * d_, window_row(slots[i]), (size_t)d_ * sizeof(float));
            window_worker_->submit(std::move(job));
            return;
        }
        window_worker_->collect(window_out_, true);  // keep the order: the worker's first
    }
    // No room for a copy: reduce them here, now.
    const std::vector<double> e = window_evaluate(slots, windows, W);
    window_out_.insert(window_out_.end(), e.begin(), e.end());
}

std::vector<double> CpuBackend::window_results() {
    if (window_worker_) window_worker_->collect(window_out_, true);
    std::vector<double> out;
    out.swap(window_out_);
    return out;
}

}  // namespace collapse::internal
