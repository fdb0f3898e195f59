// entropy_from_eigen (core/metric_math.hpp) is what the CUDA backend's device per-token SVD reduces
// each class's eigenvalues with (cuda/token_svd_device.cu), one thread per class. It must be the
// host's formula to the bit (singular_values_from_eigen + spectrum_entropy, what the other paths
// use) and the docs/METRICS.md SVD entropy of the singular values (float64 brute force).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/metric_math.hpp"
#include "core/metric_summary.hpp"
#include "reference/brute_force.hpp"

namespace ci = collapse::internal;

namespace test_entropy_from_eigen {
namespace {

// Eigenvalues (ascending) of a Gram of size M whose class has r = min(n, d) singular values s
// (descending) and M - r zero-padding eigenvalues carrying rounding noise of +-noise * s_max^2.
std::vector<double> padded_spectrum(const std::vector<double>& s, int64_t M, double noise, std::mt19937_64& g) {
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    std::vector<double> e;
    const double top = s.empty() ? 0.0 : s.front() * s.front();
    for (double x : s) e.push_back(x * x);
    while ((int64_t)e.size() < M) e.push_back(noise * top * u(g));
    std::sort(e.begin(), e.end());
    return e;
}


TEST(EntropyFromEigen, BitIdenticalToTheHostPathAndEqualToBruteForce) {
    std::mt19937_64 g(7);
    std::lognormal_distribution<double> ln(0.0, 2.0);
    for (int64_t r : {1, 2, 3, 7, 31, 64, 200}) {
        for (int64_t pad : {0, 1, 5}) {
            SCOPED_TRACE("r = " + std::to_string(r) + ", padding " + std::to_string(pad));
            std::vector<double> s((size_t)r);
            for (double& x : s) x = ln(g);
            std::sort(s.rbegin(), s.rend());
            const int64_t M = r + pad;
            const std::vector<double> e = padded_spectrum(s, M, 1e-17, g);
            bool zero = true;
            const double h = ci::entropy_from_eigen(e.data(), M, r, &zero);
            bool zero_host = true;
            const double h_host = ci::spectrum_entropy(ci::singular_values_from_eigen(e.data(), M, r), &zero_host);
            EXPECT_EQ(h, h_host);  // same formula, same order: the same bits
            EXPECT_EQ(zero, zero_host);
            EXPECT_FALSE(zero);
            // The reference takes the singular values themselves (sqrt of lambda loses ~1 ulp).
            EXPECT_NEAR(h, ref::svd_entropy(s), 1e-12 * std::max(1.0, std::fabs(h)));
            EXPECT_LE(h, std::log((double)r) + 1e-12);
        }
    }
}

TEST(EntropyFromEigen, RoundingBelowTheFloorIsAZeroSingularValue) {
    // Rank 2 in a Gram of size 8: the six others are rounding (|lambda| <= 8 eps lambda_max).
    const double e[8] = {-1e-16, -3e-17, 0.0, 1e-17, 2e-16, 4e-16, 1.0, 4.0};
    bool zero = true;
    const double h = ci::entropy_from_eigen(e, 8, 8, &zero);
    EXPECT_FALSE(zero);
    EXPECT_NEAR(h, ref::svd_entropy({2.0, 1.0}), 1e-15);  // p = 2/3, 1/3
}

TEST(EntropyFromEigen, AllZeroIsAZeroMatrixOfEntropyZero) {
    const double e[4] = {0.0, 0.0, 0.0, 0.0};
    bool zero = false;
    EXPECT_EQ(ci::entropy_from_eigen(e, 4, 4, &zero), 0.0);
    EXPECT_TRUE(zero);
    zero = false;
    EXPECT_EQ(ci::entropy_from_eigen(e, 0, 0, &zero), 0.0);  // no rows at all
    EXPECT_TRUE(zero);
}

TEST(EntropyFromEigen, TokenFromEntropyMatchesTokenFromSpectrum) {
    const std::vector<double> s = {3.0, 2.0, 0.5};
    for (int64_t n : {1, 3, 10}) {
        ci::TokenMetrics a, b;
        ci::MetricValues oa, ob;
        ci::token_from_spectrum(s, n, 3, a, oa);
        bool zero = false;
        const double h = ci::spectrum_entropy(s, &zero);
        ci::token_from_entropy(h, zero, n, 3, b, ob);
        EXPECT_EQ(a.svd_entropy, b.svd_entropy);
        EXPECT_EQ(a.effective_rank, b.effective_rank);
        EXPECT_EQ(a.normalized_entropy.has_value(), b.normalized_entropy.has_value());
        if (a.normalized_entropy) EXPECT_EQ(*a.normalized_entropy, *b.normalized_entropy);
        EXPECT_EQ(a.zero_matrix, b.zero_matrix);
        EXPECT_EQ(oa.svd_zero_matrices, ob.svd_zero_matrices);
    }
}

}  // namespace
}  // namespace test_entropy_from_eigen
