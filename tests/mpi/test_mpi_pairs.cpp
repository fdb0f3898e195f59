// The pair-metric tiles spread over ranks through the Session calls alone (no MPI needed): the
// root's inputs, every rank's share (contiguous tiles, by pair count), the shares merged in rank
// order give one session's pair metrics; a share that does not fit is refused, naming what.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "collapse/collapse.hpp"
#include "core/session.hpp"

namespace {

namespace ci = collapse::internal;

// Sections in memory, as src/mpi/ moves them.
class Mem final : public ci::StateWriter, public ci::StateReader {
public:
    void add(const std::string& n, uint32_t t, const std::vector<int64_t>& shape, const void* data, size_t bytes) override {
        Sec& s = secs_[n];
        s.t = t, s.shape = shape;
        s.b.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
    }
    void begin_section(const std::string& n, uint32_t t, const std::vector<int64_t>& shape, size_t) override { add(n, t, shape, nullptr, 0), cur_ = n; }
    void append(const void* data, size_t bytes) override {
        auto& b = secs_[cur_].b;
        b.insert(b.end(), static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
    }
    void end_section() override {}
    std::string description() const override { return "a test part"; }
    bool has(const std::string& n) const override { return secs_.count(n) > 0; }
    ci::StateSection section(const std::string& n) const override {
        const auto it = secs_.find(n);
        if (it == secs_.end()) ci::fail(COLLAPSE_ERR_IO, "no section ", n);
        ci::StateSection s;
        s.name = n, s.dtype_code = it->second.t, s.shape = it->second.shape, s.bytes = it->second.b.size();
        s.data = s.bytes ? it->second.b.data() : nullptr;
        return s;
    }
    template <class T>
    T* at(const std::string& n) { return reinterpret_cast<T*>(secs_.at(n).b.data()); }
    void reshape(const std::string& n, std::vector<int64_t> shape) { secs_.at(n).shape = std::move(shape); }

private:
    struct Sec {
        uint32_t t = 0;
        std::vector<int64_t> shape;
        std::vector<uint8_t> b;
    };
    std::map<std::string, Sec> secs_;
    std::string cur_;
};

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

}  // namespace
