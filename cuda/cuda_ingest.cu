// CUDA ingest, both passes (the twin of src/cpu/cpu_backend.cpp's ingest): host batches staged
// through pinned double buffers, validation and grouping by class, accumulation, and the per-batch
// status read back asynchronously. Everything is on the caller's stream (or the session's); the
// scratch and staging buffers are members sized at the first batch, so a batch of a size seen
// before allocates nothing.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/spread_part.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.hpp"
#include "kernels.cuh"

namespace collapse::internal::cuda {

namespace {

int bits_for(int64_t v) {
    int b = 1;
    while (b < 31 && (int64_t(1) << b) <= v) ++b;
    return b;
}

}  // namespace

cudaStream_t CudaBackend::pick_stream(void* s) {
    cudaStream_t st = s ? static_cast<cudaStream_t>(s) : stream_;
    // Scratch and accumulators are shared between batches: a batch on another stream waits for the
    // previous one.
    if (st != last_stream_) COLLAPSE_CUDA_TRY(cudaStreamWaitEvent(st, last_done_, 0));
    last_stream_ = st;
    return st;
}

// The feature rows of a host batch, packed, into the pinned slot: on several host threads for a
// large batch (one memcpy thread reaches a fraction of the host's memory bandwidth), in pieces of
// whole rows; on the caller's thread for a small one.
static void copy_rows_to_pinned(const MatrixView& x, uint8_t* dst) {
    const size_t row_bytes = (size_t)x.cols * dtype_size(x.dtype);
    const size_t total = (size_t)x.rows * row_bytes;
    constexpr size_t kPerThread = size_t(16) << 20;
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({(int64_t)(total / kPerThread), (int64_t)std::min(8u, hw), x.rows}));
    auto copy = [&](int64_t r0, int64_t r1) {
        if (r1 <= r0) return;
        if (x.stride == x.cols) {
            std::memcpy(dst + (size_t)r0 * row_bytes, x.row(r0), (size_t)(r1 - r0) * row_bytes);
            return;
        }
        for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + (size_t)r * row_bytes, x.row(r), row_bytes);
    };
    if (threads == 1) {
        copy(0, x.rows);
        return;
    }
    auto cut = [&](int64_t t) { return x.rows * t / threads; };
    std::vector<std::thread> pool;
    try {
        pool.reserve((size_t)threads - 1);
        for (int64_t t = 1; t < threads; ++t) pool.emplace_back(copy, cut(t), cut(t + 1));
    } catch (...) {  // no thread to be had: the pieces not started are copied here
    }
    copy(0, cut(1));
    copy(cut((int64_t)pool.size() + 1), x.rows);
    for (std::thread& th : pool) th.join();
}

// Device view of a batch; host batches are copied through pinned double buffers and uploaded on the
// copy stream, so that the host copy and upload of batch k+1 overlap the kernels of batch k.
DeviceBatch CudaBackend::device_view(const BatchDesc& b, cudaStream_t s) {
    DeviceBatch db;
    db.rows = b.num_rows();
    db.d = b.features.cols;
    db.sequences = b.sequences;
    db.seq_len = b.seq_len;
    batch_staging_ = -1;
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
    // Both slots are sized at the first host batch (and again only for a larger batch). Their
    // pinned growth is checked against host_memory_limit for both at once, before either changes.
    int64_t growth = 0;
    for (const Staging& slot : staging_) growth += std::max<int64_t>(0, (int64_t)total - (int64_t)slot.host.size());
    const std::string what = "the staging of a host batch of " + std::to_string(db.rows) + " rows (two pinned slots of " +
                             format_bytes((int64_t)total) + ")";
    host_.check(growth, "pinned host memory for " + what, kFixBatchRows);
    for (Staging& slot : staging_)
        if (slot.host.size() < total || slot.dev.size() < total) {
            COLLAPSE_CUDA_TRY(cudaEventSynchronize(slot.copied));
            COLLAPSE_CUDA_TRY(cudaEventSynchronize(slot.consumed));
            slot.dev.reset();
            slot.host.allocate(total, &budget_, &host_, what, kFixBatchRows);
            slot.dev.allocate(total, &budget_, "host-batch staging (two pinned slots)");
        }
    const int k = staging_next_;
    Staging& st = staging_[(size_t)k];
    staging_next_ ^= 1;
    COLLAPSE_CUDA_TRY(cudaEventSynchronize(st.copied));  // the pinned slot's previous upload is done
    uint8_t* h = st.host.data();
    copy_rows_to_pinned(b.features, h);
    for (int64_t r = 0; r < b.labels.rows; ++r) std::memcpy(h + loff + (size_t)r * lcols * lsz, b.labels.row(r), lcols * lsz);
    for (int64_t r = 0; r < b.valid.rows && vsz; ++r) std::memcpy(h + voff + (size_t)r * lcols * vsz, b.valid.row(r), lcols * vsz);
    // The upload on the copy stream, after the kernels that read this device slot two batches ago
    // (so it overlaps the last batch's kernels); this batch's kernels on s wait for it.
    COLLAPSE_CUDA_TRY(cudaStreamWaitEvent(copy_stream_, st.consumed, 0));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(st.dev.data(), h, total, cudaMemcpyHostToDevice, copy_stream_));
    COLLAPSE_CUDA_TRY(cudaEventRecord(st.copied, copy_stream_));
    COLLAPSE_CUDA_TRY(cudaStreamWaitEvent(s, st.copied, 0));
    batch_staging_ = k;
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
    for (auto* b : {&s.keys, &s.vals, &s.keys_sorted, &s.vals_sorted}) b->allocate((size_t)n, &budget_, what);
    size_t sort_bytes = 0;
    COLLAPSE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, s.keys.data(), s.keys_sorted.data(), s.vals.data(),
                                                      s.vals_sorted.data(), (int)n, 0, bits_for(V_)));
    s.cub_temp.allocate(sort_bytes, &budget_, what);
    if (gram_streaming_ || pass2_) s.gram_rows.allocate((size_t)(n * d_), &budget_, what + " (gathered rows)");
    if (within_streaming_ || within2_.data())
        s.within_rows.allocate((size_t)(std::min(n, within_chunk_rows(d_)) * d_), &budget_, what + " (Sigma_W's centred rows, float64)");
    s.rows = n;
}

void CudaBackend::add_centered_scatter(const DeviceBatch& db, const float* shift, const double* mean, const int32_t* kept_slot,
                                       const BatchStatus* st, double* acc, cudaStream_t s) {
    const Scratch& sc = scratch_;
    const int64_t chunk = std::min(db.rows, within_chunk_rows(d_));
    const double one = 1.0;
    for (int64_t p0 = 0; p0 < db.rows; p0 += chunk) {
        const int64_t m = std::min(chunk, db.rows - p0);
        launch_centered_rows(db, sc.keys_sorted.data(), sc.vals_sorted.data(), (int32_t)V_, p0, m, shift, mean, kept_slot, st,
                             scratch_.within_rows.data(), s);
        COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d_, (int)m, &one, scratch_.within_rows.data(),
                                        (int)d_, &one, acc, (int)d_));
    }
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
    ip.use_ignore = cfg_.ignore_index ? 1 : 0;
    ip.ignore_index = cfg_.ignore_index.value_or(0);
    launch_reset_status(st, s);
    group_batch(*db, ip, st, s);
    launch_finish_status(*db, st, check_store ? store_count_.data() : nullptr, store_capacity_, s);
    return k;
}

// Sort (label, row); the kernels after it find run starts by binary search in the sorted keys.
void CudaBackend::group_batch(const DeviceBatch& db, const IngestParams& ip, BatchStatus* st, cudaStream_t s) {
    Scratch& sc = scratch_;
    const int n = (int)db.rows;
    launch_validate(db, ip, sc.keys.data(), sc.vals.data(), st, s);
    size_t bytes = sc.cub_temp.size();
    COLLAPSE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(sc.cub_temp.data(), bytes, sc.keys.data(), sc.keys_sorted.data(),
                                                      sc.vals.data(), sc.vals_sorted.data(), n, 0, bits_for(V_), s));
}

void CudaBackend::ingest(const BatchDesc& b, void* stream) {
    refuse_if_spread(spread_phase_ == SpreadPhase::Spread, "it takes no more first-pass rows");
    pair_spread_.reset();  // the ranks' pair shares are of the rows before these
    DeviceGuard guard(cfg_.device_ordinal);
    win_batch_ = false;
    raise_pending();
    const int64_t n = b.num_rows();
    if (b.features.rows > INT32_MAX) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "a batch of ", b.features.rows, " feature rows is more than 2^31 - 1 (split it)");
    if (n == 0) return;
    if (exact_store_) {
        // Rows stay in the device buffer while it has room (the per-token SVD then runs there); a
        // full buffer moves to the host store (the spill path). max_buffer_size no longer applies.
        set_store_dtype(b.features.dtype);
        if (store_bound_ > 0 && store_bound_ + (unsigned long long)n > store_capacity_) move_store_to_host();
        store_bound_ += (unsigned long long)n;
    }
    cudaStream_t s = pick_stream(stream);
    DeviceBatch db;
    const int k = begin_batch(b, s, exact_store_, &db);
    BatchStatus* st = status_.data() + k;
    const int32_t sentinel = (int32_t)V_;
    Scratch& sc = scratch_;
    RowSinks sinks;
    if (exact_store_) {
        sinks.store = store_.data(), sinks.store_labels = store_labels_.data(), sinks.store_count = store_count_.data();
        sinks.store_raw16 = store_dtype_ != COLLAPSE_F32;  // set_store_dtype: the batch's own 2-byte dtype
    }
    if (sampled_) sinks.reservoir = reservoir_.data(), sinks.winner = winner_.data(), sinks.cap = cfg_.svd_max_rows_per_token, sinks.seed = cfg_.seed;
    if (hold_rows_ > 0) sinks.hold = hold_.data(), sinks.hold_rows = hold_rows_;
    sinks.shift = shift_.data();  // null without the class metrics
    launch_place_rows(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sentinel, count_.data(), sinks, st, s);
    launch_class_sums(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sentinel,
                      ClassState{sum_.data(), sqdev_.data(), count_.data(), shift_.data()}, st, s);
    // Sigma_W: every accepted row less its class's reference row, as the Gram below takes every row.
    if (within_streaming_) add_centered_scatter(db, shift_.data(), nullptr, nullptr, st, within_.data(), s);
    if (gram_streaming_) {
        // Every accepted row enters the Gram; rows of classes that never reach min_samples_per_token
        // are subtracted at the end from the hold area.
        launch_gather_rows(db, sc.keys_sorted.data(), sc.vals_sorted.data(), sentinel, sc.gram_rows.data(), s);
        const float one = 1.0f, zero = 0.0f;
        COLLAPSE_CUBLAS_TRY(cublasSsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d_, (int)n, &one, sc.gram_rows.data(),
                                        (int)d_, &zero, gram32_.data(), (int)d_));
        launch_add_gram(gram32_.data(), gram_.data(), d_ * d_, st, s);
    }
    launch_count_update(sc.keys_sorted.data(), n, sentinel, count_.data(),
                        exact_store_ ? store_count_.data() : nullptr, exact_store_, st, s);

    end_batch(k, b, s, true);
    // window_stash may follow: it reads this batch's view, keys and status on the same stream.
    win_batch_ = true;
    win_db_ = db;
    win_status_ = k;
}

void CudaBackend::mark_staging_consumed(cudaStream_t s) {
    if (batch_staging_ >= 0) COLLAPSE_CUDA_TRY(cudaEventRecord(staging_[(size_t)batch_staging_].consumed, s));
}

// Status back to the host asynchronously; the slot is read at a later call (process_slot).
void CudaBackend::end_batch(int k, const BatchDesc& b, cudaStream_t s, bool first_pass) {
    mark_staging_consumed(s);  // window_stash marks it again after its own reads
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
                                                             " is outside [0, " + std::to_string(V_) + ")" +
                                                             ignore_hint(cfg_.ignore_index, st.bad_label_value) + " (that batch was not ingested)");
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
    totals_.rows_ignored += (int64_t)st.ignored;
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

void CudaBackend::begin_second_pass(const KeptSet& kept, const Classifier& clf, bool nc4, bool gram) {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    const int64_t K = (int64_t)kept.ids.size();
    // The kept set's copy (its V-long slot table, K ids and counts); the classifier is not copied
    // (only whether it has a bias is kept: its device copy is made below).
    kept2_lease_ = host_.reserve(add_bytes(mul_bytes(V_, 4), mul_bytes(K, 4 + 8)),
                                 "the second pass's kept set of K = " + std::to_string(K) + " classes (with its V-long slot table)", kFixKeptClasses);
    pass2_ = true;
    pass2_nc4_ = nc4 && clf.present();
    pass2_gram_ = gram;
    kept2_ = kept;
    bias2_ = !clf.bias.empty();
    cudaStream_t s = stream_;
    ids2_.allocate((size_t)std::max<int64_t>(K, 1), &budget_, "kept ids");
    slot2_.allocate((size_t)V_, &budget_, "kept slots");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(ids2_.data(), kept.ids.data(), (size_t)K * 4, cudaMemcpyHostToDevice, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(slot2_.data(), kept.slot.data(), (size_t)V_ * 4, cudaMemcpyHostToDevice, s));
    mu2_.allocate((size_t)std::max<int64_t>(K * d_, 1), &budget_, "kept means");
    // Leases on the session's stream, which s is (resources.cuh).
    Lease<double> var = res_.take<double>((size_t)std::max<int64_t>(K, 1), "variances"),
                  weight = res_.take<double>((size_t)std::max<int64_t>(K, 1), "weights");
    launch_means(sum_.data(), sqdev_.data(), shift_.data(), count_.data(), ids2_.data(), K, d_, false, mu2_.data(), var.data(), weight.data(), s);
    // ||mu_c||^2 by the same reduction as NC4 from the device rows (nc4_from_device), so that a
    // near-tie is decided alike on both paths.
    mu2_sq_.allocate((size_t)std::max<int64_t>(K, 1), &budget_, "kept mean norms");
    launch_duality(nullptr, mu2_.data(), ids2_.data(), mu2_.data(), K, d_, mu2_sq_.data(), weight.data(), s);  // w = m = mu
    if (pass2_nc4_) {
        w2_.allocate(clf.weight.size(), &budget_, "classifier [V, d] (float64)");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w2_.data(), clf.weight.data(), clf.weight.size() * 8, cudaMemcpyHostToDevice, s));
        if (!clf.bias.empty()) {
            b2_.allocate(clf.bias.size(), &budget_, "classifier bias");
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(b2_.data(), clf.bias.data(), clf.bias.size() * 8, cudaMemcpyHostToDevice, s));
        }
        agree_.allocate(1, &budget_, "NC4 counter");
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(agree_.data(), 0, 8, s));
        if (cfg_.per_class_arrays) {
            nc4_slot_hits_.allocate((size_t)std::max<int64_t>(K, 1), &budget_, "NC4 hits per class");
            nc4_slot_rows_.allocate((size_t)std::max<int64_t>(K, 1), &budget_, "NC4 rows per class");
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(nc4_slot_hits_.data(), 0, nc4_slot_hits_.bytes(), s));
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(nc4_slot_rows_.data(), 0, nc4_slot_rows_.bytes(), s));
        }
    }
    if (pass2_gram_ && cfg_.compute_class_metrics) {  // Sigma_W of the cut kept set, about its means (as the CPU)
        within2_.allocate((size_t)(d_ * d_), &budget_, "second-pass Sigma_W scatter");
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(within2_.data(), 0, within2_.bytes(), s));
    } else {
        within2_.reset();
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
    if (within2_.data()) add_centered_scatter(db, nullptr, mu2_.data(), slot2_.data(), st, within2_.data(), s);
    if (pass2_gram_) {
        const float one = 1.0f, zero = 0.0f;
        COLLAPSE_CUBLAS_TRY(cublasSsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d_, (int)n, &one, sc.gram_rows.data(), (int)d_,
                                        &zero, gram32_.data(), (int)d_));
        launch_add_gram(gram32_.data(), gram2_.data(), d_ * d_, st, s);
    }
    if (pass2_nc4_) {
        const int64_t K = (int64_t)kept2_.ids.size();
        for (int64_t r0 = 0; r0 < n; r0 += nc4_chunk_) {
            const int64_t nr = std::min(nc4_chunk_, n - r0);
            launch_rows_to_double(sc.gram_rows.data() + r0 * d_, nullptr, nr, d_, nullptr, xd2_.data(), s);
            nc4_products(res_.blas(s), w2_.data(), V_, mu2_.data(), K, xd2_.data(), nr, d_, logits2_.data(), dots2_.data());
            launch_nc4_compare(logits2_.data(), bias2_ ? b2_.data() : nullptr, V_, dots2_.data(), mu2_sq_.data(),
                               ids2_.data(), K, nr, agree_.data(), s, sc.keys_sorted.data() + r0, slot2_.data(), st,
                               cfg_.per_class_arrays ? nc4_slot_hits_.data() : nullptr, cfg_.per_class_arrays ? nc4_slot_rows_.data() : nullptr);
        }
    }
    end_batch(k, b, s, false);
}

}  // namespace collapse::internal::cuda
