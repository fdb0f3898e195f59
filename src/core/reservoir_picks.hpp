// Sampled reservoirs spread over ranks by class (core/backend.hpp, "spread_samples"), one piece of
// code for every backend. The root decides every class's merged sample from the counts alone as
// it merges the states without rows, in rank order, as a checkpoint merge picks the rows
// (merge_reservoir_picks): each sample entry is (merge source << kShift) | row in that source's
// reservoir, in sample order. write() gives one source's picks among some classes (pick_classes,
// pick_rows, pick_slots int64 [m]); take() gives them to that rank, whose rows then go to their
// owners each with its slot in the merged sample.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/host_budget.hpp"
#include "core/state_io.hpp"

namespace collapse::internal {

class ReservoirPicks {
public:
    // Rows in this session's own reservoir of class c (merge source 0; at most cap).
    using RowsOf = std::function<int64_t(int32_t)>;
    ReservoirPicks(int64_t V, int64_t cap, uint64_t seed, HostBudget& budget)
        : V_(V), cap_(cap), seed_(seed), budget_(budget), lease_(budget.lease()), mine_lease_(budget.lease()) {}
    // load_state's part on the root: a shard's counts (theirs [V]) merged into the samples, this
    // session's counts being `before`; counted in the budget before anything changes.
    void merge(const int64_t* theirs, const std::vector<int64_t>& before, const RowsOf& own);
    // Merge source `source`'s picks among the classes `ids` (0: the root's own).
    void write(int source, const std::vector<int32_t>& ids, const RowsOf& own, StateWriter& w) const;
    // This rank's picks (checked against its reservoirs and the combined counts [V]); the root's
    // samples are dropped (the root takes its own last).
    void take(const StateReader& r, const int64_t* counts, const RowsOf& own);
    // After take: class c's picks are rows()[i], slots()[i] for i in [begin(c), end(c)).
    bool taken() const { return at_.size() == (size_t)V_ + 1; }
    int64_t begin(int32_t c) const { return at_[(size_t)c]; }
    int64_t end(int32_t c) const { return at_[(size_t)c + 1]; }
    const int64_t* rows() const { return row_.data(); }
    const int64_t* slots() const { return slot_.data(); }
    void drop_taken();  // spread_close

private:
    static constexpr int kShift = 44;
    int64_t V_, cap_;
    uint64_t seed_;
    HostBudget& budget_;
    std::vector<std::vector<uint64_t>> picks_;  // [V] on the root
    int64_t sources_ = 0;                       // merge sources taken so far (0: none yet)
    HostBudget::Lease lease_;
    std::vector<int64_t> at_, row_, slot_;
    HostBudget::Lease mine_lease_;
};

}  // namespace collapse::internal
