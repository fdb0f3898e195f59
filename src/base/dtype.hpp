// Element types at the boundary and their exact conversion to float / double.
// Host and device share these (COLLAPSE_HD) so the CPU tests cover the conversions the kernels use.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "collapse/collapse.h"

#if defined(__CUDACC__)
#define COLLAPSE_HD __host__ __device__ __forceinline__
#else
#define COLLAPSE_HD inline
#endif

namespace collapse::internal {

COLLAPSE_HD size_t dtype_size(collapse_dtype t) {
    switch (t) {
        case COLLAPSE_F32: return 4;
        case COLLAPSE_F16: return 2;
        case COLLAPSE_BF16: return 2;
        case COLLAPSE_F64: return 8;
        case COLLAPSE_I32: return 4;
        case COLLAPSE_I64: return 8;
        case COLLAPSE_U8: return 1;
        case COLLAPSE_BOOL: return 1;
    }
    return 0;
}

inline const char* dtype_name(collapse_dtype t) {
    switch (t) {
        case COLLAPSE_F32: return "float32";
        case COLLAPSE_F16: return "float16";
        case COLLAPSE_BF16: return "bfloat16";
        case COLLAPSE_F64: return "float64";
        case COLLAPSE_I32: return "int32";
        case COLLAPSE_I64: return "int64";
        case COLLAPSE_U8: return "uint8";
        case COLLAPSE_BOOL: return "bool";
    }
    return "unknown";
}

inline bool dtype_is_float(collapse_dtype t) {
    return t == COLLAPSE_F32 || t == COLLAPSE_F16 || t == COLLAPSE_BF16 || t == COLLAPSE_F64;
}
inline bool dtype_is_valid(int t) { return t >= COLLAPSE_F32 && t <= COLLAPSE_BOOL; }

COLLAPSE_HD float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// IEEE binary16 -> binary32, exact for every value (subnormals, inf, nan included).
// Branch-free so that loops over rows vectorise: the half's exponent and mantissa placed in a
// binary32 and scaled by 2^112 is exact for normal and subnormal halves alike.
COLLAPSE_HD float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t body = (uint32_t)(h & 0x7fffu) << 13;
    const float scaled = bits_to_float(body) * 5.192296858534828e+33f;  // 2^112
    uint32_t bits;
    memcpy(&bits, &scaled, 4);
    if ((h & 0x7c00u) == 0x7c00u) bits = 0x7f800000u | body;  // inf, nan (payload kept)
    return bits_to_float(sign | bits);
}

// The straightforward conversion, kept as the test oracle for half_to_float.
inline float half_to_float_reference(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
    if (mant == 0) return bits_to_float(sign);
    // subnormal half: value = mant * 2^-24, exactly representable in float
    int e = -1;
    do {
        mant <<= 1;
        ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return bits_to_float(sign | ((uint32_t)(112 - e) << 23) | (mant << 13));
}

// bfloat16 is the top half of a binary32.
COLLAPSE_HD float bf16_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

// binary32 -> binary16 with round-to-nearest-even (used by the synthetic generator and tests).
inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to inf
    if (absx < 0x38800000u) {                                     // subnormal or zero in half
        if (absx < 0x33000000u) return (uint16_t)sign;            // below half the smallest subnormal
        const uint32_t e = absx >> 23;
        const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14 + (113 - e) - 1
        uint32_t v = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (v & 1u))) ++v;
        return (uint16_t)(sign | v);
    }
    uint32_t v = ((absx >> 13) - (112u << 10));
    const uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
    return (uint16_t)(sign | v);
}

inline uint16_t float_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet nan
    const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)((x + rounding) >> 16);
}

// Element i of a float buffer of type t, exactly, as double.
inline double load_as_double(const void* p, collapse_dtype t, int64_t i) {
    switch (t) {
        case COLLAPSE_F32: return ((const float*)p)[i];
        case COLLAPSE_F64: return ((const double*)p)[i];
        case COLLAPSE_F16: return half_to_float(((const uint16_t*)p)[i]);
        case COLLAPSE_BF16: return bf16_to_float(((const uint16_t*)p)[i]);
        default: return 0.0;
    }
}

// Integer element i (labels, ids, masks).
inline int64_t load_as_int(const void* p, collapse_dtype t, int64_t i) {
    switch (t) {
        case COLLAPSE_I32: return ((const int32_t*)p)[i];
        case COLLAPSE_I64: return ((const int64_t*)p)[i];
        case COLLAPSE_U8:
        case COLLAPSE_BOOL: return ((const uint8_t*)p)[i];
        default: return 0;
    }
}

}  // namespace collapse::internal
