// Sampled reservoirs spread over ranks (core/reservoir_picks.hpp and the owner's side in
// core/spread_part.hpp, one piece of code for the CPU and CUDA backends; no MPI needed): the
// root's merged samples, decided from the counts alone, give every slot of every class's sample
// exactly once, to the row a checkpoint merge of the reservoirs themselves (merge_reservoirs,
// source after source) puts there; a rank takes its picks as written; bad picks, slots and
// budgets are refused naming what.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <unistd.h>

#include "base/error.hpp"
#include "core/host_budget.hpp"
#include "core/reservoir_picks.hpp"
#include "core/row_store.hpp"
#include "core/spread_part.hpp"
#include "core/state_sections.hpp"
#include "common/mem_state.hpp"

namespace test_mpi_picks {
namespace {

namespace ci = collapse::internal;

constexpr int64_t V = 4, cap = 3;
constexpr uint64_t seed = 11;
// Each merge source's class counts (source 0: the root's own).
const std::vector<std::vector<int64_t>> counts = {{2, 5, 0, 4}, {3, 0, 1, 7}, {1, 2, 6, 0}};

int64_t kept(int s, int64_t c) { return std::min(counts[(size_t)s][(size_t)c], cap); }
ci::ReservoirPicks::RowsOf own(int s) {
    return [s](int32_t c) { return kept(s, c); };
}

void expect_refused(const std::function<void()>& f, const std::string& needle) {
    try {
        f();
        ADD_FAILURE() << "accepted; expected: " << needle;
    } catch (const ci::Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

// The root's picks after merging sources 1 and 2 in order.
void merge_all(ci::ReservoirPicks& root) {
    std::vector<int64_t> before = counts[0];
    for (int s = 1; s < 3; ++s) {
        root.merge(counts[(size_t)s].data(), before, own(0));
        for (int64_t c = 0; c < V; ++c) before[(size_t)c] += counts[(size_t)s][(size_t)c];
    }
}

TEST(MpiReservoirPicks, EverySlotOnceAsACheckpointMergeOfTheRows) {
    ci::HostBudget budget(1 << 20);
    ci::ReservoirPicks root(V, cap, seed, budget);
    merge_all(root);
    // The reference: the reservoirs' rows merged source after source, each row (d = 1) naming its
    // source and its row in that source's reservoir (1000 s + j).
    for (int64_t c = 0; c < V; ++c) {
        SCOPED_TRACE("class " + std::to_string(c));
        std::vector<double> merged;
        int64_t seen = 0;
        for (int s = 0; s < 3; ++s) {
            std::vector<double> theirs;
            for (int64_t j = 0; j < kept(s, c); ++j) theirs.push_back(1000.0 * s + (double)j);
            const int64_t n = counts[(size_t)s][(size_t)c];
            if (s == 0) merged = theirs;
            else if (n > 0) {
                const ci::RowVector m = ci::merge_reservoirs(seed, (int32_t)c, cap, 1, merged.data(), (int64_t)merged.size(), seen, theirs.data(),
                                                             (int64_t)theirs.size(), n);
                merged.assign(m.begin(), m.end());
            }
            seen += n;
        }
        ASSERT_EQ((int64_t)merged.size(), std::min(seen, cap));
        // The picks of every source, written for this class alone.
        std::vector<double> got(merged.size(), -1.0);
        for (int s = 0; s < 3; ++s) {
            testutil::MemState w;
            root.write(s, {(int32_t)c}, own(0), w);
            const std::vector<int64_t> cls = w.values<int64_t>("pick_classes"), row = w.values<int64_t>("pick_rows"),
                                       slot = w.values<int64_t>("pick_slots");
            ASSERT_EQ(cls.size(), row.size());
            ASSERT_EQ(cls.size(), slot.size());
            for (size_t i = 0; i < cls.size(); ++i) {
                EXPECT_EQ(cls[i], c);
                ASSERT_GE(slot[i], 0);
                ASSERT_LT(slot[i], (int64_t)got.size());
                EXPECT_EQ(got[(size_t)slot[i]], -1.0) << "slot " << slot[i] << " given twice";
                EXPECT_LT(row[i], kept(s, c));
                got[(size_t)slot[i]] = 1000.0 * s + (double)row[i];
            }
        }
        EXPECT_EQ(got, merged);
    }
}

TEST(MpiReservoirPicks, ARankTakesItsPicksByClass) {
    ci::HostBudget budget(1 << 20);
    ci::ReservoirPicks root(V, cap, seed, budget);
    merge_all(root);
    std::vector<int64_t> combined((size_t)V, 0);
    for (const auto& n : counts)
        for (int64_t c = 0; c < V; ++c) combined[(size_t)c] += n[(size_t)c];
    testutil::MemState w;
    root.write(1, {3, 0, 1, 2}, own(0), w);  // any order of the classes: written ascending
    ci::ReservoirPicks rank(V, cap, seed, budget);
    EXPECT_FALSE(rank.taken());
    rank.take(w, combined.data(), own(1));
    ASSERT_TRUE(rank.taken());
    const std::vector<int64_t> cls = w.values<int64_t>("pick_classes"), row = w.values<int64_t>("pick_rows"), slot = w.values<int64_t>("pick_slots");
    EXPECT_TRUE(std::is_sorted(cls.begin(), cls.end()));
    size_t i = 0;
    for (int32_t c = 0; c < V; ++c)
        for (int64_t k = rank.begin(c); k < rank.end(c); ++k, ++i) {
            ASSERT_LT(i, cls.size());
            EXPECT_EQ(cls[i], c);
            EXPECT_EQ(rank.rows()[k], row[i]);
            EXPECT_EQ(rank.slots()[k], slot[i]);
        }
    EXPECT_EQ(i, cls.size());
    // Without any merge (one rank) the own reservoirs are the sample, row j in slot j.
    ci::ReservoirPicks alone(V, cap, seed, budget);
    testutil::MemState w0;
    alone.write(0, {1}, own(0), w0);
    EXPECT_EQ(w0.values<int64_t>("pick_rows"), (std::vector<int64_t>{0, 1, 2}));
    EXPECT_EQ(w0.values<int64_t>("pick_slots"), (std::vector<int64_t>{0, 1, 2}));
}

TEST(MpiReservoirPicks, BadPicksSourcesAndBudgetsAreRefused) {
    ci::HostBudget budget(1 << 20);
    ci::ReservoirPicks root(V, cap, seed, budget);
    merge_all(root);
    expect_refused([&] {
        testutil::MemState w;
        root.write(3, {0}, own(0), w);
    }, "merge source 3 of 3");
    std::vector<int64_t> combined((size_t)V, 0);
    for (const auto& n : counts)
        for (int64_t c = 0; c < V; ++c) combined[(size_t)c] += n[(size_t)c];
    testutil::MemState w;
    root.write(0, {1}, own(0), w);
    // A rank whose reservoir of class 1 holds fewer rows than picked from it.
    ci::ReservoirPicks small(V, cap, seed, budget);
    expect_refused([&] { small.take(w, combined.data(), [](int32_t) { return int64_t(1); }); }, ") is out of range");
    testutil::MemState bad = w;
    bad.reshape("pick_rows", {0});
    expect_refused([&] { small.take(bad, combined.data(), own(0)); }, "section pick_rows is not int64 [m] as pick_classes");
    ci::ReservoirPicks huge(V, int64_t(1) << 44, seed, budget);
    expect_refused([&] { huge.merge(counts[1].data(), counts[0], own(0)); }, "is too large to spread over MPI ranks");
    // The merged samples are counted in the session's budget.
    ci::HostBudget tiny(64);
    ci::ReservoirPicks counted(V, cap, seed, tiny);
    expect_refused([&] { counted.merge(counts[1].data(), counts[0], own(0)); }, "the merged reservoir samples of V = 4 classes");
}

// An owner's side: reservoir rows to their slots, every slot once; more rows or a slot outside
// the sample are refused, and a class left short is named at the close.
TEST(MpiReservoirPicks, OwnerFillsEverySlotOnce) {
    const std::string dir = (std::filesystem::temp_directory_path() / ("collapse_picks_" + std::to_string(::getpid()))).string();
    ci::HostBudget budget(1 << 20);
    ci::RowStore store(V, 2, -1, dir, ci::RowStore::WriteFn{}, &budget);
    ci::HostBudget::Lease lease = budget.lease();
    std::vector<int64_t> filled((size_t)V, 0);
    const double x[6] = {1, 2, 3, 4, 5, 6};
    const int64_t slots[3] = {2, 0, 1};
    ci::append_sampled_rows(store, lease, filled[1], 1, 3, x, 2, slots, 2);  // rows 0, 1 to slots 2, 0
    EXPECT_GT(lease.bytes(), 0);
    const std::vector<uint8_t> owned = {0, 1, 0, 0};
    auto want = [](int32_t) { return int64_t(3); };
    auto got = [&](int32_t c) { return filled[(size_t)c]; };
    expect_refused([&] { ci::check_owned_rows(store, owned, true, want, got); }, "class 1 has 2 rows on the rank that owns it, its sample holds 3");
    const int64_t outside[1] = {3};
    expect_refused([&] { ci::append_sampled_rows(store, lease, filled[1], 1, 3, x + 4, 1, outside, 2); }, "class 1: slot 3 outside its sample of 3");
    ci::append_sampled_rows(store, lease, filled[1], 1, 3, x + 4, 1, slots + 2, 2);  // row 2 to slot 1
    ci::check_owned_rows(store, owned, true, want, got);
    const double* rows = store.memory_data(1);
    EXPECT_EQ(std::vector<double>(rows, rows + 6), (std::vector<double>{3, 4, 5, 6, 1, 2}));
    expect_refused([&] { ci::append_sampled_rows(store, lease, filled[1], 1, 3, x, 1, slots, 2); }, "class 1 received more than its 3 sampled rows");
}

}  // namespace
}  // namespace test_mpi_picks
