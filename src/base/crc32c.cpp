// CRC32C (Castagnoli): SSE4.2 instructions where the CPU has them, slicing-by-8 tables otherwise.
#include "base/crc32c.hpp"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
#define COLLAPSE_CRC32C_SSE42 1
#endif

namespace collapse::internal {

namespace {

struct Crc32cTables {
    uint32_t t[8][256];
    Crc32cTables() {
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            t[0][i] = c;
        }
        for (int s = 1; s < 8; ++s)
            for (uint32_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
    }
};

const Crc32cTables& crc_tables() {
    static const Crc32cTables tables;
    return tables;
}

#ifdef COLLAPSE_CRC32C_SSE42
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const uint8_t* p, size_t n, uint32_t crc) {
    uint64_t c = ~crc;
    while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        --n;
    }
    while (n >= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n-- > 0) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}

bool have_sse42() {
    static const bool yes = __builtin_cpu_supports("sse4.2");
    return yes;
}
#endif

}  // namespace

uint32_t crc32c_software(const void* data, size_t bytes, uint32_t crc) {
    const auto& T = crc_tables().t;
    const uint8_t* p = static_cast<const uint8_t*>(data);
    uint32_t c = ~crc;
    while (bytes > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
        c = T[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        --bytes;
    }
    while (bytes >= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        w ^= c;
        c = T[7][w & 0xff] ^ T[6][(w >> 8) & 0xff] ^ T[5][(w >> 16) & 0xff] ^ T[4][(w >> 24) & 0xff] ^
            T[3][(w >> 32) & 0xff] ^ T[2][(w >> 40) & 0xff] ^ T[1][(w >> 48) & 0xff] ^ T[0][w >> 56];
        p += 8;
        bytes -= 8;
    }
    while (bytes-- > 0) c = T[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

uint32_t crc32c(const void* data, size_t bytes, uint32_t crc) {
#ifdef COLLAPSE_CRC32C_SSE42
    if (have_sse42()) return crc32c_sse42(static_cast<const uint8_t*>(data), bytes, crc);
#endif
    return crc32c_software(data, bytes, crc);
}

}  // namespace collapse::internal
