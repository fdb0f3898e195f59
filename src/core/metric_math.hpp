// Per-element math shared by every backend (host and device), so the CPU tests cover what the
// kernels run. Each function is one formula of docs/METRICS.md.
#pragma once
#include <cmath>
#include <cstdint>

#include "base/dtype.hpp"  // COLLAPSE_HD

namespace collapse::internal {

constexpr double kNormEps = 1e-8;          // u_c = m_c / (||m_c|| + 1e-8), UNC3 denominators
constexpr double kEntropyEps = 1e-10;      // -sum p ln(p + 1e-10)
constexpr double kGnc2MinDistance = 1e-6;  // GNC2 pairs closer than this are skipped

// Copies the upper triangle of a row-major d x d matrix into its lower one (after a dsyrk that
// wrote only the upper; host only).
inline void mirror_upper(double* a, int64_t d) {
    for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < i; ++j) a[i * d + j] = a[j * d + i];
}

// Contribution of one singular value: -p ln(p + 1e-10) with p = s / sum.
COLLAPSE_HD double entropy_term(double s, double sum) {
    const double p = s / sum;
    return -p * log(p + kEntropyEps);
}

// Singular values from the eigenvalues of a Gram of size M (zero-padded past the class's own
// size): an eigenvalue at or below M eps max(lambda) is rounding, a zero singular value.
COLLAPSE_HD double eigen_floor(double max_eigenvalue, int64_t M) {
    return (double)M * 2.220446049250313e-16 /* DBL_EPSILON */ * (max_eigenvalue > 0 ? max_eigenvalue : 0.0);
}
COLLAPSE_HD double singular_from_eigen(double eigenvalue, double floor) { return eigenvalue > floor ? sqrt(eigenvalue) : 0.0; }

// SVD entropy of the top r singular values from eigenvalues eig[0..M) (ascending), summed from the
// largest down (the order of singular_values_from_eigen + spectrum_entropy, so host and device
// agree to the bit); *zero_matrix when their sum is 0 (H = 0).
COLLAPSE_HD double entropy_from_eigen(const double* eig, int64_t M, int64_t r, bool* zero_matrix) {
    if (M <= 0 || r <= 0) {
        *zero_matrix = true;
        return 0.0;
    }
    const double floor = eigen_floor(eig[M - 1], M);
    const int64_t last = M - r > 0 ? M - r : 0;
    double sum = 0;
    for (int64_t k = M - 1; k >= last; --k) sum += singular_from_eigen(eig[k], floor);
    *zero_matrix = !(sum > 0);
    if (*zero_matrix) return 0.0;
    double h = 0;
    for (int64_t k = M - 1; k >= last; --k) h += entropy_term(singular_from_eigen(eig[k], floor), sum);
    return h;
}


// One pair (i, j) of kept classes, from the dot product of their centred means g = m_i . m_j,
// the squared norms q = ||m||^2, the direction scales a = ||m|| + 1e-8 and the variances v.
struct PairTerms {
    double cos;       // u_i . u_j
    double log_kernel;// L_ij = -ln ||u_i - u_j||
    bool gnc2_skip;   // ||u_i - u_j|| < 1e-6
    double cdnv;      // (v_i + v_j) / (2 ||mu_i - mu_j||^(2p))
    bool cdnv_skip;   // equal means
    // Anchor metrics (docs/METRICS.md, "Anchor metrics"), with the library's directions
    // u_c = m_c / ||m_c|| (no 1e-8; a zero mean has u_c = 0):
    double dist;      // ||u_i - u_j||                   (nc2g_dist_mean, nc2g_dist_var)
    double etf_dev;   // |u_i . u_j + 1/(K-1)|           (nc2_equiangular_absdev, nc2_max_equiangular_dev)
};

// inv_km1 = 1 / (K - 1).
COLLAPSE_HD PairTerms pair_terms(double g, double qi, double qj, double ai, double aj, double vi, double vj,
                                 double cdnv_power, double inv_km1) {
    PairTerms t;
    {
        const double ni = qi > 0 ? 1.0 : 0.0, nj = qj > 0 ? 1.0 : 0.0;
        const double c = (qi > 0 && qj > 0) ? g / sqrt(qi * qj) : 0.0;
        const double d2 = ni + nj - 2.0 * c;
        t.dist = d2 > 0 ? sqrt(d2) : 0.0;
        t.etf_dev = fabs(c + inv_km1);
    }
    t.cos = g / (ai * aj);
    // ||u_i - u_j||^2 = ||u_i||^2 + ||u_j||^2 - 2 u_i.u_j, with ||u||^2 = q / a^2 (not exactly 1).
    const double du2 = qi / (ai * ai) + qj / (aj * aj) - 2.0 * t.cos;
    t.gnc2_skip = !(du2 >= kGnc2MinDistance * kGnc2MinDistance);
    t.log_kernel = t.gnc2_skip ? 0.0 : -0.5 * log(du2);
    // ||mu_i - mu_j|| = ||m_i - m_j||: the global mean cancels. Equal means give 0 up to the
    // rounding of the expanded form, hence the relative threshold.
    const double dm2 = qi + qj - 2.0 * g;
    t.cdnv_skip = !(dm2 > 1e-13 * (qi + qj));
    t.cdnv = t.cdnv_skip ? 0.0 : (vi + vj) / (2.0 * (cdnv_power == 1.0 ? dm2 : pow(dm2, cdnv_power)));
    return t;
}

// var_c from sums about the class's reference row s_c (core/shifted_sums.hpp): q = sum ||x - s_c||^2,
// dd = ||S_c - n s_c||^2 with S_c the class sum, so that var_c = q/n - ||mu_c - s_c||^2. Both terms
// are small for a tight class, where E||x||^2 - ||mu_c||^2 would cancel.
COLLAPSE_HD double shifted_variance(double q, double n, double dd) {
    const double v = (q - dd / n) / n;
    return v > 0 ? v : 0.0;
}

// A kept class's row e_c of Sigma_W's correction: sum (x - s)(x - s)^T = sum (x - mu)(x - mu)^T + e e^T
// with e = (S - n s) / sqrt(n) = sqrt(n) (mu - s), element by element.
COLLAPSE_HD double unshift_term(double sum, double n, double shift) { return (sum - n * shift) / sqrt(n); }

// UNC3's per-class cosine between classifier row w_c and centred mean m_c.
COLLAPSE_HD double duality_cos(double w_dot_m, double w_norm, double m_norm) {
    return w_dot_m / ((w_norm + kNormEps) * (m_norm + kNormEps));
}

// Count, mean and sum of squared deviations; merged in a fixed order (Chan et al.) so that the
// result does not depend on how values were grouped beyond rounding.
struct Moments {
    double n = 0, mean = 0, m2 = 0;
    COLLAPSE_HD void merge(const Moments& o) {
        if (o.n == 0) return;
        if (n == 0) {
            *this = o;
            return;
        }
        const double total = n + o.n;
        const double delta = o.mean - mean;
        mean += delta * (o.n / total);
        m2 += o.m2 + delta * delta * (n * o.n / total);
        n = total;
    }
    // From a count, a sum and a sum of squares of deviations from a shift s close to the mean.
    COLLAPSE_HD static Moments from_shifted(double n, double sum_dev, double sum_dev2, double shift) {
        Moments m;
        if (n == 0) return m;
        m.n = n;
        const double md = sum_dev / n;
        m.mean = shift + md;
        m.m2 = sum_dev2 - n * md * md;
        if (m.m2 < 0) m.m2 = 0;
        return m;
    }
    COLLAPSE_HD double var_pop() const { return n > 0 ? m2 / n : 0.0; }
    COLLAPSE_HD double var_unbiased() const { return n > 1 ? m2 / (n - 1) : 0.0; }
};

}  // namespace collapse::internal
