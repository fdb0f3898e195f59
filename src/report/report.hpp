// The JSON report (schema: schema/report.schema.json). Sections: summary, counts,
// overall_analysis, token_analysis (token ids as string keys), config, engine.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "core/config.hpp"
#include "core/metrics.hpp"

namespace collapse::internal {

struct EngineInfo {
    std::string backend;
    int64_t dim = 0, num_classes = 0, batches = 0;
    bool classifier = false;
    std::map<std::string, double> timings;
    std::map<std::string, int64_t> row_store;
};

nlohmann::json build_report(const Config& cfg, const Counts& counts, const MetricValues& mv, const EngineInfo& info);

// Writes the report to path through "<path>.tmp" and a rename, so a failed write never leaves a
// half file under the final name; errors are COLLAPSE_ERR_IO naming the path.
void write_report_file(const nlohmann::json& doc, const std::string& path);

// Scalar lookup for collapse_report_get_scalar: "key" searched in overall_analysis, summary, counts
// (in that order), or "section.key". Returns false when the key does not exist; *is_null for null.
bool report_scalar(const nlohmann::json& doc, const std::string& key, double* value, bool* is_null);

}  // namespace collapse::internal
