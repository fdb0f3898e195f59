// Exact conversions at the boundary: every binary16 and bfloat16 value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "base/dtype.hpp"

namespace {
uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
}  // namespace

TEST(Dtype, HalfToFloatIsExactForAllValues) {
    for (uint32_t h = 0; h < 65536; ++h) {
        const float fast = collapse::internal::half_to_float((uint16_t)h);
        const float ref = collapse::internal::half_to_float_reference((uint16_t)h);
        ASSERT_EQ(bits(fast), bits(ref)) << "half 0x" << std::hex << h;
        if (std::isfinite(ref)) ASSERT_EQ(collapse::internal::float_to_half(ref), (uint16_t)h) << "round trip 0x" << std::hex << h;
    }
}

TEST(Dtype, Bf16ToFloatRoundTrips) {
    for (uint32_t b = 0; b < 65536; ++b) {
        const float f = collapse::internal::bf16_to_float((uint16_t)b);
        if (std::isfinite(f)) ASSERT_EQ(collapse::internal::float_to_bf16(f), (uint16_t)b) << std::hex << b;
        else ASSERT_FALSE(std::isfinite(f));
    }
}

TEST(Dtype, FloatToHalfRoundsToNearestEven) {
    EXPECT_EQ(collapse::internal::float_to_half(1.0f), 0x3c00);
    EXPECT_EQ(collapse::internal::float_to_half(65504.0f), 0x7bff);
    EXPECT_EQ(collapse::internal::float_to_half(65520.0f), 0x7c00);  // halfway to the next: rounds to inf
    EXPECT_EQ(collapse::internal::float_to_half(1.0f + 0.5f / 1024), 0x3c00);  // tie to even
    EXPECT_EQ(collapse::internal::float_to_half(1.0f + 1.5f / 1024), 0x3c02);
    EXPECT_EQ(collapse::internal::float_to_half(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
    EXPECT_EQ(collapse::internal::float_to_half(std::ldexp(1.0f, -26)), 0x0000);
}
