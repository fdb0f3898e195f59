// collapse analyze --export-dir DIR (README "Exports"): the kept classes' means, ids and
// per-class arrays as .npy files, Sigma_W when the run has it, and the per-token table as CSV.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/host_budget.hpp"
#include "core/metrics.hpp"

namespace collapse::internal {

// Before the run: DIR is created when missing; an existing path that is not a directory, or a
// directory where no file can be created, is COLLAPSE_ERR_IO naming it.
void prepare_export_dir(const std::string& dir);

// token_analysis as CSV: a header line, then one line per token in `ids` order. Columns: token_id,
// token (only when the report has token strings), then every per-token key; null is empty.
std::string token_table_csv(const nlohmann::json& doc, const std::vector<int64_t>& ids);

// An upper bound of token_table_csv's length, from the same document (nothing allocated).
int64_t token_table_csv_bound(const nlohmann::json& doc, const std::vector<int64_t>& ids);

// Writes every export of a result (each file atomically) and returns the file names. The result
// must carry the class means (Config::keep_class_means) and the per-class arrays. The host memory
// of the exports (the per-class vectors, the largest .npy image, the CSV text) is counted in
// `budget` before any of it exists: a refusal names --export-dir and leaves no file written.
std::vector<std::string> write_exports(const std::string& dir, const Result& r, const nlohmann::json& doc, HostBudget& budget);

// The names of every file write_exports may write (the CLI keeps them apart from its inputs and
// other outputs before any work: re-analysing exported means into the same directory overwrote
// the input).
const std::vector<std::string>& export_file_names();

}  // namespace collapse::internal
