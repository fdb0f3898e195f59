#include "cpu/row_kernels.hpp"

#include "base/dtype.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace collapse::internal::cpu {

namespace {

// Eight independent partial sums of squares: no loop-carried dependency, so the compiler
// vectorises without reassociating anything (no -ffast-math). kAcc: add x into acc; kShift:
// squares of x - shift instead of x.
template <bool kAcc, bool kShift, class T, class Load>
inline double accumulate_loop(const T* __restrict x, int64_t d, double* __restrict acc, const float* __restrict shift, Load load) {
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int l = 0; l < 8; ++l) {
            const double v = load(x[k + l]);
            if (kAcc) acc[k + l] += v;
            const double dv = kShift ? v - (double)shift[k + l] : v;
            part[l] += dv * dv;
        }
    double tail = 0;
    for (; k < d; ++k) {
        const double v = load(x[k]);
        if (kAcc) acc[k] += v;
        const double dv = kShift ? v - (double)shift[k] : v;
        tail += dv * dv;
    }
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

template <class T, class Load>
inline double accumulate_impl(const T* __restrict x, int64_t d, double* __restrict acc, const T* next, const double* next_acc,
                              const float* shift, Load load) {
    constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
    if (next)
        for (int64_t e = 0; e < d; e += kLine) __builtin_prefetch(next + e);
    if (next_acc)
        for (int64_t e = 0; e < d; e += 8) __builtin_prefetch(next_acc + e, 1);
    if (acc) return shift ? accumulate_loop<true, true>(x, d, acc, shift, load) : accumulate_loop<true, false>(x, d, acc, shift, load);
    return shift ? accumulate_loop<false, true>(x, d, acc, shift, load) : accumulate_loop<false, false>(x, d, acc, shift, load);
}

}  // namespace

#define COLLAPSE_CLONES __attribute__((target_clones("avx2", "default")))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// binary16 -> binary64 by F16C, 8 values per instruction (the portable half_to_float is a scalar
// loop here, the largest part of the row store's conversion). Both conversions are exact, so
// the values are the same; only a signalling NaN's quiet bit may differ, and rows with a NaN never
// reach the store.
__attribute__((target("avx,f16c"))) void convert_f16_f16c(const uint16_t* p, int64_t d, double* __restrict out) {
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) {
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)));
        _mm256_storeu_pd(out + k, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
        _mm256_storeu_pd(out + k + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    }
    for (; k < d; ++k) out[k] = (double)half_to_float(p[k]);
}
bool have_f16c() {
    __builtin_cpu_init();
    unsigned a = 0, b = 0, c = 0, d = 0;
    // CPUID.1:ECX bit 29 is F16C; "avx" also checks that the OS saves the YMM registers.
    return __builtin_cpu_supports("avx") && __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
const bool kHaveF16c = have_f16c();
#endif

COLLAPSE_CLONES double accumulate_f32(const float* x, int64_t d, double* acc, const float* next, const double* next_acc, const float* shift) {
    return accumulate_impl(x, d, acc, next, next_acc, shift, [](float v) { return (double)v; });
}
COLLAPSE_CLONES double accumulate_f64(const double* x, int64_t d, double* acc, const double* next, const double* next_acc, const float* shift) {
    return accumulate_impl(x, d, acc, next, next_acc, shift, [](double v) { return v; });
}
COLLAPSE_CLONES double accumulate_f16(const uint16_t* x, int64_t d, double* acc, const uint16_t* next, const double* next_acc, const float* shift) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    // The row converted by F16C first, then the float64 loop: the same values in the same
    // arithmetic, so the same sums.
    constexpr int64_t kRowMax = 1024;
    if (kHaveF16c && d <= kRowMax) {
        double row[kRowMax];
        convert_f16_f16c(x, d, row);
        for (int64_t e = 0; next && e < d; e += 32) __builtin_prefetch(next + e);
        return accumulate_impl(row, d, acc, static_cast<const double*>(nullptr), next_acc, shift, [](double v) { return v; });
    }
#endif
    return accumulate_impl(x, d, acc, next, next_acc, shift, [](uint16_t v) { return (double)half_to_float(v); });
}
COLLAPSE_CLONES double accumulate_bf16(const uint16_t* x, int64_t d, double* acc, const uint16_t* next, const double* next_acc, const float* shift) {
    return accumulate_impl(x, d, acc, next, next_acc, shift, [](uint16_t v) { return (double)bf16_to_float(v); });
}

double accumulate_row(const void* x, collapse_dtype t, int64_t d, double* acc, const void* next, const double* next_acc, const float* shift) {
    switch (t) {
        case COLLAPSE_F32: return accumulate_f32(static_cast<const float*>(x), d, acc, static_cast<const float*>(next), next_acc, shift);
        case COLLAPSE_F64: return accumulate_f64(static_cast<const double*>(x), d, acc, static_cast<const double*>(next), next_acc, shift);
        case COLLAPSE_F16: return accumulate_f16(static_cast<const uint16_t*>(x), d, acc, static_cast<const uint16_t*>(next), next_acc, shift);
        case COLLAPSE_BF16: return accumulate_bf16(static_cast<const uint16_t*>(x), d, acc, static_cast<const uint16_t*>(next), next_acc, shift);
        default: return 0.0;
    }
}

COLLAPSE_CLONES void convert_row(const void* x, collapse_dtype t, int64_t d, double* __restrict out) {
    switch (t) {
        case COLLAPSE_F32: {
            const float* p = static_cast<const float*>(x);
            for (int64_t k = 0; k < d; ++k) out[k] = (double)p[k];
            return;
        }
        case COLLAPSE_F64: {
            const double* p = static_cast<const double*>(x);
            for (int64_t k = 0; k < d; ++k) out[k] = p[k];
            return;
        }
        case COLLAPSE_F16: {
            const uint16_t* p = static_cast<const uint16_t*>(x);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
            if (kHaveF16c) return convert_f16_f16c(p, d, out);
#endif
            for (int64_t k = 0; k < d; ++k) out[k] = (double)half_to_float(p[k]);
            return;
        }
        case COLLAPSE_BF16: {
            const uint16_t* p = static_cast<const uint16_t*>(x);
            for (int64_t k = 0; k < d; ++k) out[k] = (double)bf16_to_float(p[k]);
            return;
        }
        default:
            for (int64_t k = 0; k < d; ++k) out[k] = 0.0;
    }
}

COLLAPSE_CLONES void add_into(double* __restrict dst, const double* __restrict src, int64_t d) {
    for (int64_t k = 0; k < d; ++k) dst[k] += src[k];
}

}  // namespace collapse::internal::cpu
