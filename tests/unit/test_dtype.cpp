// Exact conversions at the boundary: every binary16 and bfloat16 value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "base/dtype.hpp"
#include "cpu/row_kernels.hpp"

namespace test_dtype {
namespace {
uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

TEST(Dtype, HalfToFloatIsExactForAllValues) {
    for (uint32_t h = 0; h < 65536; ++h) {
        const float fast = collapse::internal::half_to_float((uint16_t)h);
        const float ref = collapse::internal::half_to_float_reference((uint16_t)h);
        ASSERT_EQ(bits(fast), bits(ref)) << "half 0x" << std::hex << h;
        if (std::isfinite(ref)) ASSERT_EQ(collapse::internal::float_to_half(ref), (uint16_t)h) << "round trip 0x" << std::hex << h;
    }
}

// The row store's conversion (F16C where the CPU has it) against the reference, on every binary16
// value at every position of a row whose width is not a multiple of the vector width.
TEST(Dtype, ConvertRowF16IsExactForAllValues) {
    constexpr int64_t d = 67;
    std::vector<uint16_t> row((size_t)d);
    std::vector<double> out((size_t)d);
    for (uint32_t h0 = 0; h0 < 65536; h0 += (uint32_t)d) {
        for (int64_t k = 0; k < d; ++k) row[(size_t)k] = (uint16_t)((h0 + (uint32_t)k) & 0xffffu);
        collapse::internal::cpu::convert_row(row.data(), COLLAPSE_F16, d, out.data());
        for (int64_t k = 0; k < d; ++k) {
            const double ref = (double)collapse::internal::half_to_float_reference(row[(size_t)k]);
            if (std::isnan(ref)) {
                EXPECT_TRUE(std::isnan(out[(size_t)k])) << "half 0x" << std::hex << row[(size_t)k];
            } else {
                uint64_t a, b;
                std::memcpy(&a, &out[(size_t)k], 8);
                std::memcpy(&b, &ref, 8);
                ASSERT_EQ(a, b) << "half 0x" << std::hex << row[(size_t)k];
            }
        }
    }
}

// A binary16 row's sums (with and without a shift) equal those of the same values given as float64.
TEST(Dtype, AccumulateRowF16EqualsFloat64) {
    for (int64_t d : {5, 64, 67, 1024, 1030}) {
        std::vector<uint16_t> row((size_t)d);
        std::vector<double> wide((size_t)d), acc16((size_t)d, 0.5), acc64((size_t)d, 0.5);
        std::vector<float> shift((size_t)d);
        for (int64_t k = 0; k < d; ++k) {
            row[(size_t)k] = collapse::internal::float_to_half((float)(0.37 * (double)(k % 29) - 4.1));
            wide[(size_t)k] = (double)collapse::internal::half_to_float_reference(row[(size_t)k]);
            shift[(size_t)k] = (float)(0.01 * (double)k);
        }
        for (const float* sh : {(const float*)nullptr, (const float*)shift.data()}) {
            const double q16 = collapse::internal::cpu::accumulate_row(row.data(), COLLAPSE_F16, d, acc16.data(), nullptr, nullptr, sh);
            const double q64 = collapse::internal::cpu::accumulate_row(wide.data(), COLLAPSE_F64, d, acc64.data(), nullptr, nullptr, sh);
            EXPECT_EQ(q16, q64) << "d = " << d;
            EXPECT_EQ(acc16, acc64) << "d = " << d;
        }
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

}  // namespace
}  // namespace test_dtype
