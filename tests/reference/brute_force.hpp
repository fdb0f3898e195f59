// Brute-force float64 reference of docs/METRICS.md, for the test suite.
//
// Deliberately naive and independent of the engine: no code from src/, no BLAS/LAPACK, no Gram
// matrices. Every formula is evaluated as written in docs/METRICS.md (distances as norms of difference
// vectors, double loops over pairs i < j, two-pass mean/variance). Long sums are accumulated in
// long double. Section comments ("docs/METRICS.md ...") name the section each block implements.
//
// Singular values use one-sided (Hestenes) Jacobi. A tall matrix (more rows than columns, after
// transposing so that the columns are the smaller side) is first reduced to its square triangular
// factor R by Householder QR -- A = Q R with Q orthonormal, so R has exactly the singular values of A
// -- which turns the N x d Jacobi sweeps into d x d ones (N = 200k, d = 64 then takes seconds).
// singular_values_unpreconditioned() runs Jacobi on the full matrix, for cross-checking.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <vector>

namespace ref {

struct Options {
  int64_t num_classes = 0;             // V
  std::vector<int64_t> exclude;        // excluded labels E
  int64_t min_samples = 2;             // min_samples_per_token
  int64_t max_tokens = 0;              // 0 = no limit; else keep T most frequent (ties: smaller id)
  bool svd_center = false;             // per-token SVD of X_c - mu_c
  bool token_weighted_mean = false;    // global_mean: token_weighted
  double cdnv_power = 1.0;             // p
  bool unc3_class_means = false;       // unc3_classifier: class_means (w_c = mu_c, uncentred)
  bool compute_nc4 = false;
  int64_t min_classes_for_gnc2 = 2, min_classes_for_unc3 = 2;
};

struct Token {
  int64_t n = 0;
  std::optional<double> svd_entropy, effective_rank, normalized_entropy;
  bool zero_matrix = false;
};

struct Result {
  // counts
  int64_t rows_seen = 0, rows_excluded = 0, rows_kept = 0, classes_seen = 0, classes_kept = 0,
          classes_below_min = 0;
  std::vector<int64_t> kept;           // kept class ids ascending
  std::map<int64_t, Token> tokens;     // per kept class, exact per-token SVD entropy from ALL its rows
  std::optional<double> overall_svd_entropy, overall_effective_rank;
  std::optional<double> overall_gnc2, gnc2_var, gnc2_cov; int64_t gnc2_skipped_pairs = 0;
  std::optional<double> overall_unc3, unc3_mean_cos, unc3_std_cos;
  std::optional<double> nc1_cdnv; int64_t cdnv_skipped_pairs = 0;
  std::optional<double> nc2_equinorm_cov, nc2_log_norm_std, nc2_equiangular_mean,
      nc2_equiangular_std, nc2_equiangular_ideal;
  std::optional<double> nc3_self_duality, nc4_agreement;
  int64_t svd_zero_matrices = 0;
  // summary
  std::optional<double> avg_svd_entropy, std_svd_entropy, avg_samples_per_token;
  int64_t min_samples = 0, max_samples = 0;
};

// Kept classes and their means, exposed so tests can check identities on the reference's own means.
// Index k refers to class kept[k]; vectors of d values are stored row-major, K x d.
struct ClassStats {
  std::vector<int64_t> kept;           // kept class ids ascending
  std::vector<int64_t> n;              // n_c
  std::vector<double> mu;              // mu_c                      (K x d)
  std::vector<double> var;             // var_c (population, trace)  (K)
  std::vector<double> mu_G;            // global mean                (d)
  std::vector<double> m;               // m_c = mu_c - mu_G          (K x d)
  std::vector<double> m_norm;          // ||m_c||                    (K)
  std::vector<double> u;               // u_c = m_c/(||m_c|| + 1e-8) (K x d)
};

namespace detail {

using LD = long double;

inline LD dot(const double* a, const double* b, int64_t n) {
  LD s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // four partial sums only to shorten the dependency chain
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += static_cast<LD>(a[i]) * b[i];
    s1 += static_cast<LD>(a[i + 1]) * b[i + 1];
    s2 += static_cast<LD>(a[i + 2]) * b[i + 2];
    s3 += static_cast<LD>(a[i + 3]) * b[i + 3];
  }
  for (; i < n; ++i) s0 += static_cast<LD>(a[i]) * b[i];
  return (s0 + s1) + (s2 + s3);
}

inline double norm(const double* a, int64_t n) { return static_cast<double>(std::sqrt(dot(a, a, n))); }

// ||a - b||^2, from the difference vector.
inline LD diff_norm2(const double* a, const double* b, int64_t n) {
  LD s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const LD t = static_cast<LD>(a[i]) - b[i];
    s += t * t;
  }
  return s;
}

// ||a - b||, the norm of the difference vector.
inline double diff_norm(const double* a, const double* b, int64_t n) {
  return static_cast<double>(std::sqrt(diff_norm2(a, b, n)));
}

// docs/METRICS.md "Statistics over a set of values": mean; var_pop (divide by count); std_unbiased
// (divide by count - 1). Two passes.
inline double mean(const std::vector<double>& v) {
  LD s = 0;
  for (double x : v) s += x;
  return static_cast<double>(s / static_cast<LD>(v.size()));
}

inline LD sum_sq_dev(const std::vector<double>& v, double mu) {
  LD s = 0;
  for (double x : v) {
    const LD t = static_cast<LD>(x) - mu;
    s += t * t;
  }
  return s;
}

inline double var_pop(const std::vector<double>& v) {
  return static_cast<double>(sum_sq_dev(v, mean(v)) / static_cast<LD>(v.size()));
}

inline double std_unbiased(const std::vector<double>& v) {
  return static_cast<double>(std::sqrt(sum_sq_dev(v, mean(v)) / static_cast<LD>(v.size() - 1)));
}

// Mean and population variance over the pair set P = {(i, j): i < j < K} of value(i, j), skipping
// the pairs for which value() returns nullopt. Two passes over the pairs (nothing K x K is stored).
struct PairStats {
  int64_t count = 0, skipped = 0;
  double mean = 0, var_pop = 0;
};

template <class F>
PairStats pair_stats(int64_t K, F value) {
  PairStats st;
  LD sum = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i + 1; j < K; ++j) {
      const std::optional<double> v = value(i, j);
      if (!v) { ++st.skipped; continue; }
      sum += *v;
      ++st.count;
    }
  if (st.count == 0) return st;
  st.mean = static_cast<double>(sum / static_cast<LD>(st.count));
  LD ss = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i + 1; j < K; ++j) {
      const std::optional<double> v = value(i, j);
      if (!v) continue;
      const LD t = static_cast<LD>(*v) - st.mean;
      ss += t * t;
    }
  st.var_pop = static_cast<double>(ss / static_cast<LD>(st.count));
  return st;
}

// One-sided (Hestenes) Jacobi on the k columns (each of length m) of the column-major matrix B:
// rotate pairs of columns until every pair is orthogonal to ~1e-15 relative; the singular values are
// then the column norms. Zero columns are already orthogonal to everything and are never rotated;
// nor are columns below eps^2 ||B||_F (e.g. subnormal rounding debris of a rank-deficient matrix,
// which rotations cannot orthogonalise and which is far below the accuracy of the largest values).
inline std::vector<double> jacobi_column_norms(std::vector<double> B, int64_t m, int64_t k) {
  const LD tol = 1e-15L;
  const int max_sweeps = 60;
  const auto col = [&](int64_t j) { return &B[j * m]; };
  std::vector<LD> norm2(static_cast<size_t>(k));  // ||column j||^2, recomputed after each rotation
  LD fro2 = 0;
  for (int64_t j = 0; j < k; ++j) fro2 += norm2[j] = dot(col(j), col(j), m);
  const LD eps = std::numeric_limits<double>::epsilon();
  const LD negligible2 = eps * eps * eps * eps * fro2;  // (eps^2 ||B||_F)^2
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p < k; ++p)
      for (int64_t q = p + 1; q < k; ++q) {
        const LD alpha = norm2[p], beta = norm2[q];
        if (alpha <= negligible2 || beta <= negligible2) continue;  // zero or negligible column
        const LD gamma = dot(col(p), col(q), m);
        if (std::fabs(gamma) <= tol * std::sqrt(alpha) * std::sqrt(beta)) continue;
        // Rotation [c s; -s c] that zeroes the off-diagonal of the 2x2 Gram [alpha gamma; gamma beta].
        const LD zeta = (beta - alpha) / (2 * gamma);
        const LD sgn = zeta >= 0 ? 1 : -1;
        const LD t = std::fabs(zeta) > 1e300L ? 1 / (2 * zeta)
                                              : sgn / (std::fabs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = static_cast<double>(1 / std::sqrt(1 + t * t));
        const double s = static_cast<double>(t) * c;
        double* a = col(p);
        double* b = col(q);
        for (int64_t i = 0; i < m; ++i) {
          const double ai = a[i], bi = b[i];
          a[i] = c * ai - s * bi;
          b[i] = s * ai + c * bi;
        }
        norm2[p] = dot(a, a, m);
        norm2[q] = dot(b, b, m);
        rotated = true;
      }
    if (!rotated) break;
  }
  std::vector<double> s(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) s[j] = norm(&B[j * m], m);
  std::sort(s.begin(), s.end(), [](double x, double y) { return x > y; });
  return s;
}

// Householder QR of the column-major m x k matrix B (m > k); returns the k x k upper-triangular R
// (column-major). Q is orthonormal, so R has the singular values of B.
inline std::vector<double> householder_r(std::vector<double> B, int64_t m, int64_t k) {
  std::vector<double> v(static_cast<size_t>(m));
  for (int64_t j = 0; j < k; ++j) {
    double* col = &B[j * m];
    const int64_t len = m - j;
    const double alpha = norm(col + j, len);
    if (alpha == 0) continue;  // column already zero below the diagonal: H = I
    // v = x - beta e1 with beta = -sign(x0) ||x||, H = I - 2 v v^T / (v^T v), H x = beta e1.
    const double beta = col[j] >= 0 ? -alpha : alpha;
    for (int64_t i = 0; i < len; ++i) v[i] = col[j + i];
    v[0] -= beta;
    const LD vtv = dot(v.data(), v.data(), len);
    col[j] = beta;
    for (int64_t i = 1; i < len; ++i) col[j + i] = 0;
    for (int64_t c = j + 1; c < k; ++c) {
      double* x = &B[c * m] + j;
      const double f = static_cast<double>(2 * dot(v.data(), x, len) / vtv);
      for (int64_t i = 0; i < len; ++i) x[i] -= f * v[i];
    }
  }
  std::vector<double> R(static_cast<size_t>(k * k), 0.0);
  for (int64_t c = 0; c < k; ++c)
    for (int64_t r = 0; r <= c; ++r) R[c * k + r] = B[c * m + r];
  return R;
}

// The n x d row-major A as a column-major m x k matrix with m >= k: its d columns when n >= d,
// else the d columns of A^T (= the rows of A). Either way k = min(n, d).
inline std::vector<double> smaller_side_columns(const std::vector<double>& A, int64_t n, int64_t d,
                                                int64_t& m, int64_t& k) {
  if (static_cast<int64_t>(A.size()) != n * d) throw std::invalid_argument("singular_values: size");
  std::vector<double> B(A.size());
  if (n >= d) {
    m = n; k = d;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < d; ++c) B[c * n + r] = A[r * d + c];
  } else {
    m = d; k = n;
    B = A;  // row r of A is column r of A^T, already contiguous
  }
  return B;
}

}  // namespace detail

// Singular values of an n x d row-major matrix: all min(n, d) of them (zeros included), descending.
inline std::vector<double> singular_values(const std::vector<double>& A, int64_t n, int64_t d) {
  int64_t m = 0, k = 0;
  std::vector<double> B = detail::smaller_side_columns(A, n, d, m, k);
  if (k == 0) return {};
  if (m > k) {
    B = detail::householder_r(std::move(B), m, k);
    m = k;
  }
  return detail::jacobi_column_norms(std::move(B), m, k);
}

// Same values by Jacobi on the whole (unreduced) matrix; slow, for cross-checking the QR step.
inline std::vector<double> singular_values_unpreconditioned(const std::vector<double>& A, int64_t n,
                                                            int64_t d) {
  int64_t m = 0, k = 0;
  std::vector<double> B = detail::smaller_side_columns(A, n, d, m, k);
  if (k == 0) return {};
  return detail::jacobi_column_norms(std::move(B), m, k);
}

// docs/METRICS.md "SVD entropy": p_k = s_k / sum(s), H = -sum_k p_k ln(p_k + 1e-10); sum(s) = 0 -> 0.
inline double svd_entropy(const std::vector<double>& s) {
  detail::LD total = 0;
  for (double x : s) total += x;
  if (total == 0) return 0.0;
  detail::LD h = 0;
  for (double x : s) {
    const detail::LD p = x / total;
    h -= p * std::log(p + 1e-10L);
  }
  return static_cast<double>(h);
}

namespace detail {

inline void check_inputs(const std::vector<double>& X, const std::vector<int64_t>& y, int64_t d,
                         const Options& o) {
  if (d <= 0) throw std::invalid_argument("ref: d must be positive");
  if (static_cast<int64_t>(X.size()) != static_cast<int64_t>(y.size()) * d)
    throw std::invalid_argument("ref: X must be N x d");
  for (int64_t label : y)
    if (label < 0 || label >= o.num_classes) throw std::invalid_argument("ref: label out of [0, V)");
}

// docs/METRICS.md "Inputs and notation": exclusion, n_c, kept classes, max_tokens cut. Fills the counts of
// `r` and returns the kept ids ascending.
inline std::vector<int64_t> select_classes(const std::vector<int64_t>& y, const Options& o, Result& r) {
  const std::set<int64_t> E(o.exclude.begin(), o.exclude.end());
  std::vector<int64_t> n(static_cast<size_t>(o.num_classes), 0);
  r.rows_seen = static_cast<int64_t>(y.size());
  r.rows_excluded = 0;
  for (int64_t label : y) {
    if (E.count(label)) ++r.rows_excluded;   // dropped before anything else
    else ++n[label];
  }
  std::vector<int64_t> candidates;  // K before the max_tokens cut
  r.classes_seen = r.classes_below_min = 0;
  for (int64_t c = 0; c < o.num_classes; ++c) {
    if (n[c] == 0) continue;  // excluded labels have n[c] == 0 here
    ++r.classes_seen;
    if (n[c] >= o.min_samples) candidates.push_back(c);
    else ++r.classes_below_min;
  }
  if (o.max_tokens > 0 && static_cast<int64_t>(candidates.size()) > o.max_tokens) {
    // T most frequent; ties: smaller token id first.
    std::stable_sort(candidates.begin(), candidates.end(),
                     [&](int64_t a, int64_t b) { return n[a] != n[b] ? n[a] > n[b] : a < b; });
    candidates.resize(static_cast<size_t>(o.max_tokens));
    std::sort(candidates.begin(), candidates.end());
  }
  r.classes_kept = static_cast<int64_t>(candidates.size());
  r.rows_kept = 0;
  for (int64_t c : candidates) r.rows_kept += n[c];
  return candidates;
}

// Row indices of each kept class (index k <-> class kept[k]); -1 in `slot` for rows not kept.
inline std::vector<std::vector<int64_t>> rows_by_class(const std::vector<int64_t>& y,
                                                       const std::vector<int64_t>& kept,
                                                       int64_t num_classes) {
  std::vector<int64_t> slot(static_cast<size_t>(num_classes), -1);
  for (size_t k = 0; k < kept.size(); ++k) slot[kept[k]] = static_cast<int64_t>(k);
  std::vector<std::vector<int64_t>> rows(kept.size());
  for (size_t i = 0; i < y.size(); ++i)
    if (slot[y[i]] >= 0) rows[slot[y[i]]].push_back(static_cast<int64_t>(i));
  return rows;
}

// docs/METRICS.md "Inputs and notation": mu_c, var_c, mu_G, m_c, u_c for the kept classes.
inline ClassStats class_stats(const std::vector<double>& X, int64_t d, const std::vector<int64_t>& kept,
                              const std::vector<std::vector<int64_t>>& rows, const Options& o) {
  const int64_t K = static_cast<int64_t>(kept.size());
  ClassStats cs;
  cs.kept = kept;
  cs.n.resize(K);
  cs.mu.assign(K * d, 0.0);
  cs.var.assign(K, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const auto& idx = rows[k];
    cs.n[k] = static_cast<int64_t>(idx.size());
    double* mu = &cs.mu[k * d];
    // mu_c = (1/n_c) sum_{y_i = c} x_i
    std::vector<LD> sum(static_cast<size_t>(d), 0);
    for (int64_t i : idx)
      for (int64_t t = 0; t < d; ++t) sum[t] += X[i * d + t];
    for (int64_t t = 0; t < d; ++t) mu[t] = static_cast<double>(sum[t] / static_cast<LD>(idx.size()));
    // var_c = (1/n_c) sum_{y_i = c} ||x_i - mu_c||^2   (second pass)
    LD ss = 0;
    for (int64_t i : idx) ss += diff_norm2(&X[i * d], mu, d);
    cs.var[k] = static_cast<double>(ss / static_cast<LD>(idx.size()));
  }
  // mu_G = (1/K) sum_c mu_c, or token weighted: sum_c n_c mu_c / sum_c n_c.
  cs.mu_G.assign(d, 0.0);
  if (K > 0) {
    for (int64_t t = 0; t < d; ++t) {
      LD s = 0, w = 0;
      for (int64_t k = 0; k < K; ++k) {
        const LD weight = o.token_weighted_mean ? static_cast<LD>(cs.n[k]) : 1.0L;
        s += weight * cs.mu[k * d + t];
        w += weight;
      }
      cs.mu_G[t] = static_cast<double>(s / w);
    }
  }
  // m_c = mu_c - mu_G;  u_c = m_c / (||m_c|| + 1e-8)
  cs.m.resize(K * d);
  cs.u.resize(K * d);
  cs.m_norm.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < d; ++t) cs.m[k * d + t] = cs.mu[k * d + t] - cs.mu_G[t];
    cs.m_norm[k] = norm(&cs.m[k * d], d);
    for (int64_t t = 0; t < d; ++t) cs.u[k * d + t] = cs.m[k * d + t] / (cs.m_norm[k] + 1e-8);
  }
  return cs;
}

}  // namespace detail

// Kept classes and their means/variances/centred means, exactly as compute() uses them.
inline ClassStats class_stats(const std::vector<double>& X, const std::vector<int64_t>& y, int64_t d,
                              const Options& o) {
  detail::check_inputs(X, y, d, o);
  Result counts;
  const std::vector<int64_t> kept = detail::select_classes(y, o, counts);
  return detail::class_stats(X, d, kept, detail::rows_by_class(y, kept, o.num_classes), o);
}

// X: N x d row-major, y: N labels in [0, V). W: V x d row-major or nullptr; b: V or nullptr.
inline Result compute(const std::vector<double>& X, const std::vector<int64_t>& y, int64_t d,
                      const double* W, const double* b, const Options& o) {
  using detail::LD;
  detail::check_inputs(X, y, d, o);
  Result r;
  r.kept = detail::select_classes(y, o, r);
  const int64_t K = static_cast<int64_t>(r.kept.size());
  if (K == 0) return r;  // empty kept set: every metric null, counts as filled above
  const auto rows = detail::rows_by_class(y, r.kept, o.num_classes);
  const ClassStats cs = detail::class_stats(X, d, r.kept, rows, o);
  const auto mu = [&](int64_t k) { return &cs.mu[k * d]; };
  const auto m = [&](int64_t k) { return &cs.m[k * d]; };
  const auto u = [&](int64_t k) { return &cs.u[k * d]; };

  // ---- Per-token SVD entropy (exact mode: all rows of the class) ----
  std::vector<double> entropies;
  for (int64_t k = 0; k < K; ++k) {
    const auto& idx = rows[k];
    const int64_t n = static_cast<int64_t>(idx.size());
    std::vector<double> Xc(static_cast<size_t>(n * d));
    for (int64_t a = 0; a < n; ++a)
      for (int64_t t = 0; t < d; ++t)
        Xc[a * d + t] = X[idx[a] * d + t] - (o.svd_center ? mu(k)[t] : 0.0);
    const std::vector<double> s = singular_values(Xc, n, d);
    Token tok;
    tok.n = n;
    LD total = 0;
    for (double x : s) total += x;
    tok.zero_matrix = (total == 0);
    if (tok.zero_matrix) ++r.svd_zero_matrices;
    const double H = svd_entropy(s);  // 0 for a zero matrix
    tok.svd_entropy = H;
    tok.effective_rank = std::exp(H);
    const int64_t mn = std::min(n, d);
    if (mn != 1) tok.normalized_entropy = H / std::log(static_cast<double>(mn));
    r.tokens[r.kept[k]] = tok;
    entropies.push_back(H);
  }

  // ---- overall_svd_entropy = H(X_K), all kept rows stacked (uncentred); effective rank exp(H) ----
  {
    std::vector<double> XK;
    XK.reserve(static_cast<size_t>(r.rows_kept * d));
    for (size_t i = 0; i < y.size(); ++i)
      if (std::binary_search(r.kept.begin(), r.kept.end(), y[i]))
        XK.insert(XK.end(), X.begin() + i * d, X.begin() + (i + 1) * d);
    const double H = svd_entropy(singular_values(XK, r.rows_kept, d));
    r.overall_svd_entropy = H;
    r.overall_effective_rank = std::exp(H);
  }

  // ---- Pair metrics over P = {(i, j): i < j}: null when K < min_classes_for_gnc2 ----
  if (K >= o.min_classes_for_gnc2 && K >= 2) {
    // GNC2: L_ij = -ln ||u_i - u_j||, pairs with ||u_i - u_j|| < 1e-6 skipped and counted.
    const detail::PairStats g = detail::pair_stats(K, [&](int64_t i, int64_t j) -> std::optional<double> {
      const double dist = detail::diff_norm(u(i), u(j), d);
      if (dist < 1e-6) return std::nullopt;
      return -std::log(dist);
    });
    r.gnc2_skipped_pairs = g.skipped;
    if (g.count > 0) {
      r.overall_gnc2 = g.mean;
      r.gnc2_var = g.var_pop;
      if (g.mean != 0) r.gnc2_cov = std::sqrt(g.var_pop) / std::fabs(g.mean);
    }

    // CDNV: (var_i + var_j) / (2 ||mu_i - mu_j||^(2p)); pairs with equal means skipped and counted.
    const detail::PairStats c = detail::pair_stats(K, [&](int64_t i, int64_t j) -> std::optional<double> {
      const double dist2 = static_cast<double>(detail::diff_norm2(mu(i), mu(j), d));  // ||mu_i - mu_j||^2
      if (dist2 == 0) return std::nullopt;
      return (cs.var[i] + cs.var[j]) / (2 * std::pow(dist2, o.cdnv_power));
    });
    r.cdnv_skipped_pairs = c.skipped;
    if (c.count > 0) r.nc1_cdnv = c.mean;

    // Equiangularity: mean and population std of cos_ij = u_i . u_j; ideal -1/(K-1).
    const detail::PairStats e = detail::pair_stats(K, [&](int64_t i, int64_t j) -> std::optional<double> {
      return static_cast<double>(detail::dot(u(i), u(j), d));
    });
    r.nc2_equiangular_mean = e.mean;
    r.nc2_equiangular_std = std::sqrt(e.var_pop);
    r.nc2_equiangular_ideal = -1.0 / static_cast<double>(K - 1);
  }

  // ---- Equinorm (needs K >= 2): std_unbiased(||m_c||)/mean(||m_c||), std_unbiased(ln ||m_c||) ----
  if (K >= 2) {
    const std::vector<double>& norms = cs.m_norm;
    const double mean_norm = detail::mean(norms);
    if (mean_norm != 0) r.nc2_equinorm_cov = detail::std_unbiased(norms) / mean_norm;
    const bool all_positive = std::all_of(norms.begin(), norms.end(), [](double x) { return x > 0; });
    if (all_positive) {
      std::vector<double> logs;
      for (double x : norms) logs.push_back(std::log(x));
      r.nc2_log_norm_std = detail::std_unbiased(logs);
    }
  }

  // ---- Classifier rows w_c for c in K: W, or mu_c with unc3_classifier: class_means ----
  const bool have_w = o.unc3_class_means || W != nullptr;
  const auto w = [&](int64_t k) { return o.unc3_class_means ? mu(k) : &W[r.kept[k] * d]; };

  // ---- UNC3: cos_c = (w_c . m_c) / ((||w_c|| + 1e-8)(||m_c|| + 1e-8)); std_unbiased/mean ----
  if (have_w && K >= o.min_classes_for_unc3) {
    std::vector<double> cos;
    for (int64_t k = 0; k < K; ++k)
      cos.push_back(static_cast<double>(detail::dot(w(k), m(k), d)) /
                    ((detail::norm(w(k), d) + 1e-8) * (cs.m_norm[k] + 1e-8)));
    r.unc3_mean_cos = detail::mean(cos);
    if (K >= 2) {
      r.unc3_std_cos = detail::std_unbiased(cos);
      if (*r.unc3_mean_cos >= 1e-8) r.overall_unc3 = *r.unc3_std_cos / *r.unc3_mean_cos;
    }
  }

  // ---- NC3 self-duality: || W_K/||W_K||_F - M/||M||_F ||_F ----
  if (have_w) {
    LD wf2 = 0, mf2 = 0;
    for (int64_t k = 0; k < K; ++k) {
      wf2 += detail::dot(w(k), w(k), d);
      mf2 += detail::dot(m(k), m(k), d);
    }
    const double wf = static_cast<double>(std::sqrt(wf2)), mf = static_cast<double>(std::sqrt(mf2));
    if (wf > 0 && mf > 0) {
      LD s = 0;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < d; ++t) {
          const LD diff = static_cast<LD>(w(k)[t] / wf) - m(k)[t] / mf;
          s += diff * diff;
        }
      r.nc3_self_duality = static_cast<double>(std::sqrt(s));
    }
  }

  // ---- NC4: argmax_{c in [0,V)} (w_c . x + b_c) == argmin_{c in K} ||x - mu_c||, ties: smaller id ----
  if (o.compute_nc4 && W != nullptr) {
    int64_t agree = 0;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i : rows[k]) {
        const double* x = &X[i * d];
        int64_t best_logit_class = 0;
        LD best_logit = 0;
        for (int64_t c = 0; c < o.num_classes; ++c) {
          const LD logit = detail::dot(&W[c * d], x, d) + (b ? b[c] : 0.0);
          if (c == 0 || logit > best_logit) { best_logit = logit; best_logit_class = c; }
        }
        int64_t nearest = 0;
        LD best_dist2 = 0;  // ||x - mu_c||^2: same argmin as ||x - mu_c||
        for (int64_t j = 0; j < K; ++j) {
          const LD dist2 = detail::diff_norm2(x, mu(j), d);
          if (j == 0 || dist2 < best_dist2) { best_dist2 = dist2; nearest = j; }
        }
        if (best_logit_class == r.kept[nearest]) ++agree;
      }
    r.nc4_agreement = static_cast<double>(agree) / static_cast<double>(r.rows_kept);
  }

  // ---- Summary: avg / population std of per-token entropies; avg / min / max n_c ----
  r.avg_svd_entropy = detail::mean(entropies);
  r.std_svd_entropy = std::sqrt(detail::var_pop(entropies));
  std::vector<double> counts(cs.n.begin(), cs.n.end());
  r.avg_samples_per_token = detail::mean(counts);
  r.min_samples = *std::min_element(cs.n.begin(), cs.n.end());
  r.max_samples = *std::max_element(cs.n.begin(), cs.n.end());
  return r;
}

// ---- docs/METRICS.md "Anchor metrics": the neural_collapse library's measures ----
// Explicit K x K matrices, Sigma_W from the rows about their class means, and Sigma_B's
// pseudo-inverse from a cyclic Jacobi eigen-decomposition (no Gram shortcut, no BLAS/LAPACK).
struct Anchors {
  std::optional<double> nc1_pinv, nc1_svd, nc1_quot, nc2_etf_err, nc3_dual_err, nc3u_uni_dual;
  std::optional<double> nc2g_dist_mean, nc2g_dist_var, nc2_equiangular_absdev, nc2_max_equiangular_dev;
  std::optional<double> nc5_ood_dev;
  std::vector<double> sigma_w, sigma_b;  // d x d
};

namespace detail {

// Eigenpairs of the symmetric n x n row-major A by cyclic Jacobi rotations: values[k] with
// vectors in column k of V (row-major), unsorted.
inline void jacobi_eigen(std::vector<double> A, int64_t n, std::vector<double>& values, std::vector<double>& V) {
  V.assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) V[i * n + i] = 1.0;
  for (int sweep = 0; sweep < 100; ++sweep) {
    LD off = 0, total = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        total += static_cast<LD>(A[i * n + j]) * A[i * n + j];
        if (i != j) off += static_cast<LD>(A[i * n + j]) * A[i * n + j];
      }
    if (off <= 1e-32L * total || off == 0) break;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = A[p * n + q];
        if (apq == 0) continue;
        const double theta = (A[q * n + q] - A[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), sn = t * c;
        for (int64_t k = 0; k < n; ++k) {  // A <- A J (columns p, q)
          const double akp = A[k * n + p], akq = A[k * n + q];
          A[k * n + p] = c * akp - sn * akq;
          A[k * n + q] = sn * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {  // A <- J^T A (rows p, q)
          const double apk = A[p * n + k], aqk = A[q * n + k];
          A[p * n + k] = c * apk - sn * aqk;
          A[q * n + k] = sn * apk + c * aqk;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double vkp = V[k * n + p], vkq = V[k * n + q];
          V[k * n + p] = c * vkp - sn * vkq;
          V[k * n + q] = sn * vkp + c * vkq;
        }
      }
  }
  values.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[i] = A[i * n + i];
}

// ||S - (I - J/K)/sqrt(K-1)||_F with S = A / ||A||_F, A given entry by entry (K x K, explicit).
template <class F>
std::optional<double> etf_error(int64_t K, F a) {
  LD fa = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) fa += static_cast<LD>(a(i, j)) * a(i, j);
  if (!(fa > 0)) return std::nullopt;
  const LD f = std::sqrt(fa), c = std::sqrt(static_cast<LD>(K - 1));
  LD e = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) {
      const LD target = ((i == j ? 1.0L : 0.0L) - 1.0L / K) / c;
      const LD diff = a(i, j) / f - target;
      e += diff * diff;
    }
  return static_cast<double>(std::sqrt(e));
}

}  // namespace detail

// X: N x d, y: N labels; W: V x d or nullptr; ood_mean: d values or nullptr.
inline Anchors anchors(const std::vector<double>& X, const std::vector<int64_t>& y, int64_t d, const double* W,
                       const double* ood_mean, const Options& o) {
  using detail::LD;
  Anchors a;
  const ClassStats cs = class_stats(X, y, d, o);
  const int64_t K = static_cast<int64_t>(cs.kept.size());
  if (K < 2) return a;
  const auto rows = detail::rows_by_class(y, cs.kept, o.num_classes);
  const double Kd = static_cast<double>(K);
  // Sigma_W = (1/N) sum over kept rows (x - mu_y)(x - mu_y)^T, Sigma_B = M^T M / K.
  std::vector<LD> sw(static_cast<size_t>(d * d), 0), sb(static_cast<size_t>(d * d), 0);
  int64_t N = 0;
  std::vector<double> diff(static_cast<size_t>(d));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i : rows[k]) {
      ++N;
      for (int64_t t = 0; t < d; ++t) diff[t] = X[i * d + t] - cs.mu[k * d + t];
      for (int64_t p = 0; p < d; ++p)
        for (int64_t q = 0; q < d; ++q) sw[p * d + q] += static_cast<LD>(diff[p]) * diff[q];
    }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < d; ++p)
      for (int64_t q = 0; q < d; ++q) sb[p * d + q] += static_cast<LD>(cs.m[k * d + p]) * cs.m[k * d + q];
  a.sigma_w.resize(static_cast<size_t>(d * d));
  a.sigma_b.resize(static_cast<size_t>(d * d));
  for (int64_t e = 0; e < d * d; ++e) {
    a.sigma_w[e] = static_cast<double>(sw[e] / static_cast<LD>(N));
    a.sigma_b[e] = static_cast<double>(sb[e] / static_cast<LD>(K));
  }
  // nc1_pinv: Sigma_B^+ = V diag(1/s, s > max(d, K) eps s_max) V^T, then Tr(Sigma_B^+ Sigma_W) / K.
  std::vector<double> ev, V;
  detail::jacobi_eigen(a.sigma_b, d, ev, V);
  double smax = 0;
  for (double v : ev) smax = std::max(smax, v);
  const double tol = static_cast<double>(std::max(d, K)) * 2.220446049250313e-16 * smax;
  std::vector<int64_t> order(static_cast<size_t>(d));
  for (int64_t k = 0; k < d; ++k) order[k] = k;
  std::sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return ev[p] > ev[q]; });
  LD tr_w = 0, tr_b = 0;
  for (int64_t t = 0; t < d; ++t) tr_w += a.sigma_w[t * d + t], tr_b += a.sigma_b[t * d + t];
  if (tr_b > 0) a.nc1_quot = static_cast<double>(tr_w / tr_b);
  if (smax > 0) {
    auto trace_with = [&](int64_t limit) {  // Tr(Sigma_W P) with P = sum over the first `limit` eigenpairs of v v^T / s
      std::vector<LD> P(static_cast<size_t>(d * d), 0);
      for (int64_t r = 0; r < limit; ++r) {
        const int64_t k = order[r];
        if (!(ev[k] > tol)) continue;
        for (int64_t p = 0; p < d; ++p)
          for (int64_t q = 0; q < d; ++q) P[p * d + q] += static_cast<LD>(V[p * d + k]) * V[q * d + k] / ev[k];
      }
      LD tr = 0;
      for (int64_t p = 0; p < d; ++p)
        for (int64_t q = 0; q < d; ++q) tr += P[p * d + q] * a.sigma_w[q * d + p];
      return static_cast<double>(tr / static_cast<LD>(K));
    };
    a.nc1_pinv = trace_with(d);
    a.nc1_svd = trace_with(std::min(K - 1, d));
  }
  // nc2_etf_err from the explicit K x K M M^T.
  a.nc2_etf_err = detail::etf_error(K, [&](int64_t i, int64_t j) { return static_cast<double>(detail::dot(&cs.m[i * d], &cs.m[j * d], d)); });
  // Directions of the library: u_c = m_c / ||m_c|| (0 for a zero mean).
  std::vector<double> u(static_cast<size_t>(K * d), 0.0);
  for (int64_t k = 0; k < K; ++k)
    if (cs.m_norm[k] > 0)
      for (int64_t t = 0; t < d; ++t) u[k * d + t] = cs.m[k * d + t] / cs.m_norm[k];
  const auto dist = detail::pair_stats(K, [&](int64_t i, int64_t j) -> std::optional<double> { return detail::diff_norm(&u[i * d], &u[j * d], d); });
  a.nc2g_dist_mean = dist.mean;
  a.nc2g_dist_var = dist.var_pop;
  double mx = 0;
  const auto dev = detail::pair_stats(K, [&](int64_t i, int64_t j) -> std::optional<double> {
    const double v = std::fabs(static_cast<double>(detail::dot(&u[i * d], &u[j * d], d)) + 1.0 / (Kd - 1.0));
    mx = std::max(mx, v);
    return v;
  });
  a.nc2_equiangular_absdev = dev.mean;
  a.nc2_max_equiangular_dev = mx;
  // Duality: w_c the classifier row (or the uncentred mean in class_means mode).
  const bool duality = W || o.unc3_class_means;
  if (duality) {
    const auto w = [&](int64_t k) { return o.unc3_class_means ? &cs.mu[k * d] : W + cs.kept[k] * d; };
    a.nc3_dual_err = detail::etf_error(K, [&](int64_t i, int64_t j) { return static_cast<double>(detail::dot(w(i), &cs.m[j * d], d)); });
    std::vector<double> dots(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) dots[k] = static_cast<double>(detail::dot(w(k), &cs.m[k * d], d));
    const double sd = detail::std_unbiased(dots);
    a.nc3u_uni_dual = sd * sd;
  }
  if (ood_mean) {
    LD acc = 0;
    const double on = detail::norm(ood_mean, d);
    for (int64_t k = 0; k < K; ++k) {
      const double mn = detail::norm(&cs.mu[k * d], d);
      acc += (mn > 0 && on > 0) ? std::fabs(static_cast<double>(detail::dot(&cs.mu[k * d], ood_mean, d)) / (mn * on)) : 0.0;
    }
    a.nc5_ood_dev = static_cast<double>(acc / static_cast<LD>(K));
  }
  return a;
}

}  // namespace ref
