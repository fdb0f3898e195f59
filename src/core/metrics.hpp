// What a backend computes at finalisation: every value of docs/METRICS.md, before it becomes JSON.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace collapse::internal {

struct TokenMetrics {
    int64_t id = 0;
    int64_t num_samples = 0;  // n_c, all rows of the class
    int64_t svd_rows = 0;     // rows the entropy was computed from (< n_c when sampled)
    bool sampled = false;
    bool zero_matrix = false;
    std::optional<double> svd_entropy, effective_rank, normalized_entropy;
    // Per-class arrays (per_class_arrays; docs/METRICS.md "Anchor metrics"): ||m_c||, Tr(Sigma_c),
    // cos(w_c, m_c), w_c . m_c, and NC4's hits and rows of the class (hit rate = hits / rows).
    std::optional<double> mean_norm, within_variance, duality_cos, duality_dot;
    int64_t nc4_hits = 0, nc4_rows = 0;
    bool has_per_class = false;
};

// The per-class arrays as the backends produce them, one entry per kept class (ascending id);
// empty vectors where not computed. The session moves them into `tokens`.
struct PerClassArrays {
    std::vector<double> mean_norm, within_variance, duality_cos, duality_dot;
    std::vector<int64_t> nc4_hits, nc4_rows;
};

struct MetricValues {
    std::optional<double> overall_svd_entropy, overall_effective_rank;
    std::optional<double> overall_gnc2, gnc2_var, gnc2_cov;
    int64_t gnc2_pairs = 0, gnc2_skipped_pairs = 0;
    std::optional<double> overall_unc3, unc3_mean_cos, unc3_std_cos;
    std::optional<double> nc1_cdnv;
    int64_t cdnv_skipped_pairs = 0;
    std::optional<double> nc2_equinorm_cov, nc2_log_norm_std;
    std::optional<double> nc2_equiangular_mean, nc2_equiangular_std, nc2_equiangular_ideal;
    std::optional<double> nc3_self_duality;
    // Anchor metrics (docs/METRICS.md, "Anchor metrics"; metric_summary.hpp finish_anchor_metrics).
    std::optional<double> nc1_pinv, nc1_svd, nc1_quot, nc2_etf_err, nc3_dual_err, nc3u_uni_dual;
    std::optional<double> nc2g_dist_mean, nc2g_dist_var, nc2_equiangular_absdev, nc2_max_equiangular_dev;
    std::optional<double> nc5_ood_dev;
    std::vector<double> sigma_w;  // [d, d] within-class covariance Sigma_W, full (keep_sigma_w; empty when null)
    std::optional<double> nc4_agreement;
    int64_t nc4_rows = 0;
    bool nc4_held_out = false;  // nc4_rows are held-out rows (not the rows the means came from)
    int64_t svd_zero_matrices = 0;
    PerClassArrays per_class;         // per_class_arrays
    std::vector<double> class_means;  // [K, d] uncentred mu_c, kept ids ascending (keep_class_means)
    std::vector<TokenMetrics> tokens;          // kept classes, ascending id
    std::map<std::string, std::string> notes;  // metric key -> why it is null (or how it was computed)
    std::map<std::string, double> timings;     // phase -> seconds
    std::map<std::string, int64_t> row_store;  // exact row store: spilled_bytes, spill_flushes
};

// Row and class counts (docs/METRICS.md, "The summary block"). Every row seen is masked, ignored
// (label = ignore_index), excluded, non-finite (skipped) or counted in its class's n_c; rows_kept
// is the part of the last that belongs to kept classes.
struct Counts {
    int64_t rows_seen = 0, rows_masked = 0, rows_excluded = 0, rows_nonfinite = 0, rows_kept = 0;
    int64_t rows_ignored = 0;
    int64_t classes_seen = 0, classes_kept = 0, classes_below_min = 0, classes_cut = 0;
};

// Adds b's counts of rows seen, masked, ignored, excluded and non-finite to a's (a state loaded or merged).
inline void add_row_counts(Counts& a, const Counts& b) {
    a.rows_seen += b.rows_seen, a.rows_masked += b.rows_masked, a.rows_ignored += b.rows_ignored;
    a.rows_excluded += b.rows_excluded, a.rows_nonfinite += b.rows_nonfinite;
}

// How the numbers were obtained: backend, shapes, phases.
struct EngineInfo {
    std::string backend;
    int64_t dim = 0, num_classes = 0, batches = 0, batches_failed = 0, rows_skipped = 0;
    bool classifier = false;
    std::map<std::string, double> timings;
    std::map<std::string, int64_t> row_store;
};

// Generation-time windows (docs/METRICS.md, "Generation-time window entropy"): per sequence and
// the summary (core/windows.cpp computes them from the window entropies).
struct SequenceWindows {
    int64_t id = 0;
    int64_t tokens = 0;             // total_generated_tokens: n_s, the sequence's kept rows
    std::vector<double> entropies;  // fixed_chunk_svd_entropies, every window in order
    double avg = 0, cv = 0, slope = 0;
};
struct WindowResult {
    bool present = false;  // false: the sections are null and `note` says why
    std::string note;
    int64_t window_size = 0;
    std::vector<SequenceWindows> sequences;  // ascending id
    std::optional<double> overall_avg, overall_cv, overall_slope;  // null without a sequence with a window
    int64_t valid_samples = 0, total_samples = 0;
    std::vector<double> chunk_avg;     // per window index i: mean over the sequences that have window i
    std::vector<int64_t> chunk_count;  // and their number
};

// What Session::compute returns; src/report/ turns it into the JSON report.
struct Result {
    Counts counts;
    MetricValues metrics;
    EngineInfo engine;
    WindowResult windows;
};

}  // namespace collapse::internal
