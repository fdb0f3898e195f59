#include "core/metric_summary.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>

namespace collapse::internal {

namespace {

// Unbiased std / mean of a small vector (two passes).
struct Stats {
    double mean = 0, std_unbiased = 0;
    bool ok = false;  // at least two values
};
Stats stats_of(const std::vector<double>& v) {
    Stats s;
    if (v.size() < 2) return s;
    double sum = 0;
    for (double x : v) sum += x;
    s.mean = sum / (double)v.size();
    double ss = 0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.std_unbiased = std::sqrt(ss / (double)(v.size() - 1));
    s.ok = true;
    return s;
}

}  // namespace

std::vector<double> singular_values_from_eigen(const double* eig, int64_t M, int64_t r) {
    std::vector<double> s;
    if (M <= 0) return s;
    const double floor = (double)M * DBL_EPSILON * std::max(eig[M - 1], 0.0);
    for (int64_t k = M - 1; k >= 0 && (int64_t)s.size() < r; --k) s.push_back(eig[k] > floor ? std::sqrt(eig[k]) : 0.0);
    return s;
}

double spectrum_entropy(const std::vector<double>& s, bool* zero_matrix) {
    double sum = 0;
    for (double v : s) sum += v;
    *zero_matrix = !(sum > 0);
    if (*zero_matrix) return 0.0;
    double h = 0;
    for (double v : s) h += entropy_term(v, sum);
    return h;
}

void token_from_spectrum(const std::vector<double>& s, int64_t n, int64_t d, TokenMetrics& tm, MetricValues& out) {
    const double h = spectrum_entropy(s, &tm.zero_matrix);
    tm.svd_entropy = h;
    tm.effective_rank = std::exp(h);
    const int64_t r = n < d ? n : d;
    if (r > 1) tm.normalized_entropy = h / std::log((double)r);
    if (tm.zero_matrix) ++out.svd_zero_matrices;
}

void finish_pair_metrics(const PairTotals& t, int64_t K, MetricValues& out) {
    out.gnc2_pairs = t.pairs;
    out.gnc2_skipped_pairs = t.skip_l;
    out.cdnv_skipped_pairs = t.skip_cdnv;
    if (t.l.n > 0) {
        out.overall_gnc2 = t.l.mean;
        out.gnc2_var = t.l.var_pop();
        if (t.l.mean != 0) out.gnc2_cov = std::sqrt(t.l.var_pop()) / std::fabs(t.l.mean);
    } else {
        out.notes["overall_gnc2"] = "every pair of directions is closer than 1e-6";
    }
    out.nc2_equiangular_mean = t.c.mean;
    out.nc2_equiangular_std = std::sqrt(t.c.var_pop());
    out.nc2_equiangular_ideal = -1.0 / (double)(K - 1);
    if (t.n_cdnv > 0) out.nc1_cdnv = t.s_cdnv / t.n_cdnv;
    else out.notes["nc1_cdnv"] = "every pair of class means is equal";
}

void note_too_few_classes_for_pairs(const Config& cfg, MetricValues& out) {
    const std::string why = "needs at least min_classes_for_gnc2 = " + std::to_string(cfg.min_classes_for_gnc2) + " kept classes";
    out.notes["overall_gnc2"] = why;
    out.notes["nc1_cdnv"] = why;
    out.notes["nc2_equiangular_mean"] = why;
}

void finish_class_metrics(const ClassVectors& v, const Config& cfg, MetricValues& out) {
    const size_t K = v.norm.size();
    bool zero_norm = false;
    std::vector<double> log_norm(K);
    for (size_t s = 0; s < K; ++s) {
        zero_norm = zero_norm || !(v.norm[s] > 0);
        log_norm[s] = std::log(v.norm[s]);
    }
    // NC2 equinorm
    const Stats ns = stats_of(v.norm);
    if (ns.ok && ns.mean > 0) out.nc2_equinorm_cov = ns.std_unbiased / ns.mean;
    else out.notes["nc2_equinorm_cov"] = K < 2 ? "needs at least 2 kept classes" : "every centred mean is zero";
    if (ns.ok && !zero_norm) out.nc2_log_norm_std = stats_of(log_norm).std_unbiased;
    else out.notes["nc2_log_norm_std"] = K < 2 ? "needs at least 2 kept classes" : "a centred mean is zero (log of 0)";

    // UNC3 and NC3 self-duality
    if (!v.duality) {
        out.notes["overall_unc3"] = "no classifier was given";
        out.notes["nc3_self_duality"] = "no classifier was given";
        return;
    }
    if ((int64_t)K < cfg.min_classes_for_unc3) {
        out.notes["overall_unc3"] = "needs at least min_classes_for_unc3 = " + std::to_string(cfg.min_classes_for_unc3) + " kept classes";
    } else {
        const Stats cs = stats_of(v.cos);
        out.unc3_mean_cos = cs.mean;
        out.unc3_std_cos = cs.std_unbiased;
        if (cs.mean < 1e-8) out.notes["overall_unc3"] = "mean cosine between classifier rows and centred means is below 1e-8";
        else out.overall_unc3 = cs.std_unbiased / cs.mean;
    }
    if (cfg.unc3_classifier == COLLAPSE_UNC3_CLASS_MEANS)
        out.notes["unc3_classifier"] = "class_means: w_c is the uncentred class mean (seed-compatible), not the classifier";
    if (v.w_frobenius > 0 && v.m_frobenius > 0 && v.self_duality_sq >= 0) out.nc3_self_duality = std::sqrt(v.self_duality_sq);
    else out.notes["nc3_self_duality"] = "the classifier rows or the centred means are all zero";
}

}  // namespace collapse::internal
