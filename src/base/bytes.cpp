// Byte sizes as people write them ("8GiB", "512 MB", "1e9") and as the engine prints them.
#include "base/bytes.hpp"

#include <charconv>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>

#include "base/error.hpp"
#include "base/text.hpp"

namespace collapse::internal {

int64_t parse_bytes(const std::string& text) {
    auto bad = [&](const std::string& why) {
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "invalid byte size '", text, "': ", why);
    };
    const auto space = [](char ch) { return ch == ' ' || ch == '\t'; };
    size_t b = 0, e = text.size();
    while (b < e && space(text[b])) ++b;
    while (e > b && space(text[e - 1])) --e;
    const std::string s = text.substr(b, e - b);
    if (s.empty()) bad("empty");
    if (s[0] == '-') bad("negative");

    // The number: digits, an optional fraction, an optional exponent ("1e9").
    auto is_digit = [&](size_t i) { return i < s.size() && s[i] >= '0' && s[i] <= '9'; };
    size_t i = 0, ndigits = 0;
    bool whole = true;
    for (; is_digit(i); ++i) ++ndigits;
    if (i < s.size() && s[i] == '.') {
        whole = false;
        for (++i; is_digit(i); ++i) ++ndigits;
    }
    if (ndigits == 0) bad("expects a number followed by an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
        size_t j = i + 1;
        if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
        if (is_digit(j)) {  // otherwise the 'e' is not an exponent and the unit check refuses it
            whole = false;
            i = j;
            while (is_digit(i)) ++i;
        }
    }
    const std::string number = s.substr(0, i);
    while (i < s.size() && space(s[i])) ++i;
    const std::string unit = lower_ascii(s.substr(i));

    static const std::map<std::string, int64_t> kUnits{
        {"", 1},
        {"b", 1},
        {"kb", 1000},
        {"mb", 1000 * 1000},
        {"gb", 1000 * 1000 * 1000},
        {"tb", int64_t(1000) * 1000 * 1000 * 1000},
        {"kib", int64_t(1) << 10},
        {"mib", int64_t(1) << 20},
        {"gib", int64_t(1) << 30},
        {"tib", int64_t(1) << 40},
    };
    auto u = kUnits.find(unit);
    if (u == kUnits.end())
        bad("unknown unit '" + s.substr(s.size() - unit.size()) + "' (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)");

    // Integers stay in integer arithmetic so that large exact values are not rounded.
    if (whole) {
        int64_t n = 0, out = 0;
        auto [ptr, ec] = std::from_chars(number.data(), number.data() + number.size(), n);
        if (ec != std::errc() || ptr != number.data() + number.size() || __builtin_mul_overflow(n, u->second, &out))
            bad("too large for a 64-bit byte count");
        return out;
    }
    long double v = 0;
    auto [ptr, ec] = std::from_chars(number.data(), number.data() + number.size(), v);
    if (ec == std::errc::result_out_of_range) bad("too large for a 64-bit byte count");
    if (ec != std::errc() || ptr != number.data() + number.size()) bad("not a number");
    v = std::round(v * (long double)u->second);  // fractional bytes round to the nearest byte
    if (!(v < 9223372036854775808.0L)) bad("too large for a 64-bit byte count");
    return int64_t(v);
}

std::string format_bytes(int64_t bytes) {
    static const char* const kUnitNames[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    // Work on the magnitude as unsigned: -INT64_MIN does not fit an int64_t.
    uint64_t mag = bytes < 0 ? uint64_t(0) - uint64_t(bytes) : uint64_t(bytes);
    const std::string sign = bytes < 0 ? "-" : "";
    int u = 0;
    while (u < 6 && mag >= (uint64_t(1) << (10 * (u + 1)))) ++u;
    const uint64_t scale = uint64_t(1) << (10 * u);
    char buf[64];
    if (mag % scale == 0) {
        std::snprintf(buf, sizeof buf, "%llu %s", (unsigned long long)(mag / scale), kUnitNames[u]);
    } else {
        std::snprintf(buf, sizeof buf, "%.2f %s", double(mag) / double(scale), kUnitNames[u]);
    }
    return sign + buf;
}

}  // namespace collapse::internal
