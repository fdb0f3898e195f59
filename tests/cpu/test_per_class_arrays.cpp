// Per-class arrays (per_class_arrays; docs/METRICS.md "Anchor metrics") and held-out NC4 against a
// float64 brute force of their definitions: n_c, ||m_c||, Tr(Sigma_c) = E||x - mu_c||^2,
// cos(w_c, m_c), w_c . m_c (the neural_collapse library's per-class term of its uni-duality),
// the NC4 hit rate of each class and the per-token SVD entropy; random shapes and the real data.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.hpp"
#include "common/capi_helpers.hpp"
#include "core/session.hpp"
#include "io/tensor_file.hpp"
#include "reference/brute_force.hpp"
#include "report/report.hpp"

namespace test_per_class_arrays {
namespace {

using testutil::buf;

struct Data {
    int64_t N = 0, d = 0, V = 0;
    std::vector<double> X, W, b;
    std::vector<int64_t> y;
};

// Rows around separated class means (some classes absent or below min_samples_per_token).
Data make_data(int64_t N, int64_t d, int64_t V, uint32_t seed) {
    Data D;
    D.N = N, D.d = d, D.V = V;
    std::mt19937 rng(seed);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<double> centre((size_t)(V * d));
    for (double& v : centre) v = 2.0 * g(rng);
    std::uniform_int_distribution<int64_t> lab(0, V - 1);
    D.X.resize((size_t)(N * d));
    D.y.resize((size_t)N);
    for (int64_t i = 0; i < N; ++i) {
        int64_t c = lab(rng);
        if (c == V - 1 && i > 0) c = 0;  // class V - 1 has a single row (below min_samples_per_token)
        D.y[(size_t)i] = c;
        for (int64_t j = 0; j < d; ++j) D.X[(size_t)(i * d + j)] = centre[(size_t)(c * d + j)] + 0.7 * g(rng);
    }
    D.W.resize((size_t)(V * d));
    // A classifier near the class means, so that NC4 agreement is neither 0 nor 1.
    for (int64_t c = 0; c < V; ++c)
        for (int64_t j = 0; j < d; ++j) D.W[(size_t)(c * d + j)] = centre[(size_t)(c * d + j)] + 1.5 * g(rng);
    D.b.resize((size_t)V);
    for (double& v : D.b) v = 0.3 * g(rng);
    return D;
}

// The brute force of the per-class arrays (means from `main`, NC4 on the rows of `nc4`).
struct RefPerClass {
    std::vector<int64_t> kept, n, nc4_rows, nc4_hits;
    std::vector<double> mean_norm, within, cosv, dot;
    std::vector<std::optional<double>> entropy;
    int64_t agree = 0, rows = 0;
};

RefPerClass reference(const Data& main, const Data& nc4, const ref::Options& o, bool with_entropy) {
    const int64_t d = main.d;
    const ref::ClassStats cs = ref::class_stats(main.X, main.y, d, o);
    RefPerClass r;
    r.kept = cs.kept;
    r.n = cs.n;
    const size_t K = cs.kept.size();
    r.mean_norm = cs.m_norm;
    r.within = cs.var;
    for (size_t k = 0; k < K; ++k) {
        const double* w = &main.W[(size_t)(cs.kept[k] * d)];
        const double wm = (double)ref::detail::dot(w, &cs.m[k * d], d);
        r.dot.push_back(wm);
        r.cosv.push_back(wm / ((ref::detail::norm(w, d) + 1e-8) * (cs.m_norm[k] + 1e-8)));
    }
    if (with_entropy) {
        ref::Options no_nc4 = o;  // only the entropies are wanted here
        no_nc4.compute_nc4 = false;
        const ref::Result full = ref::compute(main.X, main.y, d, main.W.data(), main.b.data(), no_nc4);
        for (int64_t c : cs.kept) r.entropy.push_back(full.tokens.at(c).svd_entropy);
    }
    // NC4 per class: argmax_c (w_c . x + b_c) against the nearest kept mean, ties to the smaller id.
    r.nc4_rows.assign(K, 0);
    r.nc4_hits.assign(K, 0);
    for (int64_t i = 0; i < nc4.N; ++i) {
        const auto it = std::find(cs.kept.begin(), cs.kept.end(), nc4.y[(size_t)i]);
        if (it == cs.kept.end()) continue;
        const size_t k = (size_t)(it - cs.kept.begin());
        const double* x = &nc4.X[(size_t)(i * d)];
        int64_t best = 0;
        long double best_v = 0;
        for (int64_t c = 0; c < main.V; ++c) {
            const long double v = ref::detail::dot(&main.W[(size_t)(c * d)], x, d) + main.b[(size_t)c];
            if (c == 0 || v > best_v) best_v = v, best = c;
        }
        size_t near = 0;
        long double near_v = 0;
        for (size_t j = 0; j < K; ++j) {
            const long double v = ref::detail::diff_norm2(x, &cs.mu[j * d], d);
            if (j == 0 || v < near_v) near_v = v, near = j;
        }
        ++r.nc4_rows[k];
        ++r.rows;
        if (best == cs.kept[near]) ++r.nc4_hits[k], ++r.agree;
    }
    return r;
}

void expect_close(double got, double want, const std::string& what) {
    const double tol = 1e-9 * std::max(std::fabs(want), 1e-3);
    EXPECT_NEAR(got, want, tol) << what;
}

// Per-class arrays through the C API's per-token getters.
struct Arrays {
    std::vector<int64_t> ids;
    std::map<std::string, std::vector<double>> a;
};

Arrays read_arrays(const collapse_report* r) {
    Arrays out;
    int64_t K = 0;
    EXPECT_EQ(collapse_report_num_tokens(r, &K), COLLAPSE_OK);
    out.ids.resize((size_t)K);
    EXPECT_EQ(collapse_report_token_ids(r, out.ids.data(), K), COLLAPSE_OK);
    for (const char* key : {"num_samples", "mean_norm", "within_variance", "duality_cos", "duality_dot", "nc4_hit_rate", "nc4_rows",
                            "svd_entropy"}) {
        std::vector<double> v((size_t)K);
        EXPECT_EQ(collapse_report_token_array(r, key, v.data(), K), COLLAPSE_OK) << key << ": " << collapse_last_error();
        out.a[key] = v;
    }
    return out;
}

void compare(const Arrays& got, const RefPerClass& want, bool nc4, bool entropy, const std::string& where) {
    ASSERT_EQ(got.ids, want.kept) << where;
    for (size_t k = 0; k < want.kept.size(); ++k) {
        const std::string at = where + ", class " + std::to_string(want.kept[k]);
        EXPECT_EQ(got.a.at("num_samples")[k], (double)want.n[k]) << at;
        expect_close(got.a.at("mean_norm")[k], want.mean_norm[k], "mean_norm " + at);
        expect_close(got.a.at("within_variance")[k], want.within[k], "within_variance " + at);
        expect_close(got.a.at("duality_cos")[k], want.cosv[k], "duality_cos " + at);
        expect_close(got.a.at("duality_dot")[k], want.dot[k], "duality_dot " + at);
        if (nc4) {
            EXPECT_EQ(got.a.at("nc4_rows")[k], (double)want.nc4_rows[k]) << at;
            if (want.nc4_rows[k] > 0) expect_close(got.a.at("nc4_hit_rate")[k], (double)want.nc4_hits[k] / (double)want.nc4_rows[k], "nc4_hit_rate " + at);
            else EXPECT_TRUE(std::isnan(got.a.at("nc4_hit_rate")[k])) << at;
        } else {
            EXPECT_EQ(got.a.at("nc4_rows")[k], 0.0) << at;
            EXPECT_TRUE(std::isnan(got.a.at("nc4_hit_rate")[k])) << at;
        }
        if (entropy && want.entropy[k]) expect_close(got.a.at("svd_entropy")[k], *want.entropy[k], "svd_entropy " + at);
    }
}

// A C API run of D with the classifier; svd_mode as given; NC4 on.
testutil::ReportPtr run_capi(const Data& D, collapse_svd_mode mode, bool per_class = true, bool nc4 = true) {
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = D.V;
    o.per_class_arrays = per_class ? 1 : 0;
    o.compute_nc4 = nc4 ? 1 : 0;
    o.svd_mode = mode;
    testutil::SessionPtr s = testutil::make_session(o);
    if (!s) return nullptr;
    const collapse_buffer w = buf(D.W.data(), COLLAPSE_F64, D.V, D.d), bb = buf(D.b.data(), COLLAPSE_F64, D.V);
    EXPECT_EQ(collapse_session_set_classifier(s.get(), &w, &bb), COLLAPSE_OK) << collapse_last_error();
    auto feed = [&] {
        // Two batches, so the per-class sums and NC4 counts cross a batch boundary.
        const int64_t half = D.N / 2;
        for (int64_t r0 : {int64_t(0), half}) {
            const int64_t n = r0 == 0 ? half : D.N - half;
            const collapse_buffer x = buf(D.X.data() + r0 * D.d, COLLAPSE_F64, n, D.d), y = buf(D.y.data() + r0, COLLAPSE_I64, n);
            EXPECT_EQ(collapse_session_ingest_rows(s.get(), &x, &y, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
        }
    };
    feed();
    int needed = 0;
    EXPECT_EQ(collapse_session_needs_second_pass(s.get(), &needed), COLLAPSE_OK);
    if (needed) {
        EXPECT_EQ(collapse_session_begin_second_pass(s.get()), COLLAPSE_OK) << collapse_last_error();
        feed();
    }
    collapse_report* r = nullptr;
    EXPECT_EQ(collapse_session_compute(s.get(), &r), COLLAPSE_OK) << collapse_last_error();
    return testutil::ReportPtr(r);
}

struct Shape {
    int64_t N, d, V;
    uint32_t seed;
};
const Shape kShapes[] = {{300, 7, 12, 1}, {900, 33, 40, 2}, {500, 64, 9, 3}};

// Exact mode (NC4 from the row store) and sampled mode (NC4 from the second pass) against the
// brute force; svd_mode: off still lists every kept class (its entropy null).
TEST(PerClassArrays, MatchBruteForceOnRandomShapes) {
    for (const Shape& sh : kShapes)
        for (collapse_svd_mode mode : {COLLAPSE_SVD_EXACT, COLLAPSE_SVD_SAMPLED, COLLAPSE_SVD_OFF}) {
            const Data D = make_data(sh.N, sh.d, sh.V, sh.seed);
            ref::Options o;
            o.num_classes = D.V;
            o.compute_nc4 = true;
            const std::string where = "N=" + std::to_string(sh.N) + " d=" + std::to_string(sh.d) + " V=" + std::to_string(sh.V) +
                                      " svd_mode=" + std::to_string((int)mode);
            const RefPerClass want = reference(D, D, o, mode == COLLAPSE_SVD_EXACT);
            const testutil::ReportPtr r = run_capi(D, mode);
            ASSERT_TRUE(r) << where;
            const Arrays got = read_arrays(r.get());
            compare(got, want, true, mode == COLLAPSE_SVD_EXACT, where);
            if (mode == COLLAPSE_SVD_OFF)
                for (double h : got.a.at("svd_entropy")) EXPECT_TRUE(std::isnan(h)) << where;
            double agree = 0;
            int is_null = 1;
            ASSERT_EQ(collapse_report_get_scalar(r.get(), "nc4_agreement", &agree, &is_null), COLLAPSE_OK);
            ASSERT_EQ(is_null, 0) << where;
            expect_close(agree, (double)want.agree / (double)want.rows, "nc4_agreement " + where);
            const nlohmann::json doc = nlohmann::json::parse([&] {
                const char* text = nullptr;
                collapse_report_json(r.get(), &text);
                return std::string(text);
            }());
            EXPECT_EQ(doc["overall_analysis"]["nc4_measured_on"], "input_rows") << where;
        }
}

TEST(PerClassArrays, OffByDefaultAndRefusedByTheGetter) {
    const Data D = make_data(200, 5, 6, 4);
    const testutil::ReportPtr r = run_capi(D, COLLAPSE_SVD_EXACT, false, false);
    ASSERT_TRUE(r);
    int64_t K = 0;
    collapse_report_num_tokens(r.get(), &K);
    std::vector<double> v((size_t)K);
    EXPECT_EQ(collapse_report_token_array(r.get(), "mean_norm", v.data(), K), COLLAPSE_ERR_NOT_FOUND);
    EXPECT_NE(std::string(collapse_last_error()).find("per_class_arrays"), std::string::npos) << collapse_last_error();
    EXPECT_EQ(collapse_report_token_array(r.get(), "no_such_key", v.data(), K), COLLAPSE_ERR_NOT_FOUND);
    const char* text = nullptr;
    ASSERT_EQ(collapse_report_json(r.get(), &text), COLLAPSE_OK);
    const nlohmann::json doc = nlohmann::json::parse(text);
    for (auto it = doc["token_analysis"].begin(); it != doc["token_analysis"].end(); ++it)
        EXPECT_FALSE(it.value().contains("mean_norm")) << it.key();
    // No NC4: no nc4_measured_on.
    EXPECT_FALSE(doc["overall_analysis"].contains("nc4_measured_on"));
}

// Without a classifier the duality arrays are null, the others are there.
TEST(PerClassArrays, WithoutClassifierDualityIsNull) {
    const Data D = make_data(300, 6, 8, 5);
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = D.V;
    o.per_class_arrays = 1;
    testutil::SessionPtr s = testutil::make_session(o);
    ASSERT_TRUE(s);
    const collapse_buffer x = buf(D.X.data(), COLLAPSE_F64, D.N, D.d), y = buf(D.y.data(), COLLAPSE_I64, D.N);
    ASSERT_EQ(collapse_session_ingest_rows(s.get(), &x, &y, nullptr, nullptr), COLLAPSE_OK);
    collapse_report* rp = nullptr;
    ASSERT_EQ(collapse_session_compute(s.get(), &rp), COLLAPSE_OK);
    const testutil::ReportPtr r(rp);
    const Arrays got = read_arrays(r.get());
    ref::Options ro;
    ro.num_classes = D.V;
    const ref::ClassStats cs = ref::class_stats(D.X, D.y, D.d, ro);
    ASSERT_EQ(got.ids, cs.kept);
    for (size_t k = 0; k < cs.kept.size(); ++k) {
        expect_close(got.a.at("mean_norm")[k], cs.m_norm[k], "mean_norm");
        expect_close(got.a.at("within_variance")[k], cs.var[k], "within_variance");
        EXPECT_TRUE(std::isnan(got.a.at("duality_cos")[k]));
        EXPECT_TRUE(std::isnan(got.a.at("duality_dot")[k]));
    }
}

// The C API has no tokenizer: exclude_special_tokens in a YAML config is refused there.
TEST(PerClassArrays, YamlExcludeSpecialTokensRefusedByTheCApi) {
    const std::string path = (std::filesystem::path(::testing::TempDir()) / "collapse_special.yaml").string();
    {
        std::ofstream f(path);
        f << "exclude_special_tokens: true\nper_class_arrays: true\n";
    }
    collapse_options o;
    EXPECT_EQ(collapse_options_from_yaml_file(path.c_str(), &o), COLLAPSE_ERR_CONFIG);
    EXPECT_NE(std::string(collapse_last_error()).find("exclude_special_tokens"), std::string::npos) << collapse_last_error();
    {
        std::ofstream f(path);
        f << "per_class_arrays: true\n";
    }
    ASSERT_EQ(collapse_options_from_yaml_file(path.c_str(), &o), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(o.per_class_arrays, 1);
    std::filesystem::remove(path);
}

// An older caller's struct (collapse 0.1.0's size) gets per_class_arrays off.
TEST(PerClassArrays, OlderOptionsStructDefaultsOff) {
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = 4;
    o.per_class_arrays = 1;
    o.struct_size = (uint32_t)(offsetof(collapse_options, max_buffer_size) + sizeof(int64_t));
    const collapse::internal::Config c = collapse::internal::from_options(o);
    EXPECT_FALSE(c.per_class_arrays);
}

// ---------------------------------------------------------------------------------------------
// Held-out NC4: the means and W of one input, the agreement on another's rows.

collapse::internal::Result run_held_out(const Data& main, const Data& held, collapse_svd_mode mode, int64_t V) {
    collapse::internal::Config cfg;
    cfg.num_classes = V;
    cfg.compute_nc4 = true;
    cfg.nc4_held_out = true;
    cfg.per_class_arrays = true;
    cfg.svd_mode = mode;
    collapse::internal::Session s(cfg);
    const collapse_buffer w = buf(main.W.data(), COLLAPSE_F64, V, main.d), bb = buf(main.b.data(), COLLAPSE_F64, V);
    s.set_classifier(&w, &bb);
    const collapse_buffer x = buf(main.X.data(), COLLAPSE_F64, main.N, main.d), y = buf(main.y.data(), COLLAPSE_I64, main.N);
    s.ingest_rows(&x, &y, nullptr, nullptr);
    EXPECT_TRUE(s.needs_second_pass());  // even with a row store
    s.begin_second_pass();
    const collapse_buffer x2 = buf(held.X.data(), COLLAPSE_F64, held.N, held.d), y2 = buf(held.y.data(), COLLAPSE_I64, held.N);
    s.ingest_rows(&x2, &y2, nullptr, nullptr);
    return s.compute(true);
}

TEST(HeldOutNc4, MatchesBruteForce) {
    for (const Shape& sh : kShapes)
        for (collapse_svd_mode mode : {COLLAPSE_SVD_EXACT, COLLAPSE_SVD_SAMPLED}) {
            const Data main = make_data(sh.N, sh.d, sh.V, sh.seed);
            Data held = make_data(sh.N / 2 + 17, sh.d, sh.V, sh.seed + 100);
            held.W = main.W, held.b = main.b;
            ref::Options o;
            o.num_classes = sh.V;
            const RefPerClass want = reference(main, held, o, false);
            const std::string where = "N=" + std::to_string(sh.N) + " d=" + std::to_string(sh.d) + " mode=" + std::to_string((int)mode);
            const collapse::internal::Result r = run_held_out(main, held, mode, sh.V);
            ASSERT_TRUE(r.metrics.nc4_agreement) << where;
            EXPECT_TRUE(r.metrics.nc4_held_out);
            EXPECT_EQ(r.metrics.nc4_rows, want.rows) << where;
            expect_close(*r.metrics.nc4_agreement, (double)want.agree / (double)want.rows, "held-out nc4_agreement " + where);
            ASSERT_EQ(r.metrics.tokens.size(), want.kept.size());
            for (size_t k = 0; k < want.kept.size(); ++k) {
                EXPECT_EQ(r.metrics.tokens[k].nc4_rows, want.nc4_rows[k]) << where;
                EXPECT_EQ(r.metrics.tokens[k].nc4_hits, want.nc4_hits[k]) << where;
            }
            // The held-out rows do not move the means: the per-class arrays are the main input's.
            for (size_t k = 0; k < want.kept.size(); ++k) expect_close(*r.metrics.tokens[k].mean_norm, want.mean_norm[k], "mean_norm " + where);
            const nlohmann::json doc = collapse::internal::build_report(collapse::internal::Config{}, r);
            EXPECT_EQ(doc["overall_analysis"]["nc4_measured_on"], "held_out_rows");
            EXPECT_EQ(doc["overall_analysis"]["nc4_rows"], want.rows);
        }
}

// One second pass cannot serve the Gram of a max_tokens_to_analyze cut and held-out NC4.
TEST(HeldOutNc4, RefusedWithASecondPassGram) {
    collapse::internal::Config cfg;
    cfg.num_classes = 10;
    cfg.nc4_held_out = true;
    cfg.compute_nc4 = true;
    cfg.max_tokens_to_analyze = 3;
    cfg.svd_mode = COLLAPSE_SVD_SAMPLED;
    try {
        collapse::internal::Session s(cfg);
        FAIL() << "accepted";
    } catch (const collapse::internal::Error& e) {
        EXPECT_NE(std::string(e.what()).find("--nc4-features"), std::string::npos) << e.what();
    }
    cfg.svd_mode = COLLAPSE_SVD_EXACT;  // the row store gives the Gram: fine
    EXPECT_NO_THROW(collapse::internal::Session s(cfg));
}

// ---------------------------------------------------------------------------------------------
// Real data: the first rows of stories260k with its classifier.

std::string shared_data() { return std::string(COLLAPSE_SHARED_DIR) + "/data/stories260k"; }

Data load_real(int64_t first, int64_t count) {
    namespace io = collapse::internal::io;
    const io::Tensor f = io::open_npy(shared_data() + "/features.npy"), l = io::open_npy(shared_data() + "/labels.npy"),
                     w = io::open_npy(shared_data() + "/classifier.npy");
    Data D;
    D.N = count, D.d = f.shape[1], D.V = w.shape[0];
    D.X.resize((size_t)(count * D.d));
    for (int64_t i = 0; i < count * D.d; ++i)
        D.X[(size_t)i] = collapse::internal::load_as_double(f.data(), f.dtype, first * D.d + i);
    for (int64_t i = 0; i < count; ++i) D.y.push_back(collapse::internal::load_as_int(l.data(), l.dtype, first + i));
    D.W.resize((size_t)(D.V * D.d));
    for (int64_t i = 0; i < D.V * D.d; ++i) D.W[(size_t)i] = collapse::internal::load_as_double(w.data(), w.dtype, i);
    D.b.assign((size_t)D.V, 0.0);
    return D;
}

TEST(PerClassArrays, RealDataStories260k) {
    if (!std::filesystem::exists(shared_data() + "/features.npy")) GTEST_SKIP() << "no real data at " << shared_data();
    const Data D = load_real(0, 2500);
    ref::Options o;
    o.num_classes = D.V;
    o.compute_nc4 = true;
    const RefPerClass want = reference(D, D, o, true);
    ASSERT_GT(want.kept.size(), 50u);  // the real vocabulary, not a degenerate load
    const testutil::ReportPtr r = run_capi(D, COLLAPSE_SVD_EXACT);
    ASSERT_TRUE(r);
    compare(read_arrays(r.get()), want, true, true, "stories260k rows 0-2499");
    // Held out: the means of rows 0-2499, NC4 on rows 2500-3299.
    const Data held = load_real(2500, 800);
    const RefPerClass want_h = reference(D, held, o, false);
    const collapse::internal::Result h = run_held_out(D, held, COLLAPSE_SVD_EXACT, D.V);
    ASSERT_TRUE(h.metrics.nc4_agreement);
    EXPECT_EQ(h.metrics.nc4_rows, want_h.rows);
    expect_close(*h.metrics.nc4_agreement, (double)want_h.agree / (double)want_h.rows, "held-out nc4 on stories260k");
}

}  // namespace
}  // namespace test_per_class_arrays
