// The synthetic generator: determinism, chunk independence, the label distribution, the geometry of
// the class means, dtype rounding and spec validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/synth.hpp"

using collapse::internal::SynthGenerator;
using collapse::internal::SynthSpec;

namespace test_synth {
namespace {

SynthSpec small_spec() {
    SynthSpec s;
    s.rows = 3000;
    s.dim = 33;  // odd: the last coordinate is the unpaired half of a Box-Muller pair
    s.classes = 50;
    s.seed = 7;
    return s;
}

std::vector<int32_t> all_labels(const SynthGenerator& g) {
    std::vector<int32_t> y((size_t)g.spec().rows);
    g.labels(0, g.spec().rows, y.data());
    return y;
}

std::vector<uint8_t> all_features(const SynthGenerator& g, const std::vector<int32_t>& y) {
    const SynthSpec& s = g.spec();
    std::vector<uint8_t> x((size_t)(s.rows * s.dim) * collapse::internal::dtype_size(s.dtype));
    g.features(0, s.rows, y.data(), x.data());
    return x;
}

std::vector<double> all_features_f64(SynthSpec s) {
    s.dtype = COLLAPSE_F64;
    SynthGenerator g(s);
    const auto y = all_labels(g);
    const auto bytes = all_features(g, y);
    std::vector<double> x(bytes.size() / 8);
    std::memcpy(x.data(), bytes.data(), bytes.size());
    return x;
}

double generalized_harmonic(int64_t V, double s) {
    double h = 0;
    for (int64_t k = 1; k <= V; ++k) h += std::pow((double)k, -s);
    return h;
}


TEST(Synth, SameSpecGivesIdenticalBytes) {
    for (collapse_dtype t : {COLLAPSE_F32, COLLAPSE_F16, COLLAPSE_BF16, COLLAPSE_F64}) {
        SynthSpec s = small_spec();
        s.dtype = t;
        SynthGenerator a(s), b(s);
        const auto ya = all_labels(a), yb = all_labels(b);
        EXPECT_EQ(ya, yb);
        EXPECT_EQ(all_features(a, ya), all_features(b, yb)) << collapse::internal::dtype_name(t);
        std::vector<float> wa((size_t)(s.classes * s.dim)), wb(wa.size());
        a.classifier(wa.data());
        b.classifier(wb.data());
        EXPECT_EQ(0, std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(float)));
        EXPECT_EQ(a.class_means(), b.class_means());
    }
}

TEST(Synth, DifferentSeedsGiveDifferentData) {
    SynthSpec s = small_spec();
    SynthGenerator a(s);
    s.seed += 1;
    SynthGenerator b(s);
    EXPECT_NE(all_labels(a), all_labels(b));
    EXPECT_NE(a.class_means(), b.class_means());
}

TEST(Synth, ChunkingDoesNotChangeRows) {
    for (collapse_dtype t : {COLLAPSE_F32, COLLAPSE_F16}) {
        SynthSpec s = small_spec();
        s.dtype = t;
        SynthGenerator g(s);
        const auto y = all_labels(g);
        const auto x = all_features(g, y);
        const size_t row_bytes = (size_t)s.dim * collapse::internal::dtype_size(t);
        for (int64_t chunk : {int64_t(1), int64_t(7), int64_t(1000)}) {
            std::vector<int32_t> yc((size_t)s.rows);
            std::vector<uint8_t> xc(x.size());
            // A fresh generator per chunking: nothing may carry over between calls.
            SynthGenerator h(s);
            for (int64_t r = 0; r < s.rows; r += chunk) {
                const int64_t n = std::min(chunk, s.rows - r);
                h.labels(r, n, &yc[(size_t)r]);
                h.features(r, n, &yc[(size_t)r], &xc[(size_t)r * row_bytes]);
            }
            EXPECT_EQ(y, yc) << "chunk " << chunk;
            EXPECT_EQ(x, xc) << "chunk " << chunk << " " << collapse::internal::dtype_name(t);
        }
    }
}

TEST(Synth, ChunksInAnyOrderGiveTheSameRows) {
    SynthSpec s = small_spec();
    SynthGenerator g(s);
    const auto y = all_labels(g);
    const auto x = all_features(g, y);
    const size_t row_bytes = (size_t)s.dim * 4;
    // The last 500 rows, generated on their own, equal the tail of the full run.
    std::vector<int32_t> yt(500);
    std::vector<uint8_t> xt(500 * row_bytes);
    g.labels(s.rows - 500, 500, yt.data());
    g.features(s.rows - 500, 500, yt.data(), xt.data());
    EXPECT_TRUE(std::equal(yt.begin(), yt.end(), y.end() - 500));
    EXPECT_TRUE(std::equal(xt.begin(), xt.end(), x.end() - (ptrdiff_t)xt.size()));
}

TEST(Synth, LabelsFollowZipfOverAPermutedVocabulary) {
    SynthSpec s;
    s.rows = 200000;
    s.dim = 4;
    s.classes = 1000;
    s.zipf_s = 1.1;
    SynthGenerator g(s);
    const auto y = all_labels(g);
    std::vector<int64_t> count((size_t)s.classes, 0);
    for (int32_t c : y) {
        ASSERT_GE(c, 0);
        ASSERT_LT(c, s.classes);
        ++count[(size_t)c];
    }
    const double H = generalized_harmonic(s.classes, s.zipf_s);
    for (int64_t rank : {0, 1, 9}) {
        const double p = std::pow((double)(rank + 1), -s.zipf_s) / H;
        const double share = (double)count[(size_t)g.token_of_rank(rank)] / (double)s.rows;
        // 5 standard errors of a binomial share
        EXPECT_NEAR(share, p, 5 * std::sqrt(p * (1 - p) / (double)s.rows)) << "rank " << rank;
    }
    // The most frequent id is the one of rank 0.
    EXPECT_EQ(std::max_element(count.begin(), count.end()) - count.begin(), g.token_of_rank(0));
    // rank -> token is a permutation, and it is not the identity on the head.
    std::vector<int> seen((size_t)s.classes, 0);
    int identity = 0;
    for (int64_t k = 0; k < s.classes; ++k) {
        ++seen[(size_t)g.token_of_rank(k)];
        identity += g.token_of_rank(k) == k;
    }
    for (int v : seen) EXPECT_EQ(v, 1);
    EXPECT_LT(identity, 10);
}

TEST(Synth, ZipfZeroIsUniform) {
    SynthSpec s;
    s.rows = 100000;
    s.dim = 2;
    s.classes = 10;
    s.zipf_s = 0;
    SynthGenerator g(s);
    std::vector<int64_t> count(10, 0);
    for (int32_t c : all_labels(g)) ++count[(size_t)c];
    for (int64_t n : count) EXPECT_NEAR((double)n / 1e5, 0.1, 0.005);
}

TEST(Synth, LabelsStayInRangeForLargeVocabularies) {
    SynthSpec s;
    s.rows = 50000;
    s.dim = 8;
    s.classes = 32000;
    s.zipf_s = 0.5;
    SynthGenerator g(s);
    for (int32_t c : all_labels(g)) {
        ASSERT_GE(c, 0);
        ASSERT_LT(c, s.classes);
    }
}

TEST(Synth, FullCollapsePutsRowsExactlyOnTheirMeans) {
    SynthSpec s = small_spec();
    s.collapse = 1.0;
    s.noise = 3.0;
    s.dtype = COLLAPSE_F64;
    SynthGenerator g(s);
    const auto y = all_labels(g);
    const auto bytes = all_features(g, y);
    const double* x = (const double*)bytes.data();
    const auto& m = g.class_means();
    for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t j = 0; j < s.dim; ++j)
            ASSERT_EQ(x[r * s.dim + j], m[(size_t)(y[(size_t)r] * s.dim + j)]) << "row " << r << " coord " << j;
}

TEST(Synth, EmpiricalMeansAndSpreadMatchTheModel) {
    SynthSpec s;
    s.rows = 100000;
    s.dim = 16;
    s.classes = 10;
    s.collapse = 0.0;
    s.noise = 1.5;
    s.dtype = COLLAPSE_F64;
    SynthGenerator g(s);
    const auto y = all_labels(g);
    const auto x = all_features_f64(s);
    const int64_t V = s.classes, d = s.dim;
    std::vector<double> sum((size_t)(V * d), 0.0), sq((size_t)V, 0.0);
    std::vector<int64_t> n((size_t)V, 0);
    for (int64_t r = 0; r < s.rows; ++r) {
        const int64_t c = y[(size_t)r];
        ++n[(size_t)c];
        for (int64_t j = 0; j < d; ++j) sum[(size_t)(c * d + j)] += x[(size_t)(r * d + j)];
    }
    const auto& m = g.class_means();
    for (int64_t r = 0; r < s.rows; ++r) {
        const int64_t c = y[(size_t)r];
        for (int64_t j = 0; j < d; ++j) {
            const double e = x[(size_t)(r * d + j)] - m[(size_t)(c * d + j)];
            sq[(size_t)c] += e * e;
        }
    }
    for (int64_t c = 0; c < V; ++c) {
        ASSERT_GT(n[(size_t)c], 1000) << "class " << c;
        const double se = s.noise / std::sqrt((double)n[(size_t)c]);
        for (int64_t j = 0; j < d; ++j)
            EXPECT_NEAR(sum[(size_t)(c * d + j)] / (double)n[(size_t)c], m[(size_t)(c * d + j)], 5 * se);
        // Per-coordinate variance around the true mean is noise^2 (1 - collapse)^2.
        EXPECT_NEAR(sq[(size_t)c] / (double)(n[(size_t)c] * d), s.noise * s.noise, 0.05 * s.noise * s.noise);
    }
}

TEST(Synth, PartialCollapseScalesTheNoise) {
    SynthSpec s = small_spec();
    s.rows = 20000;
    s.collapse = 0.75;
    s.noise = 2.0;  // per-coordinate std 2 * 0.25 = 0.5
    SynthGenerator g(s);
    const auto y = all_labels(g);
    const auto x = all_features_f64(s);
    const auto& m = g.class_means();
    double sq = 0;
    for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t j = 0; j < s.dim; ++j) {
            const double e = x[(size_t)(r * s.dim + j)] - m[(size_t)(y[(size_t)r] * s.dim + j)];
            sq += e * e;
        }
    EXPECT_NEAR(std::sqrt(sq / (double)(s.rows * s.dim)), 0.5, 0.01);
}

TEST(Synth, MeansHaveTheRequestedNorm) {
    for (int64_t V : {int64_t(1), int64_t(5), int64_t(200)}) {
        for (double collapse : {0.0, 0.3, 1.0}) {
            SynthSpec s;
            s.rows = 10;
            s.dim = 20;
            s.classes = V;
            s.collapse = collapse;
            s.mean_norm = 3.5;
            SynthGenerator g(s);
            const auto& m = g.class_means();
            ASSERT_EQ(m.size(), (size_t)(V * s.dim));
            for (int64_t c = 0; c < V; ++c) {
                double r = 0;
                for (int64_t j = 0; j < s.dim; ++j) r += m[(size_t)(c * s.dim + j)] * m[(size_t)(c * s.dim + j)];
                EXPECT_NEAR(std::sqrt(r), 3.5, 1e-12) << "V " << V << " collapse " << collapse;
            }
        }
    }
}

TEST(Synth, FullCollapseMeansFormASimplexEtf) {
    // V < d and the edge V == d.
    for (int64_t V : {int64_t(10), int64_t(32)}) {
        SynthSpec s;
        s.rows = 10;
        s.dim = 32;
        s.classes = V;
        s.collapse = 1.0;
        SynthGenerator g(s);
        const int64_t d = s.dim;
        const auto& m = g.class_means();
        // Centred means (class-balanced global mean, as docs/METRICS.md); the ETF already sums to zero.
        std::vector<double> mu(d, 0.0);
        for (int64_t c = 0; c < V; ++c)
            for (int64_t j = 0; j < d; ++j) mu[(size_t)j] += m[(size_t)(c * d + j)] / (double)V;
        for (double v : mu) EXPECT_NEAR(v, 0.0, 1e-12);
        auto centred = [&](int64_t c, int64_t j) { return m[(size_t)(c * d + j)] - mu[(size_t)j]; };
        for (int64_t a = 0; a < V; ++a)
            for (int64_t b = a + 1; b < V; ++b) {
                double ab = 0, aa = 0, bb = 0;
                for (int64_t j = 0; j < d; ++j) {
                    ab += centred(a, j) * centred(b, j);
                    aa += centred(a, j) * centred(a, j);
                    bb += centred(b, j) * centred(b, j);
                }
                ASSERT_NEAR(ab / std::sqrt(aa * bb), -1.0 / (double)(V - 1), 1e-12) << a << "," << b;
            }
        // Dense, not axis-aligned: the rotation moved mass out of the first V coordinates.
        double tail = 0;
        for (int64_t j = V; j < d; ++j) tail += std::fabs(m[(size_t)j]);
        if (V < d) {
            EXPECT_GT(tail, 0.1);
        }
    }
}

TEST(Synth, OtherDtypesAreTheFloat32ValuesRounded) {
    SynthSpec s = small_spec();
    s.noise = 100.0;  // spread the exponents so rounding is exercised broadly
    const auto x64 = all_features_f64(s);
    auto run = [&](collapse_dtype t) {
        SynthSpec u = s;
        u.dtype = t;
        SynthGenerator g(u);
        return all_features(g, all_labels(g));
    };
    const auto f32 = run(COLLAPSE_F32), f16 = run(COLLAPSE_F16), bf16 = run(COLLAPSE_BF16);
    const size_t n = x64.size();
    const float* a = (const float*)f32.data();
    const uint16_t* h = (const uint16_t*)f16.data();
    const uint16_t* b = (const uint16_t*)bf16.data();
    for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(a[i], (float)x64[i]) << i;
        ASSERT_EQ(h[i], collapse::internal::float_to_half(a[i])) << i;
        ASSERT_EQ(b[i], collapse::internal::float_to_bf16(a[i])) << i;
    }
}

TEST(Synth, ClassifierIsUnitMeansPlusNoise) {
    SynthSpec s = small_spec();
    s.classes = 400;
    s.classifier_noise = 0.0;
    SynthGenerator exact(s);
    const int64_t V = s.classes, d = s.dim;
    std::vector<float> w((size_t)(V * d));
    exact.classifier(w.data());
    const auto& m = exact.class_means();
    for (size_t i = 0; i < w.size(); ++i) ASSERT_NEAR(w[i], m[i] / s.mean_norm, 1e-6);

    s.classifier_noise = 0.2;
    SynthGenerator noisy(s);
    std::vector<float> wn(w.size());
    noisy.classifier(wn.data());
    double sq = 0;
    for (size_t i = 0; i < w.size(); ++i) sq += (wn[i] - w[i]) * (double)(wn[i] - w[i]);
    EXPECT_NEAR(std::sqrt(sq / (double)w.size()), 0.2, 0.01);
}

TEST(Synth, InvalidSpecsAreRefusedNamingTheField) {
    const std::vector<std::pair<std::string, std::function<void(SynthSpec&)>>> cases = {
        {"rows", [](SynthSpec& s) { s.rows = 0; }},
        {"dim", [](SynthSpec& s) { s.dim = -1; }},
        {"classes", [](SynthSpec& s) { s.classes = 0; }},
        {"classes", [](SynthSpec& s) { s.classes = int64_t(1) << 32; }},
        {"classes * dim", [](SynthSpec& s) { s.classes = int64_t(1) << 20, s.dim = int64_t(1) << 12; }},
        {"zipf_s", [](SynthSpec& s) { s.zipf_s = -0.5; }},
        {"zipf_s", [](SynthSpec& s) { s.zipf_s = NAN; }},
        {"collapse", [](SynthSpec& s) { s.collapse = 1.5; }},
        {"collapse", [](SynthSpec& s) { s.collapse = -0.1; }},
        {"noise", [](SynthSpec& s) { s.noise = -1; }},
        {"noise", [](SynthSpec& s) { s.noise = INFINITY; }},
        {"mean_norm", [](SynthSpec& s) { s.mean_norm = 0; }},
        {"classifier_noise", [](SynthSpec& s) { s.classifier_noise = -0.1; }},
        {"dtype", [](SynthSpec& s) { s.dtype = COLLAPSE_I32; }},
    };
    for (const auto& [field, mutate] : cases) {
        SynthSpec s = small_spec();
        mutate(s);
        try {
            SynthGenerator g(s);
            ADD_FAILURE() << field << ": accepted";
        } catch (const collapse::internal::Error& e) {
            EXPECT_EQ(e.status(), COLLAPSE_ERR_INVALID_ARGUMENT) << field;
            EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << field << ": " << e.what();
        }
    }
}

TEST(Synth, BadCallsAreRefused) {
    SynthSpec s = small_spec();
    SynthGenerator g(s);
    std::vector<int32_t> y(10);
    std::vector<float> x((size_t)(10 * s.dim));
    auto status = [](const std::function<void()>& f) {
        try {
            f();
        } catch (const collapse::internal::Error& e) {
            return e.status();
        }
        return COLLAPSE_OK;
    };
    EXPECT_EQ(status([&] { g.labels(-1, 5, y.data()); }), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(status([&] { g.labels(s.rows - 5, 10, y.data()); }), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(status([&] { g.labels(0, 5, nullptr); }), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(status([&] { g.labels(s.rows, 0, nullptr); }), COLLAPSE_OK);
    y.assign(10, 0);
    y[3] = (int32_t)s.classes;
    EXPECT_EQ(status([&] { g.features(0, 10, y.data(), x.data()); }), COLLAPSE_ERR_BAD_INPUT);
    y[3] = -1;
    EXPECT_EQ(status([&] { g.features(0, 10, y.data(), x.data()); }), COLLAPSE_ERR_BAD_INPUT);
    EXPECT_EQ(status([&] { g.features(0, 10, nullptr, x.data()); }), COLLAPSE_ERR_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace test_synth
