// The host-side last step of every metric, shared by the backends: each backend computes the
// per-class vectors, pair totals and spectra its own way (CPU loops and BLAS, CUDA kernels and
// cuBLAS/cuSOLVER), then these functions turn them into the docs/METRICS.md values and notes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "core/metric_math.hpp"
#include "core/metrics.hpp"

namespace collapse::internal {

// The r largest singular values from the eigenvalues (ascending) of an M x M Gram matrix.
// Eigenvalues at or below M * DBL_EPSILON * lambda_max are rounding noise of a zero singular value
// (it would otherwise come out near 1e-8 * s_max and, summed over many, move the entropy by 1e-5).
std::vector<double> singular_values_from_eigen(const double* eig_ascending, int64_t M, int64_t r);

// SVD entropy of a spectrum; *zero_matrix when sum(s) = 0 (H = 0).
double spectrum_entropy(const std::vector<double>& s, bool* zero_matrix);

// Per-token values from the spectrum of a class's n x d rows.
void token_from_spectrum(const std::vector<double>& s, int64_t n, int64_t d, TokenMetrics& tm, MetricValues& out);
// The same from an entropy already reduced (entropy_from_eigen, on the device).
void token_from_entropy(double h, bool zero_matrix, int64_t n, int64_t d, TokenMetrics& tm, MetricValues& out);

// Pair reductions (GNC2, equiangularity, CDNV) accumulated over tiles, merged in a fixed order.
struct PairTotals {
    Moments l, c;  // log kernels (non-skipped pairs), cosines (all pairs)
    Moments dist;  // ||u_i - u_j|| with the anchors' u_c (all pairs)
    double s_etf = 0, max_etf = 0;  // sum and maximum of |u_i . u_j + 1/(K-1)| (all pairs)
    double n_cdnv = 0, s_cdnv = 0;
    int64_t pairs = 0, skip_l = 0, skip_cdnv = 0;
    void merge(const PairTotals& o) {
        l.merge(o.l);
        c.merge(o.c);
        dist.merge(o.dist);
        s_etf += o.s_etf;
        max_etf = o.max_etf > max_etf ? o.max_etf : max_etf;
        n_cdnv += o.n_cdnv;
        s_cdnv += o.s_cdnv;
        pairs += o.pairs;
        skip_l += o.skip_l;
        skip_cdnv += o.skip_cdnv;
    }
};
void finish_pair_metrics(const PairTotals& t, int64_t K, MetricValues& out);

// Per-class vectors of the class-mean geometry.
struct ClassVectors {
    std::vector<double> norm;     // ||m_c||
    bool duality = false;         // a classifier (or class_means mode) is there
    std::vector<double> cos;      // UNC3 cosines (when duality)
    std::vector<double> dot;      // w_c . m_c (when duality and per_class_arrays)
    double w_frobenius = 0;       // ||W_K||_F
    double m_frobenius = 0;       // ||M||_F
    double self_duality_sq = -1;  // sum of (w/||W||_F - m/||M||_F)^2, < 0 when not computed
};
// Equinorm, log-norm std, UNC3 and NC3; notes for what is null. With per_class_arrays, the
// per-class norms, cosines and dot products go to out.per_class.
void finish_class_metrics(const ClassVectors& v, const Config& cfg, MetricValues& out);
// The anchor metrics that come from d x d matrices (docs/METRICS.md, "Anchor metrics"): nc1_pinv,
// nc1_svd, nc1_quot, nc2_etf_err, nc3_dual_err, nc3u_uni_dual and nc5_ood_dev. Each backend
// reduces its rows and means to these inputs (host vectors), this turns them into the values.
struct AnchorInputs {
    int64_t K = 0, d = 0, N = 0;      // kept classes, width, kept rows
    std::vector<double> within;       // [d, d] full: sum over kept rows of (x - mu_y)(x - mu_y)^T; empty: within_note
    std::string within_note;          // why Sigma_W is not there
    std::vector<double> gram_m;       // [d, d] full: M^T M
    std::vector<double> sum_m;        // [d] sum_c m_c (zero up to rounding with class-balanced centring)
    bool duality = false;             // the next three are there (a classifier, or class_means mode)
    std::vector<double> gram_w;       // [d, d] full: W_K^T W_K
    std::vector<double> sum_w;        // [d] sum_c w_c
    std::vector<double> dot;          // [K] w_c . m_c
    std::vector<double> ood_cos;      // [K] cos(mu_c, mu_G_ood); empty: no out-of-distribution mean was given
};
// Host scratch (Sigma_B's eigenvectors, LAPACK's workspace, Sigma_W U) is counted in `budget`.
// With cfg.keep_sigma_w, out.sigma_w = Sigma_W.
class HostBudget;
void finish_anchor_metrics(AnchorInputs& in, const Config& cfg, HostBudget& budget, MetricValues& out);
// g (d x d, upper triangle, row-major) += (X - center)^T (X - center) over the n rows of x (row-major;
// center may be null), through blocks of 512 centred rows (512 x d doubles: the caller counts them).
void add_centered_gram(const double* x, int64_t n, int64_t d, const double* center, double* g);
// The notes of the pair metrics when there are too few classes.
void note_too_few_classes_for_pairs(const Config& cfg, MetricValues& out);

}  // namespace collapse::internal
