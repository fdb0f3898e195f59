// Comparing engine reports with the float64 reference (tests/reference/brute_force.hpp) to the
// docs/METRICS.md "Accuracy contract": relative tolerance, with an absolute floor near zero.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace testutil {

// |got - want| <= rel * |want| + abs_floor, and null exactly where the reference is null.
inline ::testing::AssertionResult close(const std::string& what, const nlohmann::json& got, const std::optional<double>& want,
                                        double rel = 1e-9, double abs_floor = 1e-12) {
    if (!want) {
        if (got.is_null()) return ::testing::AssertionSuccess();
        return ::testing::AssertionFailure() << what << ": reference is null, engine gave " << got.dump();
    }
    if (got.is_null()) return ::testing::AssertionFailure() << what << ": engine is null, reference " << *want;
    const double g = got.get<double>();
    const double err = std::fabs(g - *want);
    if (err <= rel * std::fabs(*want) + abs_floor) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": engine " << std::setprecision(17) << g << ", reference " << *want
                                         << ", |diff| " << err << ", relative " << err / std::fabs(*want);
}

}  // namespace testutil

namespace testutil {

// Structural equality of two report documents, keys named in failures. Numbers: integers exactly;
// floats exactly when rel = 0, else |a - b| <= rel * max(|a|, |b|, magnitude_floor). The keys of
// `skipped_key` are skipped wherever they stand: wall-clock times and the provenance of a run (its
// command line and input files) differ between runs that must give the same numbers.
inline bool skipped_key(const std::string& k) { return k == "timings_seconds" || k == "run" || k == "input"; }

inline void expect_same_json(const nlohmann::json& a, const nlohmann::json& b, double rel, double magnitude_floor = 0,
                             const std::string& at = "") {
    if (a.is_number() && b.is_number()) {
        if (rel == 0 || (a.is_number_integer() && b.is_number_integer())) {
            EXPECT_EQ(a.get<double>(), b.get<double>()) << at << ": " << a.dump() << " vs " << b.dump();
        } else {
            const double x = a.get<double>(), y = b.get<double>();
            const double scale = std::max({std::fabs(x), std::fabs(y), magnitude_floor});
            EXPECT_LE(std::fabs(x - y), rel * scale) << at << ": " << a.dump() << " vs " << b.dump() << " (relative "
                                                     << std::fabs(x - y) / scale << ")";
        }
        return;
    }
    if (a.type() != b.type()) {
        ADD_FAILURE() << at << ": " << a.dump().substr(0, 200) << " vs " << b.dump().substr(0, 200);
        return;
    }
    if (a.is_object()) {
        for (auto it = a.begin(); it != a.end(); ++it) {
            if (skipped_key(it.key())) continue;
            if (!b.contains(it.key())) ADD_FAILURE() << at << "/" << it.key() << " only in the first report";
            else expect_same_json(it.value(), b[it.key()], rel, magnitude_floor, at + "/" + it.key());
        }
        for (auto it = b.begin(); it != b.end(); ++it)
            if (!skipped_key(it.key()) && !a.contains(it.key())) ADD_FAILURE() << at << "/" << it.key() << " only in the second report";
        return;
    }
    if (a.is_array()) {
        if (a.size() != b.size()) {
            ADD_FAILURE() << at << ": array sizes " << a.size() << " vs " << b.size();
            return;
        }
        for (size_t i = 0; i < a.size(); ++i) expect_same_json(a[i], b[i], rel, magnitude_floor, at + "/" + std::to_string(i));
        return;
    }
    EXPECT_EQ(a, b) << at;
}

}  // namespace testutil
