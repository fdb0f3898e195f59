// The exact per-token SVD on the device, from the rows the exact mode keeps in the device row buffer
// (issue 11): no host round trip of rows, and no allocation per group. Algorithm in
// token_svd_device.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "collapse/collapse.h"
#include "core/backend.hpp"
#include "core/host_budget.hpp"
#include "core/metrics.hpp"
#include "resources.cuh"

namespace collapse::internal::cuda {

// Rows of the device row buffer as they were ingested: float16 / bfloat16 rows kept as they came
// (exact at 2 bytes), every other input as float32 (ingest_kernels.cu, place_rows).
struct DeviceRows {
    const void* data = nullptr;       // [n, d] in dtype
    collapse_dtype dtype = COLLAPSE_F32;  // F32, F16 or BF16
    const int32_t* labels = nullptr;  // [n] class ids
    int64_t n = 0, d = 0;
};

// The dtype the device row buffer keeps rows of a batch of `input` in.
inline collapse_dtype row_buffer_dtype(collapse_dtype input) {
    return input == COLLAPSE_F16 || input == COLLAPSE_BF16 ? input : COLLAPSE_F32;
}
inline int64_t row_buffer_elem_bytes(collapse_dtype t) { return t == COLLAPSE_F32 ? 4 : 2; }

// dst [rows, d] (float64) = src[index[r]] (index null: row r) converted from the buffer's dtype.
void launch_buffer_rows_to_double(const void* src, collapse_dtype dtype, const int32_t* index, int64_t rows, int64_t d, double* dst,
                                  cudaStream_t s);

// The device-resident rows grouped by kept class for one compute: every lease is the session's
// pool's, used on res.stream() only, and lives as long as this object (one compute).
class DeviceClassRows {
public:
    // Sorts the row indices by kept slot on the device; the per-class offsets come back (K + 1
    // integers) and must equal kept.counts (every kept row is on the device), else COLLAPSE_ERR_INTERNAL.
    // Its row-long leases are sized for max_rows (the buffer's capacity), not rows.n, so that the
    // next compute, with more rows, reuses the same pool slabs.
    DeviceClassRows(Resources& res, const DeviceRows& rows, int64_t max_rows, const KeptSet& kept);
    // Bytes of device memory the grouping takes for max_rows rows, V classes (its sort included).
    static int64_t grouping_bytes(int64_t max_rows, int64_t V, int64_t K);

    // Per-token SVD entropies into tokens[t] and out (svd_zero_matrices), centred on mu [K, d]
    // (kept order, device) when `center`. Returns false, having changed nothing, when its
    // workspace does not fit the device budget, and throws COLLAPSE_ERR_OUT_OF_MEMORY, having
    // changed nothing, when a solver's workspace (not in that estimate) does not: the caller takes
    // the host path either way.
    bool token_entropies(bool center, const double* mu, std::vector<TokenMetrics>& tokens, MetricValues& out);
    // The within-class scatter sum_kept (x - mu_c)(x - mu_c)^T [d, d] (row-major, both triangles).
    std::vector<double> within_scatter(const double* mu);
    // Class t's rows are order[offsets()[t] .. offsets()[t + 1]) (a checkpoint writes every class:
    // kept = all V classes, slot = id). order() downloads the first offsets().back() entries; the
    // caller counts them (4 bytes a row).
    const std::vector<int64_t>& offsets() const { return host_offset_; }
    std::vector<int32_t> order() const;

private:
    Resources& res_;
    DeviceRows rows_;
    const KeptSet& kept_;
    int64_t K_ = 0;
    Lease<int32_t> order_;        // [n] row indices, by kept slot (stable: arrival order within a class)
    Lease<int32_t> keys_sorted_;  // [n] the kept slot of order_[i] (K: not kept)
    Lease<int64_t> offset_;       // [K + 1] class t's rows: order_[offset_[t] .. offset_[t + 1])
    HostBudget::Lease host_lease_;  // host_offset_
    std::vector<int64_t> host_offset_;
};

}  // namespace collapse::internal::cuda
