// The JSON report (schema: schema/report.schema.json). Sections: summary, counts,
// overall_analysis, token_analysis (token ids as string keys), config, engine.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "base/json_text.hpp"
#include "core/config.hpp"
#include "core/metrics.hpp"

namespace collapse::internal {

namespace io {
struct Tokenizer;  // io/tokenizer.hpp
}

// The JSON report of a session's result.
nlohmann::json build_report(const Config& cfg, const Result& result);

// Writes the report to path through a unique temp file and a rename (base/atomic_file.hpp), so a
// failed write never leaves a half file under the final name and no other file is touched;
// /dev/null, a terminal or a FIFO is written straight through. Errors: COLLAPSE_ERR_IO naming the path.
void write_report_file(const nlohmann::json& doc, const std::string& path);

// collapse analyze --tokenizer: "token" (the id's text) in every token_analysis entry that has
// one, and input.tokenizer (path, format, vocab size, special ids).
void add_token_strings(nlohmann::json& doc, const io::Tokenizer& tok);

// Scalar lookup for collapse_report_get_scalar: "key" searched in overall_analysis, summary, counts
// (in that order), or "section.key". Returns false when the key does not exist; *is_null for null.
bool report_scalar(const nlohmann::json& doc, const std::string& key, double* value, bool* is_null);

}  // namespace collapse::internal
