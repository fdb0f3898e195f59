// The exact per-token SVD on the device (issue 11), from the rows the exact mode keeps in the device
// row buffer (fp16/bf16 rows as they came, other inputs as float32), with no host round trip of rows:
//
//   1. group: key = kept slot of each row's label (K for classes not kept), CUB radix sort of
//      (key, row index) on ceil(log2(K + 1)) bits (stable: arrival order within a class), and the
//      class offsets by a binary search per class in the sorted keys. The K + 1 offsets come back
//      to the host (to plan the size buckets) and must equal the kept counts: every kept row is on
//      the device, or this path is not taken.
//   2. per size bucket M (a power of two >= min(n_c, d), the sizes eigen_solvers.cu was tested with):
//      classes with n_c <= d: their rows gathered into float64 [cnt, M, d] blocks, zero past n_c
//      (centred on mu_c with svd_center), then one cublasDgemmStridedBatched gives the cnt Grams
//      X X^T (M x M, zero-padded); classes with n_c > d: X^T X (d x d in an M x M slot) by
//      cublasDsyrk over pieces of rows. Float64 products of exactly converted rows: the accuracy of
//      the host path (docs/METRICS.md, "Accuracy contract").
//   3. eigenvalues_batched (syevjBatched up to 32, XsyevBatched beyond), then one thread per class
//      reduces its eigenvalues to the entropy (entropy_from_eigen, core/metric_math.hpp: the host's
//      formula and summation order) into [K] results; only those come back.
// Every workspace is a pool lease (resources.cuh) sized once per compute from the plan and the free
// device budget (at most 256 MiB each); a plan that does not fit leaves the host path to do it.
#include "token_svd_device.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <map>
#include <string>
#include <utility>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/host_budget.hpp"
#include "core/metric_math.hpp"
#include "core/metric_summary.hpp"
#include "cuda_check.hpp"
#include "eigen_solvers.cuh"

namespace collapse::internal::cuda {

namespace {

constexpr int64_t kWorkspaceCap = int64_t(256) << 20;  // bytes per workspace (gather, Grams)
constexpr int64_t kMaxBatch = 65535;                    // matrices per batched call (the solvers' limit)

int radix_bits(int64_t max_key) {
    int b = 1;
    while (b < 31 && (int64_t(1) << b) <= max_key) ++b;
    return b;
}

int blocks_for(int64_t work, int threads, int64_t cap = 1 << 20) {
    return (int)std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, cap));
}

// Gram size of a class of n rows: a power of two >= min(n, d), at least 2 (as class_spectra).
int64_t gram_size(int64_t n, int64_t d) {
    const int64_t m = std::min(n, d);
    int64_t M = 2;
    while (M < m) M *= 2;
    return M;
}

__device__ __forceinline__ double buffer_elem(const void* p, collapse_dtype t, int64_t i) {
    switch (t) {
        case COLLAPSE_F16: return (double)half_to_float(static_cast<const uint16_t*>(p)[i]);
        case COLLAPSE_BF16: return (double)bf16_to_float(static_cast<const uint16_t*>(p)[i]);
        default: return (double)static_cast<const float*>(p)[i];
    }
}

__global__ void slot_keys_kernel(const int32_t* labels, int64_t n, const int32_t* slot, int64_t V, int32_t K, int32_t* keys,
                                 int32_t* vals) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int32_t c = labels[i];
        const int32_t t = (c >= 0 && c < V) ? slot[c] : -1;
        keys[i] = t >= 0 ? t : K;
        vals[i] = (int32_t)i;
    }
}

// off[t] = first position of key t in the sorted keys (t = 0..K; off[K] = the kept rows).
__global__ void class_offsets_kernel(const int32_t* keys, int64_t n, int64_t K, int64_t* off) {
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t <= K; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t lo = 0, hi = n;
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (keys[mid] < t) lo = mid + 1;
            else hi = mid;
        }
        off[t] = lo;
    }
}

// dst [cnt, rows_per, d] (float64): block i holds rows row0 .. row0 + rows_per of class plan[i]
// (zero past the class's end), minus mu[plan[i]] when mu is given.
__global__ void gather_class_rows_kernel(DeviceRows x, const int32_t* order, const int64_t* off, const int32_t* plan, int64_t cnt,
                                         int64_t row0, int64_t rows_per, const double* mu, double* dst) {
    const int64_t d = x.d, total = cnt * rows_per * d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t k = e % d, j = (e / d) % rows_per, i = e / (d * rows_per);
        const int64_t t = plan[i], r = row0 + j;
        double v = 0.0;
        if (r < off[t + 1] - off[t]) {
            v = buffer_elem(x.data, x.dtype, (int64_t)order[off[t] + r] * d + k);
            if (mu) v -= mu[t * d + k];
        }
        dst[e] = v;
    }
}

// dst [m, d] (float64): sorted rows p0 .. p0 + m, each minus its class mean mu[keys[p]].
__global__ void gather_sorted_rows_kernel(DeviceRows x, const int32_t* order, const int32_t* keys, int64_t p0, int64_t m,
                                          const double* mu, double* dst) {
    const int64_t d = x.d;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < m * d; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = p0 + e / d, k = e % d;
        dst[e] = buffer_elem(x.data, x.dtype, (int64_t)order[p] * d + k) - mu[(int64_t)keys[p] * d + k];
    }
}

// One thread per class of the call: its entropy from its eigenvalues w [cnt, M] (ascending).
__global__ void entropies_kernel(const double* w, const int* info, const int32_t* plan, int64_t cnt, int64_t M, const int64_t* off,
                                 int64_t d, double* ent, int* zero, int* infos) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < cnt; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = plan[i], n = off[t + 1] - off[t];
        bool z = false;
        ent[t] = entropy_from_eigen(w + i * M, M, n < d ? n : d, &z);
        zero[t] = z ? 1 : 0;
        infos[t] = info[i];
    }
}

__global__ void buffer_rows_to_double_kernel(const void* src, collapse_dtype dtype, const int32_t* index, int64_t rows, int64_t d,
                                             double* dst) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < rows * d; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / d, k = e % d;
        dst[e] = buffer_elem(src, dtype, (index ? (int64_t)index[r] : r) * d + k);
    }
}

}  // namespace

void launch_buffer_rows_to_double(const void* src, collapse_dtype dtype, const int32_t* index, int64_t rows, int64_t d, double* dst,
                                  cudaStream_t s) {
    if (rows * d == 0) return;
    buffer_rows_to_double_kernel<<<blocks_for(rows * d, 256), 256, 0, s>>>(src, dtype, index, rows, d, dst);
    COLLAPSE_CUDA_CHECK_LAUNCH();
}

namespace {

size_t sort_bytes_for(int64_t n, int64_t K) {
    size_t bytes = 0;
    COLLAPSE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const int32_t*)nullptr, (int32_t*)nullptr, (const int32_t*)nullptr,
                                                      (int32_t*)nullptr, (int)std::max<int64_t>(n, 1), 0, radix_bits(K)));
    return std::max<size_t>(bytes, 1);
}

}  // namespace

int64_t DeviceClassRows::grouping_bytes(int64_t max_rows, int64_t V, int64_t K) {
    return add_bytes(add_bytes(mul_bytes(max_rows, 16), mul_bytes(V, 4)), add_bytes(mul_bytes(K + 1, 8), (int64_t)sort_bytes_for(max_rows, K)));
}

DeviceClassRows::DeviceClassRows(Resources& res, const DeviceRows& rows, int64_t max_rows, const KeptSet& kept)
    : res_(res), rows_(rows), kept_(kept), K_((int64_t)kept.ids.size()) {
    cudaStream_t s = res.stream();
    const int64_t n = rows.n, V = (int64_t)kept.slot.size(), K = K_;
    max_rows = std::max(max_rows, n);
    if (max_rows > INT32_MAX || K >= INT32_MAX)
        fail(COLLAPSE_ERR_INTERNAL, "the device row buffer holds ", n, " rows of ", K, " kept classes: more than 2^31 - 1");
    host_lease_ = res.host().reserve(mul_bytes(K + 1, 8), "the per-class offsets of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    host_offset_.assign((size_t)K + 1, 0);
    order_ = res.take<int32_t>((size_t)max_rows, "per-token SVD: row order by class");
    keys_sorted_ = res.take<int32_t>((size_t)max_rows, "per-token SVD: sorted class keys");
    offset_ = res.take<int64_t>((size_t)K + 1, "per-token SVD: class offsets");
    if (n > 0) {
        Lease<int32_t> slot = res.take<int32_t>((size_t)V, "per-token SVD: kept slots [V]");
        Lease<int32_t> keys = res.take<int32_t>((size_t)max_rows, "per-token SVD: class keys"),
                       vals = res.take<int32_t>((size_t)max_rows, "per-token SVD: row indices");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(slot.data(), kept.slot.data(), (size_t)V * 4, cudaMemcpyHostToDevice, s));
        slot_keys_kernel<<<blocks_for(n, 256), 256, 0, s>>>(rows.labels, n, slot.data(), V, (int32_t)K, keys.data(), vals.data());
        COLLAPSE_CUDA_CHECK_LAUNCH();
        // The workspace for max_rows (the same slab every compute); n rows never need more.
        size_t sort_bytes = sort_bytes_for(n, K);
        Lease<uint8_t> temp = res.take<uint8_t>(std::max(sort_bytes, sort_bytes_for(max_rows, K)), "per-token SVD: sort workspace");
        sort_bytes = temp.size();
        COLLAPSE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp.data(), sort_bytes, keys.data(), keys_sorted_.data(), vals.data(), order_.data(),
                                                          (int)n, 0, radix_bits(K), s));
        class_offsets_kernel<<<blocks_for(K + 1, 256), 256, 0, s>>>(keys_sorted_.data(), n, K, offset_.data());
        COLLAPSE_CUDA_CHECK_LAUNCH();
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(host_offset_.data(), offset_.data(), (size_t)(K + 1) * 8, cudaMemcpyDeviceToHost, s));
        // `slot` (read by the kernel above) goes back to the pool after this sync: stream order.
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    } else if (K > 0) {
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(offset_.data(), 0, offset_.bytes(), s));
    }
    for (int64_t t = 0; t < K; ++t) {
        const int64_t got = host_offset_[(size_t)t + 1] - host_offset_[(size_t)t];
        if (got != kept.counts[(size_t)t])
            fail(COLLAPSE_ERR_INTERNAL, "the device row buffer holds ", got, " rows of token ", kept.ids[(size_t)t], ", its class count is ",
                 kept.counts[(size_t)t]);
    }
}

bool DeviceClassRows::token_entropies(bool center, const double* mu, std::vector<TokenMetrics>& tokens, MetricValues& out) {
    cudaStream_t s = res_.stream();
    const int64_t K = K_, d = rows_.d;
    if (K == 0) return true;
    // The plan: kept slots bucketed by (tall, M), short classes first. Host: the plan, its buckets
    // (a map node each) and the K results on their way back.
    const HostBudget::Lease plan_lease = res_.host().reserve(mul_bytes(K, 4 + 8 + 4 + 4 + 64),
                                                             "the per-token SVD plan of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    std::map<std::pair<bool, int64_t>, std::vector<int32_t>> buckets;
    auto rows_of = [&](int64_t t) { return host_offset_[(size_t)t + 1] - host_offset_[(size_t)t]; };
    for (int64_t t = 0; t < K; ++t) buckets[{rows_of(t) > d, gram_size(rows_of(t), d)}].push_back((int32_t)t);
    std::vector<int32_t> plan;
    plan.reserve((size_t)K);
    int64_t gather_min = d, gather_need = 0, gram_min = 0, gram_need = 0;
    for (const auto& [key, members] : buckets) {
        const auto [tall, M] = key;
        const int64_t cnt = (int64_t)members.size();
        if (!tall) {
            gather_min = std::max(gather_min, M * d);
            gather_need += cnt * M * d;
        } else {
            for (int32_t t : members) gather_need += rows_of(t) * d;
        }
        gram_min = std::max(gram_min, M * M), gram_need += cnt * M * M;
        plan.insert(plan.end(), members.begin(), members.end());
    }
    // Workspaces: each what the plan needs rounded up to a power of two of at least 16 MiB (a
    // later compute with more rows then reuses the same pool slab), within 256 MiB and a quarter
    // of the free budget, and at least one class's.
    const Budget& budget = res_.budget();
    const int64_t share = std::min(kWorkspaceCap, (budget.limit() - budget.used()) / 4) / 8;
    auto workspace = [&](int64_t at_least, int64_t need) {
        int64_t e = int64_t(2) << 20;
        while (e < need && e < share) e *= 2;
        return std::max(at_least, std::min(e, share));
    };
    const int64_t gather_elems = workspace(gather_min, gather_need);
    const int64_t gram_elems = workspace(gram_min, gram_need);
    auto per_call = [&](bool tall, int64_t M, int64_t cnt) {
        int64_t per = std::min({cnt, gram_elems / (M * M), kMaxBatch});
        if (!tall) per = std::min(per, gather_elems / (M * d));
        return std::max<int64_t>(per, 1);
    };
    int64_t w_elems = 0, info_elems = 0;
    for (const auto& [key, members] : buckets) {
        const int64_t per = per_call(key.first, key.second, (int64_t)members.size());
        w_elems = std::max(w_elems, per * key.second), info_elems = std::max(info_elems, per);
    }
    w_elems = (int64_t)reusable_bytes(budget, (size_t)w_elems * 8, size_t(64) << 10) / 8;
    info_elems = (int64_t)reusable_bytes(budget, (size_t)info_elems * 4, size_t(16) << 10) / 4;
    const int64_t need = add_bytes(mul_bytes(gather_elems + gram_elems + w_elems + K, 8), mul_bytes(info_elems + 3 * K, 4));
    if (need > budget.limit() - budget.used()) return false;

    Lease<double> gather = res_.take<double>((size_t)gather_elems, "per-token SVD: gathered rows (float64)");
    Lease<double> gram = res_.take<double>((size_t)gram_elems, "per-token SVD: per-class Grams");
    Lease<double> w = res_.take<double>((size_t)w_elems, "per-token SVD: eigenvalues");
    Lease<int> info = res_.take<int>((size_t)info_elems, "per-token SVD: solver info");
    Lease<int32_t> plan_dev = res_.take<int32_t>((size_t)K, "per-token SVD: plan");
    Lease<double> ent = res_.take<double>((size_t)K, "per-token SVD: entropies");
    Lease<int> zero = res_.take<int>((size_t)K, "per-token SVD: zero flags"), infos = res_.take<int>((size_t)K, "per-token SVD: solver info");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(plan_dev.data(), plan.data(), (size_t)K * 4, cudaMemcpyHostToDevice, s));
    const double* ctr = center ? mu : nullptr;
    const double one = 1.0, zero_d = 0.0;
    int64_t first = 0;  // the bucket's first position in the plan
    for (const auto& [key, members] : buckets) {
        const auto [tall, M] = key;
        const int64_t count = (int64_t)members.size(), per = per_call(tall, M, count);
        for (int64_t c0 = 0; c0 < count; c0 += per) {
            const int64_t cnt = std::min(per, count - c0);
            const int32_t* pl = plan_dev.data() + first + c0;
            if (!tall) {
                gather_class_rows_kernel<<<blocks_for(cnt * M * d, 256), 256, 0, s>>>(rows_, order_.data(), offset_.data(), pl, cnt, 0, M, ctr,
                                                                                       gather.data());
                COLLAPSE_CUDA_CHECK_LAUNCH();
                // Block i is the column-major d x M matrix A_i = X_i^T: A_i^T A_i = X_i X_i^T.
                COLLAPSE_CUBLAS_TRY(cublasDgemmStridedBatched(res_.blas(s), CUBLAS_OP_T, CUBLAS_OP_N, (int)M, (int)M, (int)d, &one, gather.data(),
                                                              (int)d, M * d, gather.data(), (int)d, M * d, &zero_d, gram.data(), (int)M, M * M,
                                                              (int)cnt));
            } else {
                // d x d Grams in M x M slots: the padding stays zero.
                COLLAPSE_CUDA_TRY(cudaMemsetAsync(gram.data(), 0, (size_t)(cnt * M * M) * 8, s));
                const int64_t piece = gather_elems / d;
                for (int64_t i = 0; i < cnt; ++i) {
                    const int64_t nt = rows_of(plan[(size_t)(first + c0 + i)]);
                    for (int64_t r0 = 0; r0 < nt; r0 += piece) {
                        const int64_t m = std::min(piece, nt - r0);
                        gather_class_rows_kernel<<<blocks_for(m * d, 256), 256, 0, s>>>(rows_, order_.data(), offset_.data(), pl + i, 1, r0, m, ctr,
                                                                                         gather.data());
                        COLLAPSE_CUDA_CHECK_LAUNCH();
                        // The column-major d x m matrix A = X^T: A A^T = X^T X (upper triangle).
                        COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d, (int)m, &one, gather.data(), (int)d,
                                                        r0 == 0 ? &zero_d : &one, gram.data() + i * M * M, (int)M));
                    }
                }
            }
            eigenvalues_batched(res_, gram.data(), M, cnt, w.data(), info.data(), s);
            entropies_kernel<<<blocks_for(cnt, 128), 128, 0, s>>>(w.data(), info.data(), pl, cnt, M, offset_.data(), d, ent.data(), zero.data(),
                                                                  infos.data());
            COLLAPSE_CUDA_CHECK_LAUNCH();
        }
        first += count;
    }
    std::vector<double> h_ent((size_t)K);
    std::vector<int> h_zero((size_t)K), h_info((size_t)K);
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h_ent.data(), ent.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h_zero.data(), zero.data(), (size_t)K * 4, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h_info.data(), infos.data(), (size_t)K * 4, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    for (int64_t t = 0; t < K; ++t)
        if (h_info[(size_t)t] != 0)
            fail(COLLAPSE_ERR_INTERNAL, "batched eigen-solver failed for token ", kept_.ids[(size_t)t], " (info = ", h_info[(size_t)t],
                 ", Gram size ", gram_size(rows_of(t), d), ")");
    for (int64_t t = 0; t < K; ++t) token_from_entropy(h_ent[(size_t)t], h_zero[(size_t)t] != 0, rows_of(t), d, tokens[(size_t)t], out);
    return true;
}

std::vector<int32_t> DeviceClassRows::order() const {
    std::vector<int32_t> h((size_t)host_offset_.back());
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h.data(), order_.data(), h.size() * 4, cudaMemcpyDeviceToHost, res_.stream()));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(res_.stream()));
    return h;
}

std::vector<double> DeviceClassRows::within_scatter(const double* mu) {
    cudaStream_t s = res_.stream();
    const int64_t d = rows_.d, kept_rows = host_offset_.back();
    const Budget& budget = res_.budget();
    // Pieces of rows: what the rows need rounded up to a power of two of at least 16 MiB (the same
    // pool slab for the next compute), within 256 MiB and a quarter of the free budget, one row at least.
    const int64_t share = std::min(kWorkspaceCap, std::max<int64_t>(0, budget.limit() - budget.used() - d * d * 8) / 4) / 8;
    int64_t elems = int64_t(2) << 20;
    while (elems < kept_rows * d && elems < share) elems *= 2;
    const int64_t piece = std::max<int64_t>(1, std::min(elems, share) / d);
    Lease<double> g = res_.take<double>((size_t)(d * d), "Sigma_W's scatter d x d");
    Lease<double> x = res_.take<double>((size_t)(piece * d), "Sigma_W's centred rows (float64)", "raise device_memory_limit");
    const double one = 1.0, zero = 0.0;
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(g.data(), 0, g.bytes(), s));
    for (int64_t p0 = 0; p0 < kept_rows; p0 += piece) {
        const int64_t m = std::min(piece, kept_rows - p0);
        gather_sorted_rows_kernel<<<blocks_for(m * d, 256), 256, 0, s>>>(rows_, order_.data(), keys_sorted_.data(), p0, m, mu, x.data());
        COLLAPSE_CUDA_CHECK_LAUNCH();
        COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d, (int)m, &one, x.data(), (int)d,
                                        p0 == 0 ? &zero : &one, g.data(), (int)d));
    }
    std::vector<double> w((size_t)(d * d));  // the caller counts it (within_scatter's result)
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w.data(), g.data(), g.bytes(), cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    // Column-major upper (i <= j at i + j d) to row-major, both triangles.
    for (int64_t j = 0; j < d; ++j)
        for (int64_t i = 0; i < j; ++i) w[(size_t)(j + i * d)] = w[(size_t)(i + j * d)];
    return w;
}

}  // namespace collapse::internal::cuda
