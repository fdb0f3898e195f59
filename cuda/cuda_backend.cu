// The CUDA backend: the same Backend interface as src/cpu/, computed on the GPU. This file: the
// session's accumulators, sized at construction, and the factory. The other parts are listed in
// cuda_backend.cuh.
//
// Ingest (per batch, asynchronous on the caller's stream, no device-wide sync, no allocation after
// the first batch unless a batch is larger than all before it; a host batch is copied into a pinned
// slot on host threads and uploaded on a copy stream, overlapping the previous batch's kernels):
//   validate (warp per row) -> CUB radix sort of (label, row) on ceil(log2(V+1)) bits -> run starts
//   (max-scan) -> row buffer / reservoirs / hold rows -> class sums (fp64 registers, one atomicAdd per
//   class piece and column) -> Gram (gather + cublasSsyrk, fp32 into an fp64 accumulator) -> counts.
// Exact mode: rows stay in the device row buffer (float16/bfloat16 rows as they came, 2 bytes an
// element; others as float32) while it has room within device_memory_limit, and finalisation
// computes the per-token SVD there (token_svd_device.cu). Only when the buffer is full do its rows
// move to the host store (RowStore: host memory, spilled to disk beyond host_memory_limit): that is
// the spill path, and finalisation then uploads the rows back a group of whole classes at a time.
// A move waits for the batches before it (a sync); an asynchronous move is future work.
// A batch refused on the device (label out of range, non-finite value) is a no-op: every mutating
// kernel reads the batch's status first. The error reaches the caller at the next call or sync().
//
// Finalisation: means and centring by kernels; pair metrics by tiles of cublasDgemm followed by a
// fused reduction kernel (never a K x K buffer); UNC3/NC3 warp-per-class; NC4 by GEMM chunks and an
// arg-max kernel (from the device row buffer when it holds every row, else in the second pass); SVD
// entropies from Gram eigenvalues (cusolverDnXsyevd for the overall Gram, syevjBatched /
// XsyevBatched for per-class Grams grouped by size; in exact mode those
// Grams come from the device row buffer by batched DGEMMs, token_svd_device.cu). Its temporaries are
// pool leases (resources.cuh): no cudaMalloc/cudaFree after the first compute of a shape.
#include <algorithm>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/backend.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.hpp"
#include "device_memory.hpp"

namespace collapse::internal {

namespace cuda {
namespace {

// Free memory of the device, for the default budget (a server's model is already there).
int64_t device_free_bytes(int device) {
    int current = 0;
    COLLAPSE_CUDA_TRY(cudaGetDevice(&current));
    size_t free_b = 0, total_b = 0;
    COLLAPSE_CUDA_TRY(cudaSetDevice(device));
    const cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
    COLLAPSE_CUDA_TRY(cudaSetDevice(current));
    COLLAPSE_CUDA_TRY(e);
    return (int64_t)free_b;
}

}  // namespace

CudaBackend::CudaBackend(const Config& cfg, int64_t V, int64_t d, std::shared_ptr<HostBudget> host)
    : cfg_(cfg),
      V_(V),
      d_(d),
      res_(cfg.device_ordinal, cfg.device_memory_limit > 0 ? cfg.device_memory_limit
                                                         : device_free_bytes(cfg.device_ordinal) / 10 * 9 / std::max(1, cfg.device_shared_by),
           cfg.allow_tf32, host ? std::move(host) : HostBudget::from_config(cfg)),
      budget_(res_.budget()),
      host_(res_.host()),
      stream_(res_.stream()) {
    try {
        DeviceGuard guard(cfg.device_ordinal);  // gone before release(): the caller's device is current there
        init();
    } catch (...) {
        release();
        throw;
    }
}

void CudaBackend::init() {
    const Config& cfg = cfg_;
    COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&last_done_, cudaEventDisableTiming));
    for (auto& slot : slots_) COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&slot.event, cudaEventDisableTiming));
    for (auto& st : staging_) {
        COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming));
        COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&st.consumed, cudaEventDisableTiming));
    }
    // Non-blocking: uploads order with the batches by events only, not through the legacy stream.
    COLLAPSE_CUDA_TRY(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    for (auto& w : win_stash_) COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&w.done, cudaEventDisableTiming));

    // Everything that lives as long as the session is sized here, before the first batch.
    const std::string hint = "raise device_memory_limit, or use svd_mode: sampled / off";
    count_.allocate((size_t)V_, &budget_, "class counts", hint);
    sum_.allocate((size_t)(V_ * d_), &budget_, "per-class sums [V, d] (float64)", hint);
    sqdev_.allocate((size_t)V_, &budget_, "per-class sums of squares", hint);
    excluded_.allocate((size_t)V_, &budget_, "excluded-label table", hint);
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(count_.data(), 0, count_.bytes(), stream_));
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(sum_.data(), 0, sum_.bytes(), stream_));
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(sqdev_.data(), 0, sqdev_.bytes(), stream_));
    if (cfg.compute_class_metrics) {
        shift_.allocate((size_t)(V_ * d_), &budget_, "the classes' reference rows [V, d] (float32)", hint);
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(shift_.data(), 0, shift_.bytes(), stream_));
    }
    {
        const HostBudget::Lease lease =
            host_.reserve(V_, "the excluded-label table of V = " + std::to_string(V_) + " classes (on its way to the device)", kFixNumClasses);
        std::vector<uint8_t> ex((size_t)V_, 0);
        for (int64_t e : cfg.exclude_token_ids)
            if (e >= 0 && e < V_) ex[(size_t)e] = 1;
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(excluded_.data(), ex.data(), ex.size(), cudaMemcpyHostToDevice, stream_));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));  // before `ex` goes
    }

    gram_streaming_ = cfg.compute_overall_metrics && cfg.max_tokens_to_analyze == 0;
    if (gram_streaming_) {
        gram_.allocate((size_t)(d_ * d_), &budget_, "the overall Gram d x d (float64)", hint);
        gram32_.allocate((size_t)(d_ * d_), &budget_, "the batch Gram d x d (float32)", hint);
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram_.data(), 0, gram_.bytes(), stream_));
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram32_.data(), 0, gram32_.bytes(), stream_));
        within_streaming_ = cfg.compute_class_metrics;
        if (within_streaming_) {
            within_.allocate((size_t)(d_ * d_), &budget_, "Sigma_W's scatter d x d (float64)", hint);
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(within_.data(), 0, within_.bytes(), stream_));
        }
        hold_rows_ = cfg.min_samples_per_token - 1;
        if (hold_rows_ > 0)
            hold_.allocate((size_t)(V_ * hold_rows_ * d_), &budget_,
                           "the first min_samples_per_token - 1 rows of every class (Gram correction)", "lower min_samples_per_token or raise device_memory_limit");
    }
    const bool keep_rows = cfg.svd_mode != COLLAPSE_SVD_OFF && cfg.compute_token_metrics;
    exact_store_ = keep_rows && cfg.svd_mode == COLLAPSE_SVD_EXACT;
    sampled_ = keep_rows && cfg.svd_mode == COLLAPSE_SVD_SAMPLED;
    status_.allocate(kStatusSlots, &budget_, "batch status");
    status_host_.allocate(kStatusSlots, &budget_, &host_, "the batch status slots");
    if (sampled_) {
        const size_t slots = (size_t)(V_ * cfg.svd_max_rows_per_token);
        reservoir_.allocate(slots * (size_t)d_, &budget_, "reservoirs [V, svd_max_rows_per_token, d]",
                            "lower svd_max_rows_per_token or raise device_memory_limit");
        winner_.allocate(slots, &budget_, "reservoir slot owners");
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(winner_.data(), 0xff, winner_.bytes(), stream_));  // -1
    }
    if (exact_store_) {
        ensure_download_buffers(hint);  // first: a move to the host must never lack device memory
        // The row buffer takes half of what is left; the rest is for batches and finalisation. Its
        // bytes hold that many 2-byte rows (float16/bfloat16 input), or half as many float32 rows.
        const int64_t left = budget_.limit() - budget_.used();
        const int64_t rows16 = std::min<int64_t>(INT32_MAX, std::max<int64_t>(0, left / 2 / (d_ * 2 + 4)));
        store_.allocate((size_t)(rows16 * d_ * 2), &budget_, "the exact row store", hint);
        store_labels_.allocate((size_t)rows16, &budget_, "row store labels", hint);
        store_capacity_ = (unsigned long long)(store_.size() / (size_t)(d_ * 4));  // float32 until the first batch says
        store_count_.allocate(1, &budget_, "row store count", hint);
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(store_count_.data(), 0, 8, stream_));
        // When the buffer is full its rows move to host memory, which keeps half of what
        // host_memory_limit leaves (after the store's own index, which it counts itself) and spills
        // the rest under intermediate_save_dir, as the CPU backend's store does.
        const int64_t spill_budget = std::max<int64_t>(0, (host_.available() - RowStore::index_bytes(V_)) / 2);
        host_store_ = std::make_unique<RowStore>(V_, d_, spill_budget, cfg.intermediate_save_dir, RowStore::WriteFn{}, &host_);
        store_held_ = host_.lease();
    }
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
    last_stream_ = stream_;
}

CudaBackend::~CudaBackend() { release(); }

// Waits for the streams and frees the events; also used when the constructor fails half-way. The
// stream and the handles go with res_, after every buffer. Makes the session's device current for
// good: restore_device_ puts the caller's back after every member is freed.
void CudaBackend::release() noexcept {
    int caller = 0;
    (void)cudaGetDevice(&caller);
    restore_device_.device = caller;
    (void)cudaSetDevice(cfg_.device_ordinal);
    if (last_stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamSynchronize(last_stream_));
    if (stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamSynchronize(stream_));
    if (copy_stream_) {
        COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamSynchronize(copy_stream_));
        COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamDestroy(copy_stream_));
    }
    for (auto& slot : slots_)
        if (slot.event) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(slot.event));
    for (auto& st : staging_) {
        if (st.copied) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(st.copied));
        if (st.consumed) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(st.consumed));
    }
    for (auto& w : win_stash_)
        if (w.done) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(w.done));
    if (last_done_) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(last_done_));
}

// The V-long result is the caller's to count (the session's kept-class selection does); copied
// straight into it (a count is far below 2^63, so the bits are the same), with no temporary.
std::vector<int64_t> CudaBackend::class_counts() {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are copied bit for bit");
    std::vector<int64_t> c((size_t)V_);
    COLLAPSE_CUDA_TRY(cudaMemcpy(c.data(), count_.data(), count_.bytes(), cudaMemcpyDeviceToHost));
    return c;
}

int64_t CudaBackend::load_budget() const { return std::max<int64_t>(d_ * 8, host_.available() / 6); }

void CudaBackend::set_store_dtype(collapse_dtype input) {
    const collapse_dtype want = row_buffer_dtype(input);
    if (store_dtype_set_ && (store_dtype_ == COLLAPSE_F32 || store_dtype_ == want)) return;  // float32 holds every input
    if (store_dtype_set_) {
        move_store_to_host();  // 2-byte rows of one kind meet another: the buffer becomes float32
        store_dtype_ = COLLAPSE_F32;
    } else {
        store_dtype_ = want;
    }
    store_dtype_set_ = true;
    store_capacity_ = (unsigned long long)std::min<size_t>(store_labels_.size(), store_.size() / (size_t)(d_ * row_buffer_elem_bytes(store_dtype_)));
}

DeviceRows CudaBackend::device_rows() {
    unsigned long long n = 0;
    COLLAPSE_CUDA_TRY(cudaMemcpy(&n, store_count_.data(), 8, cudaMemcpyDeviceToHost));
    return DeviceRows{store_.data(), store_dtype_, store_labels_.data(), (int64_t)n, d_};
}

}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget) {
    if (!cuda_backend_available())
        fail(COLLAPSE_ERR_NO_CUDA, "backend cuda requested, but no CUDA device is usable on this machine");
    return std::make_unique<cuda::CudaBackend>(cfg, num_classes, dim, std::move(budget));
}

bool cuda_backend_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return n > 0;
}

}  // namespace collapse::internal
