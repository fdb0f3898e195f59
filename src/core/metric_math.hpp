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


// The three squared distances of one pair (i, j) of kept classes: between the centred means,
// ||m_i - m_j||^2 (CDNV; the global mean cancels, so it is ||mu_i - mu_j||^2), between the
// directions u = m / a with a = ||m|| + 1e-8 (GNC2), and between the library's directions
// m / ||m|| (0 for a zero mean; nc2g_dist). Expanded from the dot product g = m_i . m_j and the
// squared norms q, e.g. q_i + q_j - 2 g, they lose digits as the two directions meet: about
// log10(4 / lib2) of them (8 digits at ||mu_i - mu_j|| = 1e-4 ||mu||, and all of them for two
// distinct means within 1e-8). So a pair whose library distance^2 is below kPairDirect (of at most
// 4) sums them from the two mean vectors instead: exact to rounding, and exactly 0 for equal
// means. Such pairs are rare in real data; at worst (every mean alike) they cost one more pass of
// K^2 d, as the dot products themselves.
constexpr double kPairDirect = 1e-4;
struct PairDistances {
    double mean2;  // ||m_i - m_j||^2
    double dir2;   // ||u_i - u_j||^2, u = m / (||m|| + 1e-8)
    double lib2;   // ||u_i - u_j||^2, u = m / ||m|| (the library's)
};

// Needs m_i and m_j (d values each) only when the expanded forms would cancel.
COLLAPSE_HD PairDistances pair_distances(double g, double qi, double qj, double ai, double aj, const double* mi, const double* mj,
                                         int64_t d) {
    const double ni = qi > 0 ? 1.0 : 0.0, nj = qj > 0 ? 1.0 : 0.0;
    const double c = (qi > 0 && qj > 0) ? g / (sqrt(qi) * sqrt(qj)) : 0.0;  // sqrt(qi qj) underflows at ||m|| ~ 1e-160
    PairDistances r;
    r.lib2 = ni + nj - 2.0 * c;
    if (r.lib2 >= kPairDirect) {
        r.mean2 = qi + qj - 2.0 * g;
        // ||u||^2 = q / a^2 (not exactly 1).
        r.dir2 = qi / (ai * ai) + qj / (aj * aj) - 2.0 * g / (ai * aj);
        return r;
    }
    const double li = qi > 0 ? sqrt(qi) : 1.0, lj = qj > 0 ? sqrt(qj) : 1.0;
    r.mean2 = r.dir2 = r.lib2 = 0;
    for (int64_t k = 0; k < d; ++k) {
        const double x = mi[k], y = mj[k];
        const double e = x - y, f = x / ai - y / aj, h = x / li - y / lj;
        r.mean2 += e * e, r.dir2 += f * f, r.lib2 += h * h;
    }
    return r;
}

// One pair's terms from its dot product g, squared norms q, direction scales a, variances v and
// distances (pair_distances).
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
                                 double cdnv_power, double inv_km1, const PairDistances& pd) {
    PairTerms t;
    const double c = (qi > 0 && qj > 0) ? g / (sqrt(qi) * sqrt(qj)) : 0.0;
    t.dist = pd.lib2 > 0 ? sqrt(pd.lib2) : 0.0;
    t.etf_dev = fabs(c + inv_km1);
    t.cos = g / (ai * aj);
    t.gnc2_skip = !(pd.dir2 >= kGnc2MinDistance * kGnc2MinDistance);
    t.log_kernel = t.gnc2_skip ? 0.0 : -0.5 * log(pd.dir2);
    // Equal means: exactly 0 (a pair this close has its distances summed directly).
    t.cdnv_skip = !(pd.mean2 > 0);
    if (t.cdnv_skip) {
        t.cdnv = 0.0;
    } else {
        const double half = 0.5 * (vi + vj);
        const double den = cdnv_power == 1.0 ? pd.mean2 : pow(pd.mean2, cdnv_power);
        if (!(half > 0)) t.cdnv = 0.0;
        else if (den >= 2.2250738585072014e-308 /* DBL_MIN: a subnormal keeps few digits */ && den <= 1.7976931348623157e308 /* DBL_MAX */)
            t.cdnv = half / den;
        else t.cdnv = exp(log(half) - cdnv_power * log(pd.mean2));  // the power left the double range (p > 1), the ratio may not
    }
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
