// The window tracker (core/windows.hpp) on its own: which rows form which window, when, and how
// much it holds; including the CUDA path where the filter verdicts come after the rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <memory>
#include <vector>

#include "core/host_budget.hpp"
#include "core/windows.hpp"

namespace test_window_tracker {
namespace {

using collapse::internal::HostBudget;
using collapse::internal::RowTags;
using collapse::internal::WindowTracker;

// Tags of explicit rows from vectors.
struct Tags {
    std::vector<int64_t> seq, pos;
    RowTags view() const {
        RowTags t;
        t.rows = (int64_t)seq.size();
        t.seq = seq.data();
        t.pos = pos.empty() ? nullptr : pos.data();
        return t;
    }
};

std::shared_ptr<HostBudget> budget() { return std::make_shared<HostBudget>(int64_t(1) << 30); }

TEST(WindowTracker, InOrderStreamsHoldLessThanAWindowPerSequence) {
    const int64_t W = 8;
    WindowTracker t(W, budget());
    int64_t windows = 0;
    for (int64_t step = 0; step < 200; ++step) {
        Tags g;
        for (int64_t s = 0; s < 3; ++s) g.seq.push_back(s), g.pos.push_back(step);
        const auto p = t.plan(g.view(), 0);
        const std::vector<uint8_t> kept(3, 1);
        t.commit(p, kept.data());
        windows += (int64_t)t.take_ready().size() / W;
        EXPECT_LT(t.pending_rows(), 3 * W);
    }
    EXPECT_EQ(windows, 3 * (200 / W));
    EXPECT_EQ(t.pending_rows(), 0);  // 200 is a multiple of 8
}

TEST(WindowTracker, LateVerdictsHoldWindowsUntilKnown) {
    const int64_t W = 3;
    WindowTracker t(W, budget());
    Tags g;
    for (int64_t p = 0; p < 7; ++p) g.seq.push_back(5), g.pos.push_back(6 - p);  // reversed order
    const auto plan = t.plan(g.view(), 0);
    const std::vector<int64_t> slots = t.commit(plan, nullptr);  // verdicts pending (CUDA)
    for (int64_t s : slots) EXPECT_GE(s, 0);
    EXPECT_TRUE(t.take_ready().empty());
    EXPECT_EQ(t.unknown_verdicts(), 7);
    // Positions 6..0 are rows 0..6; drop position 1 (row 5) and position 4 (row 2).
    const std::vector<uint8_t> kept{1, 1, 0, 1, 1, 0, 1};
    t.verdicts(slots.data(), kept.data(), 7);
    const std::vector<int64_t> ready = t.take_ready();
    // Kept positions in order: 0 2 3 | 5 6 -> one window: rows of positions 0, 2, 3.
    ASSERT_EQ(ready.size(), 3u);
    EXPECT_EQ(ready[0], slots[6]);
    EXPECT_EQ(ready[1], slots[4]);
    EXPECT_EQ(ready[2], slots[3]);
    EXPECT_EQ(t.pending_rows(), 2);
}

TEST(WindowTracker, AGapHoldsRowsUntilFilled) {
    const int64_t W = 2;
    WindowTracker t(W, budget());
    auto feed = [&](std::vector<int64_t> pos) {
        Tags g;
        g.pos = pos;
        g.seq.assign(pos.size(), 1);
        const std::vector<uint8_t> kept(pos.size(), 1);
        t.commit(t.plan(g.view(), 0), kept.data());
        return t.take_ready().size() / W;
    };
    EXPECT_EQ(feed({0, 2, 3, 4, 5}), 0u);  // position 1 missing: only position 0 is final
    EXPECT_EQ(t.pending_rows(), 5);
    EXPECT_EQ(feed({1}), 3u);  // 0 1 | 2 3 | 4 5
    EXPECT_EQ(t.pending_rows(), 0);
}

TEST(WindowTracker, WindowEntropyFromEigenvalues) {
    using collapse::internal::window_entropy_from_eigen;
    const double two[] = {1.0, 1.0};
    EXPECT_NEAR(window_entropy_from_eigen(two, 2), -std::log(0.5 + 1e-10), 1e-15);
    const double none[] = {0.0, 0.0, 0.0};
    EXPECT_EQ(window_entropy_from_eigen(none, 3), 0.0);
    // Rounding debris below the floor (M eps lambda_max) does not count.
    const double debris[] = {-1e-18, 1e-17, 1.0};
    EXPECT_NEAR(window_entropy_from_eigen(debris, 3), -std::log(1 + 1e-10), 1e-15);
}

}  // namespace
}  // namespace test_window_tracker
