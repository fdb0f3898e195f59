#include "core/metric_summary.hpp"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>

#include "base/error.hpp"
#include "core/host_budget.hpp"

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
    const double floor = eigen_floor(eig[M - 1], M);
    for (int64_t k = M - 1; k >= 0 && (int64_t)s.size() < r; --k) s.push_back(singular_from_eigen(eig[k], floor));
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
    bool zero = false;
    const double h = spectrum_entropy(s, &zero);
    token_from_entropy(h, zero, n, d, tm, out);
}

void token_from_entropy(double h, bool zero_matrix, int64_t n, int64_t d, TokenMetrics& tm, MetricValues& out) {
    tm.zero_matrix = zero_matrix;
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
    if (t.pairs > 0) {
        out.nc2g_dist_mean = t.dist.mean;
        out.nc2g_dist_var = t.dist.var_pop();
        out.nc2_equiangular_absdev = t.s_etf / (double)t.pairs;
        out.nc2_max_equiangular_dev = t.max_etf;
    }
    if (t.n_cdnv > 0) out.nc1_cdnv = t.s_cdnv / t.n_cdnv;
    else out.notes["nc1_cdnv"] = "every pair of class means is equal";
}

void note_too_few_classes_for_pairs(const Config& cfg, MetricValues& out) {
    const std::string why = "needs at least min_classes_for_gnc2 = " + std::to_string(cfg.min_classes_for_gnc2) + " kept classes";
    out.notes["overall_gnc2"] = why;
    out.notes["nc1_cdnv"] = why;
    out.notes["nc2_equiangular_mean"] = why;
    for (const char* k : {"nc2g_dist_mean", "nc2g_dist_var", "nc2_equiangular_absdev", "nc2_max_equiangular_dev"}) out.notes[k] = why;
}

void finish_class_metrics(const ClassVectors& v, const Config& cfg, MetricValues& out) {
    const size_t K = v.norm.size();
    if (cfg.per_class_arrays) {
        out.per_class.mean_norm = v.norm;
        if (v.duality) out.per_class.duality_cos = v.cos, out.per_class.duality_dot = v.dot;
    }
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


void add_centered_gram(const double* x, int64_t n, int64_t d, const double* center, double* g) {
    const int64_t B = 512;
    std::vector<double> blk((size_t)(std::min(B, n) * d));
    for (int64_t i0 = 0; i0 < n; i0 += B) {
        const int64_t nb = std::min(B, n - i0);
        for (int64_t i = 0; i < nb; ++i)
            for (int64_t j = 0; j < d; ++j) blk[(size_t)(i * d + j)] = x[(i0 + i) * d + j] - (center ? center[j] : 0.0);
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)nb, 1.0, blk.data(), (int)d, 1.0, g, (int)d);
    }
}

void finish_anchor_metrics(AnchorInputs& in, const Config& cfg, HostBudget& budget, MetricValues& out) {
    const int64_t K = in.K, d = in.d;
    const char* const all[] = {"nc1_pinv", "nc1_svd", "nc1_quot", "nc2_etf_err", "nc3_dual_err", "nc3u_uni_dual", "nc5_ood_dev"};
    if (K < 2) {
        for (const char* k : all) out.notes[k] = "needs at least 2 kept classes";
        return;
    }
    const double Kd = (double)K, c = std::sqrt(Kd - 1.0);
    const size_t dd = (size_t)(d * d);

    // nc3u_uni_dual: unbiased variance of w_c . m_c; nc5_ood_dev: mean |cos(mu_c, mu_G_ood)|.
    if (in.duality) {
        const Stats st = stats_of(in.dot);
        out.nc3u_uni_dual = st.std_unbiased * st.std_unbiased;
    } else {
        out.notes["nc3u_uni_dual"] = "no classifier was given";
    }
    if (!in.ood_cos.empty()) {
        double acc = 0;
        for (double v : in.ood_cos) acc += std::fabs(v);
        out.nc5_ood_dev = acc / Kd;
    } else {
        out.notes["nc5_ood_dev"] = "no out-of-distribution input was given (CLI --ood-features, C API collapse_session_set_ood_mean)";
    }

    // Sigma_B = M^T M / K and its eigenpairs (ascending); LAPACK's dsyevd with vectors needs
    // 1 + 6d + 2d^2 doubles and 3 + 5d ints besides the matrix, and Sigma_W U one more d x d.
    const HostBudget::Lease lease =
        budget.reserve(add_bytes(mul_bytes(4 * d + 8, d, 8), mul_bytes(5 * d + 3, 4)),
                       "the anchor metrics' eigen-decomposition of Sigma_B (d x d, d = " + std::to_string(d) + ")",
                       "compute_class_metrics: false skips it; or raise host_memory_limit");
    std::vector<double> U(in.gram_m), lambda((size_t)d);
    const int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', (int)d, U.data(), (int)d, lambda.data());
    if (info != 0) fail(COLLAPSE_ERR_INTERNAL, "LAPACKE_dsyevd failed with info = ", info, " (M^T M of the anchor metrics, d = ", d, ")");
    // Eigenvalues of M^T M (not yet divided by K), clamped at 0.
    for (double& v : lambda) v = std::max(v, 0.0);
    const double lmax = d > 0 ? lambda[(size_t)(d - 1)] : 0.0;
    const int64_t r_etf = std::min<int64_t>(d, K - 1);  // rank(M) <= K - 1 with class-balanced centring

    // nc2_etf_err = ||S - P / sqrt(K-1)||_F, S = M M^T / ||M M^T||_F, P = I - J/K.
    // Class-balanced: M^T 1 = sum_c m_c = 0, so M M^T = V diag(sigma^2) V^T with V orthogonal to 1 and
    // P = V V^T + (the other K-1-r directions of P). S - P/c then has the eigenvalues
    // sigma_k^2/f - 1/c (k <= r) and -1/c (K-1-r times), where sigma_k^2 are the eigenvalues of
    // M^T M (d x d: the nonzero ones of M M^T), r = min(d, K-1) and f = ||M M^T||_F = ||M^T M||_F =
    // sqrt(sum sigma^4). So err^2 = sum_k (sigma_k^2/f - 1/c)^2 + (K-1-r)/c^2, a sum of squares
    // without cancellation (exact to rounding even at an ETF, where err = 0).
    // Token-weighted centring (sum_c m_c != 0): the expansion ||S||^2 + ||E||^2 - 2<S, E> with
    // ||S|| = ||E|| = 1 and <M M^T, P> = ||M||_F^2 - ||sum_c m_c||^2 / K, i.e.
    // err^2 = 2 - 2 (||M||_F^2 - ||sum m||^2/K) / (f sqrt(K-1)) (absolute accuracy ~1e-8 near 0).
    {
        double f2 = 0;
        if (cfg.global_mean == COLLAPSE_MEAN_CLASS_BALANCED)
            for (int64_t k = d - r_etf; k < d; ++k) f2 += lambda[(size_t)k] * lambda[(size_t)k];
        else
            for (size_t k = 0; k < dd; ++k) f2 += in.gram_m[k] * in.gram_m[k];
        const double f = std::sqrt(f2);
        if (!(f > 0)) {
            out.notes["nc2_etf_err"] = "every centred mean is zero";
        } else if (cfg.global_mean == COLLAPSE_MEAN_CLASS_BALANCED) {
            double e2 = (double)(K - 1 - r_etf) / (c * c);
            for (int64_t k = d - r_etf; k < d; ++k) {
                const double t = lambda[(size_t)k] / f - 1.0 / c;
                e2 += t * t;
            }
            out.nc2_etf_err = std::sqrt(e2);
        } else {
            double tr = 0, sm = 0;
            for (int64_t j = 0; j < d; ++j) tr += in.gram_m[(size_t)(j * d + j)], sm += in.sum_m[(size_t)j] * in.sum_m[(size_t)j];
            out.nc2_etf_err = std::sqrt(std::max(0.0, 2.0 - 2.0 * (tr - sm / Kd) / (f * c)));
        }
    }
    // nc3_dual_err: the same with S = W_K M^T / ||W_K M^T||_F (not symmetric). From d x d products:
    // ||W_K M^T||_F^2 = Tr(M W^T W M^T) = <W_K^T W_K, M^T M>_F, and
    // <W_K M^T, P> = Tr(W_K M^T) - 1^T W_K M^T 1 / K = sum_c w_c . m_c - (sum_c w_c) . (sum_c m_c) / K,
    // so err^2 = 2 - 2 <W_K M^T, P> / (||W_K M^T||_F sqrt(K-1)) (absolute accuracy ~1e-8 near 0).
    if (!in.duality) {
        out.notes["nc3_dual_err"] = "no classifier was given";
    } else {
        double g2 = 0, tr = 0, sws = 0;
        for (size_t k = 0; k < dd; ++k) g2 += in.gram_w[k] * in.gram_m[k];
        for (double v : in.dot) tr += v;
        for (int64_t j = 0; j < d; ++j) sws += in.sum_w[(size_t)j] * in.sum_m[(size_t)j];
        if (!(g2 > 0)) out.notes["nc3_dual_err"] = "W_K M^T is zero (classifier rows orthogonal to every centred mean, or all zero)";
        else out.nc3_dual_err = std::sqrt(std::max(0.0, 2.0 - 2.0 * (tr - sws / Kd) / (std::sqrt(g2) * c)));
    }

    // NC1: Sigma_W = within / N, Sigma_B = M^T M / K with eigenpairs (lambda_k / K, u_k).
    // Tr(Sigma_W U diag(1/s) U^T) = sum_k u_k^T Sigma_W u_k / s_k.
    if (in.within.empty() || in.N <= 0) {
        const std::string why = in.within.empty() ? in.within_note : "no kept rows";
        for (const char* k : {"nc1_pinv", "nc1_svd", "nc1_quot"}) out.notes[k] = why;
        return;
    }
    for (double& v : in.within) v /= (double)in.N;
    double tr_w = 0, tr_b = 0;
    for (int64_t j = 0; j < d; ++j) tr_w += in.within[(size_t)(j * d + j)], tr_b += in.gram_m[(size_t)(j * d + j)] / Kd;
    if (tr_b > 0) out.nc1_quot = tr_w / tr_b;
    else out.notes["nc1_quot"] = "Tr(Sigma_B) is zero (every class mean equals the global mean)";
    if (!(lmax > 0)) {
        out.notes["nc1_pinv"] = out.notes["nc1_svd"] = "Sigma_B is zero (every class mean equals the global mean)";
    } else {
        std::vector<double> Z(dd);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d, (int)d, (int)d, 1.0, in.within.data(), (int)d, U.data(), (int)d, 0.0,
                    Z.data(), (int)d);
        // Singular values of the symmetric PSD Sigma_B are its eigenvalues; those at or below
        // max(d, K) * eps * s_max are zero for the pseudo-inverse (and left out of nc1_svd's top
        // min(K-1, d) too: 1/0 has no meaning there either).
        const double smax = lmax / Kd, tol = (double)std::max(d, K) * DBL_EPSILON * smax;
        const int64_t r_svd = std::min<int64_t>(K - 1, d);
        double pinv = 0, svd = 0;
        for (int64_t k = d - 1; k >= 0; --k) {
            const double s_k = lambda[(size_t)k] / Kd;
            if (!(s_k > tol)) continue;
            double t = 0;
            for (int64_t i = 0; i < d; ++i) t += U[(size_t)(i * d + k)] * Z[(size_t)(i * d + k)];
            pinv += t / s_k;
            if (k >= d - r_svd) svd += t / s_k;
        }
        out.nc1_pinv = pinv / Kd;
        out.nc1_svd = svd / Kd;
    }
    if (cfg.keep_sigma_w) out.sigma_w = std::move(in.within);
}

}  // namespace collapse::internal
