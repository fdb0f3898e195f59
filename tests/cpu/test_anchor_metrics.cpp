// The anchor metrics (docs/METRICS.md, "Anchor metrics": the neural_collapse library's measures) on
// the CPU engine, through the public C++ API, against the float64 brute force of
// tests/reference/brute_force.hpp (ref::anchors: explicit K x K matrices, Sigma_W from the rows,
// Sigma_B's pseudo-inverse by Jacobi eigenpairs). Each test name names the library function
// (rhubarbwu/neural-collapse, neural_collapse/measure.py and kernels.py) whose formula it checks:
//   nc1_pinv  covariance_pinv            nc1_svd  covariance_pinv(svd=True)   nc1_quot  covariance_ratio
//   nc2_etf_err  simplex_etf_error       nc3_dual_err  self_duality_error     nc3u_uni_dual  similarities(...).var()
//   nc2g_dist_mean/var  kernel_stats(dist_kernel)   nc5_ood_dev  orthogonality_deviation
//   nc2_equiangular_absdev / nc2_max_equiangular_dev  Papyan et al. 2020 Figure 4 (|cos + 1/(C-1)|)
// Accuracy contract: 1e-9 relative, 1e-12 absolute near zero.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/dtype.hpp"
#include "collapse/collapse.hpp"
#include "common/compare.hpp"
#include "io/tensor_file.hpp"
#include "reference/brute_force.hpp"

namespace test_anchor_metrics {
namespace {

using nlohmann::json;

// Worst relative error per key over the file, printed at the end (the report's agreement figures).
std::map<std::string, double>& worst() {
    static std::map<std::string, double> w;
    return w;
}
class PrintWorst : public ::testing::Environment {
public:
    void TearDown() override {
        if (worst().empty()) return;
        std::cout << "[anchor-metrics] max |diff| / max(|ref|, 1e-3) vs the float64 brute force:\n";
        for (const auto& [k, v] : worst()) std::cout << "  " << k << ": " << v << "\n";
    }
};
const auto* const kPrintWorst = ::testing::AddGlobalTestEnvironment(new PrintWorst);

::testing::AssertionResult near(const std::string& key, const json& got, const std::optional<double>& want, double rel = 1e-9,
                                double abs_floor = 1e-12) {
    if (want && got.is_number()) {
        const double e = std::fabs(got.get<double>() - *want) / std::max(std::fabs(*want), abs_floor / rel);
        worst()[key] = std::max(worst()[key], e);
    }
    return testutil::close(key, got, want, rel, abs_floor);
}

struct Input {
    int64_t N = 0, d = 0, V = 0;
    std::vector<float> x;    // N x d
    std::vector<int32_t> y;  // N
    std::vector<float> w;    // V x d
};

// The first and the second half of in's rows (two shards of one input).
std::pair<Input, Input> halves(const Input& in) {
    Input a = in, b = in;
    const int64_t half = in.N / 2;
    a.N = half, b.N = in.N - half;
    a.x.assign(in.x.begin(), in.x.begin() + half * in.d), a.y.assign(in.y.begin(), in.y.begin() + half);
    b.x.assign(in.x.begin() + half * in.d, in.x.end()), b.y.assign(in.y.begin() + half, in.y.end());
    return {a, b};
}

// Class means with per-coordinate std `sep` around `offset`, rows with std `noise` around them;
// labels uniform over [0, used) (used = V), or Zipf-like when zipf (a tail below min_samples).
Input make(int64_t V, int64_t d, int64_t N, uint64_t seed, double sep = 3.0, double noise = 1.0, double offset = 2.0, bool zipf = false) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> g(0.0, 1.0);
    Input in;
    in.N = N, in.d = d, in.V = V;
    std::vector<double> mu((size_t)(V * d));
    for (auto& v : mu) v = offset + sep * g(rng);
    in.y.resize((size_t)N);
    std::vector<double> wts((size_t)V);
    for (int64_t c = 0; c < V; ++c) wts[(size_t)c] = zipf ? 1.0 / std::pow((double)c + 1.0, 1.2) : 1.0;
    std::discrete_distribution<int32_t> pick(wts.begin(), wts.end());
    for (auto& l : in.y) l = pick(rng);
    in.x.resize((size_t)(N * d));
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < d; ++j) in.x[(size_t)(i * d + j)] = (float)(mu[(size_t)(in.y[(size_t)i] * d + j)] + noise * g(rng));
    in.w.resize((size_t)(V * d));
    for (auto& v : in.w) v = (float)g(rng);
    return in;
}

struct RunSpec {
    int64_t batch = 257;
    bool classifier = true;
    std::vector<double> ood;  // empty: none
    std::function<void(collapse_options&)> tweak;
    std::vector<int64_t> order;  // row order (empty: as given)
};

collapse_options options_for(const Input& in, const RunSpec& r) {
    collapse_options o = collapse::default_options();
    o.num_classes = in.V;
    if (r.tweak) r.tweak(o);
    return o;
}

void ingest_all(collapse::Session& s, const Input& in, const RunSpec& r) {
    std::vector<float> x(in.x);
    std::vector<int32_t> y(in.y);
    if (!r.order.empty())
        for (int64_t i = 0; i < in.N; ++i) {
            const int64_t src = r.order[(size_t)i];
            std::copy(in.x.begin() + src * in.d, in.x.begin() + (src + 1) * in.d, x.begin() + i * in.d);
            y[(size_t)i] = in.y[(size_t)src];
        }
    for (int64_t r0 = 0; r0 < in.N; r0 += r.batch) {
        const int64_t n = std::min(r.batch, in.N - r0);
        s.ingest_rows(collapse::host_buffer(x.data() + r0 * in.d, n, in.d), collapse::host_buffer(y.data() + r0, n));
    }
}

json overall(collapse::Report rep) { return json::parse(rep.json())["overall_analysis"]; }

json run_engine(const Input& in, const RunSpec& r = {}) {
    collapse::Session s(options_for(in, r));
    if (r.classifier) s.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
    if (!r.ood.empty()) s.set_ood_mean(r.ood);
    ingest_all(s, in, r);
    if (s.needs_second_pass()) {
        s.begin_second_pass();
        ingest_all(s, in, r);
    }
    return overall(s.compute());
}

ref::Anchors run_ref(const Input& in, const RunSpec& r = {}, ref::Options o = {}) {
    o.num_classes = in.V;
    std::vector<double> x(in.x.begin(), in.x.end()), w(in.w.begin(), in.w.end());
    std::vector<int64_t> y(in.y.begin(), in.y.end());
    return ref::anchors(x, y, in.d, r.classifier ? w.data() : nullptr, r.ood.empty() ? nullptr : r.ood.data(), o);
}

const char* const kKeys[] = {"nc1_pinv", "nc1_svd", "nc1_quot", "nc2_etf_err", "nc3_dual_err", "nc3u_uni_dual",
                             "nc2g_dist_mean", "nc2g_dist_var", "nc2_equiangular_absdev", "nc2_max_equiangular_dev", "nc5_ood_dev"};

std::optional<double> ref_value(const ref::Anchors& a, const std::string& k) {
    if (k == "nc1_pinv") return a.nc1_pinv;
    if (k == "nc1_svd") return a.nc1_svd;
    if (k == "nc1_quot") return a.nc1_quot;
    if (k == "nc2_etf_err") return a.nc2_etf_err;
    if (k == "nc3_dual_err") return a.nc3_dual_err;
    if (k == "nc3u_uni_dual") return a.nc3u_uni_dual;
    if (k == "nc2g_dist_mean") return a.nc2g_dist_mean;
    if (k == "nc2g_dist_var") return a.nc2g_dist_var;
    if (k == "nc2_equiangular_absdev") return a.nc2_equiangular_absdev;
    if (k == "nc2_max_equiangular_dev") return a.nc2_max_equiangular_dev;
    return a.nc5_ood_dev;
}

// The shapes every formula test sweeps: K < d, K > d, K ~ d, a Zipf tail below min_samples_per_token
// (held-back rows) with an excluded id, token-weighted centring, and class_means as w_c.
struct Shape {
    std::string name;
    Input in;
    RunSpec run;
    ref::Options opt;
};
const std::vector<Shape>& shapes() {
    static const std::vector<Shape> s = [] {
        std::vector<Shape> v;
        std::vector<double> ood(24);
        for (size_t j = 0; j < ood.size(); ++j) ood[j] = 1.0 + 0.1 * (double)j;
        v.push_back({"K<d", make(8, 24, 600, 11), {}, {}});
        v.back().run.ood = ood;
        v.push_back({"K>d", make(48, 10, 2000, 12), {}, {}});
        v.back().run.ood.assign(ood.begin(), ood.begin() + 10);
        v.push_back({"K=d-1", make(17, 16, 900, 13), {}, {}});
        Shape z{"zipf+min3+exclude", make(40, 12, 1500, 14, 3.0, 1.0, 2.0, true), {}, {}};
        z.run.tweak = [](collapse_options& o) {
            static const int64_t ex[] = {3};
            o.min_samples_per_token = 3;
            o.exclude_token_ids = ex;
            o.num_exclude_token_ids = 1;
        };
        z.opt.min_samples = 3;
        z.opt.exclude = {3};
        v.push_back(z);
        Shape t{"token_weighted", make(20, 12, 1200, 15, 3.0, 1.0, 2.0, true), {}, {}};
        t.run.tweak = [](collapse_options& o) { o.global_mean = COLLAPSE_MEAN_TOKEN_WEIGHTED; };
        t.opt.token_weighted_mean = true;
        v.push_back(t);
        Shape m{"class_means_as_w", make(12, 9, 700, 16), {}, {}};
        m.run.classifier = false;
        m.run.tweak = [](collapse_options& o) { o.unc3_classifier = COLLAPSE_UNC3_CLASS_MEANS; };
        m.opt.unc3_class_means = true;
        v.push_back(m);
        return v;
    }();
    return s;
}

// Engine reports of the shapes, computed once.
const std::vector<json>& shape_reports() {
    static const std::vector<json> r = [] {
        std::vector<json> v;
        for (const Shape& s : shapes()) v.push_back(run_engine(s.in, s.run));
        return v;
    }();
    return r;
}

void expect_keys_match(const std::vector<std::string>& keys) {
    for (size_t i = 0; i < shapes().size(); ++i) {
        const Shape& s = shapes()[i];
        const ref::Anchors want = run_ref(s.in, s.run, s.opt);
        const json& o = shape_reports()[i];
        for (const std::string& k : keys) EXPECT_TRUE(near(k, o[k], ref_value(want, k))) << s.name;
    }
}

TEST(AnchorMetrics, Nc1PinvSvdQuot_MatchLibrary_covariance_pinv_and_covariance_ratio) {
    expect_keys_match({"nc1_pinv", "nc1_svd", "nc1_quot"});
    // K > d: Sigma_B has full rank d, so the top min(K-1, d) = d eigenpairs are all of them.
    EXPECT_NEAR(shape_reports()[1]["nc1_svd"].get<double>(), shape_reports()[1]["nc1_pinv"].get<double>(), 1e-12);
}
TEST(AnchorMetrics, Nc2EtfErr_MatchesLibrary_simplex_etf_error) { expect_keys_match({"nc2_etf_err"}); }
TEST(AnchorMetrics, Nc3DualErr_MatchesLibrary_self_duality_error) {
    expect_keys_match({"nc3_dual_err"});
    // Distinct from Papyan's nc3_self_duality: both reported, different numbers.
    const json& o = shape_reports()[0];
    EXPECT_GT(std::fabs(o["nc3_dual_err"].get<double>() - o["nc3_self_duality"].get<double>()), 1e-3);
}
TEST(AnchorMetrics, Nc3uUniDual_MatchesLibrary_similarities_dot_var) { expect_keys_match({"nc3u_uni_dual"}); }
TEST(AnchorMetrics, Nc2gDist_MatchesLibrary_kernel_stats_dist_kernel) { expect_keys_match({"nc2g_dist_mean", "nc2g_dist_var"}); }
TEST(AnchorMetrics, Nc2EquiangularAbsdevAndMax_MatchPapyanFigure4) {
    expect_keys_match({"nc2_equiangular_absdev", "nc2_max_equiangular_dev"});
}
TEST(AnchorMetrics, Nc5OodDev_MatchesLibrary_orthogonality_deviation) {
    expect_keys_match({"nc5_ood_dev"});
    EXPECT_TRUE(shape_reports()[2]["nc5_ood_dev"].is_null());
    EXPECT_NE(shape_reports()[2]["notes"]["nc5_ood_dev"].get<std::string>().find("out-of-distribution"), std::string::npos);
}

// Tight clusters: means ~1e3, spread ~1e-4 (a few float32 ulps). E[xx^T] - mu mu^T cancels 14 digits
// there; the engine's scatter of rows shifted by each class's first row does not.
TEST(AnchorMetrics, TightClusters_Nc1MatchesLibraryCovariancePinv_WhereTheNaiveFormulaFails) {
    const Input in = make(10, 6, 800, 21, /*sep=*/300.0, /*noise=*/1e-4, /*offset=*/1000.0);
    const ref::Anchors want = run_ref(in);
    const json o = run_engine(in);
    // Values near 1e-13: relative 1e-9 with no absolute floor.
    for (const char* k : {"nc1_pinv", "nc1_svd", "nc1_quot"}) EXPECT_TRUE(near(std::string(k) + " (tight, relative)", o[k], ref_value(want, k), 1e-9, 0.0));
    // The naive route, in float64: Tr(Sigma_W) = (sum ||x||^2 - sum_c n_c ||mu_c||^2) / N.
    const ref::ClassStats cs = [&] {
        std::vector<double> x(in.x.begin(), in.x.end());
        std::vector<int64_t> y(in.y.begin(), in.y.end());
        ref::Options opt;
        opt.num_classes = in.V;
        return ref::class_stats(x, y, in.d, opt);
    }();
    double sxx = 0, smm = 0;
    for (int64_t i = 0; i < in.N * in.d; ++i) sxx += (double)in.x[(size_t)i] * (double)in.x[(size_t)i];
    for (size_t k = 0; k < cs.n.size(); ++k)
        for (int64_t j = 0; j < in.d; ++j) smm += (double)cs.n[k] * cs.mu[k * (size_t)in.d + (size_t)j] * cs.mu[k * (size_t)in.d + (size_t)j];
    double tr_b = 0;
    for (int64_t j = 0; j < in.d; ++j) tr_b += want.sigma_b[(size_t)(j * in.d + j)];
    const double naive_quot = (sxx - smm) / (double)in.N / tr_b;
    const double naive_err = std::fabs(naive_quot - *want.nc1_quot) / *want.nc1_quot;
    const double engine_err = std::fabs(o["nc1_quot"].get<double>() - *want.nc1_quot) / *want.nc1_quot;
    const double pinv_err = std::fabs(o["nc1_pinv"].get<double>() - *want.nc1_pinv) / *want.nc1_pinv;
    std::printf("[anchor-metrics] tight clusters: nc1_quot reference %.6e, engine rel. error %.2e, naive E[xx^T] - mu mu^T rel. error %.2e; "
                "nc1_pinv reference %.6e, engine rel. error %.2e\n",
                *want.nc1_quot, engine_err, naive_err, *want.nc1_pinv, pinv_err);
    EXPECT_GT(naive_err, 1e-4);  // the naive formula loses the digits ...
    EXPECT_LT(engine_err, 1e-9);  // ... the engine keeps them
}

// Per-class variances of tight classes far from the origin (|mu_c| ~ 2e3, rows 1e-4 around them):
// E||x||^2 - ||mu_c||^2 (the old route) cancels about 14 digits there; the sums about each class's
// reference row (core/shifted_sums.hpp) keep them. nc1_cdnv (Galanti et al.'s variability_cdnv in
// the library) and the per-class within_variance against the float64 brute force, in every
// svd_mode (exact takes var_c from its row store, sampled and off from the sums alone), and after a
// checkpoint merge of the rows split over two sessions (whose reference rows differ).
json full_report(collapse::Session& s) { return json::parse(s.compute().json()); }

void expect_tight_variances(const json& rep, const Input& in, const std::string& what) {
    std::vector<double> x(in.x.begin(), in.x.end()), w(in.w.begin(), in.w.end());
    std::vector<int64_t> y(in.y.begin(), in.y.end());
    ref::Options o;
    o.num_classes = in.V;
    const ref::Result want = ref::compute(x, y, in.d, w.data(), nullptr, o);
    const ref::ClassStats cs = ref::class_stats(x, y, in.d, o);
    EXPECT_TRUE(near("nc1_cdnv (tight, relative)", rep["overall_analysis"]["nc1_cdnv"], want.nc1_cdnv, 1e-9, 0.0)) << what;
    ASSERT_EQ(rep["token_analysis"].size(), cs.kept.size()) << what;
    for (size_t k = 0; k < cs.kept.size(); ++k)
        EXPECT_TRUE(near("within_variance (tight, relative)", rep["token_analysis"][std::to_string(cs.kept[k])]["within_variance"], cs.var[k], 1e-9, 0.0))
            << what << ", class " << cs.kept[k];
}

TEST(AnchorMetrics, TightClustersFarFromOrigin_CdnvAndWithinVariance_MatchBruteForce) {
    const Input in = make(12, 6, 600, 23, /*sep=*/1.0, /*noise=*/1e-4, /*offset=*/2000.0);
    for (collapse_svd_mode mode : {COLLAPSE_SVD_OFF, COLLAPSE_SVD_SAMPLED, COLLAPSE_SVD_EXACT}) {
        RunSpec r;
        r.batch = 97;
        r.tweak = [mode](collapse_options& o) {
            o.svd_mode = mode;
            o.per_class_arrays = 1;
        };
        collapse::Session s(options_for(in, r));
        s.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
        ingest_all(s, in, r);
        expect_tight_variances(full_report(s), in, "svd_mode " + std::to_string((int)mode));
    }
}

TEST(AnchorMetrics, TightClustersFarFromOrigin_CheckpointMergeOfTwoSessions_MatchesBruteForce) {
    const Input in = make(12, 6, 600, 24, /*sep=*/1.0, /*noise=*/1e-4, /*offset=*/2000.0);
    RunSpec r;
    r.tweak = [](collapse_options& o) {
        o.svd_mode = COLLAPSE_SVD_OFF;
        o.per_class_arrays = 1;
    };
    const std::string dir = ::testing::TempDir() + "anchors_tight_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    // Each half starts every class with another first row: the two reference rows differ.
    const auto [a, b] = halves(in);
    for (const Input* part : {&a, &b}) {
        collapse::Session s(options_for(in, r));
        s.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
        ingest_all(s, *part, r);
        s.save(dir + (part == &a ? "/a.ckpt" : "/b.ckpt"));
    }
    collapse::Session m(options_for(in, r));
    m.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
    m.load(dir + "/b.ckpt");
    m.merge(dir + "/a.ckpt");  // b's reference rows stay; a's sums of squares move to them
    // Saved again and resumed: the merged state goes through a checkpoint whole.
    m.save(dir + "/ab.ckpt");
    expect_tight_variances(full_report(m), in, "b.ckpt + a.ckpt");
    collapse::Session resumed(options_for(in, r));
    resumed.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
    resumed.load(dir + "/ab.ckpt");
    expect_tight_variances(full_report(resumed), in, "ab.ckpt resumed");
    std::filesystem::remove_all(dir);
}

// Simplex ETF (docs/METRICS.md "Reference sanity values"): rows e_c + 3 (every row equal to its
// class mean), W rows e_c (so W_K M^T = I - J/K), K = 5 in d = 8.
TEST(AnchorMetrics, SimplexEtf_SanityValuesOfLibraryFormulas) {
    const int64_t K = 5, d = 8;
    Input in;
    in.N = 3 * K, in.d = d, in.V = K;
    for (int64_t i = 0; i < in.N; ++i) {
        const int32_t c = (int32_t)(i % K);
        in.y.push_back(c);
        for (int64_t j = 0; j < d; ++j) in.x.push_back(3.0f + (j == c ? 1.0f : 0.0f));
    }
    for (int64_t c = 0; c < K; ++c)
        for (int64_t j = 0; j < d; ++j) in.w.push_back(j == c ? 1.0f : 0.0f);
    const json o = run_engine(in);
    for (const char* k : {"nc2_etf_err", "nc2_equiangular_absdev", "nc2_max_equiangular_dev", "nc2g_dist_var", "nc3u_uni_dual", "nc1_pinv",
                          "nc1_svd", "nc1_quot"})
        EXPECT_NEAR(o[k].get<double>(), 0.0, 1e-12) << k;
    // ||u_i - u_j|| = sqrt(2 + 2/(K-1)) for every pair of a simplex.
    EXPECT_NEAR(o["nc2g_dist_mean"].get<double>(), std::sqrt(2.0 + 2.0 / (K - 1)), 1e-12);
    // The closed form 2 - 2<S, E> of nc3_dual_err cancels near 0: about sqrt(eps) absolute.
    EXPECT_NEAR(o["nc3_dual_err"].get<double>(), 0.0, 1e-7);
}

TEST(AnchorMetrics, BatchAndOrderInvariance) {
    const Input in = make(30, 12, 1500, 31, 3.0, 1.0, 50.0);
    RunSpec a;
    a.batch = 1500;
    RunSpec b;
    b.batch = 7;
    RunSpec c;
    c.batch = 131;
    c.order.resize((size_t)in.N);
    std::iota(c.order.begin(), c.order.end(), 0);
    std::mt19937_64 rng(5);
    std::shuffle(c.order.begin(), c.order.end(), rng);
    const json ra = run_engine(in, a), rb = run_engine(in, b), rc = run_engine(in, c);
    for (const char* k : kKeys) {
        if (ra[k].is_null()) continue;
        EXPECT_TRUE(testutil::close(std::string(k) + " (batch 7)", rb[k], ra[k].get<double>(), 1e-12, 1e-15));
        EXPECT_TRUE(testutil::close(std::string(k) + " (shuffled)", rc[k], ra[k].get<double>(), 1e-12, 1e-15));
    }
}

// Two shards (classes in both, classes held back below min_samples_per_token in each that qualify
// together), saved and merged: the same numbers as one session over all rows, and the OoD mean
// travels with the state.
TEST(AnchorMetrics, CheckpointSaveLoadMerge_MatchesOneSessionAndBruteForce) {
    const Input in = make(25, 8, 400, 41, 2.0, 0.01, 100.0, true);
    std::vector<double> ood(8, 0.5);
    ood[0] = 2.0;
    RunSpec r;
    r.ood = ood;
    r.tweak = [](collapse_options& o) { o.min_samples_per_token = 3; };
    ref::Options ro;
    ro.min_samples = 3;
    const json whole = run_engine(in, r);
    const ref::Anchors want = run_ref(in, r, ro);
    const std::string dir = ::testing::TempDir() + "anchors_ckpt_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    const auto [a, b] = halves(in);
    {
        collapse::Session s(options_for(in, r));
        s.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
        s.set_ood_mean(ood);
        ingest_all(s, a, r);
        s.save(dir + "/a.ckpt");
    }
    {
        collapse::Session s(options_for(in, r));
        s.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
        ingest_all(s, b, r);
        s.save(dir + "/b.ckpt");
    }
    collapse::Session m(options_for(in, r));
    m.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
    m.load(dir + "/b.ckpt");
    m.merge(dir + "/a.ckpt");  // b's reference rows stay; a's scatter moves to them
    const json merged = overall(m.compute());
    for (const char* k : kKeys) {
        EXPECT_TRUE(near(k, merged[k], ref_value(want, k))) << "merged";
        if (!whole[k].is_null()) EXPECT_TRUE(testutil::close(std::string(k) + " merged vs one session", merged[k], whole[k].get<double>(), 1e-10, 1e-13));
    }
    EXPECT_FALSE(merged["nc5_ood_dev"].is_null());  // a's OoD mean came with its state
    // A shard with another OoD mean is refused, naming it, and the session stays usable.
    {
        collapse::Session s(options_for(in, r));
        s.set_classifier(collapse::host_buffer(in.w.data(), in.V, in.d));
        std::vector<double> other(ood);
        other[1] = 7.0;
        s.set_ood_mean(other);
        ingest_all(s, b, r);
        try {
            s.merge(dir + "/a.ckpt");
            ADD_FAILURE() << "merge of another OoD mean was accepted";
        } catch (const collapse::ApiError& e) {
            EXPECT_NE(std::string(e.what()).find("out-of-distribution"), std::string::npos) << e.what();
        }
        EXPECT_FALSE(overall(s.compute())["nc1_pinv"].is_null());
    }
    std::filesystem::remove_all(dir);
}

// max_tokens_to_analyze: the kept set is known only at the end. Sigma_W from the row store (exact
// mode), from the second pass (no store), or null with a note (neither).
TEST(AnchorMetrics, MaxTokensToAnalyze_RowStoreSecondPassOrNullWithNote) {
    const Input in = make(20, 7, 900, 51, 3.0, 1.0, 2.0, true);
    ref::Options ro;
    ro.max_tokens = 6;
    const ref::Anchors want = run_ref(in, {}, ro);
    for (int mode = 0; mode < 2; ++mode) {
        RunSpec r;
        r.tweak = [mode](collapse_options& o) {
            o.max_tokens_to_analyze = 6;
            if (mode == 1) o.svd_mode = COLLAPSE_SVD_OFF;  // no row store: the second pass
        };
        const json o = run_engine(in, r);
        for (const char* k : kKeys) EXPECT_TRUE(near(k, o[k], ref_value(want, k))) << (mode ? "second pass" : "row store");
    }
    RunSpec r;
    r.tweak = [](collapse_options& o) {
        o.max_tokens_to_analyze = 6;
        o.svd_mode = COLLAPSE_SVD_OFF;
        o.compute_overall_metrics = 0;  // no second pass is asked for
    };
    const json o = run_engine(in, r);
    EXPECT_TRUE(o["nc1_pinv"].is_null());
    EXPECT_NE(o["notes"]["nc1_pinv"].get<std::string>().find("max_tokens_to_analyze"), std::string::npos);
    EXPECT_TRUE(near("nc2_etf_err", o["nc2_etf_err"], want.nc2_etf_err));
}

TEST(AnchorMetrics, NullsCarryNotes) {
    const Input in = make(6, 5, 300, 61);
    RunSpec r;
    r.classifier = false;
    const json o = run_engine(in, r);
    for (const char* k : {"nc3_dual_err", "nc3u_uni_dual", "nc5_ood_dev"}) {
        EXPECT_TRUE(o[k].is_null()) << k;
        EXPECT_TRUE(o["notes"].contains(k)) << k;
    }
    EXPECT_NE(o["notes"]["nc3_dual_err"].get<std::string>().find("classifier"), std::string::npos);
    // One kept class: every anchor metric is null, each with a note.
    Input one = make(1, 4, 50, 62);
    const json o1 = run_engine(one);
    for (const char* k : kKeys) {
        EXPECT_TRUE(o1[k].is_null()) << k;
        EXPECT_TRUE(o1["notes"].contains(k)) << k;
    }
}

TEST(AnchorMetrics, SetOodMeanRefusesBadInputAndChangesNothing) {
    const Input in = make(6, 5, 300, 71);
    collapse::Session s(options_for(in, {}));
    ingest_all(s, in, {});
    const auto refused = [&](const std::vector<double>& m, const std::string& piece) {
        try {
            s.set_ood_mean(m);
            ADD_FAILURE() << "accepted";
        } catch (const collapse::ApiError& e) {
            EXPECT_NE(std::string(e.what()).find(piece), std::string::npos) << e.what();
        }
    };
    refused(std::vector<double>(4, 1.0), "width d = 5");
    refused({1, 2, NAN, 4, 5}, "not finite");
    EXPECT_TRUE(overall(s.compute())["nc5_ood_dev"].is_null());  // nothing was set
    // Given before the width is known, rows of another width are refused.
    collapse::Session early(options_for(in, {}));
    early.set_ood_mean(std::vector<double>(3, 1.0));
    EXPECT_THROW(ingest_all(early, in, {}), collapse::ApiError);
}

// The real hidden states (first 12,000 rows; skipped without ../shared/data/stories260k).
TEST(AnchorMetrics, RealData_Stories260k_MatchesLibraryFormulas) {
    const std::string dir = std::string(COLLAPSE_SHARED_DIR) + "/data/stories260k";
    if (!std::filesystem::exists(dir + "/features.npy")) GTEST_SKIP() << dir << " is absent";
    namespace ci = collapse::internal;
    const auto f = ci::io::open_npy(dir + "/features.npy");
    const auto l = ci::io::open_npy(dir + "/labels.npy");
    const auto c = ci::io::open_npy(dir + "/classifier.npy");
    Input in;
    in.N = std::min<int64_t>(12000, f.shape[0]), in.d = f.shape[1], in.V = c.shape[0];
    for (int64_t i = 0; i < in.N * in.d; ++i) in.x.push_back((float)ci::load_as_double(f.data(), f.dtype, i));  // float16 -> float32 exactly
    for (int64_t i = 0; i < in.N; ++i) in.y.push_back((int32_t)ci::load_as_int(l.data(), l.dtype, i));
    for (int64_t i = 0; i < in.V * in.d; ++i) in.w.push_back((float)ci::load_as_double(c.data(), c.dtype, i));
    RunSpec r;
    r.batch = 4096;
    r.ood.assign((size_t)in.d, 0.0);  // the mean of rows 12000.. as the "other" input
    const int64_t n2 = f.shape[0] - in.N;
    for (int64_t i = in.N; i < f.shape[0]; ++i)
        for (int64_t j = 0; j < in.d; ++j) r.ood[(size_t)j] += ci::load_as_double(f.data(), f.dtype, i * in.d + j) / (double)n2;
    const json o = run_engine(in, r);
    const ref::Anchors want = run_ref(in, r);
    for (const char* k : kKeys) EXPECT_TRUE(near(std::string(k) + " (stories260k)", o[k], ref_value(want, k))) << k;
}

}  // namespace
}  // namespace test_anchor_metrics
