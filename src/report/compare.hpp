// Two reports side by side (`collapse compare A.json B.json`): every numeric metric of the
// compared sections with the difference B - A, the tokens whose per-token SVD entropy moved most,
// and how many tokens only one report has. The shape of the result is documented in README.md,
// "Comparing two runs"; src/cli/compare_cmd.cpp only prints it.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace collapse::internal {

// The sections whose numeric keys are compared, in this order. Any key of them that holds a number
// or null is a metric (new keys need no change here); strings, booleans and objects are not.
inline constexpr const char* kComparedSections[] = {"overall_analysis", "summary", "window_summary"};

// A report file: read (a regular file of at most 1 GiB), parsed and checked (check_report).
// Errors name the file: COLLAPSE_ERR_IO when it cannot be read or is not JSON,
// COLLAPSE_ERR_BAD_INPUT when it is JSON but not a collapse report.
nlohmann::json read_report_file(const std::string& path);

// Refuses (COLLAPSE_ERR_BAD_INPUT, "<name> is not a collapse report: <what is missing>") a document
// without the sections compared here: overall_analysis, summary and token_analysis objects,
// engine.num_classes and engine.dim; window_summary, when present, must be an object or null
// (compared as absent); every
// token_analysis key a token id whose entry is an object.
void check_report(const nlohmann::json& doc, const std::string& name);

// The comparison of report b against report a (both checked first); name_a and name_b name them
// (file names). top >= 1 (else COLLAPSE_ERR_INVALID_ARGUMENT): how many tokens to list, ranked by
// |b - a| of token_analysis.<id>.svd_entropy among tokens in both with an entropy in both, ties by
// ascending token id.
nlohmann::json compare_reports(const nlohmann::json& a, const nlohmann::json& b, int64_t top, const std::string& name_a = "A",
                               const std::string& name_b = "B");

// The comparison as aligned text columns (what `collapse compare` prints).
std::string format_comparison(const nlohmann::json& cmp);

}  // namespace collapse::internal
