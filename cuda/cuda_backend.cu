// The CUDA backend: the same Backend interface as src/cpu/, computed on the GPU.
//
// Ingest (per batch, asynchronous on the caller's stream, no device-wide sync, no allocation after
// the first batch unless a batch is larger than all before it):
//   validate (warp per row) -> CUB radix sort of (label, row) on ceil(log2(V+1)) bits -> run starts
//   (max-scan) -> row buffer / reservoirs / hold rows -> class sums (fp64 registers, one atomicAdd per
//   class piece and column) -> Gram (gather + cublasSsyrk, fp32 into an fp64 accumulator) -> counts.
// Exact mode: every max_buffer_size rows the row buffer moves to the host store (RowStore: host
// memory, spilled to disk beyond host_memory_limit); finalisation uploads it back a group of whole
// classes at a time. A move waits for the batches before it (a sync): with max_buffer_size below
// the batch size that is every batch, and ingest no longer overlaps the next batch's copy with the
// previous batch's work. Rows must cross PCIe anyway; an asynchronous move is future work.
// A batch refused on the device (label out of range, non-finite value) is a no-op: every mutating
// kernel reads the batch's status first. The error reaches the caller at the next call or sync().
//
// Finalisation: means and centring by kernels; pair metrics by tiles of cublasDgemm followed by a
// fused reduction kernel (never a K x K buffer); UNC3/NC3 warp-per-class; NC4 by GEMM chunks and an
// arg-max kernel; SVD entropies from Gram eigenvalues (cusolverDnXsyevd for the overall Gram,
// syevjBatched / XsyevBatched / Xsyevd for per-class Grams grouped by size).
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "core/backend.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/metric_summary.hpp"
#include "cuda_check.hpp"
#include "device_memory.hpp"
#include "cuda_backend.cuh"
#include "kernels.cuh"

namespace collapse::internal {

namespace cuda {
namespace {

struct MaxOp {
    __host__ __device__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};

int bits_for(int64_t v) {
    int b = 1;
    while (b < 31 && (int64_t(1) << b) <= v) ++b;
    return b;
}

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


CudaBackend::CudaBackend(const Config& cfg, int64_t V, int64_t d)
    : cfg_(cfg),
      V_(V),
      d_(d),
      budget_(cfg.device_memory_limit > 0 ? cfg.device_memory_limit : device_free_bytes(cfg.device_ordinal) / 10 * 9) {
    DeviceGuard guard(cfg.device_ordinal);
    try {
        init();
    } catch (...) {
        release();
        throw;
    }
}

void CudaBackend::init() {
    const Config& cfg = cfg_;
    // A blocking stream: it orders with the legacy default stream, which callers passing NULL and
    // plain cudaMemcpy use.
    COLLAPSE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&last_done_, cudaEventDisableTiming));
    COLLAPSE_CUBLAS_TRY(cublasCreate(&cublas_));
    COLLAPSE_CUBLAS_TRY(cublasSetMathMode(cublas_, cfg.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    COLLAPSE_CUSOLVER_TRY(cusolverDnCreate(&cusolver_));
    COLLAPSE_CUSOLVER_TRY(cusolverDnCreateParams(&solver_params_));
    for (auto& slot : slots_) COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&slot.event, cudaEventDisableTiming));
    for (auto& st : staging_) COLLAPSE_CUDA_TRY(cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming));

    // Everything that lives as long as the session is sized here, before the first batch.
    const std::string hint = "raise device_memory_limit, or use svd_mode: sampled / off";
    count_.allocate((size_t)V_, &budget_, "class counts", hint);
    sum_.allocate((size_t)(V_ * d_), &budget_, "per-class sums [V, d] (float64)", hint);
    sqnorm_.allocate((size_t)V_, &budget_, "per-class squared norms", hint);
    excluded_.allocate((size_t)V_, &budget_, "excluded-label table", hint);
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(count_.data(), 0, count_.bytes(), stream_));
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(sum_.data(), 0, sum_.bytes(), stream_));
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(sqnorm_.data(), 0, sqnorm_.bytes(), stream_));
    std::vector<uint8_t> ex((size_t)V_, 0);
    for (int64_t e : cfg.exclude_token_ids)
        if (e >= 0 && e < V_) ex[(size_t)e] = 1;
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(excluded_.data(), ex.data(), ex.size(), cudaMemcpyHostToDevice, stream_));

    gram_streaming_ = cfg.compute_overall_metrics && cfg.max_tokens_to_analyze == 0;
    if (gram_streaming_) {
        gram_.allocate((size_t)(d_ * d_), &budget_, "the overall Gram d x d (float64)", hint);
        gram32_.allocate((size_t)(d_ * d_), &budget_, "the batch Gram d x d (float32)", hint);
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram_.data(), 0, gram_.bytes(), stream_));
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram32_.data(), 0, gram32_.bytes(), stream_));
        hold_rows_ = cfg.min_samples_per_token - 1;
        if (hold_rows_ > 0)
            hold_.allocate((size_t)(V_ * hold_rows_ * d_), &budget_,
                           "the first min_samples_per_token - 1 rows of every class (Gram correction)", "lower min_samples_per_token or raise device_memory_limit");
    }
    const bool keep_rows = cfg.svd_mode != COLLAPSE_SVD_OFF && cfg.compute_token_metrics;
    exact_store_ = keep_rows && cfg.svd_mode == COLLAPSE_SVD_EXACT;
    sampled_ = keep_rows && cfg.svd_mode == COLLAPSE_SVD_SAMPLED;
    status_.allocate(kStatusSlots, &budget_, "batch status");
    status_host_.allocate(kStatusSlots);
    if (sampled_) {
        const size_t slots = (size_t)(V_ * cfg.svd_max_rows_per_token);
        reservoir_.allocate(slots * (size_t)d_, &budget_, "reservoirs [V, svd_max_rows_per_token, d]",
                            "lower svd_max_rows_per_token or raise device_memory_limit");
        winner_.allocate(slots, &budget_, "reservoir slot owners");
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(winner_.data(), 0xff, winner_.bytes(), stream_));  // -1
    }
    if (exact_store_) {
        ensure_download_buffers(hint);  // first: a move to the host must never lack device memory
        // The row buffer takes half of what is left; the rest is for batches and finalisation.
        const int64_t left = budget_.limit() - budget_.used();
        store_capacity_ = (unsigned long long)std::min<int64_t>(INT32_MAX, std::max<int64_t>(0, left / 2 / (d_ * 4 + 4)));
        store_.allocate((size_t)store_capacity_ * (size_t)d_, &budget_, "the exact row store", hint);
        store_labels_.allocate((size_t)store_capacity_, &budget_, "row store labels", hint);
        store_count_.allocate(1, &budget_, "row store count", hint);
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(store_count_.data(), 0, 8, stream_));
        // Every max_buffer_size rows the buffer moves to host memory, which keeps half of
        // host_memory_limit and spills the rest under intermediate_save_dir.
        host_store_ = std::make_unique<RowStore>(V_, d_, cfg.host_memory_limit / 2, cfg.intermediate_save_dir);
    }
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
    last_stream_ = stream_;
}

CudaBackend::~CudaBackend() { release(); }

// Frees the handles; also used when the constructor fails half-way.
void CudaBackend::release() noexcept {
    int previous = 0;
    (void)cudaGetDevice(&previous);
    (void)cudaSetDevice(cfg_.device_ordinal);
    if (last_stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamSynchronize(last_stream_));
    if (stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamSynchronize(stream_));
    for (auto& slot : slots_)
        if (slot.event) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(slot.event));
    for (auto& st : staging_)
        if (st.copied) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(st.copied));
    if (last_done_) COLLAPSE_CUDA_TRY_NO_THROW(cudaEventDestroy(last_done_));
    if (solver_params_) cusolverDnDestroyParams(solver_params_);
    if (cusolver_) cusolverDnDestroy(cusolver_);
    if (cublas_) cublasDestroy(cublas_);
    if (stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamDestroy(stream_));
    stream_ = nullptr;
    (void)cudaSetDevice(previous);
}

cudaStream_t CudaBackend::pick_stream(void* s) {
    cudaStream_t st = s ? static_cast<cudaStream_t>(s) : stream_;
    // Scratch and accumulators are shared between batches: a batch on another stream waits for the
    // previous one.
    if (st != last_stream_) COLLAPSE_CUDA_TRY(cudaStreamWaitEvent(st, last_done_, 0));
    last_stream_ = st;
    COLLAPSE_CUBLAS_TRY(cublasSetStream(cublas_, st));
    COLLAPSE_CUSOLVER_TRY(cusolverDnSetStream(cusolver_, st));
    return st;
}

// Device view of a batch; host batches are copied through pinned double buffers so that the CPU copy
// of batch k+1 overlaps the GPU work of batch k.
DeviceBatch CudaBackend::device_view(const BatchDesc& b, cudaStream_t s) {
    DeviceBatch db;
    db.rows = b.num_rows();
    db.d = b.features.cols;
    db.sequences = b.sequences;
    db.seq_len = b.seq_len;
    if (b.features.memory == COLLAPSE_MEMORY_DEVICE) {
        const std::pair<const void*, const char*> bufs[] = {{b.features.data, "features"}, {b.labels.data, "labels"}, {b.valid.data, "mask"}};
        for (const auto& [ptr, what] : bufs) {
            if (!ptr) continue;
            cudaPointerAttributes attr{};
            COLLAPSE_CUDA_TRY(cudaPointerGetAttributes(&attr, ptr));
            if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": the buffer says device memory, but the pointer is not a device pointer");
            if (attr.type == cudaMemoryTypeDevice && attr.device != cfg_.device_ordinal)
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": the pointer is on device ", attr.device, ", the session on device ", cfg_.device_ordinal);
        }
        db.features = b.features.data, db.fdtype = b.features.dtype, db.fstride = b.features.stride;
        db.labels = b.labels.data, db.ldtype = b.labels.dtype, db.lstride = b.labels.stride;
        db.valid = b.valid.data, db.vdtype = b.valid.dtype, db.vstride = b.valid.stride;
        return db;
    }
    // Packed copies: features rows, labels, mask.
    const size_t fsz = dtype_size(b.features.dtype), frow = (size_t)b.features.cols * fsz;
    const size_t lsz = dtype_size(b.labels.dtype), lcols = (size_t)b.labels.cols;
    const size_t vsz = b.valid.data ? dtype_size(b.valid.dtype) : 0;
    const size_t fbytes = (size_t)b.features.rows * frow, lbytes = (size_t)b.labels.rows * lcols * lsz;
    const size_t vbytes = (size_t)b.valid.rows * lcols * vsz;
    auto align = [](size_t x) { return (x + 255) & ~size_t(255); };  // int64 labels need aligned loads
    const size_t loff = align(fbytes), voff = align(loff + lbytes), total = voff + vbytes;
    // Both slots are sized at the first host batch (and again only for a larger batch).
    for (Staging& slot : staging_)
        if (slot.host.size() < total || slot.dev.size() < total) {
            COLLAPSE_CUDA_TRY(cudaEventSynchronize(slot.copied));
            slot.dev.reset();
            slot.host.allocate(total);
            slot.dev.allocate(total, &budget_, "host-batch staging (two pinned slots)");
        }
    Staging& st = staging_[(size_t)staging_next_];
    staging_next_ ^= 1;
    COLLAPSE_CUDA_TRY(cudaEventSynchronize(st.copied));  // the pinned slot's previous copy is done
    uint8_t* h = st.host.data();
    for (int64_t r = 0; r < b.features.rows; ++r) std::memcpy(h + (size_t)r * frow, b.features.row(r), frow);
    for (int64_t r = 0; r < b.labels.rows; ++r) std::memcpy(h + loff + (size_t)r * lcols * lsz, b.labels.row(r), lcols * lsz);
    for (int64_t r = 0; r < b.valid.rows && vsz; ++r) std::memcpy(h + voff + (size_t)r * lcols * vsz, b.valid.row(r), lcols * vsz);
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(st.dev.data(), h, total, cudaMemcpyHostToDevice, s));
    COLLAPSE_CUDA_TRY(cudaEventRecord(st.copied, s));
    db.features = st.dev.data(), db.fdtype = b.features.dtype, db.fstride = b.features.cols;
    db.labels = st.dev.data() + loff, db.ldtype = b.labels.dtype, db.lstride = (int64_t)lcols;
    if (vsz) db.valid = st.dev.data() + voff, db.vdtype = b.valid.dtype, db.vstride = (int64_t)lcols;
    return db;
}

void CudaBackend::ensure_scratch(int64_t rows) {
    if (rows <= scratch_.rows) return;
    const int64_t n = std::max<int64_t>(rows, std::min<int64_t>(cfg_.batch_rows, INT32_MAX));
    Scratch& s = scratch_;
    s.rows = 0;  // not valid until every buffer is reallocated
    const std::string what = "per-batch scratch for " + std::to_string(n) + " rows";
    for (auto* b : {&s.keys, &s.vals, &s.keys_sorted, &s.vals_sorted, &s.heads, &s.run_start}) b->allocate((size_t)n, &budget_, what);
    size_t sort_bytes = 0, scan_bytes = 0;
    COLLAPSE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, s.keys.data(), s.keys_sorted.data(), s.vals.data(),
                                                      s.vals_sorted.data(), (int)n, 0, bits_for(V_)));
    COLLAPSE_CUDA_TRY(cub::DeviceScan::InclusiveScan(nullptr, scan_bytes, s.heads.data(), s.run_start.data(), MaxOp{}, (int)n));
    s.cub_temp.allocate(std::max(sort_bytes, scan_bytes), &budget_, what);
    if (gram_streaming_ || pass2_) s.gram_rows.allocate((size_t)(n * d_), &budget_, what + " (gathered rows)");
    s.rows = n;
}

// Both passes: a status slot, the device view, validation, grouping. Returns the status slot.
int CudaBackend::begin_batch(const BatchDesc& b, cudaStream_t s, bool check_store, DeviceBatch* db) {
    ensure_scratch(b.num_rows());
    const int k = status_next_;
    status_next_ = (status_next_ + 1) % kStatusSlots;
    if (slots_[(size_t)k].pending) process_slot(k, true);
    raise_pending();
    BatchStatus* st = status_.data() + k;
    *db = device_view(b, s);
    IngestParams ip;
    ip.V = V_;
    ip.excluded = excluded_.data();
    ip.nonfinite_skip = cfg_.nonfinite_policy == COLLAPSE_NONFINITE_SKIP_ROW ? 1 : 0;
    ip.sentinel = (int32_t)V_;
    launch_reset_status(st, s);
    group_batch(*db, ip, st, s);
    launch_finish_status(*db, st, check_store ? store_count_.data() : nullptr, store_capacity_, s);
    return k;
}

// Sort (label, row), run starts.
void CudaBackend::group_batch(const DeviceBatch& db, const IngestParams& ip, BatchStatus* st, cudaStream_t s) {
    Scratch& sc = scratch_;
    const int n = (int)db.rows;
    launch_validate(db, ip, sc.keys.data(), sc.vals.data(), st, s);
    size_t bytes = sc.cub_temp.size();
    COLLAPSE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(sc.cub_temp.data(), bytes, sc.keys.data(), sc.keys_sorted.data(),
                                                      sc.vals.data(), sc.vals_sorted.data(), n, 0, bits_for(V_), s));
    launch_run_heads(sc.keys_sorted.data(), n, sc.heads.data(), s);
    bytes = sc.cub_temp.size();
    COLLAPSE_CUDA_TRY(cub::DeviceScan::InclusiveScan(sc.cub_temp.data(), bytes, sc.heads.data(), sc.run_start.data(), MaxOp{}, n, s));
}

void CudaBackend::ingest(const BatchDesc& b, void* stream) {
    DeviceGuard guard(cfg_.device_ordinal);
    raise_pending();
    const int64_t n = b.num_rows();
    if (b.features.rows > INT32_MAX) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "a batch of ", b.features.rows, " feature rows is more than 2^31 - 1 (split it)");
    if (n == 0) return;
    if (exact_store_) {
        // The device buffer holds max_buffer_size rows (at least one batch) before they move on.
        const unsigned long long limit = std::min<unsigned long long>(store_capacity_, (unsigned long long)std::max<int64_t>(cfg_.max_buffer_size, 1));
        if (store_bound_ > 0 && store_bound_ + (unsigned long long)n > limit) move_store_to_host();
        store_bound_ += (unsigned long long)n;
    }
    cudaStream_t s = pick_stream(stream);
    DeviceBatch db;
    const int k = begin_batch(b, s, exact_store_, &db);
    BatchStatus* st = status_.data() + k;
    const int32_t sentinel = (int32_t)V_;
    Scratch& sc = scratch_;
    RowSinks sinks;
    if (exact_store_) sinks.store = store_.data(), sinks.store_labels = store_labels_.data(), sinks.store_count = store_count_.data();
    if (sampled_) sinks.reservoir = reservoir_.data(), sinks.winner = winner_.data(), sinks.cap = cfg_.svd_max_rows_per_token, sinks.seed = cfg_.seed;
    if (hold_rows_ > 0) sinks.hold = hold_.data(), sinks.hold_rows = hold_rows_;
    launch_place_rows(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sc.run_start.data(), sentinel, count_.data(), sinks, st, s);
    launch_class_sums(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sentinel,
                      ClassState{sum_.data(), sqnorm_.data(), count_.data()}, st, s);
    if (gram_streaming_) {
        // Every accepted row enters the Gram; rows of classes that never reach min_samples_per_token
        // are subtracted at the end from the hold area.
        launch_gather_rows(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sentinel, sc.gram_rows.data(), s);
        const float one = 1.0f, zero = 0.0f;
        COLLAPSE_CUBLAS_TRY(cublasSsyrk(cublas_, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d_, (int)n, &one, sc.gram_rows.data(),
                                        (int)d_, &zero, gram32_.data(), (int)d_));
        launch_add_gram(gram32_.data(), gram_.data(), d_ * d_, st, s);
    }
    launch_count_update(sc.keys_sorted.data(), sc.run_start.data(), n, sentinel, count_.data(),
                        exact_store_ ? store_count_.data() : nullptr, exact_store_, st, s);

    end_batch(k, b, s, true);
}

// Status back to the host asynchronously; the slot is read at a later call (process_slot).
void CudaBackend::end_batch(int k, const BatchDesc& b, cudaStream_t s, bool first_pass) {
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(status_host_.data() + k, status_.data() + k, sizeof(BatchStatus), cudaMemcpyDeviceToHost, s));
    Slot& slot = slots_[(size_t)k];
    COLLAPSE_CUDA_TRY(cudaEventRecord(slot.event, s));
    COLLAPSE_CUDA_TRY(cudaEventRecord(last_done_, s));
    slot.pending = true;
    slot.first_pass = first_pass;
    slot.rows = b.num_rows();
    slot.offset = b.row_offset;
    slot.sequences = b.sequences;
    slot.seq_len = b.seq_len;
}

void CudaBackend::process_slot(int k, bool wait) {
    if (!slots_[(size_t)k].pending) return;
    if (wait) {
        COLLAPSE_CUDA_TRY(cudaEventSynchronize(slots_[(size_t)k].event));
    } else {
        const cudaError_t e = cudaEventQuery(slots_[(size_t)k].event);
        if (e == cudaErrorNotReady) return;
        COLLAPSE_CUDA_TRY(e);
    }
    slots_[(size_t)k].pending = false;
    const BatchStatus& st = status_host_[(size_t)k];
    const int64_t off = slots_[(size_t)k].offset;
    auto where = [&](unsigned long long r) {
        const std::string of = off ? " of the input" : " of the batch";
        if (!slots_[(size_t)k].sequences) return "row " + std::to_string(off + (int64_t)r) + of;
        const int64_t per = slots_[(size_t)k].seq_len - 1;  // batch rows per sequence after the shift
        return "sequence " + std::to_string(off + (int64_t)r / per) + of + ", position " + std::to_string((int64_t)r % per);
    };
    if (st.error) {
        if (st.bad_label_row != ~0ull)
            errors_.emplace_back(COLLAPSE_ERR_BAD_INPUT, "label " + std::to_string(st.bad_label_value) + " at " + where(st.bad_label_row) +
                                                             " is outside [0, " + std::to_string(V_) + ") (that batch was not ingested)");
        else if (st.nonfinite_row != ~0ull)
            errors_.emplace_back(COLLAPSE_ERR_BAD_INPUT,
                                 "feature value " + std::to_string(st.nonfinite_value) + " (non-finite or beyond the float32 range) at " +
                                     where(st.nonfinite_row) + ", column " + std::to_string(st.nonfinite_col) +
                                     " (nonfinite_policy: error; that batch was not ingested)");
        else
            errors_.emplace_back(COLLAPSE_ERR_OUT_OF_MEMORY,
                                 "a batch has more rows than the device row buffer holds (" + std::to_string(store_capacity_) +
                                     " rows within device_memory_limit = " + format_bytes(budget_.limit()) +
                                     "); that batch was not ingested: split it, or raise device_memory_limit");
        return;
    }
    if (!slots_[(size_t)k].first_pass) return;  // the second pass sees the same rows again
    totals_.rows_seen += slots_[(size_t)k].rows;
    totals_.rows_masked += (int64_t)st.masked;
    totals_.rows_excluded += (int64_t)st.excluded;
    totals_.rows_nonfinite += (int64_t)st.nonfinite_skipped;
}

// Reports the oldest device-side error, once. The batch of the call that reports it is not
// ingested either (nothing of it has been touched), so the caller can resubmit it.
void CudaBackend::raise_pending() {
    for (int i = 0; i < kStatusSlots; ++i) {  // oldest first; stop at the first batch still running
        const int k = (status_next_ + i) % kStatusSlots;
        if (!slots_[(size_t)k].pending) continue;
        const cudaError_t e = cudaEventQuery(slots_[(size_t)k].event);
        if (e == cudaErrorNotReady) break;
        COLLAPSE_CUDA_TRY(e);
        process_slot(k, false);
    }
    if (errors_.empty()) return;
    const auto err = errors_.front();
    errors_.pop_front();
    throw Error(err.first, err.second);
}

void CudaBackend::sync() {
    DeviceGuard guard(cfg_.device_ordinal);
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(last_stream_));
    for (int i = 0; i < kStatusSlots; ++i) process_slot((status_next_ + i) % kStatusSlots, true);
    raise_pending();
}

std::vector<int64_t> CudaBackend::class_counts() {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    std::vector<unsigned long long> c((size_t)V_);
    COLLAPSE_CUDA_TRY(cudaMemcpy(c.data(), count_.data(), count_.bytes(), cudaMemcpyDeviceToHost));
    return std::vector<int64_t>(c.begin(), c.end());
}

// Eigenvalues (ascending) of the symmetric n x n matrix in a (upper triangle, column-major); a is overwritten.
std::vector<double> CudaBackend::eigenvalues_sym(DeviceBuffer<double>& a, int64_t n, cudaStream_t s) {
    DeviceBuffer<double> w((size_t)n, &budget_, "eigenvalues");
    DeviceBuffer<int> info(1, &budget_, "solver info");
    size_t dev_bytes = 0, host_bytes = 0;
    COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevd_bufferSize(cusolver_, solver_params_, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                      CUDA_R_64F, a.data(), n, CUDA_R_64F, w.data(), CUDA_R_64F, &dev_bytes,
                                                      &host_bytes));
    DeviceBuffer<uint8_t> work(std::max<size_t>(dev_bytes, 1), &budget_, "eigen-solver workspace");
    std::vector<uint8_t> host_work(std::max<size_t>(host_bytes, 1));
    COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevd(cusolver_, solver_params_, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_64F,
                                           a.data(), n, CUDA_R_64F, w.data(), CUDA_R_64F, work.data(), dev_bytes,
                                           host_work.data(), host_bytes, info.data()));
    std::vector<double> out((size_t)n);
    int h_info = 0;
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(out.data(), w.data(), (size_t)n * 8, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(&h_info, info.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    if (h_info != 0) fail(COLLAPSE_ERR_INTERNAL, "cusolverDnXsyevd failed with info = ", h_info, " (n = ", n, ")");
    return out;
}

void CudaBackend::begin_second_pass(const KeptSet& kept, const Classifier& clf, bool nc4, bool gram) {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    pass2_ = true;
    pass2_nc4_ = nc4 && clf.present();
    pass2_gram_ = gram;
    kept2_ = kept;
    clf2_ = clf;
    const int64_t K = (int64_t)kept.ids.size();
    cudaStream_t s = stream_;
    ids2_.allocate((size_t)std::max<int64_t>(K, 1), &budget_, "kept ids");
    slot2_.allocate((size_t)V_, &budget_, "kept slots");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(ids2_.data(), kept.ids.data(), (size_t)K * 4, cudaMemcpyHostToDevice, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(slot2_.data(), kept.slot.data(), (size_t)V_ * 4, cudaMemcpyHostToDevice, s));
    mu2_.allocate((size_t)std::max<int64_t>(K * d_, 1), &budget_, "kept means");
    DeviceBuffer<double> var((size_t)std::max<int64_t>(K, 1), &budget_, "variances"), weight((size_t)std::max<int64_t>(K, 1), &budget_, "weights");
    launch_means(sum_.data(), sqnorm_.data(), count_.data(), ids2_.data(), K, d_, false, mu2_.data(), var.data(), weight.data(), s);
    // ||mu||^2 = (sqnorm - n var) / n is not what we want; recompute from mu on the host side is
    // simpler: copy mu once.
    std::vector<double> mu((size_t)(K * d_)), mu_sq((size_t)K, 0.0);
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(mu.data(), mu2_.data(), mu.size() * 8, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < d_; ++j) mu_sq[(size_t)i] += mu[(size_t)(i * d_ + j)] * mu[(size_t)(i * d_ + j)];
    mu2_sq_.allocate((size_t)std::max<int64_t>(K, 1), &budget_, "kept mean norms");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(mu2_sq_.data(), mu_sq.data(), (size_t)K * 8, cudaMemcpyHostToDevice, s));
    if (pass2_nc4_) {
        w2_.allocate(clf.weight.size(), &budget_, "classifier [V, d] (float64)");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w2_.data(), clf.weight.data(), clf.weight.size() * 8, cudaMemcpyHostToDevice, s));
        if (!clf.bias.empty()) {
            b2_.allocate(clf.bias.size(), &budget_, "classifier bias");
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(b2_.data(), clf.bias.data(), clf.bias.size() * 8, cudaMemcpyHostToDevice, s));
        }
        agree_.allocate(1, &budget_, "NC4 counter");
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(agree_.data(), 0, 8, s));
    }
    if (pass2_gram_) {
        gram2_.allocate((size_t)(d_ * d_), &budget_, "second-pass Gram");
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram2_.data(), 0, gram2_.bytes(), s));
        if (!gram32_.data()) {
            gram32_.allocate((size_t)(d_ * d_), &budget_, "the batch Gram d x d (float32)");
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram32_.data(), 0, gram32_.bytes(), s));
        }
    }
    if (pass2_nc4_) {
        // NC4 works on chunks of rows whose logits stay near 64 MiB.
        nc4_chunk_ = std::max<int64_t>(1, std::min<int64_t>(cfg_.batch_rows, (int64_t(64) << 20) / (8 * std::max(V_, K))));
        xd2_.allocate((size_t)(nc4_chunk_ * d_), &budget_, "NC4 rows (float64)");
        logits2_.allocate((size_t)(nc4_chunk_ * V_), &budget_, "NC4 logits");
        dots2_.allocate((size_t)(nc4_chunk_ * std::max<int64_t>(K, 1)), &budget_, "NC4 distances");
    }
    pass2_rows_dev_.allocate(1, &budget_, "second-pass row count");
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(pass2_rows_dev_.data(), 0, 8, s));
    scratch_.rows = 0;  // the next batch reallocates the scratch with room for the gathered rows
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
}

// Second pass, all on the device and asynchronous like the first: rows of kept classes are gathered
// (others become zero rows), the Gram by SSYRK into fp64, NC4 by GEMM chunks and an arg-max kernel
// that skips rows outside the kept set.
void CudaBackend::ingest_second_pass(const BatchDesc& b, void* stream) {
    DeviceGuard guard(cfg_.device_ordinal);
    raise_pending();
    const int64_t n = b.num_rows();
    if (n == 0) return;
    if (b.features.rows > INT32_MAX) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "a batch of ", b.features.rows, " feature rows is more than 2^31 - 1 (split it)");
    cudaStream_t s = pick_stream(stream);
    DeviceBatch db;
    const int k = begin_batch(b, s, false, &db);
    BatchStatus* st = status_.data() + k;
    Scratch& sc = scratch_;
    const int32_t sentinel = (int32_t)V_;
    launch_gather_rows(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sentinel, sc.gram_rows.data(), s, slot2_.data());
    launch_count_kept(sc.keys_sorted.data(), n, sentinel, slot2_.data(), pass2_rows_dev_.data(), st, s);
    if (pass2_gram_) {
        const float one = 1.0f, zero = 0.0f;
        COLLAPSE_CUBLAS_TRY(cublasSsyrk(cublas_, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d_, (int)n, &one, sc.gram_rows.data(), (int)d_,
                                        &zero, gram32_.data(), (int)d_));
        launch_add_gram(gram32_.data(), gram2_.data(), d_ * d_, st, s);
    }
    if (pass2_nc4_) {
        const int64_t K = (int64_t)kept2_.ids.size();
        const double one = 1.0, zero = 0.0;
        for (int64_t r0 = 0; r0 < n; r0 += nc4_chunk_) {
            const int64_t nr = std::min(nc4_chunk_, n - r0);
            launch_rows_to_double(sc.gram_rows.data() + r0 * d_, nullptr, nr, d_, nullptr, xd2_.data(), s);
            COLLAPSE_CUBLAS_TRY(cublasDgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, (int)V_, (int)nr, (int)d_, &one, w2_.data(), (int)d_,
                                            xd2_.data(), (int)d_, &zero, logits2_.data(), (int)V_));
            COLLAPSE_CUBLAS_TRY(cublasDgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, (int)K, (int)nr, (int)d_, &one, mu2_.data(), (int)d_,
                                            xd2_.data(), (int)d_, &zero, dots2_.data(), (int)K));
            launch_nc4_compare(logits2_.data(), clf2_.bias.empty() ? nullptr : b2_.data(), V_, dots2_.data(), mu2_sq_.data(),
                               ids2_.data(), K, nr, agree_.data(), s, sc.keys_sorted.data() + r0, slot2_.data(), st);
        }
    }
    end_batch(k, b, s, false);
}

// The rows in the device buffer go to the host store, grouped by class (stably: arrival order within
// a class), in chunks; the buffer is then empty. A refusal of the host store (a full disk) rolls the
// host store back and leaves the buffer as it was.
void CudaBackend::move_store_to_host() {
    sync();
    unsigned long long stored = 0;
    COLLAPSE_CUDA_TRY(cudaMemcpy(&stored, store_count_.data(), 8, cudaMemcpyDeviceToHost));
    if (stored > 0) {
        std::vector<int32_t> labels((size_t)stored);
        COLLAPSE_CUDA_TRY(cudaMemcpy(labels.data(), store_labels_.data(), labels.size() * 4, cudaMemcpyDeviceToHost));
        std::vector<int64_t> off((size_t)V_ + 1, 0);
        for (int32_t c : labels) ++off[(size_t)c + 1];
        for (int64_t c = 0; c < V_; ++c) off[(size_t)c + 1] += off[(size_t)c];
        std::vector<int64_t> next(off.begin(), off.end() - 1);
        std::vector<int32_t> index(labels.size());
        for (size_t i = 0; i < labels.size(); ++i) index[(size_t)next[(size_t)labels[i]]++] = (int32_t)i;
        const RowStore::Mark mark = host_store_->mark([&] {
            int64_t add = 0;
            for (int64_t c = 0; c < V_; ++c) add += host_store_->growth((int32_t)c, off[(size_t)c + 1] - off[(size_t)c]);
            return add;
        });
        try {
            // Rows arrive grouped by class through the pinned buffer. A class is appended whole when
            // its first row arrives (one append per class, as mark() counted), and a class that
            // spans chunks is filled in as they come.
            int64_t c = -1;
            double* dst = nullptr;
            download_rows(store_.data(), index, [&](const double* x, int64_t first, int64_t m) {
                for (int64_t r = first; r < first + m;) {
                    if (c < 0 || r >= off[(size_t)c + 1]) {
                        do ++c;
                        while (off[(size_t)c + 1] <= r);
                        const int64_t n = off[(size_t)c + 1] - off[(size_t)c];
                        host_store_->make_room([&] { return host_store_->growth((int32_t)c, n); });
                        dst = host_store_->append((int32_t)c, n);
                    }
                    const int64_t k = std::min(off[(size_t)c + 1], first + m) - r;
                    std::memcpy(dst + (r - off[(size_t)c]) * d_, x + (r - first) * d_, (size_t)(k * d_) * 8);
                    r += k;
                }
            });
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(store_count_.data(), 0, 8, stream_));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
        } catch (...) {
            host_store_->rollback(mark);
            throw;
        }
    }
    store_bound_ = 0;
}

// Per-token SVD entropies from per-class Gram eigenvalues. Sampled: the reservoirs on the device.
// Exact: the rows are in host memory (or spilled to disk) by now; they come back to the device
// buffer a group of whole classes at a time, each group solved before the next is uploaded.
void CudaBackend::per_token(const KeptSet& kept, const DeviceBuffer<double>& mu, MetricValues& out) {
    cudaStream_t s = stream_;
    const int64_t K = (int64_t)kept.ids.size();
    const int64_t cap = cfg_.svd_max_rows_per_token;
    std::vector<int64_t> offset((size_t)K), nrows((size_t)K);
    std::vector<TokenMetrics> tokens((size_t)K);
    auto describe = [&](int64_t t) {
        TokenMetrics& tm = tokens[(size_t)t];
        tm.id = kept.ids[(size_t)t];
        tm.num_samples = kept.counts[(size_t)t];
        tm.svd_rows = nrows[(size_t)t];
        tm.sampled = tm.svd_rows < tm.num_samples;
    };
    if (sampled_) {
        std::vector<int32_t> h((size_t)(K * cap));
        std::vector<int64_t> all((size_t)K);
        for (int64_t t = 0; t < K; ++t) {
            offset[(size_t)t] = t * cap;
            nrows[(size_t)t] = std::min<int64_t>(kept.counts[(size_t)t], cap);
            for (int64_t j = 0; j < cap; ++j) h[(size_t)(t * cap + j)] = (int32_t)((int64_t)kept.ids[(size_t)t] * cap + j);
            all[(size_t)t] = t;
            describe(t);
        }
        DeviceBuffer<int32_t> index(h.size(), &budget_, "reservoir index");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(index.data(), h.data(), h.size() * 4, cudaMemcpyHostToDevice, s));
        class_spectra(reservoir_.data(), index.data(), all, offset, nrows, kept, mu, tokens, out);
    } else {
        move_store_to_host();
        const int64_t room = std::min<int64_t>((int64_t)store_capacity_, std::max<int64_t>(kept.rows, 1));
        std::vector<int32_t> h((size_t)room);
        for (int64_t i = 0; i < room; ++i) h[(size_t)i] = (int32_t)i;
        DeviceBuffer<int32_t> iota((size_t)std::max<int64_t>(room, 1), &budget_, "row buffer index");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(iota.data(), h.data(), h.size() * 4, cudaMemcpyHostToDevice, s));
        std::vector<int64_t> members;
        int64_t filled = 0, staged_from = 0;
        // Rows are converted into a pinned float32 staging buffer and uploaded a chunk at a time
        // (one copy per class was the whole cost of this phase on an H200: 11,770 classes, 0.17 s).
        const int64_t stage_rows = std::max<int64_t>(1, (int64_t(64) << 20) / (d_ * 4));
        PinnedBuffer<float> stage((size_t)(std::min(stage_rows, room) * d_));
        const int64_t stage_cap = (int64_t)stage.size() / d_;
        auto upload = [&] {
            if (filled > staged_from)
                COLLAPSE_CUDA_TRY(cudaMemcpy(store_.data() + staged_from * d_, stage.data(), (size_t)((filled - staged_from) * d_) * 4,
                                             cudaMemcpyHostToDevice));
            staged_from = filled;
        };
        auto solve = [&] {
            upload();
            if (!members.empty()) class_spectra(store_.data(), iota.data(), members, offset, nrows, kept, mu, tokens, out);
            members.clear();
            filled = staged_from = 0;
        };
        const int64_t load = std::max<int64_t>(d_ * 8, cfg_.host_memory_limit / 6);
        host_store_->for_each_class(kept.ids, load, [&](int32_t c, const double* x, int64_t n, int64_t first, bool) {
            const int64_t t = kept.slot[(size_t)c];
            if (first == 0) {  // a class's pieces go one after the other into the buffer
                const int64_t total = host_store_->rows(c);
                if (total > room)
                    fail(COLLAPSE_ERR_OUT_OF_MEMORY, "class ", c, " has ", total, " rows, more than the device row buffer holds (", room,
                         " rows within device_memory_limit); raise device_memory_limit or use backend: cpu");
                if (filled + total > room) solve();
                offset[(size_t)t] = filled;
                nrows[(size_t)t] = total;
                describe(t);
                members.push_back(t);
            }
            for (int64_t r = 0; r < n;) {
                if (filled - staged_from == stage_cap) upload();
                const int64_t k = std::min(n - r, stage_cap - (filled - staged_from));
                float* dst = stage.data() + (filled - staged_from) * d_;
                for (int64_t j = 0; j < k * d_; ++j) dst[j] = (float)x[r * d_ + j];
                filled += k, r += k;
            }
        });
        solve();
        out.row_store = {{"spilled_bytes", host_store_->disk_bytes()}, {"spill_flushes", host_store_->flushes()}};
    }
    out.tokens = std::move(tokens);
}

// The entropies of the classes `members` (positions in kept), whose rows are rows[index[offset[t] ..
// offset[t] + nrows[t])]; classes grouped by Gram size M (a power of two >= min(n, d)), each group a
// handful of batched calls.
void CudaBackend::class_spectra(const float* rows, const int32_t* index, const std::vector<int64_t>& todo,
                                const std::vector<int64_t>& offset, const std::vector<int64_t>& nrows, const KeptSet& kept,
                                const DeviceBuffer<double>& mu, std::vector<TokenMetrics>& tokens, MetricValues& out) {
    cudaStream_t s = stream_;
    std::map<int64_t, std::vector<int64_t>> groups;
    for (int64_t t : todo) {
        const int64_t m = std::min(nrows[(size_t)t], d_);
        int64_t M = 2;
        while (M < m) M *= 2;
        groups[M].push_back(t);
    }
    for (const auto& [M, members] : groups) {
        // At most 65535 matrices per call: the grid's z limit and the batched solvers' limit.
        const int64_t per = std::max<int64_t>(1, std::min<int64_t>({(int64_t)members.size(), (int64_t(256) << 20) / (M * M * 8), int64_t(65535)}));
        for (size_t g0 = 0; g0 < members.size(); g0 += (size_t)per) {
            const int64_t cnt = std::min<int64_t>(per, (int64_t)(members.size() - g0));
            std::vector<int64_t> off((size_t)cnt), nn((size_t)cnt);
            std::vector<int32_t> ctr((size_t)cnt);
            for (int64_t i = 0; i < cnt; ++i) {
                const int64_t t = members[g0 + (size_t)i];
                off[(size_t)i] = offset[(size_t)t], nn[(size_t)i] = nrows[(size_t)t];
                ctr[(size_t)i] = cfg_.svd_center ? (int32_t)t : -1;
            }
            DeviceBuffer<int64_t> doff((size_t)cnt, &budget_, "class offsets"), dn((size_t)cnt, &budget_, "class sizes");
            DeviceBuffer<int32_t> dctr((size_t)cnt, &budget_, "class centres");
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(doff.data(), off.data(), (size_t)cnt * 8, cudaMemcpyHostToDevice, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dn.data(), nn.data(), (size_t)cnt * 8, cudaMemcpyHostToDevice, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dctr.data(), ctr.data(), (size_t)cnt * 4, cudaMemcpyHostToDevice, s));
            DeviceBuffer<double> gram((size_t)(cnt * M * M), &budget_, "per-class Gram batch");
            DeviceBuffer<double> w((size_t)(cnt * M), &budget_, "per-class eigenvalues");
            launch_class_gram(rows, index, doff.data(), dn.data(), dctr.data(), mu.data(), cnt, d_, M, gram.data(), s);
            DeviceBuffer<int> info((size_t)cnt, &budget_, "solver info");
            if (M <= 32) {
                syevjInfo_t params = nullptr;
                COLLAPSE_CUSOLVER_TRY(cusolverDnCreateSyevjInfo(&params));
                std::unique_ptr<std::remove_pointer_t<syevjInfo_t>, decltype(&cusolverDnDestroySyevjInfo)> params_owner(
                    params, &cusolverDnDestroySyevjInfo);
                int lwork = 0;
                COLLAPSE_CUSOLVER_TRY(cusolverDnDsyevjBatched_bufferSize(cusolver_, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER,
                                                                         (int)M, gram.data(), (int)M, w.data(), &lwork, params, (int)cnt));
                DeviceBuffer<double> work((size_t)std::max(lwork, 1), &budget_, "syevj workspace");
                COLLAPSE_CUSOLVER_TRY(cusolverDnDsyevjBatched(cusolver_, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, (int)M,
                                                              gram.data(), (int)M, w.data(), work.data(), lwork, info.data(), params,
                                                              (int)cnt));
                COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            } else if (M <= 512) {
                size_t dev_bytes = 0, host_bytes = 0;
                COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevBatched_bufferSize(cusolver_, solver_params_, CUSOLVER_EIG_MODE_NOVECTOR,
                                                                        CUBLAS_FILL_MODE_UPPER, M, CUDA_R_64F, gram.data(), M, CUDA_R_64F,
                                                                        w.data(), CUDA_R_64F, &dev_bytes, &host_bytes, cnt));
                DeviceBuffer<uint8_t> work(std::max<size_t>(dev_bytes, 1), &budget_, "syevBatched workspace");
                std::vector<uint8_t> hw(std::max<size_t>(host_bytes, 1));
                COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevBatched(cusolver_, solver_params_, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, M,
                                                             CUDA_R_64F, gram.data(), M, CUDA_R_64F, w.data(), CUDA_R_64F, work.data(),
                                                             dev_bytes, hw.data(), host_bytes, info.data(), cnt));
                COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            } else {
                // Large Grams one at a time.
                for (int64_t i = 0; i < cnt; ++i) {
                    DeviceBuffer<double> one((size_t)(M * M), &budget_, "large class Gram");
                    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(one.data(), gram.data() + i * M * M, (size_t)(M * M) * 8, cudaMemcpyDeviceToDevice, s));
                    const std::vector<double> e = eigenvalues_sym(one, M, s);
                    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w.data() + i * M, e.data(), (size_t)M * 8, cudaMemcpyHostToDevice, s));
                }
                COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            }
            std::vector<double> hw((size_t)(cnt * M));
            std::vector<int> hinfo((size_t)cnt, 0);
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hw.data(), w.data(), hw.size() * 8, cudaMemcpyDeviceToHost, s));
            if (M <= 512) COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hinfo.data(), info.data(), hinfo.size() * sizeof(int), cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            for (int64_t i = 0; i < cnt; ++i)
                if (hinfo[(size_t)i] != 0)
                    fail(COLLAPSE_ERR_INTERNAL, "batched eigen-solver failed for token ", kept.ids[(size_t)members[g0 + (size_t)i]],
                         " (info = ", hinfo[(size_t)i], ", Gram size ", M, ")");
            for (int64_t i = 0; i < cnt; ++i) {
                const int64_t t = members[g0 + (size_t)i];
                const int64_t r = std::min(nrows[(size_t)t], d_);
                token_from_spectrum(singular_values_from_eigen(hw.data() + i * M, M, r), nrows[(size_t)t], d_, tokens[(size_t)t], out);
            }
        }
    }
}

MetricValues CudaBackend::compute(const KeptSet& kept, const Classifier& clf) {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    MetricValues out;
    cudaStream_t s = stream_;
    COLLAPSE_CUBLAS_TRY(cublasSetStream(cublas_, s));
    COLLAPSE_CUSOLVER_TRY(cusolverDnSetStream(cusolver_, s));
    last_stream_ = s;
    const int64_t K = (int64_t)kept.ids.size();
    if (K == 0) {
        out.notes["overall"] = "no kept classes: every metric is null";
        return out;
    }
    unsigned long long pass2_rows = 0;
    if (pass2_) COLLAPSE_CUDA_TRY(cudaMemcpy(&pass2_rows, pass2_rows_dev_.data(), 8, cudaMemcpyDeviceToHost));
    const int64_t d = d_;
    DeviceBuffer<int32_t> ids((size_t)K, &budget_, "kept ids");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(ids.data(), kept.ids.data(), (size_t)K * 4, cudaMemcpyHostToDevice, s));
    DeviceBuffer<double> mu((size_t)(K * d), &budget_, "class means [K, d]"), var((size_t)K, &budget_, "variances"),
        weight((size_t)K, &budget_, "weights"), mug((size_t)d, &budget_, "global mean"), m((size_t)(K * d), &budget_, "centred means"),
        q((size_t)K, &budget_, "norms"), a((size_t)K, &budget_, "direction scales");
    const bool token_weighted = cfg_.global_mean == COLLAPSE_MEAN_TOKEN_WEIGHTED;
    launch_means(sum_.data(), sqnorm_.data(), count_.data(), ids.data(), K, d, token_weighted, mu.data(), var.data(), weight.data(), s);
    launch_column_sums(mu.data(), weight.data(), K, d, mug.data(), s);
    const double total_weight = token_weighted ? (double)kept.rows : (double)K;
    launch_center(mu.data(), mug.data(), total_weight, K, d, m.data(), q.data(), a.data(), s);

    using Clock = std::chrono::steady_clock;
    auto since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
    auto t_phase = Clock::now();
    if (cfg_.compute_class_metrics) {
        ClassVectors v;
        std::vector<double> hq((size_t)K);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hq.data(), q.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
        const bool use_means = cfg_.unc3_classifier == COLLAPSE_UNC3_CLASS_MEANS;
        v.duality = use_means || clf.present();
        DeviceBuffer<double> W;
        if (v.duality) {
            if (!use_means) {
                W.allocate(clf.weight.size(), &budget_, "classifier [V, d] (float64)");
                COLLAPSE_CUDA_TRY(cudaMemcpyAsync(W.data(), clf.weight.data(), clf.weight.size() * 8, cudaMemcpyHostToDevice, s));
            }
            DeviceBuffer<double> wm((size_t)K, &budget_, "duality"), ww((size_t)K, &budget_, "duality");
            launch_duality(use_means ? nullptr : W.data(), mu.data(), ids.data(), m.data(), K, d, wm.data(), ww.data(), s);
            std::vector<double> hwm((size_t)K), hww((size_t)K);
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hwm.data(), wm.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hww.data(), ww.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            double wf2 = 0, mf2 = 0;
            v.cos.resize((size_t)K);
            for (int64_t i = 0; i < K; ++i) {
                v.cos[(size_t)i] = duality_cos(hwm[(size_t)i], std::sqrt(hww[(size_t)i]), std::sqrt(hq[(size_t)i]));
                wf2 += hww[(size_t)i];
                mf2 += hq[(size_t)i];
            }
            v.w_frobenius = std::sqrt(wf2);
            v.m_frobenius = std::sqrt(mf2);
            if (v.w_frobenius > 0 && v.m_frobenius > 0) {
                launch_self_duality(use_means ? nullptr : W.data(), mu.data(), ids.data(), m.data(), K, d, v.w_frobenius, v.m_frobenius,
                                    wm.data(), s);
                COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hwm.data(), wm.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
                COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
                double acc = 0;
                for (double x : hwm) acc += x;
                v.self_duality_sq = acc;
            }
        }
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
        v.norm.resize((size_t)K);
        for (int64_t i = 0; i < K; ++i) v.norm[(size_t)i] = std::sqrt(hq[(size_t)i]);
        finish_class_metrics(v, cfg_, out);

        if (K < cfg_.min_classes_for_gnc2) {
            note_too_few_classes_for_pairs(cfg_, out);
        } else {
            // Tiles of M M^T: the edge from a quarter of the free budget, at most 16384.
            const int64_t free_bytes = budget_.limit() - budget_.used();
            const int64_t T = std::max<int64_t>(256, std::min<int64_t>({K, int64_t(16384), (int64_t)std::sqrt((double)free_bytes / 4 / 8)}));
            DeviceBuffer<double> tile((size_t)(std::min(T, K) * std::min(T, K)), &budget_, "pair tile",
                                      "raise device_memory_limit (the tile edge shrinks with the limit)");
            DeviceBuffer<double> acc((size_t)(kPairBlocks * kPairFields), &budget_, "pair accumulators");
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(acc.data(), 0, acc.bytes(), s));
            const double one = 1.0, zero = 0.0;
            for (int64_t i0 = 0; i0 < K; i0 += T)
                for (int64_t j0 = i0; j0 < K; j0 += T) {
                    const int64_t ni = std::min(T, K - i0), nj = std::min(T, K - j0);
                    // Diagonal tiles: only i < j is read, the upper triangle of a SYRK.
                    if (i0 == j0)
                        COLLAPSE_CUBLAS_TRY(cublasDsyrk(cublas_, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, (int)ni, (int)d, &one,
                                                        m.data() + i0 * d, (int)d, &zero, tile.data(), (int)ni));
                    else
                        COLLAPSE_CUBLAS_TRY(cublasDgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, (int)ni, (int)nj, (int)d, &one,
                                                        m.data() + i0 * d, (int)d, m.data() + j0 * d, (int)d, &zero, tile.data(),
                                                        (int)ni));
                    launch_pair_reduce(tile.data(), i0, j0, ni, nj, q.data(), a.data(), var.data(), cfg_.cdnv_power, acc.data(), s);
                }
            std::vector<double> h((size_t)(kPairBlocks * kPairFields));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h.data(), acc.data(), acc.bytes(), cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            PairTotals all;
            for (int b = 0; b < kPairBlocks; ++b) {
                const double* f = h.data() + b * kPairFields;
                PairTotals t;
                t.l = Moments{f[0], f[1], f[2]};
                t.c = Moments{f[3], f[4], f[5]};
                t.n_cdnv = f[6], t.s_cdnv = f[7];
                t.pairs = (int64_t)f[3];
                t.skip_l = (int64_t)f[8], t.skip_cdnv = (int64_t)f[9];
                all.merge(t);
            }
            finish_pair_metrics(all, K, out);
        }
        out.timings["class_metrics"] = since(t_phase);
    }
    t_phase = Clock::now();

    if (cfg_.compute_overall_metrics) {
        DeviceBuffer<double> g((size_t)(d * d), &budget_, "overall Gram");
        bool have = false;
        if (gram_streaming_) {
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(g.data(), gram_.data(), g.bytes(), cudaMemcpyDeviceToDevice, s));
            // Subtract the rows of classes that never reached min_samples_per_token (all in the hold area).
            const std::vector<int64_t> counts = class_counts();
            std::vector<int32_t> hold_index;
            for (int64_t c = 0; c < V_ && hold_rows_ > 0; ++c)
                if (counts[(size_t)c] > 0 && counts[(size_t)c] < cfg_.min_samples_per_token)
                    for (int64_t r = 0; r < counts[(size_t)c]; ++r) hold_index.push_back((int32_t)(c * hold_rows_ + r));
            if (!hold_index.empty()) {
                const int64_t nh = (int64_t)hold_index.size();
                DeviceBuffer<int32_t> hi((size_t)nh, &budget_, "hold rows");
                DeviceBuffer<double> xd((size_t)(nh * d), &budget_, "hold rows (float64)");
                COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hi.data(), hold_index.data(), (size_t)nh * 4, cudaMemcpyHostToDevice, s));
                launch_rows_to_double(hold_.data(), hi.data(), nh, d, nullptr, xd.data(), s);
                const double minus = -1.0, one = 1.0;
                COLLAPSE_CUBLAS_TRY(cublasDsyrk(cublas_, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d, (int)nh, &minus, xd.data(), (int)d,
                                                &one, g.data(), (int)d));
                COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            }
            have = true;
        } else if (pass2_ && pass2_gram_ && (int64_t)pass2_rows == kept.rows) {
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(g.data(), gram2_.data(), g.bytes(), cudaMemcpyDeviceToDevice, s));
            have = true;
        } else {
            out.notes["overall_svd_entropy"] =
                "max_tokens_to_analyze cuts the kept set: the cuda backend needs a second pass for the Gram of kept rows";
        }
        if (have) {
            const std::vector<double> e = eigenvalues_sym(g, d, s);
            bool zero = false;
            const double h = spectrum_entropy(singular_values_from_eigen(e.data(), d, std::min<int64_t>(kept.rows, d)), &zero);
            out.overall_svd_entropy = h;
            out.overall_effective_rank = std::exp(h);
        }
        out.timings["overall_svd"] = since(t_phase);
    }

    if (cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF) {
        t_phase = Clock::now();
        per_token(kept, mu, out);
        out.timings["token_svd"] = since(t_phase);
    }

    if (cfg_.compute_nc4) {
        if (!clf.present()) {
            out.notes["nc4_agreement"] = "no classifier was given";
        } else if (pass2_ && pass2_nc4_) {
            unsigned long long agree = 0;
            COLLAPSE_CUDA_TRY(cudaMemcpy(&agree, agree_.data(), 8, cudaMemcpyDeviceToHost));
            if ((int64_t)pass2_rows == kept.rows) {
                out.nc4_agreement = (double)agree / (double)pass2_rows;
                out.nc4_rows = (int64_t)pass2_rows;
            } else {
                out.notes["nc4_agreement"] = "the second pass saw " + std::to_string(pass2_rows) + " kept rows, the first " + std::to_string(kept.rows);
            }
        } else {
            out.notes["nc4_agreement"] = "the cuda backend computes NC4 in a second pass over the rows";
        }
    }
    return out;
}

}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(const Config& cfg, int64_t num_classes, int64_t dim) {
    if (!cuda_backend_available())
        fail(COLLAPSE_ERR_NO_CUDA, "backend cuda requested, but no CUDA device is usable on this machine");
    return std::make_unique<cuda::CudaBackend>(cfg, num_classes, dim);
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
