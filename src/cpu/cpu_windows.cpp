// Generation-time windows on the CPU: pending rows as float32 slots, each window's entropy from the
// eigenvalues of its centred W x W Gram or d x d covariance (the smaller), in float64 with LAPACK.
#include <cblas.h>

#include <algorithm>
#include <cstring>

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

}  // namespace

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
    const int64_t M = std::min(W, d_);
    {
        std::vector<double> x((size_t)(W * d_)), g((size_t)(M * M)), eig((size_t)M), mean((size_t)d_);
        for (int64_t w = 0; w < windows; ++w) {
            const int64_t* s = slots + w * W;
            std::fill(mean.begin(), mean.end(), 0.0);
            for (int64_t i = 0; i < W; ++i) {
                const float* row = window_row(s[i]);
                for (int64_t k = 0; k < d_; ++k) mean[(size_t)k] += (double)row[k];
            }
            for (double& m : mean) m /= (double)W;
            for (int64_t i = 0; i < W; ++i) {
                const float* row = window_row(s[i]);
                for (int64_t k = 0; k < d_; ++k) x[(size_t)(i * d_ + k)] = (double)row[k] - mean[(size_t)k];
            }
            // Covariance eigenvalues: those of Xc Xc^T / (W - 1) (W <= d) or Xc^T Xc / (W - 1).
            const double scale = 1.0 / (double)(W - 1);
            if (W <= d_)
                cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)W, (int)d_, scale, x.data(), (int)d_, 0.0, g.data(), (int)W);
            else
                cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)W, scale, x.data(), (int)d_, 0.0, g.data(), (int)d_);
            symmetric_eigenvalues(g.data(), M, eig.data(), "a window's covariance");
            out[(size_t)w] = window_entropy_from_eigen(eig.data(), M);
        }
    }
    return out;
}

void CpuBackend::window_reduce(const int64_t* slots, int64_t windows, int64_t W) {
    const std::vector<double> e = window_evaluate(slots, windows, W);
    window_out_.insert(window_out_.end(), e.begin(), e.end());
}

std::vector<double> CpuBackend::window_results() {
    std::vector<double> out;
    out.swap(window_out_);
    return out;
}

}  // namespace collapse::internal
