// The CUDA backend's state in a checkpoint, in the layout every backend shares
// (src/core/state_sections.hpp): a checkpoint of a GPU run resumes on the CPU and the other way
// round, and shards of both merge.
//
// What differs on the device and is converted here:
//   - the Gram is column-major upper on the device, row-major upper in the file;
//   - the device Gram holds EVERY row, and the first min_samples_per_token - 1 rows of each class
//     sit in a hold area to subtract those of classes that never qualify; the file's Gram holds the
//     rows of qualifying classes, the others are held back in the file. Saving subtracts the held
//     rows of classes below the threshold, loading adds them and fills the hold area;
//   - Sigma_W's shifted scatter (within_scatter) likewise holds every row on the device; saving
//     subtracts the held rows (streamed_within), loading adds the file's held-back rows, each less
//     its class's reference row; the per-class sums of squares and reference rows merge as on the
//     CPU (core/shifted_sums.hpp);
//   - rows (reservoirs, hold area) are float32 on the device, float64 in the file;
//   - the exact rows: while every one is still in the device buffer they are written from there,
//     grouped by class on the device (save_device_store), and stay there; otherwise the buffer
//     moves to the host store (RowStore, as on the CPU) first. The file has float64 rows whatever
//     dtype the buffer keeps.
#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "base/error.hpp"
#include "core/shifted_sums.hpp"
#include "core/spread_part.hpp"
#include "core/state_sections.hpp"
#include "cuda_backend.cuh"

namespace collapse::internal {
namespace cuda {

namespace {

constexpr int64_t kChunkBytes = int64_t(64) << 20;  // rows moved between device and host at once

__global__ void scatter_rows_kernel(const float* src, const int64_t* slot, int64_t n, int64_t d, float* dst) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n * d; i += (int64_t)gridDim.x * blockDim.x)
        dst[slot[i / d] * d + i % d] = src[i];
}

// g (d x d) += rows^T rows, g row-major upper: the Gram of held rows.
void add_outer_products(const double* rows, int64_t n, int64_t d, double alpha, double* g) {
    if (n > 0) cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)n, alpha, rows, (int)d, 1.0, g, (int)d);
}

}  // namespace

// The device and pinned buffers rows travel through to the host, allocated once (the exact mode
// allocates them at session creation, so that a move never fails for want of device memory).
// The pinned buffer takes at most 64 MiB and an eighth of what host_memory_limit leaves (one row at least).
void CudaBackend::ensure_download_buffers(const std::string& hint) {
    if (dl_index_.size() > 0) return;
    const int64_t chunk = std::max<int64_t>(1, std::min(kChunkBytes, host_.available() / 8) / (d_ * 8));
    dl_index_.allocate((size_t)chunk, &budget_, "row index (to host)", hint);
    dl_rows_.allocate((size_t)(chunk * d_), &budget_, "rows on their way to the host (float64)", hint);
    pinned_.allocate((size_t)(chunk * d_), &budget_, &host_, "rows on their way to the host (" + std::to_string(chunk) + " rows of d = " + std::to_string(d_) + ")");
}

// Rows src[index[0..n)] of a device array (float32, or the row buffer's `dtype`), as float64 on the
// host: converted on the device, copied through a pinned buffer a chunk at a time, and handed to
// `sink` (rows, first, count).
void CudaBackend::download_rows(const void* src, const std::vector<int32_t>& index,
                                const std::function<void(const double*, int64_t, int64_t)>& sink, collapse_dtype dtype) {
    const int64_t n = (int64_t)index.size();
    if (n == 0) return;
    ensure_download_buffers("");
    const int64_t chunk = (int64_t)dl_index_.size();
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const int64_t m = std::min(chunk, n - r0);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dl_index_.data(), index.data() + r0, (size_t)m * 4, cudaMemcpyHostToDevice, stream_));
        launch_buffer_rows_to_double(src, dtype, dl_index_.data(), m, d_, dl_rows_.data(), stream_);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(pinned_.data(), dl_rows_.data(), (size_t)(m * d_) * 8, cudaMemcpyDeviceToHost, stream_));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
        sink(pinned_.data(), r0, m);
    }
}

std::vector<double> CudaBackend::download_rows(const float* src, const std::vector<int32_t>& index, HostBudget::Lease& lease,
                                               const std::string& what) {
    if (!lease.bytes()) lease = host_.lease();
    lease.resize(add_bytes(lease.bytes(), mul_bytes((int64_t)index.size(), d_, 8)),
                 what + ": " + std::to_string(index.size()) + " rows of d = " + std::to_string(d_) + " in float64", "raise host_memory_limit");
    std::vector<double> out(index.size() * (size_t)d_);
    download_rows(src, index, [&](const double* x, int64_t first, int64_t m) { std::memcpy(out.data() + first * d_, x, (size_t)(m * d_) * 8); });
    return out;
}

// Float64 host rows to float32 device rows dst[slot[k]] (slot = row index of the [*, d] array),
// through `buf` and `idx`, allocated beforehand (load_state allocates before it changes anything).
void CudaBackend::upload_rows(const double* rows, const std::vector<int64_t>& slot, float* dst, DeviceBuffer<float>& buf,
                              DeviceBuffer<int64_t>& idx) {
    const int64_t n = (int64_t)slot.size();
    const int64_t chunk = (int64_t)idx.size();
    const HostBudget::Lease lease = host_.reserve(mul_bytes(std::min(n, chunk), d_, 4), "checkpoint rows on their way to the device (float32)");
    std::vector<float> f;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const int64_t m = std::min(chunk, n - r0);
        f.resize((size_t)(m * d_));
        for (int64_t k = 0; k < m * d_; ++k) f[(size_t)k] = (float)rows[r0 * d_ + k];
        COLLAPSE_CUDA_TRY(cudaMemcpy(buf.data(), f.data(), f.size() * 4, cudaMemcpyHostToDevice));
        COLLAPSE_CUDA_TRY(cudaMemcpy(idx.data(), slot.data() + r0, (size_t)m * 8, cudaMemcpyHostToDevice));
        const int64_t blocks = std::min<int64_t>((m * d_ + 255) / 256, 65535);
        scatter_rows_kernel<<<(unsigned)blocks, 256, 0, stream_>>>(buf.data(), idx.data(), m, d_, dst);
        COLLAPSE_CUDA_TRY(cudaGetLastError());
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
    }
}

// The exact rows of the device buffer in write_store's layout (store_offsets [V + 1], then
// store_rows [N, d] float64 class after class, each in arrival order: the sort is stable), grouped
// on the device with every class kept; false (nothing written) when that grouping does not fit the
// device budget, and the caller moves the rows to the host store instead.
bool CudaBackend::save_device_store(StateWriter& w, const std::vector<int64_t>& counts) {
    const DeviceRows rows = device_rows();
    if (DeviceClassRows::grouping_bytes(rows.n, V_, V_) > budget_.limit() - budget_.used()) return false;
    // Host: the all-classes kept set (ids, counts, slots) and the row order.
    const HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes(V_, 16), mul_bytes(rows.n, 4)),
                                                  "the order of the " + std::to_string(rows.n) + " device rows (V = " + std::to_string(V_) +
                                                      ") on their way to the checkpoint",
                                                  kFixNumClasses);
    KeptSet all;
    all.ids.resize((size_t)V_);
    all.slot.resize((size_t)V_);
    for (int64_t c = 0; c < V_; ++c) all.ids[(size_t)c] = all.slot[(size_t)c] = (int32_t)c;
    all.counts = counts;
    all.rows = rows.n;
    const DeviceClassRows grouped(res_, rows, rows.n, all);  // checks every class's rows against its count
    const std::vector<int64_t>& off = grouped.offsets();
    w.add("store_offsets", COLLAPSE_I64, {V_ + 1}, off.data(), off.size() * 8);
    w.begin_section("store_rows", COLLAPSE_F64, {off.back(), d_}, (size_t)(off.back() * d_) * 8);
    download_rows(store_.data(), grouped.order(), [&](const double* x, int64_t, int64_t m) { w.append(x, (size_t)(m * d_) * 8); }, store_dtype_);
    w.end_section();
    return true;
}

void CudaBackend::save_state(StateWriter& w) {
    DeviceGuard guard(cfg_.device_ordinal);
    // The state comes through host memory: the counts, sums and norms first (V * (d + 2) doubles),
    // counted before they are downloaded.
    const std::string vd = "V = " + std::to_string(V_) + ", d = " + std::to_string(d_);
    const HostBudget::Lease counts_lease = host_.reserve(mul_bytes(V_, 8), "the class counts of V = " + std::to_string(V_) + " on their way to the checkpoint",
                                                         kFixNumClasses);
    const std::vector<int64_t> counts = class_counts();  // syncs: every batch is in
    {
        // With the class metrics, the reference rows [V, d] (float32) and Sigma_W's scatter (d x d) too.
        const bool scatter = within_streaming_ && within_valid_;
        const HostBudget::Lease lease = host_.reserve(
            add_bytes(mul_bytes(V_, d_ + 1, 8), add_bytes(mul_bytes(V_, d_, shift_.data() ? 4 : 0), mul_bytes(d_, d_, scatter ? 8 : 0))),
            "the class sums, norms and reference rows (" + vd + ") on their way to the checkpoint", kFixNumClasses);
        std::vector<double> sums((size_t)(V_ * d_)), sq((size_t)V_), within;
        std::vector<float> shift(shift_.data() ? (size_t)(V_ * d_) : 0);
        COLLAPSE_CUDA_TRY(cudaMemcpy(sums.data(), sum_.data(), sum_.bytes(), cudaMemcpyDeviceToHost));
        COLLAPSE_CUDA_TRY(cudaMemcpy(sq.data(), sqdev_.data(), sqdev_.bytes(), cudaMemcpyDeviceToHost));
        if (!shift.empty()) COLLAPSE_CUDA_TRY(cudaMemcpy(shift.data(), shift_.data(), shift_.bytes(), cudaMemcpyDeviceToHost));
        if (scatter) within = streamed_within(counts, nullptr);
        write_shifted_state(w, host_, totals_, V_, d_, counts.data(), sums.data(), shift.empty() ? nullptr : shift.data(), sq.data(),
                            scatter ? within.data() : nullptr);
    }

    if (gram_streaming_) {
        // Classes below min_samples_per_token: all their rows are in the hold area.
        int64_t held_classes = 0, held_rows = 0;
        for (int64_t c = 0; c < V_; ++c)
            if (counts[(size_t)c] > 0 && counts[(size_t)c] < cfg_.min_samples_per_token) ++held_classes, held_rows += counts[(size_t)c];
        HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes(held_classes, 16), add_bytes(mul_bytes(held_rows, 4), mul_bytes(d_, d_, 16))),
                                                "the overall Gram (d = " + std::to_string(d_) + ", twice) and the index of " + std::to_string(held_rows) +
                                                    " held-back rows on their way to the checkpoint",
                                                "raise host_memory_limit");
        std::vector<int64_t> ids, n;
        std::vector<int32_t> index;
        ids.reserve((size_t)held_classes), n.reserve((size_t)held_classes), index.reserve((size_t)held_rows);
        for (int64_t c = 0; c < V_; ++c)
            if (counts[(size_t)c] > 0 && counts[(size_t)c] < cfg_.min_samples_per_token) {
                ids.push_back(c), n.push_back(counts[(size_t)c]);
                for (int64_t r = 0; r < counts[(size_t)c]; ++r) index.push_back((int32_t)(c * hold_rows_ + r));
            }
        const std::vector<double> held = download_rows(hold_.data(), index, lease, "the held-back rows on their way to the checkpoint");
        std::vector<double> g((size_t)(d_ * d_)), out((size_t)(d_ * d_), 0.0);
        COLLAPSE_CUDA_TRY(cudaMemcpy(g.data(), gram_.data(), gram_.bytes(), cudaMemcpyDeviceToHost));
        for (int64_t a = 0; a < d_; ++a)
            for (int64_t b = a; b < d_; ++b) out[(size_t)(a * d_ + b)] = g[(size_t)(a + b * d_)];
        add_outer_products(held.data(), (int64_t)index.size(), d_, -1.0, out.data());
        w.add("gram", COLLAPSE_F64, {d_, d_}, out.data(), out.size() * 8);
        w.add("holdback_ids", COLLAPSE_I64, {(int64_t)ids.size()}, ids.data(), ids.size() * 8);
        w.add("holdback_counts", COLLAPSE_I64, {(int64_t)n.size()}, n.data(), n.size() * 8);
        w.add("holdback_rows", COLLAPSE_F64, {(int64_t)index.size(), d_}, held.data(), held.size() * 8);
    }

    if (spread_phase_ != SpreadPhase::None) {
        // The rows go to their owner ranks, not into the state (cuda_ranks.cu).
    } else if (exact_store_ && rows_on_device() && save_device_store(w, counts)) {
        // Written from the device buffer, where the rows stay (the per-token SVD still runs there).
    } else if (exact_store_) {
        // Every row to the host store first; then written class after class, as the CPU does.
        move_store_to_host();
        write_store(w, *host_store_, V_, d_, load_budget());
    } else if (sampled_) {
        // The filled reservoir slots, class after class, a chunk of rows at a time.
        const int64_t cap = cfg_.svd_max_rows_per_token;
        const int64_t chunk = std::max<int64_t>(1, std::min(kChunkBytes, host_.available() / 8) / (d_ * 8));
        HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes(V_ + 1, 8), mul_bytes(chunk, 4)),
                                                "the reservoirs' offsets of V = " + std::to_string(V_) + " classes on their way to the checkpoint",
                                                kFixNumClasses);
        std::vector<int64_t> off((size_t)V_ + 1, 0);
        for (int64_t c = 0; c < V_; ++c) off[(size_t)c + 1] = off[(size_t)c] + std::min(counts[(size_t)c], cap);
        w.add("store_offsets", COLLAPSE_I64, {V_ + 1}, off.data(), off.size() * 8);
        w.begin_section("store_rows", COLLAPSE_F64, {off.back(), d_}, (size_t)(off.back() * d_) * 8);
        std::vector<int32_t> part;
        part.reserve((size_t)chunk);
        HostBudget::Lease rows_lease;
        auto flush = [&] {
            const std::vector<double> rows = download_rows(reservoir_.data(), part, rows_lease, "reservoir rows on their way to the checkpoint");
            w.append(rows.data(), rows.size() * 8);
            rows_lease.reset();
            part.clear();
        };
        for (int64_t c = 0; c < V_; ++c)
            for (int64_t j = 0; j < std::min(counts[(size_t)c], cap); ++j) {
                part.push_back((int32_t)(c * cap + j));
                if ((int64_t)part.size() == chunk) flush();
            }
        if (!part.empty()) flush();
        w.end_section();
    }
}

void CudaBackend::load_state(const StateReader& r, bool merge) {
    refuse_if_spread(spread_phase_ == SpreadPhase::Spread, merge ? "no checkpoint can be merged into it" : "no checkpoint can be loaded into it");
    DeviceGuard guard(cfg_.device_ordinal);
    const bool keeps_rows = (exact_store_ || sampled_) && spread_phase_ == SpreadPhase::None;  // spread: states come without rows
    const StateView v = read_state(r, V_, d_, cfg_, gram_streaming_, keeps_rows, exact_store_ ? 0 : cfg_.svd_max_rows_per_token);
    const ShiftedSections shifted = read_shifted_sections(r, V_, d_);
    // Sigma_W's scatter merges when both states have one (a resume takes the file's).
    const bool within_merge = within_streaming_ && (within_valid_ || !merge) && shifted.scatter != nullptr;

    // Everything that can fail (room on the device, downloads, allocations) comes before the first
    // change: a refused checkpoint changes nothing. The host copies are counted first, at their
    // largest: the counts before and after (2 V), the sums and norms (V (d + 1)), the Gram and its
    // addition (2 d^2), the held-back rows with their slots, and the reservoir rows with their slots
    // plus one class's merged reservoir.
    const int64_t row_bytes = (d_ + 1) * 8;
    int64_t host_bytes = add_bytes(mul_bytes(V_, 16), mul_bytes(V_, row_bytes));
    if (gram_streaming_) host_bytes = add_bytes(host_bytes, add_bytes(mul_bytes(d_, d_, 16), mul_bytes(v.holdback_total, row_bytes)));
    // The reference rows, and Sigma_W's scatter (twice) with the shifted held-back rows.
    if (shift_.data()) host_bytes = add_bytes(host_bytes, mul_bytes(V_, d_, 4));
    if (within_merge)
        host_bytes = add_bytes(add_bytes(host_bytes, merge_shifted_bytes(V_, d_, true)), add_bytes(mul_bytes(d_, d_, 16), mul_bytes(v.holdback_total, d_, 8)));
    const bool reservoir_rows = sampled_ && keeps_rows;
    if (reservoir_rows)
        host_bytes = add_bytes(host_bytes, add_bytes(mul_bytes(v.store_offsets[V_], row_bytes), mul_bytes(cfg_.svd_max_rows_per_token, d_, 8)));
    const HostBudget::Lease host_lease = host_.reserve(host_bytes, "loading " + r.description() + " through host memory (V = " + std::to_string(V_) +
                                                                       ", d = " + std::to_string(d_) + ": counts, sums, Gram, held-back and reservoir rows)",
                                                       "raise host_memory_limit");
    HostBudget::Lease mine_lease;  // this session's reservoir rows, downloaded to be merged
    std::vector<int64_t> before((size_t)V_, 0);
    if (merge) before = class_counts();
    else sync();
    // Rows for the hold area: after the rows the class already has there.
    std::vector<int64_t> hold_slot;
    std::vector<double> hold_rows;
    if (gram_streaming_) {
        const double* hr = v.holdback_rows;
        for (int64_t i = 0; i < v.holdback_classes; ++i) {
            const int64_t c = v.holdback_ids[i];
            for (int64_t k = 0; k < v.holdback_counts[i]; ++k, hr += d_)
                if (before[(size_t)c] + k < hold_rows_) {
                    hold_slot.push_back(c * hold_rows_ + before[(size_t)c] + k);
                    hold_rows.insert(hold_rows.end(), hr, hr + d_);
                }
        }
    }
    // Reservoir slots and rows; a class whose two reservoirs exceed svd_max_rows_per_token is
    // re-sampled on the host (its device rows downloaded once for all such classes).
    std::vector<int64_t> res_slot;
    std::vector<double> res_rows;
    if (reservoir_rows) {
        const int64_t cap = cfg_.svd_max_rows_per_token;
        auto mine_rows = [&](int64_t c) {
            const int64_t n = v.store_offsets[c + 1] - v.store_offsets[c], ka = std::min(before[(size_t)c], cap);
            return n > 0 && ka + n > cap ? ka : int64_t(0);
        };
        int64_t mine_total = 0;
        for (int64_t c = 0; c < V_; ++c) mine_total += mine_rows(c);
        mine_lease = host_.reserve(mul_bytes(mine_total, 4), "the index of this session's reservoir rows to merge", "raise host_memory_limit");
        std::vector<int32_t> mine_index;
        mine_index.reserve((size_t)mine_total);
        for (int64_t c = 0; c < V_; ++c)
            for (int64_t j = 0; j < mine_rows(c); ++j) mine_index.push_back((int32_t)(c * cap + j));
        const std::vector<double> mine = download_rows(reservoir_.data(), mine_index, mine_lease, "this session's reservoir rows to merge");
        const double* mp = mine.data();
        for (int64_t c = 0; c < V_; ++c) {
            const int64_t n = v.store_offsets[c + 1] - v.store_offsets[c], ka = std::min(before[(size_t)c], cap);
            if (n == 0) continue;
            const double* src = v.store_rows + v.store_offsets[c] * d_;
            if (ka + n <= cap) {
                for (int64_t j = 0; j < n; ++j) res_slot.push_back(c * cap + ka + j);
                res_rows.insert(res_rows.end(), src, src + n * d_);
                continue;
            }
            const RowVector merged = merge_reservoirs(cfg_.seed, (int32_t)c, cap, d_, mp, ka, before[(size_t)c], src, n, v.counts[c]);
            mp += ka * d_;
            for (int64_t j = 0; j < (int64_t)merged.size() / d_; ++j) res_slot.push_back(c * cap + j);
            res_rows.insert(res_rows.end(), merged.begin(), merged.end());
        }
    }
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (d_ * 4));
    const int64_t upload = std::min<int64_t>(chunk, std::max<int64_t>({1, (int64_t)hold_slot.size(), (int64_t)res_slot.size()}));
    DeviceBuffer<float> up_rows((size_t)(upload * d_), &budget_, "checkpoint rows (float32)");
    DeviceBuffer<int64_t> up_slots((size_t)upload, &budget_, "checkpoint row slots");
    // The new accumulators, prepared on the host (downloads and allocations can still fail here).
    std::vector<unsigned long long> cnt((size_t)V_);
    for (int64_t c = 0; c < V_; ++c) cnt[(size_t)c] = (unsigned long long)(before[(size_t)c] + v.counts[c]);
    std::vector<double> sums((size_t)(V_ * d_), 0.0), sq((size_t)V_, 0.0), g, within(within_merge ? (size_t)(d_ * d_) : 0, 0.0);
    std::vector<float> shift(shift_.data() ? (size_t)(V_ * d_) : 0, 0.0f);
    if (merge) {
        COLLAPSE_CUDA_TRY(cudaMemcpy(sums.data(), sum_.data(), sum_.bytes(), cudaMemcpyDeviceToHost));
        COLLAPSE_CUDA_TRY(cudaMemcpy(sq.data(), sqdev_.data(), sqdev_.bytes(), cudaMemcpyDeviceToHost));
        if (!shift.empty()) COLLAPSE_CUDA_TRY(cudaMemcpy(shift.data(), shift_.data(), shift_.bytes(), cudaMemcpyDeviceToHost));
        if (within_merge) {  // column-major upper on the device, row-major upper in merge_shifted_state
            std::vector<double> h((size_t)(d_ * d_));
            COLLAPSE_CUDA_TRY(cudaMemcpy(h.data(), within_.data(), within_.bytes(), cudaMemcpyDeviceToHost));
            for (int64_t a = 0; a < d_; ++a)
                for (int64_t b = a; b < d_; ++b) within[(size_t)(a * d_ + b)] = h[(size_t)(a + b * d_)];
        }
    }
    // The shard's sums of squares and scatter move to this session's reference rows (a class new
    // here takes the shard's), as on the CPU and in the MPI combine (core/shifted_sums.hpp).
    merge_shifted_state(host_, V_, d_, cfg_.min_samples_per_token, before.data(), v, shifted, shift.empty() ? nullptr : shift.data(), sq.data(),
                        within_merge ? within.data() : nullptr);
    if (within_merge && v.holdback_total > 0) {
        // The device scatter holds every row: the shard's held-back rows too, less their reference rows.
        std::vector<double> x((size_t)(v.holdback_total * d_));
        const double* hr = v.holdback_rows;
        double* xr = x.data();
        for (int64_t i = 0; i < v.holdback_classes; ++i) {
            const float* sc = shift.data() + v.holdback_ids[i] * d_;
            for (int64_t k = 0; k < v.holdback_counts[i]; ++k, hr += d_, xr += d_)
                for (int64_t j = 0; j < d_; ++j) xr[j] = hr[j] - (double)sc[j];
        }
        add_outer_products(x.data(), v.holdback_total, d_, 1.0, within.data());
    }
    for (size_t k = 0; k < sums.size(); ++k) sums[k] += v.sums[k];
    if (gram_streaming_) {
        // The device Gram holds every row: the file's Gram plus its held-back rows.
        std::vector<double> add((size_t)(d_ * d_), 0.0);
        g.assign((size_t)(d_ * d_), 0.0);
        for (int64_t a = 0; a < d_; ++a)
            for (int64_t b = a; b < d_; ++b) add[(size_t)(a * d_ + b)] = v.gram[a * d_ + b];
        add_outer_products(v.holdback_rows, v.holdback_total, d_, 1.0, add.data());
        if (merge) COLLAPSE_CUDA_TRY(cudaMemcpy(g.data(), gram_.data(), gram_.bytes(), cudaMemcpyDeviceToHost));
        for (int64_t a = 0; a < d_; ++a)
            for (int64_t b = a; b < d_; ++b) g[(size_t)(a + b * d_)] += add[(size_t)(a * d_ + b)];
    }
    // The exact rows go to the host store (spilling as needed), rolled back if the disk refuses.
    if (exact_store_ && keeps_rows) {
        if (merge) move_store_to_host();
        else host_store_->clear();  // a fresh session: nothing to keep
        store_held_.update(host_store_->memory_bytes());
        // Kept within the store's share of memory by load_store (it spills the rest); counted after.
        load_store(r, v, *host_store_, V_, d_);
        store_held_.update(host_store_->memory_bytes());
    }

    // Reservoirs spread over ranks: the merged samples decided from the counts, no row here
    // (cuda_ranks.cu); the last part that can be refused (host_memory_limit).
    if (sampled_ && merge && spread_phase_ == SpreadPhase::Gathering) merge_picks(v.counts, before);

    // From here on only CUDA itself can fail.
    if (exact_store_ && keeps_rows && !merge) {
        // A replaced state keeps none of the rows before it: the device row buffer empties too (a
        // merge moved them to the host store above), and its dtype is the next batch's again.
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(store_count_.data(), 0, 8, stream_));
        store_bound_ = 0;
        store_dtype_set_ = false;
    }
    COLLAPSE_CUDA_TRY(cudaMemcpy(count_.data(), cnt.data(), count_.bytes(), cudaMemcpyHostToDevice));
    COLLAPSE_CUDA_TRY(cudaMemcpy(sum_.data(), sums.data(), sum_.bytes(), cudaMemcpyHostToDevice));
    COLLAPSE_CUDA_TRY(cudaMemcpy(sqdev_.data(), sq.data(), sqdev_.bytes(), cudaMemcpyHostToDevice));
    if (!shift.empty()) COLLAPSE_CUDA_TRY(cudaMemcpy(shift_.data(), shift.data(), shift_.bytes(), cudaMemcpyHostToDevice));
    if (within_streaming_) {
        within_valid_ = within_merge;
        if (within_merge) {
            std::vector<double> h((size_t)(d_ * d_), 0.0);
            for (int64_t a = 0; a < d_; ++a)
                for (int64_t b = a; b < d_; ++b) h[(size_t)(a + b * d_)] = within[(size_t)(a * d_ + b)];
            COLLAPSE_CUDA_TRY(cudaMemcpy(within_.data(), h.data(), within_.bytes(), cudaMemcpyHostToDevice));
        }
    }
    if (!merge) totals_ = Counts{};
    add_row_counts(totals_, v.rows);
    if (gram_streaming_) {
        COLLAPSE_CUDA_TRY(cudaMemcpy(gram_.data(), g.data(), gram_.bytes(), cudaMemcpyHostToDevice));
        upload_rows(hold_rows.data(), hold_slot, hold_.data(), up_rows, up_slots);
    }
    if (reservoir_rows) upload_rows(res_rows.data(), res_slot, reservoir_.data(), up_rows, up_slots);
    COLLAPSE_CUDA_TRY(cudaDeviceSynchronize());
}

}  // namespace cuda
}  // namespace collapse::internal
