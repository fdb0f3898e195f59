// Reservoir sampling decisions shared by the backends (host and device), so that both keep the
// same rows: the decision for the i-th row (0-based) of class c depends only on (seed, c, i).
#pragma once
#include <cstdint>

#include "base/dtype.hpp"  // COLLAPSE_HD

namespace collapse::internal {

COLLAPSE_HD uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Algorithm R: the i-th row of a class goes to slot i while i < cap, then to slot j = U[0, i] if
// j < cap. Returns the slot, or -1 when the row is not kept.
COLLAPSE_HD int64_t reservoir_slot(uint64_t seed, int64_t c, int64_t i, int64_t cap) {
    if (i < cap) return i;
    const uint64_t j = mix64(seed ^ mix64((uint64_t)c * 0x100000001b3ull + (uint64_t)i)) % (uint64_t)(i + 1);
    return (int64_t)j < cap ? (int64_t)j : -1;
}

}  // namespace collapse::internal
