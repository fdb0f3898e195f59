// docs/METRICS.md "Reference sanity values", as exact tests through the engine (public C++ API).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "common/compare.hpp"
#include "reference/brute_force.hpp"

namespace test_sanity_values {
namespace {

using nlohmann::json;
using LD = long double;

struct Line {
    std::string what;
    double value;
};
std::vector<Line>& summary_lines() {
    static std::vector<Line> v;
    return v;
}
void note(const std::string& what, double value) {
    summary_lines().push_back({what, value});
    std::cout << "[sanity] " << what << ": " << std::setprecision(10) << value << std::endl;
}
class PrintSanitySummary : public ::testing::Environment {
public:
    void TearDown() override {
        if (summary_lines().empty()) return;
        std::cout << "[sanity] summary: " << summary_lines().size() << " values checked";
        for (const auto& l : summary_lines()) std::cout << "; " << l.what << " = " << std::setprecision(4) << l.value;
        std::cout << std::endl;
    }
};
const auto* const kPrintSanity = ::testing::AddGlobalTestEnvironment(new PrintSanitySummary);

::testing::AssertionResult near_value(const std::string& what, const json& got, double want, double rel, double abs_floor) {
    return testutil::close(what, got, want, rel, abs_floor);
}

json report_of(collapse::Session& s) { return json::parse(s.compute().json()); }

// The mean pairwise cosine in closed form from the reference's unit directions u_c [K, d]:
// (||sum u||^2 - sum ||u||^2) / (K(K-1)), in long double.
double closed_form_mean_cosine(const std::vector<double>& u, int64_t K, int64_t d) {
    LD us2 = 0, uu = 0;
    for (int64_t t = 0; t < d; ++t) {
        LD col = 0;
        for (int64_t k = 0; k < K; ++k) col += u[(size_t)(k * d + t)];
        us2 += col * col;
    }
    for (double v : u) uu += (LD)v * v;
    return (double)((us2 - uu) / ((LD)K * (K - 1)));
}

// ---------------------------------------------------------------------------------------------
// Simplex ETF: class means M_c = s (e_c - 1/K 1) in the first K of d coordinates (d > K), so
// sum_c M_c = 0 (the class-balanced global mean is 0 and m_c = M_c) and every pair has cosine
// -1/(K-1). Scale s = 2^20 (norm ~1e6), so the +1e-8 of u_c moves nothing beyond ~1e-14.
// Rows: M_c + v_c, M_c - v_c, M_c (the class mean is exactly M_c, var_c > 0). For K a power of
// two every value is exact in float32; K = 10 goes in as float64.
struct EtfCase {
    int64_t K;
    bool f64;
};

void PrintTo(const EtfCase& c, std::ostream* os) { *os << "K=" << c.K << (c.f64 ? " float64" : " float32"); }

class SanityEtf : public ::testing::TestWithParam<EtfCase> {};

TEST_P(SanityEtf, SimplexEtfMeansWithClassifierEqualToMeans) {
    const int64_t K = GetParam().K, d = K + 3;
    const bool f64 = GetParam().f64;
    const double s = 1048576.0;  // 2^20
    std::vector<double> M((size_t)(K * d), 0.0);
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < K; ++j) M[(size_t)(c * d + j)] = s * ((j == c ? 1.0 : 0.0) - 1.0 / (double)K);
    std::vector<double> X;
    std::vector<int64_t> y;
    for (int64_t c = 0; c < K; ++c)
        for (int r = 0; r < 3; ++r) {
            for (int64_t j = 0; j < d; ++j) {
                double v = 0;
                if (j == K + (c % 3)) v = 0.5;              // off the ETF span
                if (j == (c + 1) % K) v += 0.25 * (c % 5 + 1);  // inside it
                X.push_back(M[(size_t)(c * d + j)] + (r == 0 ? v : r == 1 ? -v : 0.0));
            }
            y.push_back(c);
        }
    const int64_t N = (int64_t)y.size();
    collapse_options o = collapse::default_options();
    o.num_classes = K;
    collapse::Session sess(o);
    std::vector<float> Xf(X.begin(), X.end()), Mf(M.begin(), M.end());
    if (f64) {
        sess.ingest_rows(collapse::host_buffer(X.data(), N, d), collapse::host_buffer(y.data(), N));
        sess.set_classifier(collapse::host_buffer(M.data(), K, d));  // W = M
    } else {
        for (size_t i = 0; i < X.size(); ++i) ASSERT_EQ((double)Xf[i], X[i]) << "not exact in float32";
        sess.ingest_rows(collapse::host_buffer(Xf.data(), N, d), collapse::host_buffer(y.data(), N));
        sess.set_classifier(collapse::host_buffer(Mf.data(), K, d));  // W = M
    }
    const json rep = report_of(sess);
    const auto& o2 = rep["overall_analysis"];
    const double gnc2 = -0.5 * std::log(2.0 * (double)K / (double)(K - 1));
    EXPECT_TRUE(near_value("overall_gnc2", o2["overall_gnc2"], gnc2, 1e-12, 1e-12));
    EXPECT_TRUE(near_value("gnc2_var", o2["gnc2_var"], 0.0, 0.0, 1e-12));
    EXPECT_TRUE(near_value("nc2_equiangular_mean", o2["nc2_equiangular_mean"], -1.0 / (double)(K - 1), 1e-12, 1e-12));
    EXPECT_TRUE(near_value("nc2_equiangular_std", o2["nc2_equiangular_std"], 0.0, 0.0, 1e-12));
    EXPECT_TRUE(near_value("nc2_equiangular_ideal", o2["nc2_equiangular_ideal"], -1.0 / (double)(K - 1), 1e-15, 0.0));
    EXPECT_TRUE(near_value("nc2_equinorm_cov", o2["nc2_equinorm_cov"], 0.0, 0.0, 1e-12));
    EXPECT_TRUE(near_value("nc2_log_norm_std", o2["nc2_log_norm_std"], 0.0, 0.0, 1e-12));
    EXPECT_TRUE(near_value("overall_unc3", o2["overall_unc3"], 0.0, 0.0, 1e-12));
    EXPECT_TRUE(near_value("unc3_mean_cos", o2["unc3_mean_cos"], 1.0, 1e-12, 0.0));
    EXPECT_TRUE(near_value("nc3_self_duality", o2["nc3_self_duality"], 0.0, 0.0, 1e-12));
    EXPECT_EQ(o2["gnc2_skipped_pairs"].get<int64_t>(), 0);
    EXPECT_EQ(o2["gnc2_pairs"].get<int64_t>(), K * (K - 1) / 2);
    if (K == 16 && !f64)
        note("ETF K=16 overall_gnc2 - (-0.5 ln(2K/(K-1)))", o2["overall_gnc2"].get<double>() - gnc2);
}

INSTANTIATE_TEST_SUITE_P(Sanity, SanityEtf,
                         ::testing::Values(EtfCase{2, false}, EtfCase{4, false}, EtfCase{16, false}, EtfCase{64, false},
                                           EtfCase{10, true}),
                         [](const ::testing::TestParamInfo<EtfCase>& i) {
                             return "K" + std::to_string(i.param.K) + (i.param.f64 ? "_f64" : "_f32");
                         });

// ---------------------------------------------------------------------------------------------
// With class-balanced centring, mean over P of m_i . m_j = -mean_c ||m_c||^2 / (K-1), exactly:
// sum_c m_c = 0, so 0 = ||sum m||^2 = sum ||m||^2 + 2 sum_{i<j} m_i.m_j.

// (a) Equal norms (antipodal pairs m = +-v_k with ||v_k|| = R): then u_i.u_j = m_i.m_j / (R+1e-8)^2
// and the engine's nc2_equiangular_mean gives the mean of m_i.m_j directly.
TEST(SanityCentring, EqualNormsIdentityFromEngineEquiangularMean) {
    const int64_t K = 12, d = 20;
    const double R = 1000.0;
    std::mt19937_64 rng(5);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<double> m((size_t)(K * d));
    for (int64_t k = 0; k < K / 2; ++k) {
        std::vector<double> v((size_t)d);
        double q = 0;
        for (auto& t : v) t = g(rng), q += t * t;
        for (int64_t j = 0; j < d; ++j) {
            m[(size_t)((2 * k) * d + j)] = R * v[(size_t)j] / std::sqrt(q);
            m[(size_t)((2 * k + 1) * d + j)] = -R * v[(size_t)j] / std::sqrt(q);
        }
    }
    const double offset = 3.0;  // a common offset: centring removes it
    std::vector<double> X;
    std::vector<int64_t> y;
    for (int64_t c = 0; c < K; ++c)
        for (int r = 0; r < 2; ++r) {
            for (int64_t j = 0; j < d; ++j) X.push_back(offset + m[(size_t)(c * d + j)] + (r == 0 ? 1.0 : -1.0) * 0.125 * (double)((j + c) % 3));
            y.push_back(c);
        }
    collapse_options o = collapse::default_options();
    o.num_classes = K;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(X.data(), (int64_t)y.size(), d), collapse::host_buffer(y.data(), (int64_t)y.size()));
    const json rep = report_of(s);
    const double eq = rep["overall_analysis"]["nc2_equiangular_mean"].get<double>();
    const double mean_dot = eq * (R + 1e-8) * (R + 1e-8);  // mean over P of m_i . m_j
    const double want = -R * R / (double)(K - 1);
    EXPECT_NEAR(mean_dot, want, 1e-12 * std::fabs(want));
    EXPECT_TRUE(near_value("nc2_equinorm_cov", rep["overall_analysis"]["nc2_equinorm_cov"], 0.0, 0.0, 1e-12));
    note("equal-norm centring identity relative error", std::fabs(mean_dot - want) / std::fabs(want));
}

// (b) Unequal norms: the identity on the reference's own class statistics, and the engine's
// mean-derived metrics agree with those same statistics.
TEST(SanityCentring, UnequalNormsIdentityOnReferenceMeansAndEngineAgrees) {
    const int64_t V = 80, d = 24, N = 2400;
    std::mt19937_64 rng(6);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<double> means((size_t)(V * d)), scale((size_t)V);
    for (auto& v : scale) v = std::exp(g(rng));  // norms spread over e^{+-2}
    for (int64_t c = 0; c < V; ++c)
        for (int64_t j = 0; j < d; ++j) means[(size_t)(c * d + j)] = 2.0 + scale[(size_t)c] * 3.0 * g(rng);
    std::vector<float> Xf((size_t)(N * d));
    std::vector<double> X((size_t)(N * d));
    std::vector<int64_t> y((size_t)N);
    for (int64_t i = 0; i < N; ++i) {
        y[(size_t)i] = (i * 7) % V;
        for (int64_t j = 0; j < d; ++j) {
            Xf[(size_t)(i * d + j)] = (float)(means[(size_t)(y[(size_t)i] * d + j)] + 0.5 * g(rng));
            X[(size_t)(i * d + j)] = Xf[(size_t)(i * d + j)];
        }
    }
    ref::Options ro;
    ro.num_classes = V;
    const ref::ClassStats cs = ref::class_stats(X, y, d, ro);
    const int64_t K = (int64_t)cs.kept.size();
    ASSERT_EQ(K, V);
    LD pair_sum = 0, norm2_sum = 0;
    for (int64_t i = 0; i < K; ++i) {
        for (int64_t t = 0; t < d; ++t) norm2_sum += (LD)cs.m[(size_t)(i * d + t)] * cs.m[(size_t)(i * d + t)];
        for (int64_t j = i + 1; j < K; ++j)
            for (int64_t t = 0; t < d; ++t) pair_sum += (LD)cs.m[(size_t)(i * d + t)] * cs.m[(size_t)(j * d + t)];
    }
    const double mean_dot = (double)(pair_sum / ((LD)K * (K - 1) / 2));
    const double want = (double)(-(norm2_sum / K) / (K - 1));
    EXPECT_NEAR(mean_dot, want, 1e-12 * std::fabs(want));
    note("unequal-norm centring identity relative error (reference means)", std::fabs(mean_dot - want) / std::fabs(want));
    // The norms really are unequal.
    const double mn = *std::min_element(cs.m_norm.begin(), cs.m_norm.end()), mx = *std::max_element(cs.m_norm.begin(), cs.m_norm.end());
    EXPECT_GT(mx / mn, 3.0);

    collapse_options o = collapse::default_options();
    o.num_classes = V;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(Xf.data(), N, d), collapse::host_buffer(y.data(), N));
    const json rep = report_of(s);
    const auto& oa = rep["overall_analysis"];
    const double closed = closed_form_mean_cosine(cs.u, K, d);
    EXPECT_TRUE(testutil::close("nc2_equiangular_mean vs closed form", oa["nc2_equiangular_mean"], closed));
    const ref::Result want_r = ref::compute(X, y, d, nullptr, nullptr, ro);
    EXPECT_TRUE(testutil::close("nc2_equinorm_cov", oa["nc2_equinorm_cov"], want_r.nc2_equinorm_cov));
    EXPECT_TRUE(testutil::close("nc2_log_norm_std", oa["nc2_log_norm_std"], want_r.nc2_log_norm_std));
    EXPECT_TRUE(testutil::close("overall_gnc2", oa["overall_gnc2"], want_r.overall_gnc2));
    EXPECT_TRUE(testutil::close("nc1_cdnv", oa["nc1_cdnv"], want_r.nc1_cdnv));
}

// ---------------------------------------------------------------------------------------------
// A class with n_c = 2 has svd_entropy <= ln 2 (two singular values). Random classes, one with two
// orthogonal rows of equal norm (the maximum, ln 2 minus the 1e-10 of the definition) and one with
// two zero rows (H = 0, counted in svd_zero_matrices).
TEST(SanityTokens, TwoRowClassesHaveEntropyAtMostLn2) {
    const int64_t V = 150, d = 10;
    std::mt19937_64 rng(8);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<float> X;
    std::vector<int32_t> y;
    for (int64_t c = 0; c < V; ++c) {
        const int64_t n = c % 5 == 0 ? 3 : 2;
        for (int64_t r = 0; r < n; ++r) {
            for (int64_t j = 0; j < d; ++j) {
                float v = (float)(g(rng) + (double)(c % 7));
                if (c == 1) v = (j == r) ? 2.0f : 0.0f;  // orthogonal, equal norms
                if (c == 2) v = 0.0f;                    // zero matrix
                X.push_back(v);
            }
            y.push_back((int32_t)c);
        }
    }
    collapse_options o = collapse::default_options();
    o.num_classes = V;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(X.data(), (int64_t)y.size(), d), collapse::host_buffer(y.data(), (int64_t)y.size()));
    const json rep = report_of(s);
    int64_t two = 0;
    double worst = -1;
    for (auto it = rep["token_analysis"].begin(); it != rep["token_analysis"].end(); ++it) {
        if (it.value()["num_samples"].get<int64_t>() != 2) continue;
        ++two;
        const double h = it.value()["svd_entropy"].get<double>();
        EXPECT_LE(h, std::log(2.0)) << "token " << it.key();
        EXPECT_GE(h, 0.0) << "token " << it.key();
        EXPECT_LE(it.value()["effective_rank"].get<double>(), 2.0 + 1e-12) << "token " << it.key();
        worst = std::max(worst, h);
    }
    EXPECT_EQ(two, V - V / 5);
    // -2 * (1/2) ln(1/2 + 1e-10) = ln 2 - 2e-10 (to first order)
    EXPECT_NEAR(rep["token_analysis"]["1"]["svd_entropy"].get<double>(), std::log(2.0) - 2e-10, 1e-14);
    EXPECT_TRUE(near_value("normalized_entropy of token 1", rep["token_analysis"]["1"]["normalized_entropy"], 1.0, 0.0, 1e-9));
    EXPECT_EQ(rep["token_analysis"]["2"]["svd_entropy"].get<double>(), 0.0);
    EXPECT_EQ(rep["overall_analysis"]["svd_zero_matrices"].get<int64_t>(), 1);
    note("largest n_c = 2 entropy - ln 2", worst - std::log(2.0));
}

// ---------------------------------------------------------------------------------------------
// Random directions in high dimension (d = 2000, K = 50). With class-balanced centring the mean
// cosine is exactly -1/(K-1) for equal norms and ||u_i - u_j||^2 concentrates at 2K/(K-1), so
// overall_gnc2 ~ -0.5 ln(2K/(K-1)) = -0.3567. docs/METRICS.md's "~ -0.347" is -0.5 ln 2, the value
// without centring (||u_i - u_j|| ~ sqrt 2); at K = 50 the two differ by 0.01.
TEST(SanityRandom, HighDimensionalRandomDirectionsGnc2) {
    const int64_t K = 50, d = 2000;
    std::mt19937_64 rng(10);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<float> X;
    std::vector<int32_t> y;
    std::vector<double> mu((size_t)d);
    for (int64_t c = 0; c < K; ++c) {
        for (auto& v : mu) v = g(rng);
        for (int r = 0; r < 2; ++r) {
            for (int64_t j = 0; j < d; ++j) X.push_back((float)(mu[(size_t)j] + 0.1 * g(rng)));
            y.push_back((int32_t)c);
        }
    }
    collapse_options o = collapse::default_options();
    o.num_classes = K;
    o.compute_overall_metrics = 0;  // not needed here; keeps the test fast
    o.compute_token_metrics = 0;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(X.data(), (int64_t)y.size(), d), collapse::host_buffer(y.data(), (int64_t)y.size()));
    const json rep = report_of(s);
    const double gnc2 = rep["overall_analysis"]["overall_gnc2"].get<double>();
    const double centred = -0.5 * std::log(2.0 * K / (K - 1.0));
    const double uncentred = -0.5 * std::log(2.0);
    note("random directions d=2000 K=50 overall_gnc2", gnc2);
    EXPECT_NEAR(gnc2, centred, 2e-3);
    EXPECT_GT(std::fabs(gnc2 - uncentred), 5e-3) << "the centred value, not docs/METRICS.md's uncentred ~-0.347";
    EXPECT_NEAR(rep["overall_analysis"]["nc2_equiangular_mean"].get<double>(), -1.0 / (K - 1.0), 1e-3);
    EXPECT_LT(rep["overall_analysis"]["nc2_equiangular_std"].get<double>(), 0.05);  // ~ 1/sqrt(d)
}

// ---------------------------------------------------------------------------------------------
// unc3_classifier: class_means reproduces the seed's comparison, whose "classifier" was the
// uncentred class means: the same numbers as weights mode with W = mu (uncentred), and the report
// says so in its notes. Both agree with the reference's class_means mode.
TEST(SanityCompat, Unc3ClassMeansReproducesSeedComparison) {
    const int64_t V = 60, d = 16, N = 1800;
    std::mt19937_64 rng(11);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<double> means((size_t)(V * d));
    for (auto& v : means) v = 4.0 + 2.0 * g(rng);  // a large common offset: uncentred != centred
    std::vector<double> X((size_t)(N * d));
    std::vector<float> Xf((size_t)(N * d));
    std::vector<int64_t> y((size_t)N);
    for (int64_t i = 0; i < N; ++i) {
        y[(size_t)i] = (i * 13) % V;
        if (i % 29 == 0) y[(size_t)i] = V - 1;  // unequal counts
        for (int64_t j = 0; j < d; ++j) {
            Xf[(size_t)(i * d + j)] = (float)(means[(size_t)(y[(size_t)i] * d + j)] + g(rng));
            X[(size_t)(i * d + j)] = Xf[(size_t)(i * d + j)];
        }
    }
    // Seed-compatible mode, no classifier at all.
    collapse_options o = collapse::default_options();
    o.num_classes = V;
    o.unc3_classifier = COLLAPSE_UNC3_CLASS_MEANS;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(Xf.data(), N, d), collapse::host_buffer(y.data(), N));
    const json a = report_of(s);
    ASSERT_TRUE(a["overall_analysis"]["notes"].contains("unc3_classifier"));
    EXPECT_NE(a["overall_analysis"]["notes"]["unc3_classifier"].get<std::string>().find("class_means"), std::string::npos);
    EXPECT_EQ(a["config"]["unc3_classifier"], "class_means");

    // Weights mode with W = the uncentred class means (the reference's float64 means).
    ref::Options ro;
    ro.num_classes = V;
    const ref::ClassStats cs = ref::class_stats(X, y, d, ro);
    ASSERT_EQ((int64_t)cs.kept.size(), V);
    std::vector<double> W((size_t)(V * d));
    for (size_t k = 0; k < cs.kept.size(); ++k)
        std::copy_n(&cs.mu[k * (size_t)d], d, &W[(size_t)cs.kept[k] * (size_t)d]);
    collapse_options o2 = collapse::default_options();
    o2.num_classes = V;
    collapse::Session s2(o2);
    s2.ingest_rows(collapse::host_buffer(Xf.data(), N, d), collapse::host_buffer(y.data(), N));
    s2.set_classifier(collapse::host_buffer(W.data(), V, d));
    const json b = report_of(s2);
    EXPECT_FALSE(b["overall_analysis"]["notes"].contains("unc3_classifier"));
    for (const char* k : {"overall_unc3", "unc3_mean_cos", "unc3_std_cos", "nc3_self_duality"})
        EXPECT_TRUE(testutil::close(std::string(k) + " (class_means vs weights = mu)", a["overall_analysis"][k],
                                    b["overall_analysis"][k].get<double>()));

    ro.unc3_class_means = true;
    const ref::Result want = ref::compute(X, y, d, nullptr, nullptr, ro);
    EXPECT_TRUE(testutil::close("overall_unc3", a["overall_analysis"]["overall_unc3"], want.overall_unc3));
    EXPECT_TRUE(testutil::close("nc3_self_duality", a["overall_analysis"]["nc3_self_duality"], want.nc3_self_duality));
    note("class_means mode overall_unc3", a["overall_analysis"]["overall_unc3"].get<double>());
}

// ---------------------------------------------------------------------------------------------
// K = 50,000 kept classes (d = 4, 2 rows each): ~1.25e9 pairs. No K x K matrix may exist (50k^2
// doubles = 20 GB): the peak resident set grows far less, and nc2_equiangular_mean equals its
// closed form (||sum u||^2 - sum ||u||^2) / (K(K-1)) from the reference's class statistics.
int64_t status_kib(const char* field) {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind(field, 0) == 0) {
            std::istringstream is(line.substr(std::string(field).size() + 1));
            int64_t kb = -1;
            is >> kb;
            return kb;
        }
    return -1;
}

TEST(SanityScale, FiftyThousandClassesWithoutKxKMatrix) {
    const int64_t K = 50000, d = 4, N = 2 * K;
    std::mt19937_64 rng(12);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<float> Xf((size_t)(N * d));
    std::vector<double> X((size_t)(N * d));
    std::vector<int32_t> y((size_t)N);
    std::vector<double> mu((size_t)d);
    for (int64_t c = 0; c < K; ++c) {
        for (auto& v : mu) v = 3.0 * g(rng);
        for (int64_t r = 0; r < 2; ++r) {
            const int64_t i = 2 * c + r;
            y[(size_t)i] = (int32_t)c;
            for (int64_t j = 0; j < d; ++j) {
                Xf[(size_t)(i * d + j)] = (float)(mu[(size_t)j] + 0.3 * g(rng));
                X[(size_t)(i * d + j)] = Xf[(size_t)(i * d + j)];
            }
        }
    }
    // Reset the peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS).
    bool reset = false;
    {
        std::ofstream cr("/proc/self/clear_refs");
        if (cr) {
            cr << "5";
            cr.flush();
            reset = cr.good();
        }
    }
    const int64_t rss0 = status_kib("VmRSS:"), hwm0 = status_kib("VmHWM:");
    ASSERT_GT(rss0, 0) << "/proc/self/status unreadable";
    const auto t0 = std::chrono::steady_clock::now();
    collapse_options o = collapse::default_options();
    o.num_classes = K;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(Xf.data(), N, d), collapse::host_buffer(y.data(), N));
    const json rep = report_of(s);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int64_t hwm1 = status_kib("VmHWM:");
    const double growth = (double)(hwm1 - (reset ? rss0 : hwm0)) * 1024.0;
    const double kxk = (double)K * (double)K * 8.0;
    note("K=50000 engine seconds", secs);
    std::cout << "[sanity] K=50000 engine timings: " << rep["engine"]["timings_seconds"].dump() << std::endl;
    note("K=50000 peak RSS growth MiB", growth / 1048576.0);
    RecordProperty("engine_seconds", std::to_string(secs));
    EXPECT_LT(growth, kxk / 20.0) << "peak RSS grew by " << growth / 1048576.0 << " MiB; a K x K matrix is "
                                  << kxk / 1048576.0 << " MiB";
    EXPECT_LT(growth, 1024.0 * 1048576.0) << "more than 1 GiB for K = 50,000, d = 4";

    const auto& oa = rep["overall_analysis"];
    EXPECT_EQ(oa["gnc2_pairs"].get<int64_t>(), K * (K - 1) / 2);
    ASSERT_TRUE(oa["overall_gnc2"].is_number());
    ASSERT_TRUE(oa["nc1_cdnv"].is_number());

    std::vector<double> Xd(X.begin(), X.end());
    std::vector<int64_t> yl(y.begin(), y.end());
    ref::Options ro;
    ro.num_classes = K;
    const ref::ClassStats cs = ref::class_stats(Xd, yl, d, ro);
    ASSERT_EQ((int64_t)cs.kept.size(), K);
    const double closed = closed_form_mean_cosine(cs.u, K, d);
    EXPECT_TRUE(testutil::close("nc2_equiangular_mean vs closed form", oa["nc2_equiangular_mean"], closed));
    note("K=50000 nc2_equiangular_mean - closed form", oa["nc2_equiangular_mean"].get<double>() - closed);
}

}  // namespace
}  // namespace test_sanity_values
