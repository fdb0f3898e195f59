// The CPU ingest's inner loops: one row added into a float64 accumulator, with its squared norm.
// Compiled twice (AVX2 and baseline x86-64) and chosen at load time; both clones do the same
// arithmetic in the same order, so results do not depend on the machine.
#pragma once
#include <cstdint>

#include "collapse/collapse.h"

namespace collapse::internal::cpu {

// acc[k] += x[k] for k < d (acc may be null: squared norm only); returns sum_k x[k]^2 in float64,
// or, with `shift` (a float32 row), sum_k (x[k] - shift[k])^2.
// `next` (may be null) is a row that will be read soon: its cache lines are prefetched as this row
// is consumed, which keeps enough loads in flight when rows are visited in a scattered order.
// `next_acc` (may be null) is an accumulator row that will be updated soon; prefetched for writing.
double accumulate_row(const void* x, collapse_dtype t, int64_t d, double* acc, const void* next = nullptr,
                      const double* next_acc = nullptr, const float* shift = nullptr);

// dst[k] += src[k] for k < d.
void add_into(double* dst, const double* src, int64_t d);

// out[k] = x[k] as double (exact) for k < d: one row of any float dtype, with one dispatch on the
// dtype per row (load_as_double switches per element).
void convert_row(const void* x, collapse_dtype t, int64_t d, double* out);

}  // namespace collapse::internal::cpu
