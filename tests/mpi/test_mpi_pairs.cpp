// The pair-metric tiles spread over ranks through the Session calls alone (no MPI needed): the
// root's inputs, every rank's share (contiguous tiles, by pair count), the shares merged in rank
// order give one session's pair metrics; a share that does not fit is refused, naming what. The
// tiling both backends share (core/pair_part.hpp) against a brute force over the pairs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "base/error.hpp"
#include "collapse/collapse.hpp"
#include "core/pair_part.hpp"
#include "core/session.hpp"
#include "common/mem_state.hpp"

namespace test_mpi_pairs {
namespace {

namespace ci = collapse::internal;

using Mem = testutil::MemState;

constexpr int64_t V = 90, d = 6;  // 90 kept classes in tiles of edge 32: 6 tiles of 496, 1024, 832, 496, 832, 325 pairs

void fill(ci::Session& s) {
    std::mt19937 rng(3);
    std::normal_distribution<float> g;
    std::vector<float> x;
    std::vector<int32_t> y;
    for (int32_t c = 0; c < V; ++c)
        for (int i = 0; i < 3 + c % 4; ++i) {
            y.push_back(c);
            for (int64_t k = 0; k < d; ++k) x.push_back(g(rng) + (float)((c * 5 + k * 3) % 11));
        }
    const collapse_buffer xb = collapse::host_buffer(x.data(), (int64_t)y.size(), d), yb = collapse::host_buffer(y.data(), (int64_t)y.size());
    s.ingest_rows(&xb, &yb, nullptr, nullptr);
}

ci::Config config() {
    ci::Config cfg;
    cfg.num_classes = V;
    cfg.svd_mode = COLLAPSE_SVD_OFF;
    cfg.compute_nc4 = false;
    return cfg;
}

void expect_near(const std::optional<double>& a, const std::optional<double>& b, const char* what) {
    ASSERT_TRUE(a && b) << what;
    EXPECT_LE(std::fabs(*a - *b), 1e-12 * std::fabs(*a)) << what << ": " << *a << " vs " << *b;
}

// COLLAPSE_PAIR_TILE_EDGE for one test, unset however it ends.
struct TileEdge {
    TileEdge() { ::setenv("COLLAPSE_PAIR_TILE_EDGE", "32", 1); }
    ~TileEdge() { ::unsetenv("COLLAPSE_PAIR_TILE_EDGE"); }
};

TEST(MpiPairTiles, SharesMergedInRankOrderEqualOneSession) {
    const TileEdge edge;
    ci::Session one(config());
    fill(one);
    const ci::MetricValues a = one.compute().metrics;
    for (int P : {1, 2, 3, 5}) {
        SCOPED_TRACE("P = " + std::to_string(P));
        ci::Session root(config());
        fill(root);
        Mem in;
        ASSERT_TRUE(root.save_pair_inputs(in));
        int64_t next = 0, busy = 0;
        for (int r = 0; r < P; ++r) {
            Mem part;
            root.save_pair_part(in, r, P, part);
            const int64_t* t = part.at<int64_t>("pair_tiles");
            EXPECT_EQ(t[0], next);  // contiguous, in tile order
            EXPECT_EQ(t[2], 6);
            next = t[1];
            busy += t[1] > t[0] ? 1 : 0;
            root.merge_pair_part(part);
        }
        EXPECT_EQ(next, 6);
        EXPECT_EQ(busy, P);  // by pair count: P = 5 cuts after tiles 2, 3, 4 and 5
        const ci::MetricValues b = root.compute().metrics;
        EXPECT_EQ(a.gnc2_pairs, b.gnc2_pairs);
        EXPECT_EQ(a.gnc2_pairs + a.gnc2_skipped_pairs, V * (V - 1) / 2);
        expect_near(a.overall_gnc2, b.overall_gnc2, "overall_gnc2");
        expect_near(a.gnc2_var, b.gnc2_var, "gnc2_var");
        expect_near(a.nc1_cdnv, b.nc1_cdnv, "nc1_cdnv");
    }
}

TEST(MpiPairTiles, BadSharesAreRefused) {
    const TileEdge edge;
    ci::Session s(config());
    fill(s);
    Mem in;
    Mem part;
    auto refused = [](const std::function<void()>& f, const std::string& needle) {
        try {
            f();
            ADD_FAILURE() << "accepted; expected: " << needle;
        } catch (const ci::Error& e) {
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
        }
    };
    ASSERT_TRUE(s.save_pair_inputs(in));
    s.save_pair_part(in, 0, 2, part);
    Mem bad_in = in;
    bad_in.reshape("pair_m", {V, d + 1});
    refused([&] { s.save_pair_part(bad_in, 1, 2, part); }, "section pair_m is not float64 [K, d]");
    Mem no_class = in;
    no_class.reshape("pair_var", {0});
    refused([&] { s.save_pair_part(no_class, 1, 2, part); }, "section pair_var is not float64 [K] with K >= 1");
    refused([&] { s.save_pair_part(in, 2, 2, part); }, "rank 2 of 2");
    Mem bad = part;
    bad.at<int64_t>("pair_totals_i")[1] = bad.at<int64_t>("pair_totals_i")[0] + 1;
    refused([&] { s.merge_pair_part(bad); }, "section pair_totals_i holds");
    bad = part;
    bad.at<double>("pair_totals_f")[1] = std::nan("");
    refused([&] { s.merge_pair_part(bad); }, "section pair_totals_f holds NaN");
    s.merge_pair_part(part);
    refused([&] { s.merge_pair_part(part); s.merge_pair_part(part); }, "more pairs than K = 90");
    // More rows: the inputs are not those of this kept set any more.
    fill(s);
    refused([&] { s.merge_pair_part(part); }, "the pair inputs were not written for this kept set");
    ::setenv("COLLAPSE_PAIR_TILE_EDGE", "0", 1);
    refused([&] { s.save_pair_inputs(in); }, "COLLAPSE_PAIR_TILE_EDGE=0 is not an edge in [1, 2^20]");
}

// The tiling against a brute force over the pairs: every pair i < j of K classes lies in exactly
// one tile of the list (tile (i / T, j / T)), the ranks' shares are contiguous and cover the list
// once in rank order, and each share holds about 1/P of the pairs (within one tile's pairs).
TEST(MpiPairTiles, TilingCoversEveryPairOnceInBalancedShares) {
    for (const auto& [K, T] : std::vector<std::pair<int64_t, int64_t>>{{1, 4}, {2, 1}, {7, 3}, {90, 32}, {120, 16}, {33, 64}}) {
        SCOPED_TRACE("K = " + std::to_string(K) + ", T = " + std::to_string(T));
        const int64_t nt = (K + T - 1) / T;
        std::map<std::pair<int64_t, int64_t>, int64_t> pairs_in;  // brute force: pairs per tile
        for (int64_t i = 0; i < K; ++i)
            for (int64_t j = i + 1; j < K; ++j) ++pairs_in[{i / T, j / T}];
        for (int P : {1, 2, 3, 5, 8}) {
            SCOPED_TRACE("P = " + std::to_string(P));
            int64_t next = 0, covered = 0;
            std::vector<int64_t> share((size_t)P, 0);
            for (int r = 0; r < P; ++r) {
                const ci::PairTiling t = ci::pair_tiling(K, T, r, P);
                ASSERT_EQ((int64_t)t.tiles.size(), nt * (nt + 1) / 2);
                EXPECT_EQ(t.begin, next);
                ASSERT_LE(t.begin, t.end);
                next = t.end;
                for (int64_t k = t.begin; k < t.end; ++k) {
                    const auto [bi, bj] = t.tiles[(size_t)k];
                    ASSERT_LE(bi, bj);
                    if (k > 0) EXPECT_LT(t.tiles[(size_t)k - 1], t.tiles[(size_t)k]);  // the one fixed order
                    const auto it = pairs_in.find({bi, bj});
                    share[(size_t)r] += it == pairs_in.end() ? 0 : it->second;
                }
                covered += t.end - t.begin;
            }
            EXPECT_EQ(next, nt * (nt + 1) / 2);
            EXPECT_EQ(covered, nt * (nt + 1) / 2);
            int64_t all = 0;
            for (int64_t s : share) all += s;
            EXPECT_EQ(all, K * (K - 1) / 2);
            for (int r = 0; r < P; ++r) EXPECT_LE(std::llabs(share[(size_t)r] * P - all), P * T * T) << "rank " << r;
        }
    }
    try {
        ci::pair_tiling(10, 0, 0, 1);
        ADD_FAILURE() << "an edge of 0 was accepted";
    } catch (const ci::Error& e) {
        EXPECT_NE(std::string(e.what()).find("pair_tiling: K = 10, edge 0"), std::string::npos) << e.what();
    }
}

}  // namespace
}  // namespace test_mpi_pairs
