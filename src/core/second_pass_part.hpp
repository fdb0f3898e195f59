// One layout, for every backend, of a rank's second-pass results (core/backend.hpp "Ranks":
// save_second_pass / merge_second_pass): pass2_counts int64 [2] (rows seen, NC4 agreements) and
// whichever of pass2_gram, pass2_within (float64 [d, d]) and pass2_nc4_hits, pass2_nc4_rows
// (int64 [K]) the second pass makes.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/state_io.hpp"

namespace collapse::internal {

struct SecondPassPart {
    int64_t rows = 0, agree = 0;
    // Null where the second pass does not make the array; else `size` values each.
    const double* gram = nullptr;
    const double* within = nullptr;
    const int64_t* hits = nullptr;
    const int64_t* hit_rows = nullptr;
};

// The sizes of the arrays this session's second pass makes (0: not made).
struct SecondPassSizes {
    size_t gram = 0, within = 0, hits = 0, hit_rows = 0;
};

void write_second_pass_part(StateWriter& w, const SecondPassPart& p, const SecondPassSizes& n, int64_t d);
// Checks every section (present exactly when this session makes it, its type and size, finite
// values, counts that add to rows_now / agree_now without overflow) before the caller adds any.
SecondPassPart read_second_pass_part(const StateReader& r, const SecondPassSizes& n, int64_t rows_now, int64_t agree_now);

}  // namespace collapse::internal
