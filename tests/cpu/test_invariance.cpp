// docs/METRICS.md "Accuracy contract": results do not depend on how rows are split into batches or
// ordered, beyond 1e-12 relative on CPU. Every number of the report (every scalar, every per-token
// value) is compared; integers (counts) exactly.
//  - exact mode: batch sizes 1, 7, 4096 and a shuffled row order give the same report;
//  - sampled mode: the reservoir depends on each class's row order by design, so only batch-size
//    invariance and determinism for a fixed seed are required (with the second pass it needs);
//  - the sequence layout (ingest_sequences with an attention mask) equals the rows layout of the
//    same shifted rows with a valid mask.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"

namespace test_invariance {
namespace {

using nlohmann::json;

double& worst_rel() {
    static double w = 0;
    return w;
}
int64_t& values_compared() {
    static int64_t n = 0;
    return n;
}

class PrintInvarianceSummary : public ::testing::Environment {
public:
    void TearDown() override {
        if (values_compared() == 0) return;
        std::cout << "[invariance] summary: " << values_compared() << " report values compared, worst relative difference "
                  << worst_rel() << " (contract 1e-12)" << std::endl;
    }
};
const auto* const kPrintInvariance = ::testing::AddGlobalTestEnvironment(new PrintInvarianceSummary);

// Every leaf of `a` and `b` (except engine timings/batch counts) agrees: integers exactly, other
// numbers within rel * |a| + abs_floor, the rest (strings, bools, nulls) exactly.
void expect_same_json(const json& a, const json& b, const std::string& path, double rel, double abs_floor,
                      int* failures) {
    if (*failures > 20) return;  // enough said
    if (path == "/engine") return;  // timings, batch counts: legitimately different
    if (a.is_object()) {
        ASSERT_TRUE(b.is_object()) << path;
        EXPECT_EQ(a.size(), b.size()) << path;
        for (auto it = a.begin(); it != a.end(); ++it) {
            if (!b.contains(it.key())) {
                ADD_FAILURE() << path << "/" << it.key() << " missing";
                ++*failures;
                continue;
            }
            expect_same_json(it.value(), b[it.key()], path + "/" + it.key(), rel, abs_floor, failures);
        }
        return;
    }
    if (a.is_array()) {
        ASSERT_TRUE(b.is_array()) << path;
        ASSERT_EQ(a.size(), b.size()) << path;
        for (size_t i = 0; i < a.size(); ++i)
            expect_same_json(a[i], b[i], path + "/" + std::to_string(i), rel, abs_floor, failures);
        return;
    }
    if (a.is_number_integer() && b.is_number_integer()) {
        if (a.get<int64_t>() != b.get<int64_t>()) {
            ADD_FAILURE() << path << ": " << a << " vs " << b;
            ++*failures;
        }
        return;
    }
    if (a.is_number() && b.is_number()) {
        const double x = a.get<double>(), y = b.get<double>();
        const double err = std::fabs(x - y);
        ++values_compared();
        if (x != 0) worst_rel() = std::max(worst_rel(), err / std::fabs(x));
        if (!(err <= rel * std::fabs(x) + abs_floor)) {
            ADD_FAILURE() << path << ": " << std::setprecision(17) << x << " vs " << y << ", relative " << err / std::fabs(x);
            ++*failures;
        }
        return;
    }
    if (a != b) {
        ADD_FAILURE() << path << ": " << a.dump() << " vs " << b.dump();
        ++*failures;
    }
}

void expect_same_report(const json& a, const json& b, double rel = 1e-12, double abs_floor = 1e-15) {
    int failures = 0;
    expect_same_json(a, b, "", rel, abs_floor, &failures);
}

// Seeded data: Zipf labels (many classes below min_samples), separated means, float32 rows.
struct Data {
    int64_t N = 0, d = 0, V = 0;
    std::vector<float> x;
    std::vector<int64_t> y;
    std::vector<float> w, b;
};

Data make_data(int64_t V, int64_t d, int64_t N, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> g(0.0, 1.0);
    Data D;
    D.V = V, D.d = d, D.N = N;
    std::vector<double> wts((size_t)V);
    for (int64_t r = 0; r < V; ++r) wts[(size_t)r] = 1.0 / std::pow((double)r + 1.0, 1.1);
    std::vector<int64_t> perm((size_t)V);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::discrete_distribution<int64_t> z(wts.begin(), wts.end());
    std::vector<double> means((size_t)(V * d));
    for (auto& v : means) v = 3.0 * g(rng);
    D.y.resize((size_t)N);
    D.x.resize((size_t)(N * d));
    for (int64_t i = 0; i < N; ++i) {
        D.y[(size_t)i] = perm[(size_t)z(rng)];
        for (int64_t k = 0; k < d; ++k) D.x[(size_t)(i * d + k)] = (float)(1.0 + means[(size_t)(D.y[(size_t)i] * d + k)] + g(rng));
    }
    D.w.resize((size_t)(V * d));
    for (int64_t i = 0; i < V * d; ++i) D.w[(size_t)i] = (float)(0.5 * means[(size_t)i] + g(rng));
    D.b.resize((size_t)V);
    for (auto& v : D.b) v = (float)g(rng);
    return D;
}

Data permuted(const Data& D, uint64_t seed) {
    std::vector<int64_t> p((size_t)D.N);
    std::iota(p.begin(), p.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(p.begin(), p.end(), rng);
    Data S = D;
    for (int64_t i = 0; i < D.N; ++i) {
        S.y[(size_t)i] = D.y[(size_t)p[(size_t)i]];
        std::copy_n(&D.x[(size_t)(p[(size_t)i] * D.d)], D.d, &S.x[(size_t)(i * D.d)]);
    }
    return S;
}

// Feeds D in batches of `batch` rows; does the second pass when the session asks for one.
json run(const collapse_options& o, const Data& D, int64_t batch, bool classifier = true) {
    collapse::Session s(o);
    auto feed = [&]() {
        for (int64_t r0 = 0; r0 < D.N; r0 += batch) {
            const int64_t nr = std::min(batch, D.N - r0);
            s.ingest_rows(collapse::host_buffer(D.x.data() + r0 * D.d, nr, D.d), collapse::host_buffer(D.y.data() + r0, nr));
        }
    };
    if (classifier) {
        const collapse_buffer bb = collapse::host_buffer(D.b.data(), COLLAPSE_F32, D.V, 1);
        s.set_classifier(collapse::host_buffer(D.w.data(), D.V, D.d), &bb);
    }
    feed();
    if (s.needs_second_pass()) {
        s.begin_second_pass();
        feed();
    }
    return json::parse(s.compute().json());
}

collapse_options exact_options(int64_t V) {
    static const int64_t excl[] = {0, 5};
    collapse_options o = collapse::default_options();
    o.num_classes = V;
    o.exclude_token_ids = excl;
    o.num_exclude_token_ids = 2;
    o.compute_nc4 = 1;
    return o;
}

// The other code paths: kept set cut at the end (Gram from the row store), centred per-token SVD,
// token-weighted global mean, p = 2, min_samples 3 (longer hold-back of Gram rows).
collapse_options exact_options_cut(int64_t V) {
    collapse_options o = exact_options(V);
    o.max_tokens_to_analyze = 40;
    o.svd_center = 1;
    o.global_mean = COLLAPSE_MEAN_TOKEN_WEIGHTED;
    o.cdnv_power = 2.0;
    o.min_samples_per_token = 3;
    return o;
}

collapse_options sampled_options(int64_t V, uint64_t seed) {
    collapse_options o = exact_options(V);
    o.svd_mode = COLLAPSE_SVD_SAMPLED;
    o.svd_max_rows_per_token = 8;
    o.seed = seed;
    o.max_tokens_to_analyze = 60;  // the Gram of kept rows then comes from the second pass too
    return o;
}

constexpr int64_t kV = 300, kD = 16, kN = 5000;

class InvarianceExact : public ::testing::TestWithParam<int> {};

TEST_P(InvarianceExact, BatchSizesAndShuffledOrder) {
    const Data D = make_data(kV, kD, kN, 2024);
    const collapse_options o = GetParam() == 0 ? exact_options(kV) : exact_options_cut(kV);
    const json base = run(o, D, 4096);
    ASSERT_TRUE(base["overall_analysis"]["nc4_agreement"].is_number());
    ASSERT_TRUE(base["overall_analysis"]["overall_svd_entropy"].is_number());
    ASSERT_GT(base["counts"]["classes_below_min"].get<int64_t>(), 0);
    for (int64_t batch : {int64_t(1), int64_t(7)}) {
        SCOPED_TRACE("batch rows " + std::to_string(batch));
        expect_same_report(base, run(o, D, batch));
    }
    {
        SCOPED_TRACE("shuffled rows, batch 4096");
        expect_same_report(base, run(o, permuted(D, 7), 4096));
    }
    {
        SCOPED_TRACE("shuffled rows, batch 7");
        expect_same_report(base, run(o, permuted(D, 8), 7));
    }
}

INSTANTIATE_TEST_SUITE_P(Invariance, InvarianceExact, ::testing::Values(0, 1),
                         [](const ::testing::TestParamInfo<int>& i) { return i.param == 0 ? std::string("defaults_nc4") : std::string("max_tokens_center_weighted_p2"); });

TEST(InvarianceSampled, BatchSizeInvariantAndDeterministic) {
    const Data D = make_data(kV, kD, kN, 2025);
    const collapse_options o = sampled_options(kV, 12345);
    const json base = run(o, D, 4096);
    // The case really samples, and really took the second pass (NC4, Gram of the cut kept set).
    int64_t sampled = 0;
    for (const auto& t : base["token_analysis"]) sampled += t["sampled"].get<bool>() ? 1 : 0;
    ASSERT_GT(sampled, 0);
    ASSERT_TRUE(base["overall_analysis"]["nc4_agreement"].is_number());
    ASSERT_TRUE(base["overall_analysis"]["overall_svd_entropy"].is_number());
    {
        SCOPED_TRACE("same seed, same batches: identical");
        expect_same_report(base, run(o, D, 4096), 0.0, 0.0);
    }
    for (int64_t batch : {int64_t(1), int64_t(7)}) {
        SCOPED_TRACE("batch rows " + std::to_string(batch));
        expect_same_report(base, run(o, D, batch));
    }
    // Another seed draws other reservoirs: some sampled token's entropy changes (the seed is used).
    const json other = run(sampled_options(kV, 999), D, 4096);
    int64_t differ = 0;
    for (auto it = base["token_analysis"].begin(); it != base["token_analysis"].end(); ++it)
        if (it.value()["sampled"].get<bool>() && it.value()["svd_entropy"] != other["token_analysis"][it.key()]["svd_entropy"])
            ++differ;
    EXPECT_GT(differ, 0);
}

// Sequences: x = H[:, :-1], y = I[:, 1:], kept where A[:, 1:] != 0.
TEST(InvarianceSequences, SequenceLayoutEqualsRowsLayout) {
    const int64_t B = 12, T = 80, V = 150, d = 16;
    std::mt19937_64 rng(77);
    std::normal_distribution<double> g(0.0, 1.0);
    std::uniform_int_distribution<int64_t> tok(0, V - 1);
    std::vector<double> means((size_t)(V * d));
    for (auto& v : means) v = 3.0 * g(rng);
    std::vector<int64_t> ids((size_t)(B * T)), mask((size_t)(B * T));
    std::vector<float> H((size_t)(B * T * d));
    for (int64_t b = 0; b < B; ++b) {
        const int64_t len = T - (b * 7) % 30;  // right padding of varying length
        for (int64_t t = 0; t < T; ++t) {
            const int64_t i = b * T + t;
            ids[(size_t)i] = tok(rng) % (1 + (tok(rng) % V));  // skewed towards small ids
            mask[(size_t)i] = (t < len && (i % 11) != 3) ? 1 : 0;
        }
    }
    // The hidden state at position t predicts token t + 1: give it that class's mean.
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const int64_t next = t + 1 < T ? ids[(size_t)(b * T + t + 1)] : 0;
            for (int64_t k = 0; k < d; ++k)
                H[(size_t)((b * T + t) * d + k)] = (float)(means[(size_t)(next * d + k)] + g(rng));
        }
    std::vector<float> W((size_t)(V * d));
    for (auto& v : W) v = (float)g(rng);

    collapse_options o = collapse::default_options();
    o.num_classes = V;
    static const int64_t excl[] = {1};
    o.exclude_token_ids = excl;
    o.num_exclude_token_ids = 1;
    o.compute_nc4 = 1;

    // Rows layout: the shifted rows and a uint8 valid mask.
    const int64_t R = B * (T - 1);
    std::vector<float> X((size_t)(R * d));
    std::vector<int32_t> Y((size_t)R);
    std::vector<uint8_t> valid((size_t)R);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t + 1 < T; ++t) {
            const int64_t r = b * (T - 1) + t;
            std::copy_n(&H[(size_t)((b * T + t) * d)], d, &X[(size_t)(r * d)]);
            Y[(size_t)r] = (int32_t)ids[(size_t)(b * T + t + 1)];
            valid[(size_t)r] = (uint8_t)mask[(size_t)(b * T + t + 1)];
        }

    // Windows need sequence ids, which only the sequence layout gives here (test_windows.cpp
    // compares the layouts' windows with tagged rows).
    o.compute_window_metrics = 0;
    for (bool with_mask : {true, false}) {
        SCOPED_TRACE(with_mask ? "attention mask" : "no mask");
        collapse::Session seq(o);
        seq.set_classifier(collapse::host_buffer(W.data(), V, d));
        const collapse_buffer m = collapse::host_buffer(mask.data(), COLLAPSE_I64, B, T);
        seq.ingest_sequences(collapse::host_buffer(H.data(), B * T, d), collapse::host_buffer(ids.data(), COLLAPSE_I64, B, T),
                             with_mask ? &m : nullptr, B, T);
        const json a = json::parse(seq.compute().json());

        collapse::Session rows(o);
        rows.set_classifier(collapse::host_buffer(W.data(), V, d));
        const collapse_buffer vb = collapse::host_buffer(valid.data(), COLLAPSE_U8, R, 1);
        rows.ingest_rows(collapse::host_buffer(X.data(), R, d), collapse::host_buffer(Y.data(), R), with_mask ? &vb : nullptr);
        const json b = json::parse(rows.compute().json());

        int64_t masked = 0;
        for (uint8_t v : valid) masked += v == 0;
        EXPECT_EQ(a["counts"]["rows_seen"].get<int64_t>(), R);
        EXPECT_EQ(a["counts"]["rows_masked"].get<int64_t>(), with_mask ? masked : 0);
        ASSERT_GT(a["counts"]["rows_excluded"].get<int64_t>(), 0);
        expect_same_report(a, b);

        // And a different split of the sequences (3 batches of 4 sequences) changes nothing.
        collapse::Session split(o);
        split.set_classifier(collapse::host_buffer(W.data(), V, d));
        for (int64_t b0 = 0; b0 < B; b0 += 4) {
            const collapse_buffer mk = collapse::host_buffer(mask.data() + b0 * T, COLLAPSE_I64, 4, T);
            split.ingest_sequences(collapse::host_buffer(H.data() + b0 * T * d, 4 * T, d),
                                   collapse::host_buffer(ids.data() + b0 * T, COLLAPSE_I64, 4, T), with_mask ? &mk : nullptr, 4, T);
        }
        expect_same_report(a, json::parse(split.compute().json()));
    }
}

}  // namespace
}  // namespace test_invariance

namespace test_invariance {
namespace {

// Ingest and the pair tiles run on OpenMP threads; each class and each tile is reduced by one thread
// in a fixed order, so the report is bit-identical whatever the thread count.
TEST(InvarianceThreads, SameReportForOneAndTwoThreads) {
    const Data D = make_data(kV, kD, kN, 2026);
    const collapse_options o = exact_options(kV);
    const int before = omp_get_max_threads();
    omp_set_num_threads(1);
    const json one = run(o, D, 4096);
    omp_set_num_threads(2);
    const json two = run(o, D, 4096);
    omp_set_num_threads(before);
    json a = one, b = two;
    a.erase("engine");
    b.erase("engine");
    EXPECT_EQ(a.dump(), b.dump());
}

}  // namespace
}  // namespace test_invariance
