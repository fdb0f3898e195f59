// The anchor metrics (docs/METRICS.md, "Anchor metrics") on the CUDA backend against the CPU
// backend on the same rows (the CPU is checked against the float64 brute force in
// tests/cpu/test_anchor_metrics.cpp). Contract: 1e-5 relative for float32 inputs. Library formulas:
// covariance_pinv / covariance_ratio (nc1_*), simplex_etf_error, self_duality_error,
// similarities().var(), kernel_stats(dist_kernel), orthogonality_deviation, and Papyan's
// |cos + 1/(C-1)|. Skips without a usable device.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "common/compare.hpp"

using nlohmann::json;

namespace {

const char* const kKeys[] = {"nc1_pinv", "nc1_svd", "nc1_quot", "nc2_etf_err", "nc3_dual_err", "nc3u_uni_dual",
                             "nc2g_dist_mean", "nc2g_dist_var", "nc2_equiangular_absdev", "nc2_max_equiangular_dev", "nc5_ood_dev"};

struct Data {
    int64_t n = 3000, d = 20, V = 40;
    std::vector<float> x, w;
    std::vector<int32_t> y;
    std::vector<double> ood;
};

Data make_data(uint64_t seed, double offset) {
    Data D;
    std::mt19937_64 g(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> mean((size_t)(D.V * D.d));
    for (auto& m : mean) m = offset + 3.0 * nd(g);
    std::uniform_int_distribution<int32_t> u(0, (int32_t)D.V - 1);
    D.y.resize((size_t)D.n);
    for (auto& l : D.y) l = u(g);
    D.x.resize((size_t)(D.n * D.d));
    for (int64_t i = 0; i < D.n; ++i)
        for (int64_t j = 0; j < D.d; ++j) D.x[(size_t)(i * D.d + j)] = (float)(mean[(size_t)(D.y[(size_t)i] * D.d + j)] + nd(g));
    D.w.resize((size_t)(D.V * D.d));
    for (auto& v : D.w) v = (float)nd(g);
    D.ood.resize((size_t)D.d);
    for (auto& v : D.ood) v = offset + nd(g);
    return D;
}

json overall_of(const Data& D, collapse_backend backend, collapse_svd_mode mode) {
    collapse_options o = collapse::default_options();
    o.num_classes = D.V;
    o.backend = backend;
    o.svd_mode = mode;
    collapse::Session s(o);
    s.set_classifier(collapse::host_buffer(D.w.data(), D.V, D.d));
    s.set_ood_mean(D.ood);
    for (int64_t r0 = 0; r0 < D.n; r0 += 700) {
        const int64_t n = std::min<int64_t>(700, D.n - r0);
        s.ingest_rows(collapse::host_buffer(D.x.data() + r0 * D.d, n, D.d), collapse::host_buffer(D.y.data() + r0, n));
    }
    if (s.needs_second_pass()) {
        s.begin_second_pass();
        for (int64_t r0 = 0; r0 < D.n; r0 += 700) {
            const int64_t n = std::min<int64_t>(700, D.n - r0);
            s.ingest_rows(collapse::host_buffer(D.x.data() + r0 * D.d, n, D.d), collapse::host_buffer(D.y.data() + r0, n));
        }
    }
    return json::parse(s.compute().json())["overall_analysis"];
}

TEST(CudaAnchorMetrics, MatchCpuOnLibraryFormulas) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    for (double offset : {2.0, 500.0}) {
        const Data D = make_data(7, offset);
        const json cpu = overall_of(D, COLLAPSE_BACKEND_CPU, COLLAPSE_SVD_EXACT);
        const json gpu = overall_of(D, COLLAPSE_BACKEND_CUDA, COLLAPSE_SVD_EXACT);
        for (const char* k : kKeys) {
            ASSERT_FALSE(cpu[k].is_null()) << k;
            EXPECT_TRUE(testutil::close(std::string(k) + " offset " + std::to_string(offset), gpu[k], cpu[k].get<double>(), 1e-5, 1e-12));
        }
    }
}

// Without the exact row store the CUDA backend has no Sigma_W yet: nc1_* null with a note, the rest computed.
TEST(CudaAnchorMetrics, SampledModeNc1NullWithNote) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    const Data D = make_data(8, 2.0);
    const json cpu = overall_of(D, COLLAPSE_BACKEND_CPU, COLLAPSE_SVD_SAMPLED);
    const json gpu = overall_of(D, COLLAPSE_BACKEND_CUDA, COLLAPSE_SVD_SAMPLED);
    for (const char* k : {"nc1_pinv", "nc1_svd", "nc1_quot"}) {
        EXPECT_TRUE(gpu[k].is_null()) << k;
        EXPECT_NE(gpu["notes"].value(k, "").find("row store"), std::string::npos) << k;
    }
    for (const char* k : {"nc2_etf_err", "nc3_dual_err", "nc3u_uni_dual", "nc2g_dist_mean", "nc5_ood_dev"})
        EXPECT_TRUE(testutil::close(k, gpu[k], cpu[k].get<double>(), 1e-5, 1e-12));
}

}  // namespace
