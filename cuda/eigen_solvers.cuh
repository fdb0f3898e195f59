// Eigenvalues on the device: the overall Gram (cusolverDnXsyevd) and per-class Grams grouped by
// size, each group solved by the solver for its size (syevjBatched up to 32, XsyevBatched beyond,
// in sub-batches within its int32 extent). Temporaries come from the session's pool; all work is on
// res.stream().
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "core/backend.hpp"
#include "core/metrics.hpp"
#include "resources.cuh"

namespace collapse::internal::cuda {

// Eigenvalues (ascending) of the symmetric n x n matrix in a (upper triangle, column-major); a is
// overwritten. Synchronises s.
std::vector<double> eigenvalues_sym(Resources& res, double* a, int64_t n, cudaStream_t s);

// Eigenvalues (ascending) of cnt symmetric M x M matrices (upper triangles, column-major, one after
// another in gram, which is overwritten) into w [cnt, M], each solver's info into info [cnt] (0:
// converged), by the solver for the size. Synchronises s.
void eigenvalues_batched(Resources& res, double* gram, int64_t M, int64_t cnt, double* w, int* info, cudaStream_t s);

// The entropies of the classes `todo` (positions in kept), whose rows are rows[index[offset[t] ..
// offset[t] + nrows[t])] of a float32 [*, d] device array (index null: rows offset[t] ..
// offset[t] + nrows[t]), centred on mu[t] when `center`; into tokens[t] and out.
void class_spectra(Resources& res, int64_t d, bool center, const float* rows, const int32_t* index,
                   const std::vector<int64_t>& todo, const std::vector<int64_t>& offset, const std::vector<int64_t>& nrows,
                   const KeptSet& kept, const double* mu, std::vector<TokenMetrics>& tokens, MetricValues& out);

}  // namespace collapse::internal::cuda
