// One tiling and one layout, for every backend, of the pair-metric tiles spread over ranks
// (core/backend.hpp, "pairs"). The root's inputs: pair_m float64 [K, d] (the centred kept means),
// pair_var float64 [K] and pair_tile int64 [1] (the tile edge). A rank's share: pair_totals_f
// float64 [13] and pair_totals_i int64 [3] (its PairTotals) and pair_tiles int64 [3] (its first
// tile, its end and the number of tiles). The root merges the shares in rank order (PairSpread).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/metric_summary.hpp"
#include "core/state_io.hpp"

namespace collapse::internal {

// COLLAPSE_PAIR_TILE_EDGE (tests): the edge it sets, at most max(K, 1); 0 when it is unset.
int64_t pair_tile_edge_override(int64_t K);

// The tiles of the pairs i < j of K classes with edge T, in their one fixed order (tile rows bi,
// then columns bj >= bi), and the contiguous share [begin, end) of rank `rank` of P: from the first
// tile with at least rank/P of all pairs before it up to the next rank's first (P = 1: every tile).
struct PairTiling {
    std::vector<std::pair<int64_t, int64_t>> tiles;  // (bi, bj)
    int64_t begin = 0, end = 0;
};
PairTiling pair_tiling(int64_t K, int64_t T, int rank, int P);

void write_pair_inputs(StateWriter& w, const double* m, const double* var, int64_t K, int64_t d, int64_t T);
// The root's inputs (checked: K >= 1, shapes against this session's d, an edge >= 1).
struct PairInputs {
    const double* m = nullptr;
    const double* var = nullptr;
    int64_t K = 0, T = 0;
};
PairInputs read_pair_inputs(const StateReader& r, int64_t d);

// A rank's share; range: its first tile, its end and the number of tiles (PairTiling).
void write_pair_share(StateWriter& w, const PairTotals& a, const int64_t range[3]);

// The ranks' shares merged on the root for one kept set (pair_inputs .. pair_merge); compute()
// takes them for that kept set only.
struct PairSpread {
    std::vector<int32_t> ids;
    int64_t rows = 0, parts = 0;
    int64_t seen = -1;  // the backend's rows seen at pair_inputs (-1: not checked)
    PairTotals all;
    explicit PairSpread(const KeptSet& kept, int64_t rows_seen = -1) : ids(kept.ids), rows(kept.rows), seen(rows_seen) {}
    // Checks the share (and that it is of this kept set) before adding it.
    void merge(const KeptSet& kept, const StateReader& r);
    // The merged totals when at least one share came for this kept set (and rows seen), else null;
    // they must cover every pair.
    const PairTotals* totals_for(const KeptSet& kept, int64_t rows_seen = -1) const;
};

}  // namespace collapse::internal
