// Per-class arrays (per_class_arrays) and held-out NC4 on the CUDA backend against the CPU backend
// (the reference) on the same float32 rows. Skips without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "core/session.hpp"

namespace test_cuda_per_class {
namespace {

bool have_device() { return collapse_backend_available("cuda") != 0; }

struct Rows {
    int64_t n = 0, d = 0, V = 0;
    std::vector<float> x, w;
    std::vector<int32_t> y;
};

Rows make_rows(int64_t n, int64_t d, int64_t V, uint32_t seed) {
    Rows R;
    R.n = n, R.d = d, R.V = V;
    std::mt19937 g(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> centre((size_t)(V * d));
    for (double& c : centre) c = 2.0 * nd(g);
    std::uniform_int_distribution<int32_t> lab(0, (int32_t)V - 1);
    for (int64_t i = 0; i < n; ++i) {
        const int32_t c = lab(g);
        R.y.push_back(c);
        for (int64_t j = 0; j < d; ++j) R.x.push_back((float)(centre[(size_t)(c * d + j)] + 0.8 * nd(g)));
    }
    for (int64_t i = 0; i < V * d; ++i) R.w.push_back((float)(centre[(size_t)i] + 1.5 * nd(g)));
    return R;
}

// The result of one backend: main rows, then (held-out or the same) rows in the second pass.
collapse::internal::Result run(collapse_backend backend, const Rows& main, const Rows* held) {
    collapse::internal::Config cfg;
    cfg.num_classes = main.V;
    cfg.backend = backend;
    cfg.device = backend == COLLAPSE_BACKEND_CUDA ? "cuda" : "cpu";
    cfg.svd_mode = COLLAPSE_SVD_SAMPLED;  // the CUDA backend's NC4 is a second pass; so is the CPU's here
    cfg.compute_nc4 = true;
    cfg.per_class_arrays = true;
    cfg.keep_class_means = true;
    cfg.nc4_held_out = held != nullptr;
    collapse::internal::Session s(cfg);
    const collapse_buffer w{main.w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, main.V, main.d, 0};
    s.set_classifier(&w, nullptr);
    auto feed = [&](const Rows& r) {
        const collapse_buffer x{r.x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, r.n, r.d, 0};
        const collapse_buffer y{r.y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, r.n, 1, 0};
        s.ingest_rows(&x, &y, nullptr, nullptr);
    };
    feed(main);
    if (s.needs_second_pass()) {
        s.begin_second_pass();
        feed(held ? *held : main);
    }
    return s.compute(true);
}

void expect_same(const collapse::internal::Result& cpu, const collapse::internal::Result& gpu, const std::string& where) {
    // docs/METRICS.md accuracy contract for the CUDA backend: 1e-6 relative on float32 rows.
    auto close = [&](const std::optional<double>& a, const std::optional<double>& b, const std::string& what) {
        ASSERT_EQ(a.has_value(), b.has_value()) << what << " " << where;
        if (a) EXPECT_NEAR(*b, *a, 1e-6 * std::max(1.0, std::fabs(*a))) << what << " " << where;
    };
    ASSERT_EQ(cpu.metrics.tokens.size(), gpu.metrics.tokens.size()) << where;
    for (size_t k = 0; k < cpu.metrics.tokens.size(); ++k) {
        const auto &a = cpu.metrics.tokens[k], &b = gpu.metrics.tokens[k];
        EXPECT_EQ(a.id, b.id);
        EXPECT_EQ(a.num_samples, b.num_samples);
        close(a.mean_norm, b.mean_norm, "mean_norm");
        close(a.within_variance, b.within_variance, "within_variance");
        close(a.duality_cos, b.duality_cos, "duality_cos");
        close(a.duality_dot, b.duality_dot, "duality_dot");
        EXPECT_EQ(a.nc4_rows, b.nc4_rows) << where;
        EXPECT_EQ(a.nc4_hits, b.nc4_hits) << where;  // well-separated data: no near-ties
    }
    close(cpu.metrics.nc4_agreement, gpu.metrics.nc4_agreement, "nc4_agreement");
    EXPECT_EQ(cpu.metrics.nc4_held_out, gpu.metrics.nc4_held_out);
    ASSERT_EQ(cpu.metrics.class_means.size(), gpu.metrics.class_means.size());
    for (size_t i = 0; i < cpu.metrics.class_means.size(); ++i)
        EXPECT_NEAR(gpu.metrics.class_means[i], cpu.metrics.class_means[i], 1e-6 * std::max(1.0, std::fabs(cpu.metrics.class_means[i])));
}

TEST(CudaPerClass, PerClassArraysMatchCpu) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    for (const auto& [n, d, V] : {std::tuple<int64_t, int64_t, int64_t>{3000, 16, 40}, {5000, 64, 300}}) {
        const Rows R = make_rows(n, d, V, (uint32_t)(n + d));
        expect_same(run(COLLAPSE_BACKEND_CPU, R, nullptr), run(COLLAPSE_BACKEND_CUDA, R, nullptr), "n=" + std::to_string(n));
    }
}

TEST(CudaPerClass, HeldOutNc4MatchesCpu) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    const Rows main = make_rows(4000, 32, 60, 7), held = make_rows(1500, 32, 60, 8);
    const collapse::internal::Result cpu = run(COLLAPSE_BACKEND_CPU, main, &held), gpu = run(COLLAPSE_BACKEND_CUDA, main, &held);
    ASSERT_TRUE(gpu.metrics.nc4_held_out);
    expect_same(cpu, gpu, "held-out");
}

}  // namespace
}  // namespace test_cuda_per_class
