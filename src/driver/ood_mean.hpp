// nc5_ood_dev's input (docs/METRICS.md, "Anchor metrics"): the global mean of a second,
// out-of-distribution feature file, the plain mean of its rows (no labels needed).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/host_budget.hpp"

namespace collapse::internal::driver {

// The mean [d] of the rows of a 2-D .npy [N, d] (any supported float dtype), read with pread in
// pieces of at most 4 MiB (bounded memory whatever N), summed in float64 in row order. Errors
// (COLLAPSE_ERR_SHAPE / _BAD_INPUT / _IO) name `flag`, the file and, for a non-finite value, its row and column.
// The read buffer and the sums are counted in `budget` first (a refusal names `flag`).
std::vector<double> ood_mean_of_npy(const std::string& path, HostBudget& budget, const std::string& flag = "--ood-features");

}  // namespace collapse::internal::driver
