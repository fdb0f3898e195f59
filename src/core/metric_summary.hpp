// The host-side last step of every metric, shared by the backends: each backend computes the
// per-class vectors, pair totals and spectra its own way (CPU loops and BLAS, CUDA kernels and
// cuBLAS/cuSOLVER), then these functions turn them into the docs/METRICS.md values and notes.
#pragma once
#include <cstdint>
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

// Pair reductions (GNC2, equiangularity, CDNV) accumulated over tiles, merged in a fixed order.
struct PairTotals {
    Moments l, c;  // log kernels (non-skipped pairs), cosines (all pairs)
    double n_cdnv = 0, s_cdnv = 0;
    int64_t pairs = 0, skip_l = 0, skip_cdnv = 0;
    void merge(const PairTotals& o) {
        l.merge(o.l);
        c.merge(o.c);
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
    double w_frobenius = 0;       // ||W_K||_F
    double m_frobenius = 0;       // ||M||_F
    double self_duality_sq = -1;  // sum of (w/||W||_F - m/||M||_F)^2, < 0 when not computed
};
// Equinorm, log-norm std, UNC3 and NC3; notes for what is null.
void finish_class_metrics(const ClassVectors& v, const Config& cfg, MetricValues& out);
// The notes of the pair metrics when there are too few classes.
void note_too_few_classes_for_pairs(const Config& cfg, MetricValues& out);

}  // namespace collapse::internal
