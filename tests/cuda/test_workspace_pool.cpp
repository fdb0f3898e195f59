// The bookkeeping of the CUDA backend's workspace pool (cuda/workspace_pool.hpp) against
// device_memory_limit, with a fake allocator: these run on any machine, GPU or not.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "../../cuda/workspace_pool.hpp"

namespace test_workspace_pool {
namespace {

using collapse::internal::cuda::Budget;
using collapse::internal::cuda::Lease;
using collapse::internal::cuda::SlabAllocator;
using collapse::internal::cuda::WorkspacePool;

int g_allocs = 0, g_frees = 0, g_fail_next = 0;

SlabAllocator fake() {
    SlabAllocator a;
    a.allocate = [](void** p, size_t n) {
        if (g_fail_next > 0) {
            --g_fail_next;
            return cudaErrorMemoryAllocation;
        }
        ++g_allocs;
        *p = std::malloc(n);
        return cudaSuccess;
    };
    a.free = [](void* p) {
        ++g_frees;
        std::free(p);
        return cudaSuccess;
    };
    return a;
}

class WorkspacePoolTest : public ::testing::Test {
protected:
    void SetUp() override { g_allocs = g_frees = g_fail_next = 0; }
    Budget budget_{1000};
};

// Workspaces sized by the data (a solver's, which grows with the batch) are rounded up to a power
// of two of at least the floor: a later compute that needs a little more gets the same slab. The
// exact size when the rounded one would not fit the budget.
TEST_F(WorkspacePoolTest, DataSizedWorkspacesRoundedSoThatTheyAreReused) {
    using collapse::internal::cuda::reusable_bytes;
    EXPECT_EQ(reusable_bytes(budget_, 1, 64), 64u);
    EXPECT_EQ(reusable_bytes(budget_, 64, 64), 64u);
    EXPECT_EQ(reusable_bytes(budget_, 65, 64), 128u);
    EXPECT_EQ(reusable_bytes(budget_, 300, 64), 512u);
    EXPECT_EQ(reusable_bytes(budget_, 600, 64), 600u) << "1024 would not fit the 1000-byte budget";
    WorkspacePool pool(&budget_, fake());
    for (size_t need : {70, 90, 128, 100}) {  // round 1, then later computes with other batches
        SCOPED_TRACE(need);
        Lease<uint8_t> w = pool.take<uint8_t>(reusable_bytes(budget_, need, 64), "solver workspace");
        EXPECT_GE(w.bytes(), need);
    }
    EXPECT_EQ(g_allocs, 1) << "one slab of 128 bytes served every round";
    Lease<uint8_t> busy = pool.take<uint8_t>(700, "most of the budget");
    EXPECT_EQ(reusable_bytes(budget_, 200, 64), 256u);
    EXPECT_EQ(reusable_bytes(budget_, 280, 64), 280u) << "512 would not fit beside 700 bytes in use";
}

// A compute of a shape seen before asks for the same sizes: they come from idle slabs.
TEST_F(WorkspacePoolTest, ReusesIdleSlabsOfTheSameSize) {
    WorkspacePool pool(&budget_, fake());
    for (int round = 0; round < 3; ++round) {
        Lease<uint8_t> a = pool.take<uint8_t>(100, "a");
        Lease<double> b = pool.take<double>(10, "b");
        Lease<double> c = pool.take<double>(10, "c");  // the same size as b, both in use: two slabs
        EXPECT_NE(b.data(), c.data());
        EXPECT_EQ(budget_.used(), 260);
        EXPECT_EQ(budget_.cached(), 0);
    }
    EXPECT_EQ(g_allocs, 3);
    EXPECT_EQ(budget_.allocation_calls().device, 3);
    EXPECT_EQ(budget_.used(), 0);
    EXPECT_EQ(budget_.cached(), 260);
    Lease<uint8_t> moved;
    {
        Lease<uint8_t> a = pool.take<uint8_t>(100, "a");
        moved = std::move(a);
        EXPECT_EQ(a.data(), nullptr);
    }
    EXPECT_EQ(budget_.used(), 100);  // the moved-to lease still holds it
    EXPECT_EQ(pool.take<int>(0, "nothing").data(), nullptr);
}

// Refused like a DeviceBuffer, with the numbers, before anything changes.
TEST_F(WorkspacePoolTest, RefusesOverTheLimitWithTheNumbers) {
    WorkspacePool pool(&budget_, fake());
    { Lease<uint8_t> idle = pool.take<uint8_t>(300, "idle"); }
    Lease<uint8_t> a = pool.take<uint8_t>(200, "a");
    try {
        Lease<uint8_t> big = pool.take<uint8_t>(900, "pair tile", "raise device_memory_limit");
        FAIL() << "no refusal";
    } catch (const std::exception& e) {
        EXPECT_STREQ(e.what(), "pair tile needs 900 B of device memory; 200 B are in use and device_memory_limit is 1000 B; "
                               "raise device_memory_limit");
    }
    EXPECT_EQ(budget_.used(), 200);
    EXPECT_EQ(budget_.cached(), 300);
    EXPECT_EQ(g_frees, 0);
}

// Idle slabs never push the session over device_memory_limit: a reservation that needs their room
// (a lease or a long-lived buffer) frees them first, least recently used first.
TEST_F(WorkspacePoolTest, FreesIdleSlabsWhenTheBudgetNeedsTheRoom) {
    WorkspacePool pool(&budget_, fake());
    {
        Lease<uint8_t> older = pool.take<uint8_t>(300, "older");
        Lease<uint8_t> newer = pool.take<uint8_t>(400, "newer");
        older.reset();  // released first: the least recently used
    }
    EXPECT_EQ(budget_.cached(), 700);
    {
        Lease<uint8_t> c = pool.take<uint8_t>(500, "c");
        EXPECT_LE(budget_.used() + budget_.cached(), 1000);
        EXPECT_EQ(g_frees, 1);
        EXPECT_EQ(budget_.cached(), 400);  // the older one went
    }
    EXPECT_EQ(budget_.cached(), 900);
    budget_.reserve(600, "a long-lived buffer", "");  // what DeviceBuffer::allocate does first
    EXPECT_LE(budget_.used() + budget_.cached(), 1000);
    EXPECT_EQ(g_frees, 3);
    budget_.release(600);
}

// A failed cudaMalloc with idle slabs around: they are freed and it is tried once more.
TEST_F(WorkspacePoolTest, RetriesAfterFreeingIdleSlabsWhenMallocFails) {
    WorkspacePool pool(&budget_, fake());
    { Lease<uint8_t> idle = pool.take<uint8_t>(40, "idle"); }
    g_fail_next = 1;
    Lease<uint8_t> a = pool.take<uint8_t>(50, "a");
    EXPECT_NE(a.data(), nullptr);
    EXPECT_EQ(g_frees, 1);
    EXPECT_EQ(budget_.cached(), 0);
    g_fail_next = 1;  // and nothing idle to free
    try {
        Lease<uint8_t> b = pool.take<uint8_t>(60, "b");
        FAIL() << "no error";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("cudaMalloc of 60 B for b failed"), std::string::npos) << e.what();
    }
    EXPECT_EQ(budget_.used(), 50);
}

}  // namespace
}  // namespace test_workspace_pool
