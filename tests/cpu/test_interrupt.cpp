// A stop request (base/interrupt.hpp, what the CLI's SIGTERM handler makes) ends a compute inside
// its long loops, not after them: the per-token SVDs, the pair tiles and NC4's tiles each throw
// Interrupted with the signal. The session stays usable: once the request is cleared, a snapshot
// equals that of a session that was never interrupted. (NC4's tiles are tested on Nc4Blocks: a
// snapshot of a session without a row store has no NC4, and with one it runs the SVDs first.)
#include <gtest/gtest.h>

#include <csignal>
#include <memory>
#include <cmath>
#include <random>
#include <vector>

#include "base/interrupt.hpp"
#include "core/host_budget.hpp"
#include "core/session.hpp"
#include "cpu/cpu_backend.hpp"

namespace test_interrupt {
namespace {
using namespace collapse::internal;

class Interrupt : public ::testing::Test {
protected:
    void TearDown() override { clear_interrupt(); }
};

struct Case {
    const char* name;
    collapse_svd_mode svd;
    bool token_metrics, class_metrics;
};

std::unique_ptr<Session> make_session(const Case& k, int64_t V, int64_t d, int64_t n) {
    Config c;
    c.num_classes = V;
    c.svd_mode = k.svd;
    c.compute_token_metrics = k.token_metrics;
    c.compute_class_metrics = k.class_metrics;
    c.compute_overall_metrics = false;
    auto s = std::make_unique<Session>(c);
    std::mt19937 rng(3);
    std::normal_distribution<float> g;
    std::vector<float> x((size_t)(n * d));
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = (int32_t)(i % V);
        for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] = g(rng) + 2.0f * (float)((y[(size_t)i] + j) % 4 == 0);
    }
    const collapse_buffer xb{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, d, 0};
    const collapse_buffer yb{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
    s->ingest_rows(&xb, &yb, nullptr, nullptr);
    return s;
}

TEST_F(Interrupt, EachLongLoopOfAComputeStopsOnARequest) {
    const int64_t V = 40, d = 16, n = 4000;
    // Each case runs one of the two loops alone (checked below: the others' metrics are absent).
    for (const Case& k : {Case{"per-token SVDs", COLLAPSE_SVD_EXACT, true, false}, Case{"pair tiles", COLLAPSE_SVD_OFF, false, true}}) {
        SCOPED_TRACE(k.name);
        const std::unique_ptr<Session> s = make_session(k, V, d, n);
        request_interrupt(SIGTERM);
        try {
            s->snapshot();
            ADD_FAILURE() << "the snapshot ran to its end despite the request";
        } catch (const Interrupted& e) {
            EXPECT_EQ(e.signal, SIGTERM);
        }
        clear_interrupt();
        const Result after = s->snapshot();
        const Result want = make_session(k, V, d, n)->snapshot();
        ASSERT_EQ(after.metrics.tokens.size(), want.metrics.tokens.size());
        for (size_t t = 0; t < want.metrics.tokens.size(); ++t)
            EXPECT_EQ(after.metrics.tokens[t].svd_entropy, want.metrics.tokens[t].svd_entropy) << "token " << t;
        EXPECT_EQ(after.metrics.overall_gnc2, want.metrics.overall_gnc2);
        const bool svd_ran = !want.metrics.tokens.empty() && want.metrics.tokens[0].svd_entropy.has_value();
        EXPECT_EQ(svd_ran, k.token_metrics);
        EXPECT_EQ(want.metrics.overall_gnc2.has_value(), k.class_metrics);
    }
}

TEST_F(Interrupt, Nc4TilesStopOnARequest) {
    const int64_t V = 300, K = 20, d = 8, rows = 1000;
    Classifier clf;
    clf.weight.resize((size_t)(V * d));
    for (size_t i = 0; i < clf.weight.size(); ++i) clf.weight[i] = std::sin(0.37 * (double)i);
    std::vector<double> mu((size_t)(K * d)), mu_sq((size_t)K, 0.0), x((size_t)(rows * d));
    for (size_t i = 0; i < mu.size(); ++i) mu[i] = std::cos(0.11 * (double)i), mu_sq[i / (size_t)d] += mu[i] * mu[i];
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.05 * (double)i);
    std::vector<int32_t> ids((size_t)K);
    for (int64_t s = 0; s < K; ++s) ids[(size_t)s] = (int32_t)(s * 7);
    HostBudget budget(int64_t(64) << 20);
    const int64_t want = nc4_agreements(budget, x.data(), rows, d, clf, V, mu, mu_sq, ids);
    request_interrupt(SIGINT);
    try {
        nc4_agreements(budget, x.data(), rows, d, clf, V, mu, mu_sq, ids);
        ADD_FAILURE() << "NC4 ran to its end despite the request";
    } catch (const Interrupted& e) {
        EXPECT_EQ(e.signal, SIGINT);
    }
    EXPECT_EQ(budget.held(), 0);
    clear_interrupt();
    EXPECT_EQ(nc4_agreements(budget, x.data(), rows, d, clf, V, mu, mu_sq, ids), want);
}

}  // namespace
}  // namespace test_interrupt
