#include "core/reservoir_picks.hpp"

#include <algorithm>
#include <string>

#include "base/error.hpp"
#include "core/state_sections.hpp"

namespace collapse::internal {

void ReservoirPicks::drop_taken() { at_ = {}, row_ = {}, slot_ = {}, mine_lease_.reset(); }

void ReservoirPicks::merge(const int64_t* theirs, const std::vector<int64_t>& before, const RowsOf& own) {
    const int64_t cap = cap_;
    if (cap >= (int64_t(1) << kShift)) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "svd_max_rows_per_token = ", cap, " is too large to spread over MPI ranks");
    if (sources_ >= (int64_t(1) << (64 - kShift))) fail(COLLAPSE_ERR_INTERNAL, "merge_picks: too many merge sources");
    // The sample grows by at most each class's rows here (min(count, cap)), and one class's next
    // list exists beside its old one: counted before anything changes.
    int64_t grow = sources_ == 0 ? mul_bytes(V_, (int64_t)sizeof(std::vector<uint64_t>)) : 0, most = 0;
    for (int64_t c = 0; c < V_; ++c) {
        const int64_t mine = sources_ == 0 ? own((int32_t)c) : (int64_t)picks_[(size_t)c].size();
        const int64_t next = std::min(cap, mine + std::min(theirs[c], cap));
        grow += 8 * (sources_ == 0 ? next : next - mine);
        most = std::max(most, next);
    }
    lease_.resize(add_bytes(lease_.bytes(), grow), "the merged reservoir samples of V = " + std::to_string(V_) +
                                                       " classes, as (rank, row) pairs (spread over the MPI ranks)", kFixNumClasses);
    const HostBudget::Lease scratch = budget_.reserve(mul_bytes(most, 2 * 8 + 16), "one class's reservoir merge", kFixNumClasses);
    if (sources_ == 0) {  // this session's own reservoirs: source 0
        picks_.assign((size_t)V_, {});
        for (int64_t c = 0; c < V_; ++c) {
            picks_[(size_t)c].resize((size_t)own((int32_t)c));
            for (size_t j = 0; j < picks_[(size_t)c].size(); ++j) picks_[(size_t)c][j] = j;
        }
        sources_ = 1;
    }
    const uint64_t source = (uint64_t)sources_ << kShift;
    for (int64_t c = 0; c < V_; ++c) {
        if (theirs[c] == 0) continue;
        std::vector<uint64_t>& mine = picks_[(size_t)c];
        const int64_t ka = (int64_t)mine.size();
        // As load_state merges reservoir rows (state_sections.cpp): theirs holds min(count, cap).
        const std::vector<int64_t> at = merge_reservoir_picks(seed_, (int32_t)c, cap, ka, before[(size_t)c], std::min(theirs[c], cap), theirs[c]);
        std::vector<uint64_t> next(at.size());
        for (size_t i = 0; i < at.size(); ++i) next[i] = at[i] < ka ? mine[(size_t)at[i]] : source | (uint64_t)(at[i] - ka);
        mine.swap(next);
    }
    ++sources_;
}

void ReservoirPicks::write(int source, const std::vector<int32_t>& ids, const RowsOf& own, StateWriter& w) const {
    if (source < 0 || (sources_ > 0 ? source >= sources_ : source != 0))
        fail(COLLAPSE_ERR_INTERNAL, "spread_write_picks: merge source ", source, " of ", std::max<int64_t>(1, sources_));
    std::vector<int32_t> sorted = ids;
    std::sort(sorted.begin(), sorted.end());
    // Without a merge (one source) every row of the own reservoirs is the sample.
    auto for_picks = [&](const std::function<void(int32_t, int64_t, int64_t)>& fn) {
        for (int32_t c : sorted) {
            if (c < 0 || c >= V_) fail(COLLAPSE_ERR_INTERNAL, "spread_write_picks: class ", c);
            if (sources_ == 0) {
                for (int64_t j = 0; j < own(c); ++j) fn(c, j, j);
                continue;
            }
            const std::vector<uint64_t>& p = picks_[(size_t)c];
            for (size_t slot = 0; slot < p.size(); ++slot)
                if ((int64_t)(p[slot] >> kShift) == source) fn(c, (int64_t)(p[slot] & ((uint64_t(1) << kShift) - 1)), (int64_t)slot);
        }
    };
    int64_t m = 0;
    for_picks([&](int32_t, int64_t, int64_t) { ++m; });
    const HostBudget::Lease lease = budget_.reserve(mul_bytes(m, 24), "the reservoir rows rank source " + std::to_string(source) + " sends to their owners",
                                                    kFixNumClasses);
    std::vector<int64_t> cls, row, slot;
    cls.reserve((size_t)m), row.reserve((size_t)m), slot.reserve((size_t)m);
    for_picks([&](int32_t c, int64_t j, int64_t at) { cls.push_back(c), row.push_back(j), slot.push_back(at); });
    w.add("pick_classes", COLLAPSE_I64, {m}, cls.data(), (size_t)m * 8);
    w.add("pick_rows", COLLAPSE_I64, {m}, row.data(), (size_t)m * 8);
    w.add("pick_slots", COLLAPSE_I64, {m}, slot.data(), (size_t)m * 8);
}

void ReservoirPicks::take(const StateReader& r, const int64_t* counts, const RowsOf& own) {
    const std::string what = r.description();
    const StateSection cs = r.section("pick_classes"), rs = r.section("pick_rows"), ss = r.section("pick_slots");
    for (const StateSection* x : {&cs, &rs, &ss})
        if (x->dtype_code != (uint32_t)COLLAPSE_I64 || x->shape.size() != 1 || x->shape != cs.shape)
            fail(COLLAPSE_ERR_INTERNAL, what, ": section ", x->name, " is not int64 [m] as pick_classes");
    const int64_t m = cs.shape[0];
    const int64_t* c = static_cast<const int64_t*>(cs.data);
    const int64_t* j = static_cast<const int64_t*>(rs.data);
    const int64_t* at = static_cast<const int64_t*>(ss.data);
    for (int64_t i = 0; i < m; ++i)
        if (c[i] < 0 || c[i] >= V_ || (i > 0 && c[i] < c[i - 1]) || j[i] < 0 || j[i] >= own((int32_t)c[i]) || at[i] < 0 ||
            at[i] >= std::min(counts[c[i]], cap_))
            fail(COLLAPSE_ERR_INTERNAL, what, ": pick ", i, " (class ", c[i], ", row ", j[i], ", slot ", at[i], ") is out of range");
    mine_lease_.resize(add_bytes(mul_bytes(V_ + 1, 8), mul_bytes(m, 16)), "this rank's picks of its reservoir rows", kFixNumClasses);
    at_.assign((size_t)V_ + 1, 0);
    for (int64_t i = 0; i < m; ++i) ++at_[(size_t)c[i] + 1];
    for (int64_t k = 0; k < V_; ++k) at_[(size_t)k + 1] += at_[(size_t)k];
    row_.assign(j, j + m), slot_.assign(at, at + m);
    picks_ = {}, lease_.reset();  // the root's sample is no longer needed
}

}  // namespace collapse::internal
