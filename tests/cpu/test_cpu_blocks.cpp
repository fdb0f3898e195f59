// The CPU backend's blocked paths (issue 11): NC4 over blocks of rows of many classes (Nc4Blocks:
// tiny classes, a block boundary inside a class, W and the means in several chunks of a tile, exact
// ties, against a float64 brute force), per-token SVDs on threads (bit-identical to one thread, spilled
// or not, and to the float64 reference), and the held-back rows' running byte count under every
// path that changes them (ingest, a class reaching min_samples_per_token, checkpoint load and merge).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "core/batch.hpp"
#include "core/config.hpp"
#include "core/host_budget.hpp"
#include "core/state_io.hpp"
#include "cpu/cpu_backend.hpp"
#include "common/mem_state.hpp"
#include "reference/brute_force.hpp"

namespace test_cpu_blocks {
namespace {

namespace ci = collapse::internal;
using nlohmann::json;

// Labels: class k of `classes` gets 2 + (k * 5) % 7 rows (2..8), shuffled.
std::vector<int32_t> tiny_class_labels(int64_t classes, std::mt19937_64& rng) {
    std::vector<int32_t> y;
    for (int64_t k = 0; k < classes; ++k)
        for (int64_t i = 0; i < 2 + (k * 5) % 7; ++i) y.push_back((int32_t)k);
    std::shuffle(y.begin(), y.end(), rng);
    return y;
}

// NC4 in long double, straight from the definition: the first argmax of w_c . x + b_c over c < V,
// the first argmin of ||x - mu_s||^2 over the kept slots s.
struct BruteNc4 {
    int64_t agree = 0;
    std::vector<int64_t> hits;
};
BruteNc4 brute_nc4(const std::vector<double>& x, const std::vector<int32_t>& slot, int64_t d, const ci::Classifier& clf, int64_t V,
                   const std::vector<double>& mu, const std::vector<int32_t>& ids) {
    const int64_t n = (int64_t)slot.size(), K = (int64_t)ids.size();
    BruteNc4 r;
    r.hits.assign((size_t)K, 0);
    for (int64_t i = 0; i < n; ++i) {
        const double* xi = x.data() + i * d;
        int64_t best = 0;
        long double best_v = 0;
        for (int64_t c = 0; c < V; ++c) {
            long double v = clf.bias.empty() ? 0.0L : clf.bias[(size_t)c];
            for (int64_t j = 0; j < d; ++j) v += (long double)clf.weight[(size_t)(c * d + j)] * xi[j];
            if (c == 0 || v > best_v) best_v = v, best = c;
        }
        int64_t near = 0;
        long double near_v = 0;
        for (int64_t s = 0; s < K; ++s) {
            long double v = 0;
            for (int64_t j = 0; j < d; ++j) {
                const long double t = (long double)xi[j] - mu[(size_t)(s * d + j)];
                v += t * t;
            }
            if (s == 0 || v < near_v) near_v = v, near = s;
        }
        if (best == ids[(size_t)near]) ++r.agree, ++r.hits[(size_t)slot[(size_t)i]];
    }
    return r;
}

struct Nc4Case {
    const char* name;
    int64_t V, K, d, classes;
    bool bias;
    int64_t max_block;  // small: block boundaries fall inside classes
    double row_noise = 0.8;  // rows: their class mean plus this times N(0, 1) (wide rows need more to disagree)
};

class Nc4BlocksTest : public ::testing::TestWithParam<Nc4Case> {};

// Rows of many 2-8 row classes, added class by class as the row store hands them over: blocks end
// inside classes, and every agreement and per-class hit matches the brute force.
TEST_P(Nc4BlocksTest, TinyClassesAcrossBlockBoundariesMatchTheBruteForce) {
    const Nc4Case c = GetParam();
    std::mt19937_64 rng(11 + (uint64_t)c.V);
    std::normal_distribution<double> g(0.0, 1.0);
    // K kept classes with ids spread over [0, V); their means; W = the means' ids' rows plus noise, so
    // that the classifier often agrees with the nearest mean (both outcomes occur).
    std::vector<int32_t> ids((size_t)c.K);
    for (int64_t s = 0; s < c.K; ++s) ids[(size_t)s] = (int32_t)(s * (c.V / c.K));
    std::vector<double> mu((size_t)(c.K * c.d)), mu_sq((size_t)c.K, 0.0);
    for (auto& v : mu) v = 2.0 * g(rng);
    for (int64_t s = 0; s < c.K; ++s)
        for (int64_t j = 0; j < c.d; ++j) mu_sq[(size_t)s] += mu[(size_t)(s * c.d + j)] * mu[(size_t)(s * c.d + j)];
    ci::Classifier clf;
    clf.weight.resize((size_t)(c.V * c.d));
    for (auto& v : clf.weight) v = 0.3 * g(rng);
    for (int64_t s = 0; s < c.K; ++s)
        for (int64_t j = 0; j < c.d; ++j) clf.weight[(size_t)(ids[(size_t)s] * c.d + j)] += mu[(size_t)(s * c.d + j)];
    if (c.bias) {
        clf.bias.resize((size_t)c.V);
        for (auto& v : clf.bias) v = 0.1 * g(rng);
    }
    // Rows by class (as the store gives them): class s has 2..8 rows near its mean.
    std::vector<double> x;
    std::vector<int32_t> slot;
    std::vector<int64_t> class_rows;
    for (int64_t s = 0; s < c.classes; ++s) {
        const int64_t k = s % c.K, n = 2 + (s * 5) % 7;
        class_rows.push_back(n);
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t j = 0; j < c.d; ++j) x.push_back(mu[(size_t)(k * c.d + j)] + c.row_noise * g(rng));
            slot.push_back((int32_t)k);
        }
    }
    const int64_t rows = (int64_t)slot.size();
    const BruteNc4 want = brute_nc4(x, slot, c.d, clf, c.V, mu, ids);
    ASSERT_GT(want.agree, 0);
    ASSERT_LT(want.agree, rows);

    ci::HostBudget budget(int64_t(256) << 20);
    std::vector<int64_t> hits((size_t)c.K, 0);
    int64_t agree = 0, block = 0;
    {
        ci::Nc4Blocks nc4(budget, c.d, clf, c.V, mu, mu_sq, ids, rows, hits.data(), c.max_block);
        block = nc4.block_rows();
        const double* p = x.data();
        for (size_t s = 0; s < class_rows.size(); ++s) {
            nc4.add(p, class_rows[s], slot[(size_t)(p - x.data()) / (size_t)c.d]);
            p += class_rows[s] * c.d;
        }
        agree = nc4.finish();
    }
    EXPECT_EQ(budget.held(), 0);
    // The block is smaller than the rows, and some class straddles a block boundary.
    ASSERT_LT(block, rows);
    bool straddles = false;
    for (int64_t at = 0, s = 0; s < (int64_t)class_rows.size(); at += class_rows[(size_t)s], ++s)
        straddles = straddles || (at / block != (at + class_rows[(size_t)s] - 1) / block);
    EXPECT_TRUE(straddles);
    EXPECT_EQ(agree, want.agree);
    EXPECT_EQ(hits, want.hits);
    // The one-call form (rows with their slots, blocks of the default size) agrees too.
    std::vector<int64_t> hits2((size_t)c.K, 0);
    EXPECT_EQ(ci::nc4_agreements(budget, x.data(), rows, c.d, clf, c.V, mu, mu_sq, ids, slot.data(), hits2.data()), want.agree);
    EXPECT_EQ(hits2, want.hits);
}

INSTANTIATE_TEST_SUITE_P(
    Cpu, Nc4BlocksTest,
    ::testing::Values(
        // V in 40 chunks of 1024 (the last one 64), blocks of 93 rows (tiles shorter than 128).
        Nc4Case{"many_v_chunks_small_block", 40000, 500, 2, 150, true, 93},
        // W of 9.6 MB in 586 chunks (the last one 64), blocks of 13 rows.
        Nc4Case{"large_w_tiny_block", 600000, 100, 2, 20, false, 13},
        // d odd; V = 3001 and K = 1100 not multiples of the 1024-wide chunk (a short last chunk of
        // each, the scan's SIMD tail); blocks of 300 rows cut into tiles of 128 + 128 + 44, each
        // tile holding rows of many classes.
        Nc4Case{"d_odd_v_and_k_not_chunk_multiples", 3001, 1100, 7, 400, true, 300},
        // V and K under one SIMD step: the scan's scalar tail alone.
        Nc4Case{"v_and_k_below_the_simd_width", 13, 5, 3, 40, true, 16},
        // Wide rows: tiles of d / 2 = 300 rows (tile_rows), chunks of 1024 of V = 2500; blocks of
        // 701 rows cut into 300 + 300 + 101.
        Nc4Case{"wide_rows_taller_tiles", 2500, 60, 600, 220, true, 701, 12.0}),
    [](const ::testing::TestParamInfo<Nc4Case>& i) { return std::string(i.param.name); });

// Exact ties: small integers everywhere, so every logit and distance is exact in any summation
// order; W's rows repeat 1024 rows apart (ties across the chunks of a tile) and two kept means are
// equal. Ties must go to the smaller id on both sides, as in the brute force; the test checks that
// ties occur across chunks and that the rule decides some verdicts (the larger id would give
// another count).
TEST(CpuBlocks, Nc4TiesGoToTheSmallerIdAcrossChunks) {
    const int64_t V = 2500, K = 40, d = 3, n = 700;
    std::mt19937_64 rng(17);
    std::uniform_int_distribution<int> small(-2, 2);
    std::vector<int32_t> ids((size_t)K);
    for (int64_t s = 0; s < K; ++s) ids[(size_t)s] = (int32_t)(s * 50);
    std::vector<double> mu((size_t)(K * d)), mu_sq((size_t)K, 0.0);
    for (auto& v : mu) v = (double)small(rng);
    for (int64_t j = 0; j < d; ++j) mu[(size_t)(7 * d + j)] = mu[(size_t)(3 * d + j)];  // slots 3 and 7: one mean
    // W: rows of -1, 0, 1, the kept ids below 1024 get 3 x their mean (so verdicts often agree),
    // then rows c >= 1024 repeat row c - 1024.
    ci::Classifier clf;
    clf.weight.resize((size_t)(V * d));
    for (auto& v : clf.weight) v = (double)(small(rng) / 2);
    for (int64_t s = 0; s < K && ids[(size_t)s] < 1024; ++s)
        for (int64_t j = 0; j < d; ++j) clf.weight[(size_t)(ids[(size_t)s] * d + j)] = 3.0 * mu[(size_t)(s * d + j)];
    for (int64_t c = 1024; c < V; ++c)
        for (int64_t j = 0; j < d; ++j) clf.weight[(size_t)(c * d + j)] = clf.weight[(size_t)((c - 1024) * d + j)];
    clf.bias.assign((size_t)V, 0.0);
    for (int64_t s = 0; s < K; ++s)
        for (int64_t j = 0; j < d; ++j) mu_sq[(size_t)s] += mu[(size_t)(s * d + j)] * mu[(size_t)(s * d + j)];
    std::vector<double> x((size_t)(n * d));
    std::vector<int32_t> slot((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        slot[(size_t)i] = (int32_t)(i % K);
        for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] = mu[(size_t)(slot[(size_t)i] * d + j)] + (double)small(rng);
    }
    // The verdicts with ties to the smaller (want) and to the larger id (other), exactly.
    int64_t want = 0, other = 0, cross_chunk_ties = 0;
    std::vector<int64_t> want_hits((size_t)K, 0);
    for (int64_t i = 0; i < n; ++i) {
        const double* xi = x.data() + i * d;
        auto logit = [&](int64_t c) {
            double v = 0;
            for (int64_t j = 0; j < d; ++j) v += clf.weight[(size_t)(c * d + j)] * xi[j];
            return v;
        };
        auto dist = [&](int64_t s) {
            double v = 0;
            for (int64_t j = 0; j < d; ++j) v += (xi[j] - mu[(size_t)(s * d + j)]) * (xi[j] - mu[(size_t)(s * d + j)]);
            return v;
        };
        int64_t b_first = 0, b_last = 0, n_first = 0, n_last = 0;
        for (int64_t c = 1; c < V; ++c) {
            if (logit(c) > logit(b_first)) b_first = c;
            if (logit(c) >= logit(b_last)) b_last = c;
        }
        for (int64_t s = 1; s < K; ++s) {
            if (dist(s) < dist(n_first)) n_first = s;
            if (dist(s) <= dist(n_last)) n_last = s;
        }
        cross_chunk_ties += b_first < 1024 && b_last >= 1024 ? 1 : 0;
        if (b_first == ids[(size_t)n_first]) ++want, ++want_hits[(size_t)slot[(size_t)i]];
        other += b_last == ids[(size_t)n_last] ? 1 : 0;
    }
    ASSERT_GT(cross_chunk_ties, 0);
    ASSERT_NE(want, other);
    ASSERT_GT(want, 0);
    ci::HostBudget budget(int64_t(64) << 20);
    std::vector<int64_t> hits((size_t)K, 0);
    EXPECT_EQ(ci::nc4_agreements(budget, x.data(), n, d, clf, V, mu, mu_sq, ids, slot.data(), hits.data()), want);
    EXPECT_EQ(hits, want_hits);
    // Without a bias (the scan's other form), the same: the bias was all zeros.
    clf.bias.clear();
    EXPECT_EQ(ci::nc4_agreements(budget, x.data(), n, d, clf, V, mu, mu_sq, ids), want);
}

// Through a session: 1200 classes of 2-8 rows, V = 1500 (two blocks of rows, tiles of 128 rows),
// NC4 from the row store (every row) and per class, against the float64 reference.
TEST(CpuBlocks, Nc4OfManyTinyClassesMatchesTheReference) {
    const int64_t V = 1500, d = 8, classes = 1200;
    std::mt19937_64 rng(5);
    std::normal_distribution<double> g(0.0, 1.0);
    const std::vector<int32_t> y32 = tiny_class_labels(classes, rng);
    const int64_t N = (int64_t)y32.size();
    std::vector<double> means((size_t)(classes * d));
    for (auto& v : means) v = g(rng);
    std::vector<float> x((size_t)(N * d));
    for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] = (float)(means[(size_t)(y32[(size_t)i] * d + j)] + 0.7 * g(rng));
    std::vector<float> w((size_t)(V * d));
    for (int64_t c = 0; c < V; ++c)
        for (int64_t j = 0; j < d; ++j) w[(size_t)(c * d + j)] = (float)((c < classes ? means[(size_t)(c * d + j)] : 0.0) + 0.5 * g(rng));
    collapse_options o = collapse::default_options();
    o.num_classes = V;
    o.compute_nc4 = 1;
    o.per_class_arrays = 1;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(x.data(), N, d), collapse::host_buffer(y32.data(), N));
    s.set_classifier(collapse::host_buffer(w.data(), V, d));
    const json rep = json::parse(s.compute().json());

    std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end());
    const std::vector<int64_t> y(y32.begin(), y32.end());
    ref::Options ro;
    ro.num_classes = V;
    ro.compute_nc4 = true;
    const ref::Result want = ref::compute(xd, y, d, wd.data(), nullptr, ro);
    ASSERT_TRUE(want.nc4_agreement.has_value());
    ASSERT_TRUE(rep["overall_analysis"]["nc4_agreement"].is_number());
    EXPECT_EQ(rep["overall_analysis"]["nc4_agreement"].get<double>(), *want.nc4_agreement);
    EXPECT_EQ(rep["overall_analysis"]["nc4_rows"].get<int64_t>(), N);
    // Per class: the hits add up to the agreement, the rows to N.
    int64_t hits = 0, rows = 0;
    for (const auto& [id, t] : rep["token_analysis"].items()) {
        rows += t["nc4_rows"].get<int64_t>();
        hits += (int64_t)std::llround(t["nc4_hit_rate"].get<double>() * (double)t["nc4_rows"].get<int64_t>());
    }
    EXPECT_EQ(rows, N);
    EXPECT_EQ((double)hits / (double)N, *want.nc4_agreement);
}

// Per-token SVDs run on threads, each class on one BLAS thread: the report is bit-identical for one
// and two threads, with the store in memory and spilled (read back a group at a time), and the
// entropies match the float64 reference.
TEST(CpuBlocks, PerTokenSvdOnThreadsIsBitIdenticalAndMatchesTheReference) {
    const int64_t V = 90, d = 24;
    std::mt19937_64 rng(7);
    std::normal_distribution<double> g(0.0, 1.0);
    std::vector<int32_t> y32;
    for (int64_t k = 0; k < V; ++k)
        for (int64_t i = 0; i < 1 + (k * k) % 97; ++i) y32.push_back((int32_t)k);  // 1..97 rows: both n < d and n > d
    std::shuffle(y32.begin(), y32.end(), rng);
    const int64_t N = (int64_t)y32.size();
    std::vector<float> x((size_t)(N * d));
    for (auto& v : x) v = (float)g(rng);
    auto run = [&](int threads, int64_t limit) {
        collapse_options o = collapse::default_options();
        o.num_classes = V;
        o.min_samples_per_token = 1;
        if (limit > 0) o.host_memory_limit = limit;
        const int before = omp_get_max_threads();
        omp_set_num_threads(threads);
        collapse::Session s(o);
        for (int64_t r0 = 0; r0 < N; r0 += 500)
            s.ingest_rows(collapse::host_buffer(x.data() + r0 * d, std::min<int64_t>(500, N - r0), d),
                          collapse::host_buffer(y32.data() + r0, std::min<int64_t>(500, N - r0)));
        json rep = json::parse(s.compute().json());
        omp_set_num_threads(before);
        return rep;
    };
    const json one = run(1, 0), two = run(2, 0);
    // 1 MiB: the store spills and finalisation reads it back in several groups.
    const json spilled = run(2, int64_t(1) << 20);
    ASSERT_GT(spilled["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0) << spilled["engine"].dump();
    EXPECT_EQ(one["token_analysis"], two["token_analysis"]);
    EXPECT_EQ(one["token_analysis"], spilled["token_analysis"]);
    EXPECT_EQ(one["overall_analysis"]["svd_zero_matrices"], two["overall_analysis"]["svd_zero_matrices"]);

    std::vector<double> xd(x.begin(), x.end());
    const std::vector<int64_t> y(y32.begin(), y32.end());
    ref::Options ro;
    ro.num_classes = V;
    ro.min_samples = 1;
    const ref::Result want = ref::compute(xd, y, d, nullptr, nullptr, ro);
    ASSERT_EQ(one["token_analysis"].size(), want.tokens.size());
    for (const auto& [id, t] : want.tokens) {
        const json& e = two["token_analysis"][std::to_string(id)];
        ASSERT_TRUE(t.svd_entropy.has_value());
        EXPECT_NEAR(e["svd_entropy"].get<double>(), *t.svd_entropy, 1e-9 * std::max(1.0, std::fabs(*t.svd_entropy))) << "class " << id;
    }
}

// The held-back rows' bytes are a running count (no walk over the map every batch): equal to the
// walk after rows arrive below min_samples_per_token, after classes reach it (rows leave for the
// Gram), after a checkpoint is loaded and after one is merged in; and counted in the budget.
TEST(CpuBlocks, HeldBackBytesAreARunningCountThatMatchesTheMap) {
    const int64_t V = 40, d = 5;
    ci::Config cfg;
    cfg.min_samples_per_token = 6;
    cfg.svd_mode = COLLAPSE_SVD_OFF;
    cfg.compute_overall_metrics = true;
    std::mt19937_64 rng(3);
    std::normal_distribution<float> g(0.0f, 1.0f);
    auto batch = [&](ci::CpuBackend& b, int64_t n, int32_t classes) {
        std::vector<float> x((size_t)(n * d));
        std::vector<int32_t> y((size_t)n);
        for (auto& v : x) v = g(rng);
        for (auto& v : y) v = (int32_t)(rng() % (uint64_t)classes);
        const collapse_buffer xb = collapse::host_buffer(x.data(), n, d), yb = collapse::host_buffer(y.data(), n);
        b.ingest(ci::describe_rows(&xb, &yb, nullptr, d), nullptr);
    };
    auto expect_exact = [](const ci::CpuBackend& b, const char* when) {
        EXPECT_EQ(b.holdback_bytes(), b.holdback_bytes_walked()) << when;
    };
    ci::CpuBackend a(cfg, V, d);
    expect_exact(a, "empty");
    EXPECT_EQ(a.holdback_bytes(), 0);
    batch(a, 30, V);  // 30 rows over 40 classes: all held back
    expect_exact(a, "rows below min_samples_per_token");
    EXPECT_GT(a.holdback_bytes(), 30 * d * 8);
    const int64_t some = a.holdback_bytes();
    batch(a, 200, 8);  // classes 0..7 pass 6 rows: their rows leave for the Gram
    expect_exact(a, "classes reaching min_samples_per_token");
    batch(a, 1, V);
    expect_exact(a, "a single row");
    EXPECT_NE(a.holdback_bytes(), some);
    EXPECT_GE(a.budget().held(), a.holdback_bytes());

    testutil::MemState st;
    a.save_state(st);
    ci::CpuBackend b(cfg, V, d);
    batch(b, 25, V);
    b.load_state(st, /*merge=*/false);  // replaces b's held rows
    expect_exact(b, "a loaded state");
    EXPECT_EQ(b.holdback_bytes_walked() > 0, a.holdback_bytes_walked() > 0);
    ci::CpuBackend m(cfg, V, d);
    batch(m, 60, V);
    m.load_state(st, /*merge=*/true);  // held rows of both; classes now past the threshold leave
    expect_exact(m, "a merged state");
    batch(m, 300, V);
    expect_exact(m, "after the merge, more rows");
}

}  // namespace
}  // namespace test_cpu_blocks
