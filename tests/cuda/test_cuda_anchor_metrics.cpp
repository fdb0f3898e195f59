// The anchor metrics (docs/METRICS.md, "Anchor metrics") on the CUDA backend against the CPU
// backend on the same rows (the CPU is checked against the float64 brute force in
// tests/cpu/test_anchor_metrics.cpp). Contract: 1e-5 relative for float32 inputs. Library formulas:
// covariance_pinv / covariance_ratio (nc1_*), simplex_etf_error, self_duality_error,
// similarities().var(), kernel_stats(dist_kernel), orthogonality_deviation, and Papyan's
// |cos + 1/(C-1)|. Skips without a usable device.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "common/compare.hpp"

using nlohmann::json;

namespace test_cuda_anchor_metrics {
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

json report_of(const Data& D, collapse_backend backend, collapse_svd_mode mode,
               const std::function<void(collapse_options&)>& tweak = nullptr) {
    collapse_options o = collapse::default_options();
    o.num_classes = D.V;
    o.backend = backend;
    o.svd_mode = mode;
    if (tweak) tweak(o);
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
    return json::parse(s.compute().json());
}

json overall_of(const Data& D, collapse_backend backend, collapse_svd_mode mode,
                const std::function<void(collapse_options&)>& tweak = nullptr) {
    return report_of(D, backend, mode, tweak)["overall_analysis"];
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

// Sigma_W streams on the device (rows less their class's reference row, a cublasDsyrk a chunk),
// so nc1_* are computed in every svd_mode, as on the CPU; and with max_tokens_to_analyze from the
// row store (exact) or the second pass (sampled, off).
TEST(CudaAnchorMetrics, EverySvdModeMatchesCpu) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    const Data D = make_data(8, 2.0);
    for (collapse_svd_mode mode : {COLLAPSE_SVD_EXACT, COLLAPSE_SVD_SAMPLED, COLLAPSE_SVD_OFF})
        for (int64_t max_tokens : {0, 25}) {
            const auto tweak = [&](collapse_options& o) { o.max_tokens_to_analyze = max_tokens; };
            const json cpu = overall_of(D, COLLAPSE_BACKEND_CPU, mode, tweak);
            const json gpu = overall_of(D, COLLAPSE_BACKEND_CUDA, mode, tweak);
            const std::string what = "svd_mode " + std::to_string((int)mode) + ", max_tokens " + std::to_string(max_tokens);
            for (const char* k : kKeys) {
                ASSERT_FALSE(cpu[k].is_null()) << k << ", " << what;
                EXPECT_TRUE(testutil::close(std::string(k) + ", " + what, gpu[k], cpu[k].get<double>(), 1e-5, 1e-12));
            }
        }
}

// Tight classes far from the origin (|mu_c| ~ 2e3, rows 1e-4 around them): var_c and Sigma_W about
// the classes' reference rows on the device too; nc1_cdnv, nc1_* and the per-class within_variance
// agree with the CPU (which the brute force checks) where E||x||^2 - ||mu||^2 would keep no digit.
TEST(CudaAnchorMetrics, TightClustersFarFromOriginMatchCpu) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    Data D = make_data(9, 2000.0);
    std::mt19937_64 g(10);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> centre((size_t)(D.V * D.d));
    for (auto& c : centre) c = 2000.0 + nd(g);
    for (int64_t i = 0; i < D.n; ++i)
        for (int64_t j = 0; j < D.d; ++j) D.x[(size_t)(i * D.d + j)] = (float)(centre[(size_t)(D.y[(size_t)i] * D.d + j)] + 1e-4 * nd(g));
    for (collapse_svd_mode mode : {COLLAPSE_SVD_SAMPLED, COLLAPSE_SVD_OFF}) {
        const auto tweak = [](collapse_options& o) { o.per_class_arrays = 1; };
        const json cpu = report_of(D, COLLAPSE_BACKEND_CPU, mode, tweak), gpu = report_of(D, COLLAPSE_BACKEND_CUDA, mode, tweak);
        for (const char* k : {"nc1_cdnv", "nc1_pinv", "nc1_svd", "nc1_quot"})
            EXPECT_TRUE(testutil::close(std::string(k) + " (tight)", gpu["overall_analysis"][k], cpu["overall_analysis"][k].get<double>(), 1e-5, 0.0));
        for (auto it = cpu["token_analysis"].begin(); it != cpu["token_analysis"].end(); ++it)
            EXPECT_TRUE(testutil::close("within_variance of " + it.key() + " (tight)", gpu["token_analysis"][it.key()]["within_variance"],
                                        it.value()["within_variance"].get<double>(), 1e-5, 0.0));
    }
}

// The reference rows, sums of squares about them and Sigma_W's scatter are checkpoint sections of
// one layout: a CUDA shard and a CPU shard merge either way into the one-session values.
TEST(CudaAnchorMetrics, CheckpointsOfBothBackendsMerge) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    const Data D = make_data(11, 300.0);
    collapse_options o = collapse::default_options();
    o.num_classes = D.V;
    o.svd_mode = COLLAPSE_SVD_OFF;
    o.min_samples_per_token = 3;
    o.per_class_arrays = 1;
    const json whole = report_of(D, COLLAPSE_BACKEND_CPU, COLLAPSE_SVD_OFF, [](collapse_options& x) {
        x.min_samples_per_token = 3;
        x.per_class_arrays = 1;
    });
    const std::string dir = ::testing::TempDir() + "cuda_anchor_ckpt";
    std::filesystem::create_directories(dir);
    const int64_t half = D.n / 2;
    auto shard = [&](collapse_backend b, int64_t r0, int64_t r1, const std::string& f) {
        collapse_options so = o;
        so.backend = b;
        collapse::Session s(so);
        s.set_classifier(collapse::host_buffer(D.w.data(), D.V, D.d));
        s.set_ood_mean(D.ood);
        s.ingest_rows(collapse::host_buffer(D.x.data() + r0 * D.d, r1 - r0, D.d), collapse::host_buffer(D.y.data() + r0, r1 - r0));
        s.save(dir + "/" + f);
    };
    shard(COLLAPSE_BACKEND_CUDA, 0, half, "gpu.ckpt");
    shard(COLLAPSE_BACKEND_CPU, half, D.n, "cpu.ckpt");
    for (collapse_backend into : {COLLAPSE_BACKEND_CPU, COLLAPSE_BACKEND_CUDA})
        for (const auto& [first, second] : {std::pair<std::string, std::string>{"gpu.ckpt", "cpu.ckpt"}, {"cpu.ckpt", "gpu.ckpt"}}) {
            collapse_options mo = o;
            mo.backend = into;
            collapse::Session m(mo);
            m.set_classifier(collapse::host_buffer(D.w.data(), D.V, D.d));
            m.load(dir + "/" + first);
            m.merge(dir + "/" + second);
            const json got = json::parse(m.compute().json());
            const std::string what = std::string(into == COLLAPSE_BACKEND_CPU ? "cpu" : "cuda") + " session, " + first + " + " + second;
            for (const char* k : {"nc1_cdnv", "nc1_pinv", "nc1_svd", "nc1_quot", "nc2_etf_err"})
                EXPECT_TRUE(testutil::close(std::string(k) + ", " + what, got["overall_analysis"][k], whole["overall_analysis"][k].get<double>(), 1e-5, 1e-12));
            for (auto it = whole["token_analysis"].begin(); it != whole["token_analysis"].end(); ++it)
                EXPECT_TRUE(testutil::close("within_variance of " + it.key() + ", " + what, got["token_analysis"][it.key()]["within_variance"],
                                            it.value()["within_variance"].get<double>(), 1e-5, 1e-12));
        }
    std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace test_cuda_anchor_metrics
