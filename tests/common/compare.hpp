// Comparing engine reports with the float64 reference (tests/reference/brute_force.hpp) to the
// METRICS.md accuracy contract: relative tolerance, with an absolute floor near zero.
#pragma once
#include <gtest/gtest.h>

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
