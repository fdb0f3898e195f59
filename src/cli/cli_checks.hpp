// Validators of numeric command-line options, with messages a user can act on: CLI11's own
// PositiveNumber said "Value 0 not in range 0.000000 to 1797693134862315708145274237317043567980...",
// and "abc" was "not in range" too.
#pragma once
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdlib>
#include <string>

namespace collapse::internal {

// A finite number above `lo` (strict) or at least `lo`.
inline CLI::Validator number_from(double lo, bool strict) {
    const std::string bound = (strict ? "> " : ">= ") + CLI::detail::to_string(lo);
    return CLI::Validator(
        [lo, strict, bound](std::string& text) -> std::string {
            char* end = nullptr;
            const double v = std::strtod(text.c_str(), &end);
            if (text.empty() || end != text.c_str() + text.size()) return "'" + text + "' is not a number";
            if (!std::isfinite(v)) return "must be a finite number, got " + text;
            if (strict ? !(v > lo) : !(v >= lo)) return "must be " + bound + ", got " + text;
            return std::string();
        },
        "NUMBER " + bound);
}
inline CLI::Validator positive() { return number_from(0, true); }
inline CLI::Validator non_negative() { return number_from(0, false); }

}  // namespace collapse::internal
