// Tests of the brute-force reference itself (tests/reference/brute_force.hpp) against known answers,
// so that a wrong reference cannot silently bless a wrong engine.
#include "reference/brute_force.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace test_reference {
namespace {

constexpr double kTight = 1e-12;

std::vector<double> random_matrix(int64_t n, int64_t d, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> a(static_cast<size_t>(n * d));
  for (double& x : a) x = nd(gen);
  return a;
}

// C = A (n x k) * B (k x d), row-major.
std::vector<double> matmul(const std::vector<double>& A, const std::vector<double>& B, int64_t n,
                           int64_t k, int64_t d) {
  std::vector<double> C(static_cast<size_t>(n * d), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) {
      long double s = 0;
      for (int64_t t = 0; t < k; ++t) s += static_cast<long double>(A[i * k + t]) * B[t * d + j];
      C[i * d + j] = static_cast<double>(s);
    }
  return C;
}

std::vector<double> transpose(const std::vector<double>& A, int64_t n, int64_t d) {
  std::vector<double> T(A.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) T[j * n + i] = A[i * d + j];
  return T;
}

// An n x n orthogonal matrix: product of Givens rotations with fixed angles.
std::vector<double> orthogonal(int64_t n, uint64_t seed) {
  std::vector<double> Q(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) Q[i * n + i] = 1.0;
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> angle(0.0, 6.283185307179586);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t q = p + 1; q < n; ++q) {
      const double th = angle(gen), c = std::cos(th), s = std::sin(th);
      for (int64_t r = 0; r < n; ++r) {  // Q <- Q G(p, q)
        const double a = Q[r * n + p], b = Q[r * n + q];
        Q[r * n + p] = c * a - s * b;
        Q[r * n + q] = s * a + c * b;
      }
    }
  return Q;
}

// Eigenvalues of a symmetric n x n matrix by classical two-sided Jacobi (test-only cross-check).
std::vector<double> symmetric_eigenvalues(std::vector<double> S, int64_t n) {
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) off += S[p * n + q] * S[p * n + q];
    if (off < 1e-300) break;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        if (S[p * n + q] == 0) continue;
        const double theta = (S[q * n + q] - S[p * n + p]) / (2 * S[p * n + q]);
        const double t = (theta >= 0 ? 1 : -1) / (std::fabs(theta) + std::sqrt(1 + theta * theta));
        const double c = 1 / std::sqrt(1 + t * t), s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // S <- S J
          const double a = S[k * n + p], b = S[k * n + q];
          S[k * n + p] = c * a - s * b;
          S[k * n + q] = s * a + c * b;
        }
        for (int64_t k = 0; k < n; ++k) {  // S <- J^T S
          const double a = S[p * n + k], b = S[q * n + k];
          S[p * n + k] = c * a - s * b;
          S[q * n + k] = s * a + c * b;
        }
      }
  }
  std::vector<double> ev(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ev[i] = S[i * n + i];
  std::sort(ev.begin(), ev.end(), [](double a, double b) { return a > b; });
  return ev;
}

void expect_values(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "index " << i;
}

// Rows of a labelled data set, built one row at a time.
struct Data {
  int64_t d;
  std::vector<double> X;
  std::vector<int64_t> y;
  void add(int64_t label, std::vector<double> x) {
    X.insert(X.end(), x.begin(), x.end());
    y.push_back(label);
  }
};

ref::Options opts(int64_t V) {
  ref::Options o;
  o.num_classes = V;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Singular values
// ---------------------------------------------------------------------------------------------

TEST(ReferenceSvd, Diagonal) {
  const std::vector<double> A = {3, 0, 0,
                                 0, 1, 0,
                                 0, 0, 2};
  expect_values(ref::singular_values(A, 3, 3), {3, 2, 1}, kTight);
  // Negative entries: singular values are absolute values.
  const std::vector<double> B = {-4, 0, 0, 0.5};
  expect_values(ref::singular_values(B, 2, 2), {4, 0.5}, kTight);
}

TEST(ReferenceSvd, RankOne) {
  // u v^T with ||u|| = 3 (u = (1, 2, 2)) and ||v|| = 5 (v = (3, 4, 0, 0)): one value 15, rest 0.
  const std::vector<double> u = {1, 2, 2}, v = {3, 4, 0, 0};
  std::vector<double> A;
  for (double ui : u)
    for (double vj : v) A.push_back(ui * vj);
  const auto s = ref::singular_values(A, 3, 4);
  expect_values(s, {15, 0, 0}, 1e-13);
  EXPECT_NEAR(ref::svd_entropy(s), 0.0, 1e-9);
}

TEST(ReferenceSvd, OrthogonalTimesDiagonalTimesOrthogonal) {
  // A = U diag(5, 2, 0.5, 1e-3, 0) V^T, 7 x 5 (U's first five columns).
  const int64_t n = 7, d = 5;
  const std::vector<double> sigma = {5, 2, 0.5, 1e-3, 0};
  const auto U = orthogonal(n, 11), V = orthogonal(d, 12);
  std::vector<double> S(static_cast<size_t>(n * d), 0.0);
  for (int64_t i = 0; i < d; ++i) S[i * d + i] = sigma[i];
  const auto A = matmul(matmul(U, S, n, n, d), transpose(V, d, d), n, d, d);
  expect_values(ref::singular_values(A, n, d), sigma, 1e-14);
  expect_values(ref::singular_values_unpreconditioned(A, n, d), sigma, 1e-14);
  // The transpose (5 x 7, n < d) has the same values.
  expect_values(ref::singular_values(transpose(A, n, d), d, n), sigma, 1e-14);
}

TEST(ReferenceSvd, ThreeByTwoKnown) {
  // A = [[1,0],[0,1],[1,1]]: A^T A = [[2,1],[1,2]], eigenvalues 3 and 1, so s = (sqrt 3, 1).
  const std::vector<double> A = {1, 0, 0, 1, 1, 1};
  expect_values(ref::singular_values(A, 3, 2), {std::sqrt(3.0), 1.0}, kTight);
  // [[3,0],[4,5]]: s = (3 sqrt 5, sqrt 5).
  const std::vector<double> B = {3, 0, 4, 5};
  expect_values(ref::singular_values(B, 2, 2), {3 * std::sqrt(5.0), std::sqrt(5.0)}, kTight);
}

TEST(ReferenceSvd, ZeroMatrixAndZeroColumns) {
  const std::vector<double> Z(12, 0.0);
  const auto s = ref::singular_values(Z, 4, 3);
  expect_values(s, {0, 0, 0}, 0.0);
  EXPECT_EQ(ref::svd_entropy(s), 0.0);
  // A zero column between two others: [[1,0,2],[3,0,4]] has the values of [[1,2],[3,4]] plus a 0.
  const std::vector<double> A = {1, 0, 2, 3, 0, 4};
  const double fro2 = 1 + 4 + 9 + 16, det = 1 * 4 - 2 * 3;  // s1^2 + s2^2, s1 s2
  const double s1 = std::sqrt((fro2 + std::sqrt(fro2 * fro2 - 4 * det * det)) / 2);
  const double s2 = std::fabs(det) / s1;
  expect_values(ref::singular_values(A, 2, 3), {s1, s2}, kTight);
  const std::vector<double> B = {1, 0, 2, 3, 0, 4, 0, 0, 0};  // plus a zero row: n >= d path
  expect_values(ref::singular_values(B, 3, 3), {s1, s2, 0}, kTight);
}

TEST(ReferenceSvd, WideAndTallCount) {
  // min(n, d) values, zeros included.
  EXPECT_EQ(ref::singular_values(random_matrix(2, 9, 1), 2, 9).size(), 2u);
  EXPECT_EQ(ref::singular_values(random_matrix(9, 2, 1), 9, 2).size(), 2u);
  EXPECT_EQ(ref::singular_values(random_matrix(1, 5, 1), 1, 5).size(), 1u);
  const std::vector<double> row = {3, 4};  // one row: its norm
  expect_values(ref::singular_values(row, 1, 2), {5}, kTight);
  expect_values(ref::singular_values(row, 2, 1), {5}, kTight);
}

TEST(ReferenceSvd, WideMatchesGramEigenvalues) {
  // n < d: s^2 are the eigenvalues of the n x n Gram A A^T.
  const int64_t n = 4, d = 9;
  const auto A = random_matrix(n, d, 3);
  const auto G = matmul(A, transpose(A, n, d), n, d, n);
  const auto ev = symmetric_eigenvalues(G, n);
  const auto s = ref::singular_values(A, n, d);
  ASSERT_EQ(s.size(), 4u);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(s[i] * s[i], ev[i], 1e-12 * ev[0]);
}

TEST(ReferenceSvd, TallQrPathMatchesPlainJacobiAndGram) {
  // n >= d, well conditioned: the QR-preconditioned values, plain Jacobi on all rows, and
  // sqrt(eig(A^T A)) agree.
  const int64_t n = 500, d = 12;
  auto A = random_matrix(n, d, 4);
  for (int64_t i = 0; i < n; ++i) A[i * d + 3] *= 10.0;  // spread the spectrum a little
  const auto s = ref::singular_values(A, n, d);
  const auto s_plain = ref::singular_values_unpreconditioned(A, n, d);
  const auto ev = symmetric_eigenvalues(matmul(transpose(A, n, d), A, d, n, d), d);
  ASSERT_EQ(s.size(), static_cast<size_t>(d));
  long double fro2 = 0, sum_s2 = 0;
  for (double x : A) fro2 += static_cast<long double>(x) * x;
  for (int64_t i = 0; i < d; ++i) {
    EXPECT_NEAR(s[i], s_plain[i], 1e-12 * s[0]);
    EXPECT_NEAR(s[i], std::sqrt(ev[i]), 1e-11 * s[0]);
    sum_s2 += static_cast<long double>(s[i]) * s[i];
  }
  EXPECT_NEAR(static_cast<double>(sum_s2 / fro2), 1.0, 1e-13);
}

TEST(ReferenceSvd, NearlyAlignedColumns) {
  // Columns almost along the coordinate axes, where a Householder reflection with the unstable sign
  // choice cancels. (a) diag(3, 2, 1) stacked on 1e-9 entries: s_k = sigma_k + O(1e-18).
  const int64_t n = 6, d = 3;
  std::vector<double> A(static_cast<size_t>(n * d), 0.0);
  A[0] = 3; A[4] = 2; A[8] = 1;
  for (int64_t i = d; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) A[i * d + j] = 1e-9 * static_cast<double>(i + j + 1);
  expect_values(ref::singular_values(A, n, d), {3, 2, 1}, 1e-15);
  expect_values(ref::singular_values_unpreconditioned(A, n, d), {3, 2, 1}, 1e-15);
  // (b) first column (1, 1e-5, 1e-5, ...), the others random: QR path equals plain Jacobi.
  const int64_t n2 = 40, d2 = 5;
  auto B = random_matrix(n2, d2, 31);
  for (int64_t i = 0; i < n2; ++i) B[i * d2] = i == 0 ? 1.0 : 1e-5;
  const auto s = ref::singular_values(B, n2, d2), s_plain = ref::singular_values_unpreconditioned(B, n2, d2);
  for (int64_t i = 0; i < d2; ++i) EXPECT_NEAR(s[i], s_plain[i], 2e-15 * s[0]) << i;
}

TEST(ReferenceSvd, EntropyFormula) {
  // Equal values: H = ln k (up to the 1e-10 inside the log).
  EXPECT_NEAR(ref::svd_entropy({2, 2, 2, 2}), std::log(4.0), 1e-9);
  // s = (3, 1): p = (3/4, 1/4).
  const double want = -(0.75 * std::log(0.75 + 1e-10) + 0.25 * std::log(0.25 + 1e-10));
  EXPECT_NEAR(ref::svd_entropy({3, 1}), want, 1e-15);
  // A single non-zero value: H = -ln(1 + 1e-10), zero values contribute 0.
  EXPECT_NEAR(ref::svd_entropy({7, 0, 0}), -std::log1p(1e-10), 1e-18);  // 1 + 1e-10 rounds
  EXPECT_EQ(ref::svd_entropy({0, 0}), 0.0);
  EXPECT_EQ(ref::svd_entropy({}), 0.0);
}

// ---------------------------------------------------------------------------------------------
// docs/METRICS.md "Reference sanity values"
// ---------------------------------------------------------------------------------------------

// Simplex ETF: m_c = S (e_c - (1/K) 1) in the first K coordinates, shifted along coordinate K
// (orthogonal to every m_c), n rows per class exactly at mu_c. W = M. The scale S = 1e6 keeps the
// +1e-8 of u_c = m_c/(||m_c|| + 1e-8) below 1e-14 relative, so the ideal values hold to ~1e-12.
struct Etf {
  int64_t K, d;
  Data data;
  std::vector<double> W;
};

Etf simplex_etf(int64_t K, int64_t d, int64_t rows_per_class) {
  Etf e{K, d, Data{d, {}, {}}, std::vector<double>(static_cast<size_t>(K * d), 0.0)};
  for (int64_t c = 0; c < K; ++c) {
    std::vector<double> m(static_cast<size_t>(d), 0.0);
    for (int64_t t = 0; t < K; ++t) m[t] = 1e6 * ((t == c ? 1.0 : 0.0) - 1.0 / static_cast<double>(K));
    for (int64_t t = 0; t < d; ++t) e.W[c * d + t] = m[t];
    std::vector<double> x = m;
    x[K] = 2.5e6;  // shift
    for (int64_t r = 0; r < rows_per_class; ++r) e.data.add(c, x);
  }
  return e;
}

TEST(ReferenceSanity, SimplexEtf) {
  for (int64_t K : {2, 3, 5, 10}) {
    const Etf e = simplex_etf(K, K + 3, 3);
    ref::Options o = opts(K);
    o.compute_nc4 = true;
    const ref::Result r = ref::compute(e.data.X, e.data.y, e.d, e.W.data(), nullptr, o);
    SCOPED_TRACE(K);
    ASSERT_EQ(r.classes_kept, K);
    const double Kd = static_cast<double>(K);
    EXPECT_NEAR(*r.overall_gnc2, -0.5 * std::log(2 * Kd / (Kd - 1)), kTight);
    EXPECT_NEAR(*r.gnc2_var, 0.0, kTight);
    EXPECT_NEAR(*r.gnc2_cov, 0.0, 1e-6);  // sqrt of a ~1e-32 variance
    EXPECT_EQ(r.gnc2_skipped_pairs, 0);
    EXPECT_NEAR(*r.nc2_equiangular_mean, -1.0 / (Kd - 1), kTight);
    EXPECT_NEAR(*r.nc2_equiangular_std, 0.0, 1e-7);
    EXPECT_DOUBLE_EQ(*r.nc2_equiangular_ideal, -1.0 / (Kd - 1));
    EXPECT_NEAR(*r.nc2_equinorm_cov, 0.0, kTight);
    EXPECT_NEAR(*r.nc2_log_norm_std, 0.0, kTight);
    EXPECT_NEAR(*r.overall_unc3, 0.0, kTight);
    EXPECT_NEAR(*r.unc3_mean_cos, 1.0, kTight);
    EXPECT_NEAR(*r.nc3_self_duality, 0.0, kTight);
    EXPECT_NEAR(*r.nc1_cdnv, 0.0, 0.0);  // rows exactly at the means: var_c = 0
    EXPECT_DOUBLE_EQ(*r.nc4_agreement, 1.0);
    // Identical rows: each class matrix is rank one, H = -ln(1 + 1e-10) ~ 0.
    for (const auto& [c, tok] : r.tokens) EXPECT_NEAR(*tok.svd_entropy, 0.0, 1e-9) << c;
  }
}

TEST(ReferenceSanity, ClassBalancedPairIdentity) {
  // mean over P of m_i . m_j = -mean_c ||m_c||^2 / (K - 1), on random data with unequal n_c.
  const int64_t d = 6, V = 9, N = 300;
  std::mt19937_64 gen(5);
  Data data{d, random_matrix(N, d, 6), {}};
  for (int64_t i = 0; i < N; ++i) data.y.push_back(static_cast<int64_t>(gen() % 7));  // 7, 8 absent
  for (int64_t i = 0; i < N; ++i) data.X[i * d] += static_cast<double>(data.y[i]);  // move the means apart
  const ref::ClassStats cs = ref::class_stats(data.X, data.y, d, opts(V));
  const int64_t K = static_cast<int64_t>(cs.kept.size());
  ASSERT_GE(K, 5);
  long double pair_sum = 0, norm_sum = 0;
  int64_t pairs = 0;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t t = 0; t < d; ++t) norm_sum += static_cast<long double>(cs.m[i * d + t]) * cs.m[i * d + t];
    for (int64_t j = i + 1; j < K; ++j, ++pairs)
      for (int64_t t = 0; t < d; ++t) pair_sum += static_cast<long double>(cs.m[i * d + t]) * cs.m[j * d + t];
  }
  const double lhs = static_cast<double>(pair_sum / pairs);
  const double rhs = -static_cast<double>(norm_sum / K) / static_cast<double>(K - 1);
  EXPECT_NEAR(lhs, rhs, 1e-12 * std::fabs(rhs));
  // The centred means sum to zero; with token weighting the n_c-weighted sum does.
  for (int64_t t = 0; t < d; ++t) {
    long double s = 0;
    for (int64_t k = 0; k < K; ++k) s += cs.m[k * d + t];
    EXPECT_NEAR(static_cast<double>(s), 0.0, 1e-13);
  }
  ref::Options tw = opts(V);
  tw.token_weighted_mean = true;
  const ref::ClassStats cw = ref::class_stats(data.X, data.y, d, tw);
  for (int64_t t = 0; t < d; ++t) {
    long double s = 0, all = 0;
    for (int64_t k = 0; k < K; ++k) s += static_cast<long double>(cw.n[k]) * cw.m[k * d + t];
    for (int64_t i = 0; i < N; ++i) all += data.X[i * d + t];
    EXPECT_NEAR(static_cast<double>(s), 0.0, 1e-11);
    EXPECT_NEAR(cw.mu_G[t], static_cast<double>(all / N), 1e-13);  // every class kept here
  }
}

TEST(ReferenceSanity, TwoRowClassEntropyAtMostLn2) {
  const int64_t d = 5, V = 40;
  Data data{d, random_matrix(2 * V, d, 7), {}};
  for (int64_t c = 0; c < V; ++c) data.y.insert(data.y.end(), {c, c});
  for (bool center : {false, true}) {
    ref::Options o = opts(V);
    o.svd_center = center;
    const ref::Result r = ref::compute(data.X, data.y, d, nullptr, nullptr, o);
    ASSERT_EQ(r.tokens.size(), static_cast<size_t>(V));
    for (const auto& [c, tok] : r.tokens) {
      EXPECT_LE(*tok.svd_entropy, std::log(2.0) + 1e-15) << c;
      EXPECT_GE(*tok.svd_entropy, -1e-9) << c;
      EXPECT_NEAR(*tok.normalized_entropy, *tok.svd_entropy / std::log(2.0), 1e-15);
      EXPECT_NEAR(*tok.effective_rank, std::exp(*tok.svd_entropy), 1e-15);
      // Centred, the two rows are +-(x1 - x2)/2: rank one, H ~ 0.
      if (center) {
        EXPECT_NEAR(*tok.svd_entropy, 0.0, 1e-9) << c;
      }
    }
  }
}

TEST(ReferenceSanity, RandomDirectionsHighDimension) {
  // K = 50 random class means in d = 2000: ||u_i - u_j|| ~ sqrt(2), overall_gnc2 ~ -0.347.
  // Class-balanced centring makes the mean cosine -1/(K-1), so the exact expectation is
  // -0.5 ln(2K/(K-1)) = -0.3567 to O(1/d).
  const int64_t K = 50, d = 2000, per_class = 3;
  const auto centres = random_matrix(K, d, 8);
  const auto noise = random_matrix(K * per_class, d, 9, 0.1);
  Data data{d, {}, {}};
  for (int64_t c = 0; c < K; ++c)
    for (int64_t r = 0; r < per_class; ++r) {
      std::vector<double> x(centres.begin() + c * d, centres.begin() + (c + 1) * d);
      for (int64_t t = 0; t < d; ++t) x[t] += noise[(c * per_class + r) * d + t];
      data.add(c, x);
    }
  const ref::Result r = ref::compute(data.X, data.y, d, nullptr, nullptr, opts(K));
  EXPECT_NEAR(*r.overall_gnc2, -0.347, 0.015);
  EXPECT_NEAR(*r.overall_gnc2, -0.5 * std::log(2.0 * K / (K - 1.0)), 2e-3);
  EXPECT_NEAR(*r.nc2_equiangular_mean, -1.0 / (K - 1.0), 2e-3);
  // 150 rows in 2000 dimensions: 150 singular values, 50 large (the centres) and 100 small (noise).
  EXPECT_GT(*r.overall_svd_entropy, std::log(50.0));
  EXPECT_LE(*r.overall_svd_entropy, std::log(150.0));
  EXPECT_FALSE(r.overall_unc3.has_value());  // no classifier
  EXPECT_FALSE(r.nc3_self_duality.has_value());
}

// ---------------------------------------------------------------------------------------------
// Counting, exclusion, min_samples, max_tokens
// ---------------------------------------------------------------------------------------------

// Labels (V = 8, E = {0, 7}): n_0 = 1, n_1 = 2, n_2 = 1, n_3 = 3, n_4 = 2, n_5 = 1, n_6 = 2, n_7 = 4.
Data counting_data() {
  const std::vector<int64_t> labels = {7, 0, 1, 1, 2, 3, 3, 3, 4, 7, 4, 5, 6, 7, 6, 7};
  Data data{2, {}, {}};
  for (size_t i = 0; i < labels.size(); ++i)
    data.add(labels[i], {static_cast<double>(i) + 1.0, static_cast<double>(labels[i]) * 0.5 + 1.0});
  return data;
}

TEST(ReferenceCounts, ExclusionAndMinSamples) {
  const Data data = counting_data();
  ref::Options o = opts(8);
  o.exclude = {0, 7};
  const ref::Result r = ref::compute(data.X, data.y, data.d, nullptr, nullptr, o);
  EXPECT_EQ(r.rows_seen, 16);
  EXPECT_EQ(r.rows_excluded, 5);        // one 0, four 7s (7 is the most frequent label)
  EXPECT_EQ(r.classes_seen, 6);         // 1..6
  EXPECT_EQ(r.classes_below_min, 2);    // 2 and 5
  EXPECT_EQ(r.classes_kept, 4);
  EXPECT_EQ(r.kept, (std::vector<int64_t>{1, 3, 4, 6}));
  EXPECT_EQ(r.rows_kept, 9);
  EXPECT_EQ(r.min_samples, 2);
  EXPECT_EQ(r.max_samples, 3);
  EXPECT_DOUBLE_EQ(*r.avg_samples_per_token, 9.0 / 4.0);
  ASSERT_EQ(r.tokens.size(), 4u);
  EXPECT_EQ(r.tokens.at(3).n, 3);

  o.min_samples = 3;
  const ref::Result r3 = ref::compute(data.X, data.y, data.d, nullptr, nullptr, o);
  EXPECT_EQ(r3.kept, (std::vector<int64_t>{3}));
  EXPECT_EQ(r3.classes_below_min, 5);
  EXPECT_EQ(r3.rows_kept, 3);
  EXPECT_FALSE(r3.overall_gnc2.has_value());      // K = 1
  EXPECT_FALSE(r3.nc2_equinorm_cov.has_value());
  EXPECT_TRUE(r3.overall_svd_entropy.has_value());

  o.min_samples = 1;
  o.exclude = {};
  const ref::Result r1 = ref::compute(data.X, data.y, data.d, nullptr, nullptr, o);
  EXPECT_EQ(r1.rows_excluded, 0);
  EXPECT_EQ(r1.classes_seen, 8);
  EXPECT_EQ(r1.classes_kept, 8);
  EXPECT_EQ(r1.rows_kept, 16);
  EXPECT_EQ(r1.min_samples, 1);
  EXPECT_EQ(r1.max_samples, 4);
}

TEST(ReferenceCounts, MaxTokensTieBreaking) {
  const Data data = counting_data();
  ref::Options o = opts(8);
  o.exclude = {0, 7};
  // Kept before the cut: n_3 = 3, then n_1 = n_4 = n_6 = 2 (tie: smaller id first).
  const std::vector<std::vector<int64_t>> want = {{3}, {1, 3}, {1, 3, 4}, {1, 3, 4, 6}, {1, 3, 4, 6}};
  const std::vector<int64_t> rows = {3, 5, 7, 9, 9};
  for (int64_t T = 1; T <= 5; ++T) {
    o.max_tokens = T;
    const ref::Result r = ref::compute(data.X, data.y, data.d, nullptr, nullptr, o);
    EXPECT_EQ(r.kept, want[T - 1]) << "T = " << T;
    EXPECT_EQ(r.rows_kept, rows[T - 1]) << "T = " << T;
    EXPECT_EQ(r.classes_seen, 6);
    EXPECT_EQ(r.classes_below_min, 2);
    EXPECT_EQ(r.rows_excluded, 5);
  }
}

TEST(ReferenceCounts, EmptyKeptSet) {
  const Data data = counting_data();
  ref::Options o = opts(8);
  o.min_samples = 5;
  o.compute_nc4 = true;
  const std::vector<double> W(16, 1.0);
  const ref::Result r = ref::compute(data.X, data.y, data.d, W.data(), nullptr, o);
  EXPECT_EQ(r.classes_kept, 0);
  EXPECT_EQ(r.rows_kept, 0);
  EXPECT_EQ(r.classes_below_min, 8);
  EXPECT_TRUE(r.kept.empty());
  EXPECT_TRUE(r.tokens.empty());
  EXPECT_FALSE(r.overall_svd_entropy.has_value());
  EXPECT_FALSE(r.overall_gnc2.has_value());
  EXPECT_FALSE(r.nc1_cdnv.has_value());
  EXPECT_FALSE(r.overall_unc3.has_value());
  EXPECT_FALSE(r.nc3_self_duality.has_value());
  EXPECT_FALSE(r.nc4_agreement.has_value());
  EXPECT_FALSE(r.avg_svd_entropy.has_value());
  EXPECT_EQ(r.min_samples, 0);
  EXPECT_EQ(r.max_samples, 0);
}

// ---------------------------------------------------------------------------------------------
// Hand-computed metrics
// ---------------------------------------------------------------------------------------------

// Class 0: (0,0), (2,0) -> mu = (1,0), var = 1.  Class 1: (4,1), (4,-1), (4,0) -> mu = (4,0), var = 2/3.
// Class 2: (1,1), (1,-1) -> mu = (1,0) = mu_0, var = 1.
Data cdnv_data() {
  Data data{2, {}, {}};
  data.add(0, {0, 0});
  data.add(0, {2, 0});
  data.add(1, {4, 1});
  data.add(1, {4, -1});
  data.add(1, {4, 0});
  data.add(2, {1, 1});
  data.add(2, {1, -1});
  return data;
}

TEST(ReferenceHand, CdnvTwoClasses) {
  Data data = cdnv_data();
  data.X.resize(10);  // classes 0 and 1 only
  data.y.resize(5);
  ref::Options o = opts(3);
  const ref::Result r1 = ref::compute(data.X, data.y, 2, nullptr, nullptr, o);
  // (1 + 2/3) / (2 * 3^2) = 5/54
  EXPECT_NEAR(*r1.nc1_cdnv, 5.0 / 54.0, 1e-16);
  o.cdnv_power = 2;
  const ref::Result r2 = ref::compute(data.X, data.y, 2, nullptr, nullptr, o);
  // (1 + 2/3) / (2 * 3^4) = 5/486
  EXPECT_NEAR(*r2.nc1_cdnv, 5.0 / 486.0, 1e-17);
  EXPECT_EQ(r2.cdnv_skipped_pairs, 0);
  // Two classes, class-balanced centring: m_1 = -m_0, ||u_0 - u_1|| = 2 ||m||/(||m|| + 1e-8), ||m|| = 1.5.
  const double dist = 2 * 1.5 / (1.5 + 1e-8);
  EXPECT_NEAR(*r1.overall_gnc2, -std::log(dist), 1e-15);
  EXPECT_EQ(*r1.gnc2_var, 0.0);
  EXPECT_NEAR(*r1.nc2_equiangular_mean, -1.0 * (1.5 / (1.5 + 1e-8)) * (1.5 / (1.5 + 1e-8)), 1e-15);
  EXPECT_EQ(*r1.nc2_equiangular_std, 0.0);
  EXPECT_DOUBLE_EQ(*r1.nc2_equiangular_ideal, -1.0);
  EXPECT_EQ(*r1.nc2_equinorm_cov, 0.0);
}

TEST(ReferenceHand, EqualMeansSkipped) {
  const Data data = cdnv_data();
  const ref::Result r = ref::compute(data.X, data.y, 2, nullptr, nullptr, opts(3));
  // Pairs (0,1) and (2,1) both give 5/54; (0,2) has equal means: skipped in CDNV and in GNC2.
  EXPECT_NEAR(*r.nc1_cdnv, 5.0 / 54.0, 1e-16);
  EXPECT_EQ(r.cdnv_skipped_pairs, 1);
  EXPECT_EQ(r.gnc2_skipped_pairs, 1);
  // mu_G = (2, 0); m_0 = m_2 = (-1, 0), m_1 = (2, 0): u_0 = u_2 = (-a, 0), u_1 = (b, 0).
  const double a = 1 / (1 + 1e-8), b = 2 / (2 + 1e-8);
  EXPECT_NEAR(*r.overall_gnc2, -std::log(a + b), 1e-15);
  EXPECT_NEAR(*r.gnc2_var, 0.0, 1e-30);
  // Equiangularity uses every pair: cos = (-ab, a^2, -ab).
  const double cm = (a * a - 2 * a * b) / 3;
  EXPECT_NEAR(*r.nc2_equiangular_mean, cm, 1e-15);
  const double v = (2 * (-a * b - cm) * (-a * b - cm) + (a * a - cm) * (a * a - cm)) / 3;
  EXPECT_NEAR(*r.nc2_equiangular_std, std::sqrt(v), 1e-15);
  // Norms (1, 2, 1): mean 4/3, unbiased std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3).
  EXPECT_NEAR(*r.nc2_equinorm_cov, std::sqrt(1.0 / 3.0) / (4.0 / 3.0), 1e-15);
  // ln norms (0, ln 2, 0): mean ln2/3, unbiased std = ln 2 / sqrt 3.
  EXPECT_NEAR(*r.nc2_log_norm_std, std::log(2.0) / std::sqrt(3.0), 1e-15);
}

TEST(ReferenceHand, NearlyEqualDirectionsSkippedInGnc2Only) {
  // As cdnv_data, but mu_2 = (1, 1e-7): ||u_0 - u_2|| ~ 1e-7 < 1e-6 is skipped by GNC2, while CDNV
  // skips only exactly equal means and so counts the pair, with a huge ratio.
  Data data = cdnv_data();
  data.X[11] = 1 + 2e-7;  // class 2's first row (1, 1 + 2e-7)
  const ref::Result r = ref::compute(data.X, data.y, 2, nullptr, nullptr, opts(3));
  EXPECT_EQ(r.gnc2_skipped_pairs, 1);
  EXPECT_EQ(r.cdnv_skipped_pairs, 0);
  EXPECT_GT(*r.nc1_cdnv, 1e12);
  const ref::ClassStats cs = ref::class_stats(data.X, data.y, 2, opts(3));
  const double a = std::hypot(cs.u[0], cs.u[1]) , b = std::hypot(cs.u[2], cs.u[3]);
  EXPECT_NEAR(*r.overall_gnc2, -0.5 * (std::log(a + b) + std::log(std::hypot(cs.u[2] - cs.u[4], cs.u[3] - cs.u[5]))),
              1e-12);
}

TEST(ReferenceHand, Unc3AndSelfDuality) {
  // Classes 0 and 1 of cdnv_data: mu_0 = (1,0), mu_1 = (4,0), mu_G = (2.5,0), m = (-1.5,0), (1.5,0).
  Data data = cdnv_data();
  data.X.resize(10);
  data.y.resize(5);
  // W rows: w_0 = (-1, 1) (cos = 1/sqrt2), w_1 = (2, 0) (cos = 1), w_2 unused.
  const std::vector<double> W = {-1, 1, 2, 0, 9, 9};
  const ref::Result r = ref::compute(data.X, data.y, 2, W.data(), nullptr, opts(3));
  const double fm = 1.5 / (1.5 + 1e-8);
  const double c0 = 1.5 / ((std::sqrt(2.0) + 1e-8) * (1.5 + 1e-8)), c1 = 3.0 / ((2 + 1e-8) * (1.5 + 1e-8));
  const double mean = (c0 + c1) / 2, sd = std::fabs(c1 - c0) / std::sqrt(2.0);
  EXPECT_NEAR(*r.unc3_mean_cos, mean, 1e-15);
  EXPECT_NEAR(*r.unc3_std_cos, sd, 1e-15);
  EXPECT_NEAR(*r.overall_unc3, sd / mean, 1e-14);
  EXPECT_LT(std::fabs(c1 - fm), 1e-8);
  // ||W_K||_F = sqrt(6), ||M||_F = sqrt(4.5): W/|W| = (-1,1,2,0)/sqrt6, M/|M| = (-1.5,0,1.5,0)/sqrt4.5.
  const double w = std::sqrt(6.0), mf = std::sqrt(4.5);
  const double sd2 = std::pow(-1 / w + 1.5 / mf, 2) + std::pow(1 / w, 2) + std::pow(2 / w - 1.5 / mf, 2);
  EXPECT_NEAR(*r.nc3_self_duality, std::sqrt(sd2), 1e-15);

  // unc3_classifier: class_means uses the uncentred mu_c: w_0 = (1,0) (cos = -1), w_1 = (4,0) (cos = 1).
  ref::Options o = opts(3);
  o.unc3_class_means = true;
  const ref::Result rm = ref::compute(data.X, data.y, 2, nullptr, nullptr, o);
  ASSERT_TRUE(rm.unc3_mean_cos.has_value());
  EXPECT_NEAR(*rm.unc3_mean_cos, 0.0, 1e-8);
  EXPECT_FALSE(rm.overall_unc3.has_value());  // mean(cos) < 1e-8
  const double mu_f = std::sqrt(17.0);
  const double sd3 = std::pow(1 / mu_f + 1.5 / mf, 2) + std::pow(4 / mu_f - 1.5 / mf, 2);
  EXPECT_NEAR(*rm.nc3_self_duality, std::sqrt(sd3), 1e-15);

  // min_classes_for_unc3 above K: null.
  ref::Options o3 = opts(3);
  o3.min_classes_for_unc3 = 3;
  o3.min_classes_for_gnc2 = 3;
  const ref::Result r3 = ref::compute(data.X, data.y, 2, W.data(), nullptr, o3);
  EXPECT_FALSE(r3.unc3_mean_cos.has_value());
  EXPECT_FALSE(r3.overall_unc3.has_value());
  EXPECT_FALSE(r3.overall_gnc2.has_value());
  EXPECT_FALSE(r3.nc1_cdnv.has_value());
  EXPECT_FALSE(r3.nc2_equiangular_mean.has_value());
  EXPECT_TRUE(r3.nc2_equinorm_cov.has_value());  // needs only K >= 2
}

// Class 0: (-1,0), (-3,0) -> mu (-2,0); class 1: (1,0), (3,0) -> mu (2,0); class 2: (0,5), (0,-1)
// -> mu (0,2). Nearest means: 0, 0, 1, 1, 2, and (0,-1) is equidistant from mu_0 and mu_1 -> 0.
Data nc4_data() {
  Data data{2, {}, {}};
  data.add(0, {-1, 0});
  data.add(0, {-3, 0});
  data.add(1, {1, 0});
  data.add(1, {3, 0});
  data.add(2, {0, 5});
  data.add(2, {0, -1});
  return data;
}

TEST(ReferenceHand, Nc4Agreement) {
  const Data data = nc4_data();
  ref::Options o = opts(3);
  o.compute_nc4 = true;
  // w = (-1,0), (1,0), (0,1): logits for (0,-1) are (0, 0, -1), a tie -> 0, matching the nearest
  // mean's tie -> 0; every other row agrees too.
  const std::vector<double> W3 = {-1, 0, 1, 0, 0, 1};
  EXPECT_DOUBLE_EQ(*ref::compute(data.X, data.y, 2, W3.data(), nullptr, o).nc4_agreement, 1.0);
  // Bias (0, 0.5, 0) breaks the logit tie towards 1: 5/6.
  const std::vector<double> b3 = {0, 0.5, 0};
  EXPECT_DOUBLE_EQ(*ref::compute(data.X, data.y, 2, W3.data(), b3.data(), o).nc4_agreement, 5.0 / 6.0);
  // V = 4: class 3 has no rows but takes part in the argmax: w_3 = (0,-0.5) wins for (0,-1): 5/6.
  o.num_classes = 4;
  const std::vector<double> W4 = {-1, 0, 1, 0, 0, 1, 0, -0.5};
  EXPECT_DOUBLE_EQ(*ref::compute(data.X, data.y, 2, W4.data(), nullptr, o).nc4_agreement, 5.0 / 6.0);
  // b_3 = -1 removes it again.
  const std::vector<double> b4 = {0, 0, 0, -1};
  EXPECT_DOUBLE_EQ(*ref::compute(data.X, data.y, 2, W4.data(), b4.data(), o).nc4_agreement, 1.0);
  // Not requested, or no classifier: null.
  o.compute_nc4 = false;
  EXPECT_FALSE(ref::compute(data.X, data.y, 2, W4.data(), nullptr, o).nc4_agreement.has_value());
  o.compute_nc4 = true;
  EXPECT_FALSE(ref::compute(data.X, data.y, 2, nullptr, nullptr, o).nc4_agreement.has_value());
}

TEST(ReferenceHand, Nc4OnlyKeptRowsAndKeptMeans) {
  Data data = nc4_data();
  data.add(3, {0, -1});  // class 3, a single row: below min_samples, neither a row nor a mean for NC4
  ref::Options o = opts(4);
  o.compute_nc4 = true;
  const std::vector<double> W = {-1, 0, 1, 0, 0, 1, 0, 0};
  const ref::Result r = ref::compute(data.X, data.y, 2, W.data(), nullptr, o);
  EXPECT_EQ(r.rows_kept, 6);
  EXPECT_DOUBLE_EQ(*r.nc4_agreement, 1.0);
}

TEST(ReferenceHand, PerTokenEntropyAndZeroMatrices) {
  // Class 0: rows (3,0), (0,1) -> s = (3, 1). Class 1: two identical rows (1,2) -> rank one; centred it
  // is the zero matrix. Class 2 (d = 2, one row with min_samples = 1) -> min(n, d) = 1.
  Data data{2, {}, {}};
  data.add(0, {3, 0});
  data.add(0, {0, 1});
  data.add(1, {1, 2});
  data.add(1, {1, 2});
  data.add(2, {5, 5});
  ref::Options o = opts(3);
  o.min_samples = 1;
  const ref::Result r = ref::compute(data.X, data.y, 2, nullptr, nullptr, o);
  EXPECT_NEAR(*r.tokens.at(0).svd_entropy, ref::svd_entropy({3, 1}), 1e-15);
  EXPECT_NEAR(*r.tokens.at(0).normalized_entropy, ref::svd_entropy({3, 1}) / std::log(2.0), 1e-15);
  EXPECT_NEAR(*r.tokens.at(1).svd_entropy, 0.0, 1e-9);
  EXPECT_FALSE(r.tokens.at(1).zero_matrix);
  EXPECT_FALSE(r.tokens.at(2).normalized_entropy.has_value());
  EXPECT_EQ(r.svd_zero_matrices, 0);
  const double h[3] = {*r.tokens.at(0).svd_entropy, *r.tokens.at(1).svd_entropy, *r.tokens.at(2).svd_entropy};
  const double avg = (h[0] + h[1] + h[2]) / 3;
  EXPECT_NEAR(*r.avg_svd_entropy, avg, 1e-15);
  const double var = ((h[0] - avg) * (h[0] - avg) + (h[1] - avg) * (h[1] - avg) + (h[2] - avg) * (h[2] - avg)) / 3;
  EXPECT_NEAR(*r.std_svd_entropy, std::sqrt(var), 1e-15);

  o.svd_center = true;
  const ref::Result rc = ref::compute(data.X, data.y, 2, nullptr, nullptr, o);
  // Class 0 centred: (1.5,-0.5), (-1.5,0.5): rank one. Class 1 and class 2 centred: zero matrices.
  EXPECT_NEAR(*rc.tokens.at(0).svd_entropy, 0.0, 1e-9);
  EXPECT_TRUE(rc.tokens.at(1).zero_matrix);
  EXPECT_EQ(*rc.tokens.at(1).svd_entropy, 0.0);
  EXPECT_EQ(*rc.tokens.at(1).effective_rank, 1.0);
  EXPECT_TRUE(rc.tokens.at(2).zero_matrix);
  EXPECT_EQ(rc.svd_zero_matrices, 2);
  // The overall entropy never centres: the stacked rows are the same with or without svd_center.
  EXPECT_EQ(*rc.overall_svd_entropy, *r.overall_svd_entropy);
}

TEST(ReferenceHand, OverallEntropyOfKeptRowsOnly) {
  // Kept rows (classes 0, 1): (3,0), (3,0), (0,1), (0,1) -> X^T X = diag(18, 2), s = (sqrt 18, sqrt 2).
  // Class 2's single row is not kept and must not count.
  Data data{2, {}, {}};
  data.add(0, {3, 0});
  data.add(1, {0, 1});
  data.add(0, {3, 0});
  data.add(2, {7, 7});
  data.add(1, {0, 1});
  const ref::Result r = ref::compute(data.X, data.y, 2, nullptr, nullptr, opts(3));
  const double H = ref::svd_entropy({std::sqrt(18.0), std::sqrt(2.0)});
  EXPECT_NEAR(*r.overall_svd_entropy, H, 1e-15);
  EXPECT_NEAR(*r.overall_effective_rank, std::exp(H), 1e-15);
}

TEST(ReferenceHand, RowOrderDoesNotMatter) {
  const int64_t d = 7, V = 6, N = 200;
  Data data{d, random_matrix(N, d, 21), {}};
  std::mt19937_64 gen(22);
  for (int64_t i = 0; i < N; ++i) data.y.push_back(static_cast<int64_t>(gen() % V));
  const auto W = random_matrix(V, d, 23);
  ref::Options o = opts(V);
  o.compute_nc4 = true;
  const ref::Result a = ref::compute(data.X, data.y, d, W.data(), nullptr, o);
  Data rev{d, {}, {}};
  for (int64_t i = N - 1; i >= 0; --i)
    rev.add(data.y[i], std::vector<double>(data.X.begin() + i * d, data.X.begin() + (i + 1) * d));
  const ref::Result b = ref::compute(rev.X, rev.y, d, W.data(), nullptr, o);
  EXPECT_NEAR(*a.overall_svd_entropy, *b.overall_svd_entropy, 1e-13);
  EXPECT_NEAR(*a.overall_gnc2, *b.overall_gnc2, 1e-13);
  EXPECT_NEAR(*a.nc1_cdnv, *b.nc1_cdnv, 1e-13);
  EXPECT_NEAR(*a.unc3_mean_cos, *b.unc3_mean_cos, 1e-13);
  EXPECT_EQ(*a.nc4_agreement, *b.nc4_agreement);
  for (const auto& [c, tok] : a.tokens) EXPECT_NEAR(*tok.svd_entropy, *b.tokens.at(c).svd_entropy, 1e-13);
}

TEST(ReferenceHand, RejectsBadInput) {
  const std::vector<double> X = {1, 2};
  EXPECT_THROW(ref::compute(X, {5}, 2, nullptr, nullptr, opts(3)), std::invalid_argument);
  EXPECT_THROW(ref::compute(X, {0, 0}, 2, nullptr, nullptr, opts(3)), std::invalid_argument);
}

}  // namespace
}  // namespace test_reference
