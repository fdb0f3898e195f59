// The owner ranks of an exact row store spread over MPI ranks (Session::spread_owners; no MPI
// needed): every kept class gets one rank, the largest work first, each to the least loaded rank,
// so that no rank carries more than the least loaded one plus one class's work.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "collapse/collapse.hpp"
#include "core/session.hpp"

namespace test_mpi_owners {
namespace {

namespace ci = collapse::internal;

TEST(MpiSpreadOwners, LargestFirstToTheLeastLoadedRank) {
    const int64_t V = 30, d = 4;
    ci::Config cfg;
    cfg.num_classes = V;
    cfg.svd_mode = COLLAPSE_SVD_EXACT;
    cfg.compute_nc4 = false;
    cfg.exclude_token_ids = {29};
    ci::Session s(cfg);
    // Class c has 3 (c + 1) rows (class 0: 3, ..., class 28: 87); class 29 is excluded; d = 4, so
    // the work of a class is n min(n, 4) = 4 n.
    std::vector<float> x;
    std::vector<int32_t> y;
    for (int32_t c = 0; c < V; ++c)
        for (int32_t i = 0; i < 3 * (c + 1); ++i) {
            y.push_back(c);
            for (int64_t k = 0; k < d; ++k) x.push_back((float)(c * 7 + i * 3 + k));
        }
    const collapse_buffer xb = collapse::host_buffer(x.data(), (int64_t)y.size(), d), yb = collapse::host_buffer(y.data(), (int64_t)y.size());
    s.ingest_rows(&xb, &yb, nullptr, nullptr);
    for (int P : {1, 2, 3, 7}) {
        SCOPED_TRACE("P = " + std::to_string(P));
        std::vector<int32_t> ids;
        const std::vector<int32_t> owner = s.spread_owners(P, ids);
        ASSERT_EQ(ids.size(), (size_t)(V - 1));
        ASSERT_EQ(owner.size(), ids.size());
        std::vector<double> load((size_t)P, 0.0);
        for (size_t i = 0; i < ids.size(); ++i) {
            EXPECT_EQ(ids[i], (int32_t)i);
            ASSERT_GE(owner[i], 0);
            ASSERT_LT(owner[i], P);
            load[(size_t)owner[i]] += 4.0 * 3 * (ids[i] + 1);
        }
        // The largest classes (28, 27, ...) go to ranks 0, 1, ... in turn while every rank is empty.
        for (int r = 0; r < P; ++r) EXPECT_EQ(owner[(size_t)(28 - r)], r);
        const double largest = 4.0 * 3 * 29;
        EXPECT_LE(*std::max_element(load.begin(), load.end()) - *std::min_element(load.begin(), load.end()), largest);
    }
}

}  // namespace
}  // namespace test_mpi_owners
