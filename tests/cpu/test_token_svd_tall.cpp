// The per-token SVD of tall classes (issue 11): CholeskyQR2 with a dgesdd fallback
// (class_singular_values, cpu_metrics.cpp) against the float64 brute force of tests/reference
// (Householder R of the rows, then one-sided Jacobi in long double: another route than the
// engine's). docs/METRICS.md's contract: each per-token SVD entropy within 1e-9 relative. Hostile
// shapes: rank-deficient, repeated rows, rows of very different scales, graded columns, classes far
// from the origin, nearly rank-deficient classes, n around the 2d crossover, centred rows; and
// which route each took, so that both are known to be exercised.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "cpu/cpu_backend.hpp"
#include "reference/brute_force.hpp"

namespace test_token_svd_tall {
namespace {

namespace ci = collapse::internal;
using nlohmann::json;

enum class Route { CholQr, Dgesdd, Either };

struct Shape {
    std::string name;
    int64_t n, d;
    Route route;
    std::function<std::vector<double>(std::mt19937_64&, int64_t, int64_t)> make;  // n x d row-major
    bool center = false;
};

std::vector<double> gaussian(std::mt19937_64& rng, int64_t n, int64_t d, double sigma = 1.0) {
    std::normal_distribution<double> g(0.0, sigma);
    std::vector<double> x((size_t)(n * d));
    for (double& v : x) v = g(rng);
    return x;
}

// Rows in an r-dimensional subspace (plus noise of size `noise`, 0 = exactly rank r).
std::vector<double> low_rank(std::mt19937_64& rng, int64_t n, int64_t d, int64_t r, double noise) {
    const std::vector<double> basis = gaussian(rng, r, d), coef = gaussian(rng, n, r), e = gaussian(rng, n, d, noise);
    std::vector<double> x((size_t)(n * d));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) {
            double v = e[(size_t)(i * d + j)];
            for (int64_t k = 0; k < r; ++k) v += coef[(size_t)(i * r + k)] * basis[(size_t)(k * d + j)];
            x[(size_t)(i * d + j)] = v;
        }
    return x;
}

// A point far from the origin (norm ~ offset) plus spread `sigma`.
std::vector<double> far_cluster(std::mt19937_64& rng, int64_t n, int64_t d, double offset, double sigma) {
    std::vector<double> x = gaussian(rng, n, d, sigma);
    const std::vector<double> mu = gaussian(rng, 1, d, offset / std::sqrt((double)d));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] += mu[(size_t)j];
    return x;
}

std::vector<Shape> shapes() {
    std::vector<Shape> s;
    s.push_back({"gaussian_tall", 400, 16, Route::CholQr, [](auto& r, int64_t n, int64_t d) { return gaussian(r, n, d); }});
    s.push_back({"gaussian_d64", 1000, 64, Route::CholQr, [](auto& r, int64_t n, int64_t d) { return gaussian(r, n, d); }});
    s.push_back({"n_is_2d", 32, 16, Route::CholQr, [](auto& r, int64_t n, int64_t d) { return gaussian(r, n, d); }});
    s.push_back({"n_below_2d", 31, 16, Route::Dgesdd, [](auto& r, int64_t n, int64_t d) { return gaussian(r, n, d); }});
    s.push_back({"wide", 5, 16, Route::Dgesdd, [](auto& r, int64_t n, int64_t d) { return gaussian(r, n, d); }});
    // Exactly rank 4: G1 is singular (Cholesky fails or U1 has rounding-sized pivots, and G2 is
    // far from I), so dgesdd must take over.
    s.push_back({"rank_deficient", 300, 16, Route::Dgesdd, [](auto& r, int64_t n, int64_t d) { return low_rank(r, n, d, 4, 0.0); }});
    s.push_back({"repeated_rows", 300, 16, Route::Dgesdd, [](auto& r, int64_t n, int64_t d) {
                     const std::vector<double> base = gaussian(r, 3, d);
                     std::vector<double> x((size_t)(n * d));
                     for (int64_t i = 0; i < n; ++i) std::copy_n(base.begin() + (i % 3) * d, d, x.begin() + i * d);
                     return x;
                 }});
    // Rank 4 plus noise 1e-5: twelve singular values ~1e-5 of the largest, which the entropy sees
    // (p_k ln p_k ~ 1e-5 each); cond ~1e5-1e6, inside what CholeskyQR2 handles.
    s.push_back({"nearly_rank_deficient", 500, 16, Route::Either, [](auto& r, int64_t n, int64_t d) { return low_rank(r, n, d, 4, 1e-5); }});
    s.push_back({"row_scales_1e-8_to_1e8", 300, 16, Route::Either, [](auto& r, int64_t n, int64_t d) {
                     std::vector<double> x = gaussian(r, n, d);
                     std::uniform_real_distribution<double> e(-8.0, 8.0);
                     for (int64_t i = 0; i < n; ++i) {
                         const double f = std::pow(10.0, e(r));
                         for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] *= f;
                     }
                     return x;
                 }});
    s.push_back({"row_scales_1e-2_to_1e2", 300, 16, Route::CholQr, [](auto& r, int64_t n, int64_t d) {
                     std::vector<double> x = gaussian(r, n, d);
                     std::uniform_real_distribution<double> e(-2.0, 2.0);
                     for (int64_t i = 0; i < n; ++i) {
                         const double f = std::pow(10.0, e(r));
                         for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] *= f;
                     }
                     return x;
                 }});
    // Column j scaled by 10^(-j/2): cond ~ 10^7.5, beyond what the check lets through.
    s.push_back({"graded_columns", 300, 16, Route::Either, [](auto& r, int64_t n, int64_t d) {
                     std::vector<double> x = gaussian(r, n, d);
                     for (int64_t i = 0; i < n; ++i)
                         for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] *= std::pow(10.0, -0.5 * (double)j);
                     return x;
                 }});
    // Far from the origin: cond ~ offset / sigma * sqrt(n).
    s.push_back({"far_1e3", 400, 16, Route::CholQr, [](auto& r, int64_t n, int64_t d) { return far_cluster(r, n, d, 1e3, 1.0); }});
    s.push_back({"far_1e5_tight", 400, 16, Route::Dgesdd, [](auto& r, int64_t n, int64_t d) { return far_cluster(r, n, d, 1e5, 1e-3); }});
    // Centred (svd_center): the far cluster's mean is subtracted first, so the centred rows are
    // well conditioned again.
    Shape c{"far_1e6_tight_centred", 400, 16, Route::CholQr, [](auto& r, int64_t n, int64_t d) { return far_cluster(r, n, d, 1e6, 1e-3); }};
    c.center = true;
    s.push_back(c);
    return s;
}

std::vector<double> column_means(const std::vector<double>& x, int64_t n, int64_t d) {
    std::vector<double> mu((size_t)d, 0.0);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) mu[(size_t)j] += x[(size_t)(i * d + j)];
    for (double& v : mu) v /= (double)n;
    return mu;
}

TEST(TokenSvdTall, HostileShapesMatchTheFloat64Reference) {
    std::mt19937_64 rng(20261201);
    int cholqr_cases = 0, fallback_cases = 0;
    for (const Shape& sh : shapes()) {
        SCOPED_TRACE(sh.name);
        const std::vector<double> x = sh.make(rng, sh.n, sh.d);
        const std::vector<double> mu = sh.center ? column_means(x, sh.n, sh.d) : std::vector<double>();
        std::vector<double> a;
        bool cholqr = false;
        const std::vector<double> s = ci::class_singular_values(x.data(), sh.n, sh.d, sh.center ? mu.data() : nullptr, a, &cholqr);
        // The reference gets exactly the matrix the engine decomposes (the engine centres in
        // float64, x - mu, as below).
        std::vector<double> xc = x;
        if (sh.center)
            for (int64_t i = 0; i < sh.n; ++i)
                for (int64_t j = 0; j < sh.d; ++j) xc[(size_t)(i * sh.d + j)] -= mu[(size_t)j];
        const std::vector<double> want = ref::singular_values(xc, sh.n, sh.d);
        ASSERT_EQ(s.size(), want.size());
        double err = 0;
        for (size_t k = 0; k < s.size(); ++k) err = std::max(err, std::fabs(s[k] - want[k]));
        EXPECT_LE(err, 1e-13 * want[0]) << "largest singular value error, relative to s_max";
        const double h = ref::svd_entropy(s), h_ref = ref::svd_entropy(want);
        EXPECT_LE(std::fabs(h - h_ref), 1e-9 * std::fabs(h_ref) + 1e-12) << "entropy " << h << " vs " << h_ref;
        if (sh.route == Route::CholQr) EXPECT_TRUE(cholqr) << "expected CholeskyQR2";
        if (sh.route == Route::Dgesdd) EXPECT_FALSE(cholqr) << "expected the dgesdd route";
        (cholqr ? cholqr_cases : fallback_cases)++;
        std::cout << "[token-svd-tall] " << sh.name << " (" << sh.n << " x " << sh.d << "): " << (cholqr ? "CholeskyQR2" : "dgesdd")
                  << ", max |s - s_ref| / s_max " << err / want[0] << ", entropy rel. error " << std::fabs(h - h_ref) / h_ref << std::endl;
    }
    EXPECT_GT(cholqr_cases, 0);
    EXPECT_GT(fallback_cases, 0);
}

// Through the engine: classes of the hostile kinds in one session (float64 rows, tall and wide,
// with and without svd_center), every token's entropy within 1e-9 of the reference, and the
// entropies bit-identical on 1 and 2 threads.
TEST(TokenSvdTall, EngineEntropiesMatchReferenceOnAnyThreadCount) {
    const int64_t d = 12;
    std::mt19937_64 rng(7);
    std::vector<std::vector<double>> classes = {
        gaussian(rng, 200, d),                  // CholeskyQR2
        far_cluster(rng, 150, d, 1e3, 1.0),     // CholeskyQR2, far from the origin
        far_cluster(rng, 150, d, 1e6, 1e-3),    // fallback (uncentred)
        low_rank(rng, 120, d, 3, 0.0),          // rank deficient: fallback
        low_rank(rng, 300, d, 3, 1e-5),         // nearly rank deficient
        gaussian(rng, 7, d),                    // wide: dgesdd
        gaussian(rng, 24, d),                   // n = 2d
    };
    {
        std::vector<double> rep = gaussian(rng, 2, d), x;
        for (int i = 0; i < 100; ++i) x.insert(x.end(), rep.begin() + (i % 2) * d, rep.begin() + (i % 2 + 1) * d);
        classes.push_back(x);  // repeated rows
    }
    const int64_t V = (int64_t)classes.size();
    std::vector<double> x;
    std::vector<int64_t> y;
    // Interleave the classes' rows (the store groups them back).
    size_t most = 0;
    for (const auto& c : classes) most = std::max(most, c.size() / (size_t)d);
    for (size_t i = 0; i < most; ++i)
        for (int64_t c = 0; c < V; ++c)
            if (i < classes[(size_t)c].size() / (size_t)d) {
                x.insert(x.end(), classes[(size_t)c].begin() + (int64_t)i * d, classes[(size_t)c].begin() + (int64_t)(i + 1) * d);
                y.push_back(c);
            }
    const int64_t N = (int64_t)y.size();
    for (const bool center : {false, true}) {
        SCOPED_TRACE(center ? "svd_center" : "raw rows");
        auto run = [&](int threads) {
            collapse_options o = collapse::default_options();
            o.num_classes = V;
            o.svd_center = center ? 1 : 0;
            const int before = omp_get_max_threads();
            omp_set_num_threads(threads);
            collapse::Session s(o);
            s.ingest_rows(collapse::host_buffer(x.data(), N, d), collapse::host_buffer(y.data(), N));
            json rep = json::parse(s.compute().json());
            omp_set_num_threads(before);
            return rep;
        };
        const json one = run(1), two = run(2);
        EXPECT_EQ(one["token_analysis"], two["token_analysis"]);
        ref::Options ro;
        ro.num_classes = V;
        ro.svd_center = center;
        const ref::Result want = ref::compute(x, y, d, nullptr, nullptr, ro);
        ASSERT_EQ((int64_t)want.tokens.size(), V);
        for (const auto& [id, t] : want.tokens) {
            ASSERT_TRUE(t.svd_entropy.has_value());
            const double got = two["token_analysis"][std::to_string(id)]["svd_entropy"].get<double>();
            EXPECT_LE(std::fabs(got - *t.svd_entropy), 1e-9 * std::fabs(*t.svd_entropy) + 1e-12) << "class " << id;
        }
    }
}

}  // namespace
}  // namespace test_token_svd_tall
