// Exact mode's spill path: when the device row buffer is full (or its dtype changes, or a checkpoint
// cannot group them on the device), its rows move to the host RowStore (through the pinned download buffers of
// cuda_checkpoint.cu), and at finalisation the kept classes' rows come back into the device row
// buffer (as float32) a group of whole classes at a time. While no row has left the device, the
// per-token SVD reads the buffer itself (token_svd_device.cu) and none of this runs.
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.hpp"

namespace collapse::internal::cuda {

// The rows in the device buffer go to the host store, grouped by class (stably: arrival order within
// a class), in chunks; the buffer is then empty. A refusal of the host store (a full disk) rolls the
// host store back and leaves the buffer as it was.
void CudaBackend::move_store_to_host() {
    sync();
    unsigned long long stored = 0;
    COLLAPSE_CUDA_TRY(cudaMemcpy(&stored, store_count_.data(), 8, cudaMemcpyDeviceToHost));
    if (stored > 0) {
        // The grouping: the stored rows' labels and order (4 + 4 bytes a row), class offsets and
        // cursors (two V-long arrays). The rows themselves are counted in store_held_ as they arrive.
        const HostBudget::Lease grouping = host_.reserve(
            add_bytes(mul_bytes((int64_t)stored, 8), mul_bytes(V_ + 1, 16)),
            "grouping the " + std::to_string(stored) + " rows of the device row buffer by class (V = " + std::to_string(V_) + ")",
            "lower device_memory_limit (the device row buffer's rows move to host memory at once); or raise host_memory_limit");
        std::vector<int32_t> labels((size_t)stored);
        COLLAPSE_CUDA_TRY(cudaMemcpy(labels.data(), store_labels_.data(), labels.size() * 4, cudaMemcpyDeviceToHost));
        std::vector<int64_t> off((size_t)V_ + 1, 0);
        for (int32_t c : labels) ++off[(size_t)c + 1];
        for (int64_t c = 0; c < V_; ++c) off[(size_t)c + 1] += off[(size_t)c];
        std::vector<int64_t> next(off.begin(), off.end() - 1);
        std::vector<int32_t> index(labels.size());
        for (size_t i = 0; i < labels.size(); ++i) index[(size_t)next[(size_t)labels[i]]++] = (int32_t)i;
        auto growth = [&] {
            int64_t add = 0;
            for (int64_t c = 0; c < V_; ++c) add += host_store_->growth((int32_t)c, off[(size_t)c + 1] - off[(size_t)c]);
            return add;
        };
        // Short of host memory as a whole (not only of the store's share): the rows in memory go to
        // disk first, as on the CPU. Before the mark (whose two V-long vectors are counted here
        // too): a flush after it may take only rows that came after it (hold_store_rows).
        store_held_.update(host_store_->memory_bytes());
        if (host_store_->memory_bytes() > 0 && !host_.fits(add_bytes(growth(), mul_bytes(V_, 16)))) {
            host_store_->spill_memory();
            store_held_.update(host_store_->memory_bytes());
        }
        const RowStore::Mark mark = host_store_->mark(growth);
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
                        hold_store_rows(host_store_->growth((int32_t)c, n));
                        dst = host_store_->append((int32_t)c, n);
                    }
                    const int64_t k = std::min(off[(size_t)c + 1], first + m) - r;
                    std::memcpy(dst + (r - off[(size_t)c]) * d_, x + (r - first) * d_, (size_t)(k * d_) * 8);
                    r += k;
                }
            }, store_dtype_);
            COLLAPSE_CUDA_TRY(cudaMemsetAsync(store_count_.data(), 0, 8, stream_));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
        } catch (...) {
            host_store_->rollback(mark);
            store_held_.update(host_store_->memory_bytes());
            throw;
        }
        store_held_.update(host_store_->memory_bytes());  // a flush may have given memory back
    }
    store_bound_ = 0;
}

// Counts `growth` more bytes of the host store's rows in memory before they are appended. When they
// do not fit beside everything else the session holds, the rows in memory (all of them complete
// classes) go to disk first. That happens only when the store's memory was empty at the mark
// (move_store_to_host spills it first when the whole move does not fit), so the flush takes only
// rows after the mark and a roll-back stays possible. A class that still does not fit is refused.
void CudaBackend::hold_store_rows(int64_t growth) {
    store_held_.update(host_store_->memory_bytes());  // make_room may have given memory back
    if (growth > 0 && host_store_->memory_bytes() > 0 && !host_.fits(growth)) {
        host_store_->spill_memory();
        store_held_.update(host_store_->memory_bytes());
    }
    store_held_.resize(add_bytes(store_held_.bytes(), growth), "the rows of the exact row store in host memory",
                       "lower device_memory_limit (the device row buffer's rows move to host memory at once), or raise host_memory_limit");
}

// The rows of the kept classes back into the device row buffer, a group of whole classes at a time:
// class t's rows at store_[offset[t] .. offset[t] + nrows[t]), and `solve_group` is called with each group
// (positions in kept) once its rows are there, before the next group is uploaded. Rows are
// converted into a pinned float32 staging buffer and uploaded a chunk at a time (one copy per class
// was the whole cost of this phase on an H200: 11,770 classes, 0.17 s).
void CudaBackend::upload_store(const KeptSet& kept, std::vector<int64_t>& offset, std::vector<int64_t>& nrows,
                               const std::function<void(const std::vector<int64_t>&)>& solve_group) {
    move_store_to_host();
    // The buffer's bytes as float32 rows (whatever dtype ingest keeps in it: it is empty now).
    float* const buffer = reinterpret_cast<float*>(store_.data());
    const int64_t room = std::min<int64_t>((int64_t)(store_.size() / (size_t)(d_ * 4)), std::max<int64_t>(kept.rows, 1));
    const int64_t K = (int64_t)kept.ids.size();
    const HostBudget::Lease members_lease =
        host_.reserve(mul_bytes(K, 8), "the upload groups of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    std::vector<int64_t> members;
    members.reserve((size_t)K);
    int64_t filled = 0, staged_from = 0;
    // At most 64 MiB, and at most an eighth of what host_memory_limit leaves (at least one row).
    const int64_t stage_bytes = std::min<int64_t>(int64_t(64) << 20, std::max<int64_t>(host_.available() + (int64_t)upload_stage_.size() * 4, 0) / 8);
    const int64_t stage_rows = std::max<int64_t>(1, stage_bytes / (d_ * 4));
    const size_t stage_size = (size_t)(std::min(stage_rows, room) * d_);
    // Kept for the next compute (pinned allocations synchronise the device); chunks stay sized
    // by this call's request, not by what an earlier one left.
    if (upload_stage_.size() < stage_size)
        upload_stage_.allocate(stage_size, &budget_, &host_, "the rows on their way back to the device (float32)",
                               "raise host_memory_limit");
    float* const stage = upload_stage_.data();
    const int64_t stage_cap = (int64_t)stage_size / d_;
    auto upload = [&] {
        if (filled > staged_from)
            COLLAPSE_CUDA_TRY(cudaMemcpy(buffer + staged_from * d_, stage, (size_t)((filled - staged_from) * d_) * 4,
                                         cudaMemcpyHostToDevice));
        staged_from = filled;
    };
    auto solve = [&] {
        upload();
        if (!members.empty()) solve_group(members);
        members.clear();
        filled = staged_from = 0;
    };
    // Spilled rows come back a class (or a piece of one) at a time within a sixth of what the
    // budget leaves; the store counts its read-back buffer itself.
    const int64_t load = load_budget();
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
            members.push_back(t);
        }
        for (int64_t r = 0; r < n;) {
            if (filled - staged_from == stage_cap) upload();
            const int64_t k = std::min(n - r, stage_cap - (filled - staged_from));
            float* dst = stage + (filled - staged_from) * d_;
            for (int64_t j = 0; j < k * d_; ++j) dst[j] = (float)x[r * d_ + j];
            filled += k, r += k;
        }
    });
    solve();
}

}  // namespace collapse::internal::cuda
