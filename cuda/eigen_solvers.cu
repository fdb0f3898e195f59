// Eigen-solver selection by matrix size, and the per-token SVD entropies of groups of classes
// (eigen_solvers.cuh).
#include "eigen_solvers.cuh"

#include <algorithm>
#include <map>
#include <memory>
#include <type_traits>

#include "base/error.hpp"
#include "core/metric_summary.hpp"
#include "cuda_check.hpp"
#include "kernels.cuh"

namespace collapse::internal::cuda {

std::vector<double> eigenvalues_sym(Resources& res, double* a, int64_t n, cudaStream_t s) {
    Lease<double> w = res.take<double>((size_t)n, "eigenvalues");
    Lease<int> info = res.take<int>(1, "solver info");
    cusolverDnHandle_t solver = res.solver(s);
    size_t dev_bytes = 0, host_bytes = 0;
    COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevd_bufferSize(solver, res.solver_params(), CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                      CUDA_R_64F, a, n, CUDA_R_64F, w.data(), CUDA_R_64F, &dev_bytes,
                                                      &host_bytes));
    Lease<uint8_t> work = res.take<uint8_t>(std::max<size_t>(dev_bytes, 1), "eigen-solver workspace");
    // The solver's host workspace and the n eigenvalues (returned: the caller holds them briefly).
    const HostBudget::Lease lease = res.host().reserve(add_bytes((int64_t)std::max<size_t>(host_bytes, 1), mul_bytes(n, 8)),
                                                       "the eigen-solver's host workspace for a Gram of size " + std::to_string(n),
                                                       "raise host_memory_limit");
    std::vector<uint8_t> host_work(std::max<size_t>(host_bytes, 1));
    COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevd(solver, res.solver_params(), CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, n, CUDA_R_64F,
                                           a, n, CUDA_R_64F, w.data(), CUDA_R_64F, work.data(), dev_bytes,
                                           host_work.data(), host_bytes, info.data()));
    std::vector<double> out((size_t)n);
    int h_info = 0;
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(out.data(), w.data(), (size_t)n * 8, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(&h_info, info.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    if (h_info != 0) fail(COLLAPSE_ERR_INTERNAL, "cusolverDnXsyevd failed with info = ", h_info, " (n = ", n, ")");
    return out;
}

// Solver by size: syevjBatched up to 32, XsyevBatched beyond (Xsyevd one at a time only past its
// int32 extent).
void eigenvalues_batched(Resources& res, double* gram, int64_t M, int64_t cnt, double* w, int* info, cudaStream_t s) {
    if (M <= 32) {
        syevjInfo_t params = nullptr;
        COLLAPSE_CUSOLVER_TRY(cusolverDnCreateSyevjInfo(&params));
        std::unique_ptr<std::remove_pointer_t<syevjInfo_t>, decltype(&cusolverDnDestroySyevjInfo)> params_owner(
            params, &cusolverDnDestroySyevjInfo);
        cusolverDnHandle_t solver = res.solver(s);
        int lwork = 0;
        COLLAPSE_CUSOLVER_TRY(cusolverDnDsyevjBatched_bufferSize(solver, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER,
                                                                 (int)M, gram, (int)M, w, &lwork, params, (int)cnt));
        Lease<double> work = res.take<double>(reusable_bytes(res.budget(), (size_t)std::max(lwork, 1) * 8, size_t(1) << 20) / 8, "syevj workspace");
        COLLAPSE_CUSOLVER_TRY(cusolverDnDsyevjBatched(solver, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, (int)M,
                                                      gram, (int)M, w, work.data(), lwork, info, params,
                                                      (int)cnt));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    } else if (M * M <= INT32_MAX) {
        // XsyevBatched at every larger size (CUDA 13: no size limit, but n * lda * batch within
        // int32): sub-batches of that many matrices, one workspace sized for the largest, one sync.
        const int64_t per = std::max<int64_t>(1, std::min<int64_t>(cnt, INT32_MAX / (M * M)));
        cusolverDnHandle_t solver = res.solver(s);
        size_t dev_bytes = 0, host_bytes = 0;
        COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevBatched_bufferSize(solver, res.solver_params(), CUSOLVER_EIG_MODE_NOVECTOR,
                                                                CUBLAS_FILL_MODE_UPPER, M, CUDA_R_64F, gram, M, CUDA_R_64F,
                                                                w, CUDA_R_64F, &dev_bytes, &host_bytes, per));
        Lease<uint8_t> work = res.take<uint8_t>(reusable_bytes(res.budget(), std::max<size_t>(dev_bytes, 1), size_t(1) << 20), "syevBatched workspace");
        const HostBudget::Lease lease = res.host().reserve((int64_t)std::max<size_t>(host_bytes, 1),
                                                           "the batched eigen-solver's host workspace (Gram size " + std::to_string(M) + ")",
                                                           "raise host_memory_limit");
        std::vector<uint8_t> hw(std::max<size_t>(host_bytes, 1));
        for (int64_t i0 = 0; i0 < cnt; i0 += per) {
            const int64_t n = std::min(per, cnt - i0);
            COLLAPSE_CUSOLVER_TRY(cusolverDnXsyevBatched(solver, res.solver_params(), CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_UPPER, M,
                                                         CUDA_R_64F, gram + i0 * M * M, M, CUDA_R_64F, w + i0 * M, CUDA_R_64F, work.data(),
                                                         dev_bytes, hw.data(), host_bytes, info + i0, n));
        }
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));  // before hw goes
    } else {
        // Beyond XsyevBatched's int32 extent (M > 46340): one at a time (Xsyevd's failure throws).
        COLLAPSE_CUDA_TRY(cudaMemsetAsync(info, 0, (size_t)cnt * sizeof(int), s));
        for (int64_t i = 0; i < cnt; ++i) {
            Lease<double> one = res.take<double>((size_t)(M * M), "large class Gram");
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(one.data(), gram + i * M * M, (size_t)(M * M) * 8, cudaMemcpyDeviceToDevice, s));
            const std::vector<double> e = eigenvalues_sym(res, one.data(), M, s);
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(w + i * M, e.data(), (size_t)M * 8, cudaMemcpyHostToDevice, s));
        }
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    }
}

// Classes grouped by Gram size M (a power of two >= min(n, d)), each group a handful of batched calls.
void class_spectra(Resources& res, int64_t d, bool center, const float* rows, const int32_t* index,
                   const std::vector<int64_t>& todo, const std::vector<int64_t>& offset, const std::vector<int64_t>& nrows,
                   const KeptSet& kept, const double* mu, std::vector<TokenMetrics>& tokens, MetricValues& out) {
    cudaStream_t s = res.stream();
    // The grouping (a map node per size and an id per class) and, per batched call, the classes'
    // ranges and eigenvalues: the largest call holds at most 256 MiB of Grams on the device, whose
    // eigenvalues are a sliver of that.
    const HostBudget::Lease groups_lease = res.host().reserve(mul_bytes((int64_t)todo.size(), 8 + 64),
                                                              "the per-token solver groups of " + std::to_string(todo.size()) + " classes",
                                                              kFixKeptClasses);
    std::map<int64_t, std::vector<int64_t>> groups;
    for (int64_t t : todo) {
        const int64_t m = std::min(nrows[(size_t)t], d);
        int64_t M = 2;
        while (M < m) M *= 2;
        groups[M].push_back(t);
    }
    for (const auto& [M, members] : groups) {
        // At most 65535 matrices per call: the grid's z limit and the batched solvers' limit.
        const int64_t per = std::max<int64_t>(1, std::min<int64_t>({(int64_t)members.size(), (int64_t(256) << 20) / (M * M * 8), int64_t(65535)}));
        for (size_t g0 = 0; g0 < members.size(); g0 += (size_t)per) {
            const int64_t cnt = std::min<int64_t>(per, (int64_t)(members.size() - g0));
            const HostBudget::Lease call_lease = res.host().reserve(mul_bytes(cnt, 8 + 8 + 4 + 4 + 8 * M),
                                                                    "the ranges and eigenvalues of " + std::to_string(cnt) + " per-class Grams of size " +
                                                                        std::to_string(M),
                                                                    kFixTokenSvd);
            std::vector<int64_t> off((size_t)cnt), nn((size_t)cnt);
            std::vector<int32_t> ctr((size_t)cnt);
            for (int64_t i = 0; i < cnt; ++i) {
                const int64_t t = members[g0 + (size_t)i];
                off[(size_t)i] = offset[(size_t)t], nn[(size_t)i] = nrows[(size_t)t];
                ctr[(size_t)i] = center ? (int32_t)t : -1;
            }
            Lease<int64_t> doff = res.take<int64_t>((size_t)cnt, "class offsets"), dn = res.take<int64_t>((size_t)cnt, "class sizes");
            Lease<int32_t> dctr = res.take<int32_t>((size_t)cnt, "class centres");
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(doff.data(), off.data(), (size_t)cnt * 8, cudaMemcpyHostToDevice, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dn.data(), nn.data(), (size_t)cnt * 8, cudaMemcpyHostToDevice, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(dctr.data(), ctr.data(), (size_t)cnt * 4, cudaMemcpyHostToDevice, s));
            Lease<double> gram = res.take<double>((size_t)(cnt * M * M), "per-class Gram batch");
            Lease<double> w = res.take<double>((size_t)(cnt * M), "per-class eigenvalues");
            launch_class_gram(rows, index, doff.data(), dn.data(), dctr.data(), mu, cnt, d, M, gram.data(), s);
            Lease<int> info = res.take<int>((size_t)cnt, "solver info");
            eigenvalues_batched(res, gram.data(), M, cnt, w.data(), info.data(), s);
            std::vector<double> hw((size_t)(cnt * M));
            std::vector<int> hinfo((size_t)cnt, 0);
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hw.data(), w.data(), hw.size() * 8, cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hinfo.data(), info.data(), hinfo.size() * sizeof(int), cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            for (int64_t i = 0; i < cnt; ++i)
                if (hinfo[(size_t)i] != 0)
                    fail(COLLAPSE_ERR_INTERNAL, "batched eigen-solver failed for token ", kept.ids[(size_t)members[g0 + (size_t)i]],
                         " (info = ", hinfo[(size_t)i], ", Gram size ", M, ")");
            for (int64_t i = 0; i < cnt; ++i) {
                const int64_t t = members[g0 + (size_t)i];
                const int64_t r = std::min(nrows[(size_t)t], d);
                token_from_spectrum(singular_values_from_eigen(hw.data() + i * M, M, r), nrows[(size_t)t], d, tokens[(size_t)t], out);
            }
        }
    }
}

}  // namespace collapse::internal::cuda
