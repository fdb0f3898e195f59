// The engine's configuration: the seed design's CollapseConfig keys, the docs/METRICS.md options,
// memory limits and backend. configs/default.yaml documents every key; parse_yaml validates it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "base/bytes.hpp"
#include "collapse/collapse.h"

namespace collapse::internal {

struct Config {
    // --- seed CollapseConfig keys ---
    int64_t save_every = 1024;        // batches between intermediate saves
    int64_t max_buffer_size = 10000;  // rows held in memory before a flush of the row store
    std::string device = "cpu";       // seed key: "cpu", "cuda" or "cuda:N"; sets backend + device_ordinal
    int64_t min_samples_per_token = 2;
    int64_t max_tokens_to_analyze = 0;  // 0 = all (YAML null)
    bool compute_token_metrics = true;
    bool compute_overall_metrics = true;
    bool compute_class_metrics = true;
    int64_t min_classes_for_gnc2 = 2;
    int64_t min_classes_for_unc3 = 2;
    bool continue_on_error = false;
    std::string log_level = "info";  // debug | info | warning | error
    bool save_intermediate_results = false;
    std::string intermediate_save_dir = "collapse_intermediate";

    // --- docs/METRICS.md options ---
    std::vector<int64_t> exclude_token_ids;
    collapse_svd_mode svd_mode = COLLAPSE_SVD_EXACT;
    int64_t svd_max_rows_per_token = 1024;
    bool svd_center = false;
    collapse_global_mean global_mean = COLLAPSE_MEAN_CLASS_BALANCED;
    double cdnv_power = 1.0;
    collapse_unc3_classifier unc3_classifier = COLLAPSE_UNC3_WEIGHTS;
    bool compute_nc4 = false;
    uint64_t seed = 0;
    // Rows labelled this value are dropped and counted in rows_ignored (the Hugging Face
    // convention, -100); nullopt (YAML null): off, such a label is refused like any outside [0, V).
    std::optional<int64_t> ignore_index = -100;
    // Generation-time windows: rows per window, and -1 auto (on when rows carry sequence ids), 0 off, 1 on.
    int64_t window_size = 64;
    int compute_window_metrics = -1;
    // Per-class arrays in token_analysis (docs/METRICS.md, "Anchor metrics"): opt-in.
    bool per_class_arrays = false;
    // Exclude the tokenizer's special ids too (CLI --tokenizer; the C API has no tokenizer and refuses it).
    bool exclude_special_tokens = false;

    // --- engine ---
    int64_t num_classes = 0;  // V; 0 = from the classifier or the labels (CLI)
    int64_t dim = 0;          // d; 0 = from the first batch
    int64_t host_memory_limit = int64_t(8) << 30;
    int64_t device_memory_limit = 0;  // 0 = 90% of the device's memory
    collapse_backend backend = COLLAPSE_BACKEND_CPU;
    int device_ordinal = 0;
    collapse_nonfinite_policy nonfinite_policy = COLLAPSE_NONFINITE_ERROR;
    bool allow_tf32 = false;
    int64_t batch_rows = 65536;  // rows per batch fed by the readers (CLI --batch-rows overrides)
    // Not a key: the result carries the kept class means [K, d] (CLI --export-dir).
    bool keep_class_means = false;
    // Not a key: NC4's second pass runs over held-out rows (CLI --nc4-features), not the input's.
    bool nc4_held_out = false;
    // Not a key: the result carries Sigma_W [d, d] (MetricValues::sigma_w; CLI --export-dir).
    bool keep_sigma_w = false;
    // Not a key: the config named a device ordinal (device: cuda:N or N), not just a backend.
    bool device_pinned = false;
    // Not a key: processes that share this CUDA device (the CLI's MPI ranks of one node); the
    // default device_memory_limit (90% of the free memory) is divided among them.
    int device_shared_by = 1;
};

// Parse YAML text. `source` names the file in messages. Errors are collapse::internal::Error with
// COLLAPSE_ERR_CONFIG and a message naming the key, the line and the closest valid key.
Config parse_yaml(const std::string& text, const std::string& source);
Config load_yaml_file(const std::string& path);

// Checks ranges and cross-key consistency; throws COLLAPSE_ERR_CONFIG / INVALID_ARGUMENT.
void validate(const Config& c);

// Conversions with the C options struct (exclude ids point into cfg's vector for to_options).
// from_options takes the struct of an older caller too (a smaller struct_size, see
// check_options_size): the fields it does not have take their defaults.
Config from_options(const collapse_options& o);
// Refuses (COLLAPSE_ERR_INVALID_ARGUMENT) a struct_size that is neither this version's
// sizeof(collapse_options) nor the size of an earlier version's struct.
void check_options_size(size_t struct_size);
collapse_options to_options(const Config& c);
// The struct of collapse 0.1.0 ended with max_buffer_size: a caller built against it passes this
// size, and the fields appended since take their defaults.
constexpr size_t kOptionsSize010 = offsetof(collapse_options, max_buffer_size) + sizeof(int64_t);
// to_options into the caller's struct of struct_size bytes (a size check_options_size takes),
// never past it: a program built against an older header has a smaller struct.
void write_options(const Config& c, collapse_options* out, size_t struct_size);

// The effective config as it appears in the report's "config" section.
nlohmann::json to_json(const Config& c);


}  // namespace collapse::internal
