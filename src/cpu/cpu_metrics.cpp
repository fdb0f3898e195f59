// Every metric of docs/METRICS.md on the CPU, from the accumulators of cpu_backend.cpp.
// Pair metrics are reduced tile by tile (a dgemm of centred means, then one fused loop): no K x K
// matrix is ever allocated.
#include <cblas.h>
#include <lapacke.h>
#include <omp.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <string>

#include "base/error.hpp"
#include "base/interrupt.hpp"
#include "core/metric_math.hpp"
#include "core/metric_summary.hpp"
#include "core/pair_part.hpp"
#include "core/shifted_sums.hpp"
#include "cpu/blas_threads.hpp"
#include "cpu/cpu_backend.hpp"

namespace collapse::internal {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A running first argmax: the largest value seen so far and its index. scan_argmax(v, a, b, n, off, r)
// is a strict left-to-right scan of x_c = a * v[c] + b[c] (b may be null: 0), c < n, at indices
// off + c: r takes x_c when x_c > r.v, so ties keep the earlier index and NaNs never win (a NaN in
// r.v keeps it: what a scan that starts at a NaN gives). a * v is exact for the a = 1 and 2 used.
// (ArgBest itself is in cpu_backend.hpp: Nc4Blocks holds each thread's.)

void scan_argmax_scalar(const double* v, double a, const double* b, int64_t n, int64_t off, ArgBest& r) {
    for (int64_t c = 0; c < n; ++c) {
        const double x = a * v[c] + (b ? b[c] : 0.0);
        if (x > r.v) r.v = x, r.i = off + c;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same scan in SIMD lanes: each lane keeps its own strict running maximum and the index where
// it was reached (-1: never above r.v); the lanes merge to the largest value and, among lanes that
// hold it, the smallest index, which is the first occurrence overall; the tail then scans on.
// Compiled for AVX2 / AVX-512 by function attributes and picked at run time, so the build needs no
// -march flag and runs on any x86-64.
void merge_lanes(const double* mv, const int64_t* iv, int lanes, ArgBest& r) {
    for (int k = 0; k < lanes; ++k)
        if (iv[k] >= 0 && (mv[k] > r.v || (mv[k] == r.v && iv[k] < r.i))) r.v = mv[k], r.i = iv[k];
}

__attribute__((target("avx512f"))) void scan_argmax_avx512(const double* v, double a, const double* b, int64_t n, int64_t off,
                                                           ArgBest& r) {
    const __m512d va = _mm512_set1_pd(a), zero = _mm512_setzero_pd();
    __m512d m0 = _mm512_set1_pd(r.v), m1 = m0;
    __m512i i0 = _mm512_set1_epi64(-1), i1 = i0;
    __m512i c0 = _mm512_add_epi64(_mm512_set1_epi64(off), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    __m512i c1 = _mm512_add_epi64(c0, _mm512_set1_epi64(8));
    const __m512i step = _mm512_set1_epi64(16);
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        const __m512d x0 = _mm512_add_pd(_mm512_mul_pd(va, _mm512_loadu_pd(v + c)), b ? _mm512_loadu_pd(b + c) : zero);
        const __m512d x1 = _mm512_add_pd(_mm512_mul_pd(va, _mm512_loadu_pd(v + c + 8)), b ? _mm512_loadu_pd(b + c + 8) : zero);
        const __mmask8 k0 = _mm512_cmp_pd_mask(x0, m0, _CMP_GT_OQ), k1 = _mm512_cmp_pd_mask(x1, m1, _CMP_GT_OQ);
        m0 = _mm512_mask_mov_pd(m0, k0, x0), i0 = _mm512_mask_mov_epi64(i0, k0, c0);
        m1 = _mm512_mask_mov_pd(m1, k1, x1), i1 = _mm512_mask_mov_epi64(i1, k1, c1);
        c0 = _mm512_add_epi64(c0, step), c1 = _mm512_add_epi64(c1, step);
    }
    alignas(64) double mv[16];
    alignas(64) int64_t iv[16];
    _mm512_store_pd(mv, m0), _mm512_store_pd(mv + 8, m1);
    _mm512_store_si512((void*)iv, i0), _mm512_store_si512((void*)(iv + 8), i1);
    merge_lanes(mv, iv, 16, r);
    scan_argmax_scalar(v + c, a, b ? b + c : nullptr, n - c, off + c, r);
}

__attribute__((target("avx2"))) void scan_argmax_avx2(const double* v, double a, const double* b, int64_t n, int64_t off, ArgBest& r) {
    const __m256d va = _mm256_set1_pd(a), zero = _mm256_setzero_pd();
    __m256d m0 = _mm256_set1_pd(r.v), m1 = m0;
    __m256d i0 = _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), i1 = i0;  // indices, moved as bits
    __m256i c0 = _mm256_add_epi64(_mm256_set1_epi64x(off), _mm256_setr_epi64x(0, 1, 2, 3));
    __m256i c1 = _mm256_add_epi64(c0, _mm256_set1_epi64x(4));
    const __m256i step = _mm256_set1_epi64x(8);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256d x0 = _mm256_add_pd(_mm256_mul_pd(va, _mm256_loadu_pd(v + c)), b ? _mm256_loadu_pd(b + c) : zero);
        const __m256d x1 = _mm256_add_pd(_mm256_mul_pd(va, _mm256_loadu_pd(v + c + 4)), b ? _mm256_loadu_pd(b + c + 4) : zero);
        const __m256d k0 = _mm256_cmp_pd(x0, m0, _CMP_GT_OQ), k1 = _mm256_cmp_pd(x1, m1, _CMP_GT_OQ);
        m0 = _mm256_blendv_pd(m0, x0, k0), i0 = _mm256_blendv_pd(i0, _mm256_castsi256_pd(c0), k0);
        m1 = _mm256_blendv_pd(m1, x1, k1), i1 = _mm256_blendv_pd(i1, _mm256_castsi256_pd(c1), k1);
        c0 = _mm256_add_epi64(c0, step), c1 = _mm256_add_epi64(c1, step);
    }
    alignas(32) double mv[8];
    alignas(32) int64_t iv[8];
    _mm256_store_pd(mv, m0), _mm256_store_pd(mv + 4, m1);
    _mm256_store_si256((__m256i*)iv, _mm256_castpd_si256(i0)), _mm256_store_si256((__m256i*)(iv + 4), _mm256_castpd_si256(i1));
    merge_lanes(mv, iv, 8, r);
    scan_argmax_scalar(v + c, a, b ? b + c : nullptr, n - c, off + c, r);
}
#endif

using ScanArgmax = void (*)(const double*, double, const double*, int64_t, int64_t, ArgBest&);
ScanArgmax pick_scan_argmax() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return scan_argmax_avx512;
    if (__builtin_cpu_supports("avx2")) return scan_argmax_avx2;
#endif
    return scan_argmax_scalar;
}
const ScanArgmax scan_argmax = pick_scan_argmax();

// LAPACK's dsyevd (jobz = 'N') allocates its own workspace of 2n + 1 doubles; with the eigenvalues
// and the n x n matrix this is what an eigen-decomposition of a Gram costs.
int64_t gram_eigen_bytes(int64_t n) { return add_bytes(mul_bytes(n, n, 8), mul_bytes(3 * n + 2, 8)); }

// The r largest singular values from the eigenvalues of a symmetric n x n matrix (upper triangle).
std::vector<double> singular_from_gram(std::vector<double>& g, int64_t n, int64_t r) {
    std::vector<double> w((size_t)n);
    if (n > 0) symmetric_eigenvalues(g.data(), n, w.data(), "a Gram");
    return singular_values_from_eigen(w.data(), n, r);
}

// All min(n, d) singular values of an n x d matrix (row-major), minus `center` per row if
// given. Small matrices go straight to LAPACK's SVD; large ones through the Gram of the smaller
// side, and so do small ones whose SVD (a copy and LAPACK's workspace) would not fit the budget.
// `what` names the matrix in a refusal.
constexpr int64_t kDirectElements = int64_t(1) << 25;  // 256 MiB of doubles

// dgesdd with jobz = 'N' on an n x d matrix: the copy, the singular values, an integer workspace of
// 8r and (the optimal) real workspace of about 3r + max(n, d, 7r) + (n + d) * 64 doubles.
int64_t direct_svd_bytes(int64_t n, int64_t d) {
    const int64_t r = std::min(n, d), mx = std::max(n, d);
    return add_bytes(mul_bytes(n, d, 8), mul_bytes(add_bytes(4 * r + std::max(mx, 7 * r), mul_bytes(n + d, 64)), 8) + 32 * r);
}

// All min(n, d) singular values by LAPACK's SVD of a centred copy, made in `a` (the caller counts
// direct_svd_bytes). Touches no budget: the per-token threads call it.
std::vector<double> direct_singular_values(const double* x, int64_t n, int64_t d, const double* center, std::vector<double>& a) {
    const int64_t r = std::min(n, d);
    a.resize((size_t)(n * d));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) a[(size_t)(i * d + j)] = x[i * d + j] - (center ? center[j] : 0.0);
    std::vector<double> s((size_t)r);
    // The row-major n x d matrix is the column-major d x n one: same singular values, and
    // column-major takes the dummy leading dimensions of jobz = 'N'.
    const int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'N', (int)d, (int)n, a.data(), (int)d, s.data(), nullptr, 1, nullptr, 1);
    if (info != 0) fail(COLLAPSE_ERR_INTERNAL, "LAPACKE_dgesdd failed with info = ", info, " (", n, " x ", d, ")");
    return s;
}

// Tall classes (n >= kCholQrRowsPerCol * d) go through CholeskyQR2 first: dgesdd reduces a tall
// matrix by an unblocked LQ (LAPACK's crossover keeps d = 64 on level-2 code: 64 sweeps over the
// rows), while CholeskyQR2 is three level-3 sweeps (dsyrk, dtrsm, dsyrk) and an SVD of d x d.
constexpr int64_t kCholQrRowsPerCol = 2;

// The centred copy, two d x d triangles and dgesdd of the d x d product.
int64_t cholqr_svd_bytes(int64_t n, int64_t d) { return add_bytes(mul_bytes(n, d, 8), add_bytes(mul_bytes(2 * d, d, 8), direct_svd_bytes(d, d))); }

// CholeskyQR2 (Yamamoto, Nakatsukasa, Yanagisawa, Fukaya 2015) on the centred copy of X in `a`,
// stored column-major n x d (the transpose of the store's layout: OpenBLAS's right-side dtrsm and
// transposed dsyrk on a tall column-major matrix ran 2.3x and 1.4x faster than the left-side ones
// on the row-major rows, d = 64): G1 = X^T X = U1^T U1, Y = X U1^-1, G2 = Y^T Y = U2^T U2, and
// X = (Y U2^-1)(U2 U1): the singular values of X are those of R = U2 U1 (d x d). Returns false
// (and leaves s alone) when the result cannot be trusted; the caller then runs dgesdd.
// The test: both Choleskys succeed and ||G2 - I||_F <= 1/2, i.e. every eigenvalue of G2 lies in
// [1/2, 3/2], so cond(Y) <= sqrt(3). That is measured, not estimated: G2 is Y^T Y up to rounding of
// O(n eps) on a matrix of norm ~1. With Y that well conditioned the second step is Householder-like
// (orthogonality and backward error O(poly(d) eps), Yamamoto et al. Thm 3.3), and the first step's
// triangular solve has a row-wise backward error O(d eps |U1|), so X = Q R + E with
// ||E|| = O(poly(d) eps ||X||) whatever cond(X) is, as for dgesdd. The test fails around
// cond(X) ~ 1e7..1e8 (G1's rounding, eps cond(X)^2, reaches G2's diagonal): rank-deficient
// classes (repeated rows, rows in a subspace) and very tight clusters far from the origin go to
// dgesdd (tests/cpu/test_token_svd_tall.cpp checks both routes against the float64 reference).
bool cholqr2_singular_values(const double* x, int64_t n, int64_t d, const double* center, std::vector<double>& a, std::vector<double>& s) {
    a.resize((size_t)(n * d + 2 * d * d));
    double* y = a.data();
    double* g1 = y + n * d;
    double* g2 = g1 + d * d;
    // The transposed copy, 8 rows at a time: each column gets a whole cache line per step.
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
        const int64_t i1 = std::min(n, i0 + 8);
        for (int64_t j = 0; j < d; ++j) {
            const double c = center ? center[j] : 0.0;
            for (int64_t i = i0; i < i1; ++i) y[j * n + i] = x[i * d + j] - c;
        }
    }
    const int D = (int)d, N = (int)n;
    cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, D, N, 1.0, y, N, 0.0, g1, D);
    if (LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', D, g1, D) != 0) return false;
    cblas_dtrsm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, N, D, 1.0, g1, D, y, N);  // Y = X U1^-1
    cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, D, N, 1.0, y, N, 0.0, g2, D);
    double off = 0;
    for (int64_t j = 0; j < d; ++j)
        for (int64_t i = 0; i <= j; ++i) {
            const double e = g2[j * d + i] - (i == j ? 1.0 : 0.0);
            off += (i == j ? 1.0 : 2.0) * e * e;
        }
    if (!(off <= 0.25)) return false;  // NaN and Inf fail too
    if (LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', D, g2, D) != 0) return false;
    for (int64_t j = 0; j < d; ++j)
        for (int64_t i = j + 1; i < d; ++i) g1[j * d + i] = 0.0;  // U1's strict lower part, for dtrmm
    cblas_dtrmm(CblasColMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, D, D, 1.0, g2, D, g1, D);  // g1 = U2 U1
    std::vector<double> r;
    s = direct_singular_values(g1, d, d, nullptr, r);
    return true;
}

std::vector<double> singular_values(HostBudget& budget, const double* x, int64_t n, int64_t d, const double* center,
                                    const std::function<std::string()>& what) {
    const int64_t r = std::min(n, d);
    if (r == 0) return {};
    const int64_t direct = token_svd_bytes(n, d);
    HostBudget::Lease lease;
    if (n * d <= kDirectElements && budget.fits(direct)) {
        lease = budget.reserve(direct, what());
        std::vector<double> a;
        return class_singular_values(x, n, d, center, a);
    }
    // Gram of the smaller side.
    const bool rows_side = n < d;  // X X^T (n x n) when n < d, else X^T X (d x d)
    const int64_t m = rows_side ? n : d;
    // The Gram, the centred copy (all rows, or add_centered_gram's blocks of 512) and dsyevd.
    lease = budget.reserve(add_bytes(gram_eigen_bytes(m), rows_side ? mul_bytes(n, d, 8) : mul_bytes(std::min<int64_t>(512, n), d, 8)), what(),
                           kFixTokenSvd);
    std::vector<double> g((size_t)(m * m), 0.0);
    if (!rows_side) {
        add_centered_gram(x, n, d, center, g.data());
    } else {
        std::vector<double> a((size_t)(n * d));
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < d; ++j) a[(size_t)(i * d + j)] = x[i * d + j] - (center ? center[j] : 0.0);
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)n, (int)d, 1.0, a.data(), (int)d, 0.0, g.data(), (int)n);
    }
    return singular_from_gram(g, m, r);
}

}  // namespace

// What class_singular_values may hold at once (CholeskyQR2 and, if its check fails, dgesdd).
int64_t token_svd_bytes(int64_t n, int64_t d) {
    return n >= kCholQrRowsPerCol * d ? std::max(direct_svd_bytes(n, d), cholqr_svd_bytes(n, d)) : direct_svd_bytes(n, d);
}

std::vector<double> class_singular_values(const double* x, int64_t n, int64_t d, const double* center, std::vector<double>& a, bool* cholqr) {
    std::vector<double> s;
    const bool tall = n >= kCholQrRowsPerCol * d && cholqr2_singular_values(x, n, d, center, a, s);
    if (cholqr) *cholqr = tall;
    return tall ? s : direct_singular_values(x, n, d, center, a);
}

void symmetric_eigenvalues(double* g, int64_t n, double* w, const char* what) {
    // A row-major upper triangle is LAPACK's column-major lower one: asking for that spares
    // LAPACKE's transposed n x n copy (memory the budget does not count, and time: a third of a
    // 64 x 64 window's eigenvalues).
    const int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'L', (int)n, g, (int)n, w);
    if (info != 0) fail(COLLAPSE_ERR_INTERNAL, "LAPACKE_dsyevd failed with info = ", info, " (", what, ", n = ", n, ")");
}

// ---------------------------------------------------------------------------------------------
// NC4's tiles: a tile is tile_rows(d) rows of the block times a chunk of kTileCols classifier rows
// (or kept means), whose products stay in L2/L3 while the argmax reads them, so the logits never
// go through memory. W is read once per tile of rows from many classes: taller tiles amortise
// BLAS's packing of W's chunk, and the wider the rows, the more a pass over W costs against the
// tile's own products. (Measured: at d = 64, 128 x 1024 beat 64 x 1024, 128 x 512, 256 x 256 and
// 192 x 512, 256 x 1024 was even; at d = 1024, 512 x 1024 took 1.08-1.11x the dgemm floor against
// 1.20x for 128 x 1024.)
constexpr int64_t kTileCols = 1024;
int64_t tile_rows(int64_t d) { return std::clamp<int64_t>(d / 2, 128, 512); }

Nc4Blocks::Nc4Blocks(HostBudget& budget, int64_t d, const Classifier& clf, int64_t V, const std::vector<double>& mu_kept,
                     const std::vector<double>& mu_sq, const std::vector<int32_t>& kept_ids, int64_t rows_hint, int64_t* slot_hits,
                     int64_t max_block)
    : d_(d), V_(V), K_((int64_t)kept_ids.size()), clf_(clf), mu_(mu_kept), ids_(kept_ids), slot_hits_(slot_hits) {
    if (rows_hint <= 0) return;
    threads_ = std::max(1, omp_get_max_threads());
    // A block row: the row, its slot and verdict; each thread's tile. The
    // block is up to 4096 rows (max_block) or 256 MiB: rows of many classes gathered so that tiles
    // are full. Short of memory the block shrinks to 16 rows, then the tile to 8 columns, and is
    // refused below.
    const int64_t per_row = add_bytes(mul_bytes(d_, 8), 5);
    const int64_t least = std::max<int64_t>(1, std::min<int64_t>(rows_hint, 16));
    int64_t B = std::max(least, std::min<int64_t>({rows_hint, max_block, (int64_t(256) << 20) / per_row}));
    const int64_t rows = tile_rows(d_);
    int64_t E = rows * kTileCols;
    auto shape = [&](int64_t b, int64_t e, int64_t& R, int64_t& Cv, int64_t& Ck) {
        R = std::min(b, rows);
        Cv = std::min(V_, std::max<int64_t>(8, e / R)), Ck = std::min(K_, std::max<int64_t>(8, e / R));
    };
    auto bytes = [&](int64_t b, int64_t e) {
        int64_t R, Cv, Ck;
        shape(b, e, R, Cv, Ck);
        // Per thread: the tile, and each tile row's two running argmaxes.
        const int64_t per_thread = add_bytes(mul_bytes(R, mul_bytes(std::max(Cv, Ck), 8)), mul_bytes(R, 2 * sizeof(ArgBest)));
        return add_bytes(add_bytes(mul_bytes(b, per_row), mul_bytes(K_, 8)), mul_bytes(threads_, per_thread));
    };
    while (!budget.fits(bytes(B, E)) && (B > least || E > 8 * std::min(B, rows))) {
        if (B > least) B = std::max(least, B / 2);
        else E = std::max(8 * std::min(B, rows), E / 2);
    }
    shape(B, E, R_, Cv_, Ck_);
    lease_ = budget.reserve(bytes(B, E), "NC4's logits tiles (" + std::to_string(threads_) + " x " + std::to_string(R_) + " rows x " +
                                             std::to_string(std::max(Cv_, Ck_)) + " of V = " + std::to_string(V_) +
                                             " classifier rows and K = " + std::to_string(K_) + " kept means) and a block of " +
                                             std::to_string(B) + " rows",
                            "compute_nc4: false skips NC4; or raise host_memory_limit");
    B_ = B;
    neg_mu_sq_.resize((size_t)K_);
    for (int64_t s = 0; s < K_; ++s) neg_mu_sq_[(size_t)s] = -mu_sq[(size_t)s];
    block_.resize((size_t)(B * d_));
    tiles_.resize((size_t)(threads_ * R_ * std::max(Cv_, Ck_)));
    best_.resize((size_t)(threads_ * 2 * R_));
    slot_.resize((size_t)B);
    hit_.resize((size_t)B);
}

void Nc4Blocks::add(const double* x, int64_t n, int32_t slot) {
    if (n > 0 && B_ == 0) fail(COLLAPSE_ERR_INTERNAL, "NC4: rows beyond the rows announced");
    // Rows of one class: the slots of a block's worth at a time.
    for (int64_t r0 = 0; r0 < n;) {
        const int64_t k = waiting_ > 0 ? std::min(n - r0, B_ - waiting_) : std::min(n - r0, B_);
        std::vector<int32_t>& s = slot_;
        if (waiting_ == 0 && k == B_) {  // a whole block straight from the caller's rows
            std::fill(s.begin(), s.begin() + k, slot);
            run(x + r0 * d_, k, s.data());
        } else {
            std::memcpy(block_.data() + waiting_ * d_, x + r0 * d_, (size_t)(k * d_) * 8);
            std::fill(s.begin() + waiting_, s.begin() + waiting_ + k, slot);
            if ((waiting_ += k) == B_) run(block_.data(), B_, s.data()), waiting_ = 0;
        }
        r0 += k;
    }
}

void Nc4Blocks::add(const double* x, int64_t n, const int32_t* slots) {
    if (n > 0 && B_ == 0) fail(COLLAPSE_ERR_INTERNAL, "NC4: rows beyond the rows announced");
    for (int64_t r0 = 0; r0 < n;) {
        const int64_t k = std::min(n - r0, B_ - waiting_);
        std::memcpy(block_.data() + waiting_ * d_, x + r0 * d_, (size_t)(k * d_) * 8);
        for (int64_t i = 0; i < k; ++i) slot_[(size_t)(waiting_ + i)] = slots ? slots[r0 + i] : -1;
        if ((waiting_ += k) == B_) run(block_.data(), B_, slot_.data()), waiting_ = 0;
        r0 += k;
    }
}

int64_t Nc4Blocks::finish() {
    if (waiting_ > 0) run(block_.data(), waiting_, slot_.data()), waiting_ = 0;
    return agree_;
}

// One block, tile by tile: each tile of rows goes to a thread (BLAS on one thread inside), which
// multiplies it by W a chunk of classifier rows at a time and carries each row's running argmax
// over the chunks (ascending, so ties keep the smaller id), then the same over the kept means.
// Rows are independent, so the tiling changes no verdict; the hits are counted in row order.
void Nc4Blocks::run(const double* x, int64_t n, const int32_t* slots) {
    if (n <= 0) return;
    const int64_t V = V_, K = K_, d = d_, R = R_, tiles = (n + R - 1) / R;
    const int threads = (int)std::min<int64_t>(threads_, tiles);
    const double* bias = clf_.bias.empty() ? nullptr : clf_.bias.data();
    int64_t agree = 0;
    const OneBlasThread one(threads > 1);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : agree) if (threads > 1)
    for (int64_t t = 0; t < tiles; ++t) {
        if (interrupt_requested()) continue;  // the tiles left are skipped; thrown below
        const int64_t r0 = t * R, nr = std::min(R, n - r0);
        const double* xt = x + r0 * d;
        double* tile = tiles_.data() + (size_t)omp_get_thread_num() * (size_t)(R * std::max(Cv_, Ck_));
        ArgBest* best = best_.data() + (size_t)omp_get_thread_num() * (size_t)(2 * R);
        ArgBest* near = best + R;
        // The largest of `scale` * (x . m_c) + add[c] over the m_c (rows of m, `count` of them), chunk by chunk.
        auto argmax_over = [&](const double* m, int64_t count, int64_t chunk, double scale, const double* add, ArgBest* r) {
            for (int64_t c0 = 0; c0 < count; c0 += chunk) {
                const int64_t nc = std::min(chunk, count - c0);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)nc, (int)d, 1.0, xt, (int)d, m + c0 * d, (int)d, 0.0, tile,
                            (int)nc);
                for (int64_t i = 0; i < nr; ++i) {
                    const double* v = tile + i * nc;
                    if (c0 == 0) r[i] = ArgBest{scale * v[0] + (add ? add[0] : 0.0), 0};  // the scan starts at c = 0
                    scan_argmax(v, scale, add ? add + c0 : nullptr, nc, c0, r[i]);
                }
            }
        };
        argmax_over(clf_.weight.data(), V, Cv_, 1.0, bias, best);
        // The nearest mean: ||x - mu||^2 = ||x||^2 - 2 x.mu + ||mu||^2, ||x||^2 the same for every
        // class, so the largest 2 x.mu - ||mu||^2 (exactly minus ||mu||^2 - 2 x.mu, rounding is
        // symmetric); kept ids ascend, so ties keep the smaller id.
        argmax_over(mu_.data(), K, Ck_, 2.0, neg_mu_sq_.data(), near);
        for (int64_t i = 0; i < nr; ++i) {
            const bool hit = best[i].i == ids_[(size_t)near[i].i];
            hit_[(size_t)(r0 + i)] = hit ? 1 : 0;
            agree += hit ? 1 : 0;
        }
    }
    throw_if_interrupted();
    agree_ += agree;
    if (slot_hits_)
        for (int64_t i = 0; i < n; ++i)
            if (hit_[(size_t)i] && slots[i] >= 0) ++slot_hits_[slots[i]];
}

int64_t nc4_agreements(HostBudget& budget, const double* x, int64_t rows, int64_t d, const Classifier& clf, int64_t V,
                       const std::vector<double>& mu_kept, const std::vector<double>& mu_sq,
                       const std::vector<int32_t>& kept_ids, const int32_t* row_slot, int64_t* slot_hits) {
    if (rows <= 0 || kept_ids.empty()) return 0;
    Nc4Blocks nc4(budget, d, clf, V, mu_kept, mu_sq, kept_ids, rows, row_slot ? slot_hits : nullptr);
    nc4.add(x, rows, row_slot);
    return nc4.finish();
}

// The kept means, their within-class variances and the centred means (compute() and the root's
// pair_inputs: one expression, so the same bits).
void CpuBackend::class_means(const KeptSet& kept, std::vector<double>& mu, std::vector<double>& var, std::vector<double>& m) const {
    const size_t K = kept.ids.size();
    const size_t d = (size_t)d_;
    mu.assign(K * d, 0.0), var.assign(K, 0.0), m.assign(K * d, 0.0);
    std::vector<double> mu_g(d, 0.0);
    double weight_total = 0;
    for (size_t s = 0; s < K; ++s) {
        const int32_t c = kept.ids[s];
        const double n = (double)count_[(size_t)c];
        for (size_t j = 0; j < d; ++j) mu[s * d + j] = sum_[(size_t)c * d + j] / n;
        // About the class's reference row: E||x||^2 - ||mu||^2 would cancel for tight classes.
        var[s] = class_variance(sqdev_[(size_t)c], count_[(size_t)c], sum_.data() + (size_t)c * d, shifted_ ? shift_.data() + (size_t)c * d : nullptr, d_);
        const double w = cfg_.global_mean == COLLAPSE_MEAN_TOKEN_WEIGHTED ? n : 1.0;
        for (size_t j = 0; j < d; ++j) mu_g[j] += w * mu[s * d + j];
        weight_total += w;
    }
    // With every row kept (exact mode), the within-class variance is taken about the final mean.
    // Rows spread over ranks: their owners' variances (cpu_ranks.cpp; reservoirs give none).
    if (spread_ready() && has_row_store()) spread_results(kept, &var, nullptr);
    else if (has_row_store()) store_variances(kept, mu, var);
    for (size_t j = 0; j < d; ++j) mu_g[j] = weight_total > 0 ? mu_g[j] / weight_total : 0.0;
    for (size_t s = 0; s < K; ++s)
        for (size_t j = 0; j < d; ++j) m[s * d + j] = mu[s * d + j] - mu_g[j];
}

// ---------------------------------------------------------------------------------------------
MetricValues CpuBackend::compute(const KeptSet& kept, const Classifier& clf) {
    MetricValues out;
    const auto t0 = Clock::now();
    const size_t K = kept.ids.size();
    // Finalisation needs room: rows the exact store still holds in memory go to disk when they
    // take more than is left free (they come back a group of classes at a time).
    if (has_row_store() && store_->memory_bytes() > 0 && store_->memory_bytes() >= budget_->available()) {
        store_->spill_memory();
        held_.update(held_rows_bytes());
    }

    // Class means, within-class variances, global mean, centred means (and the copy of the kept
    // ids each pass over the row store sorts).
    const HostBudget::Lease means = budget_->reserve(
        add_bytes(mul_bytes((int64_t)K, 2 * d_ + 2, 8), mul_bytes((int64_t)K, 4) + 8 * d_),
        "the means of K = " + std::to_string(K) + " kept classes of width d = " + std::to_string(d_) + " (two [K, d] matrices)", kFixKeptClasses);
    std::vector<double> mu, var, m;
    class_means(kept, mu, var, m);
    if (cfg_.per_class_arrays) out.per_class.within_variance = var;
    if (cfg_.keep_class_means) {
        // The result carries them past this call (the exports).
        budget_->check(mul_bytes((int64_t)K, 2 * d_, 8), "a copy of the class means [K, d] = [" + std::to_string(K) + ", " + std::to_string(d_) + "] for the exports",
                       kFixKeptClasses);
        out.class_means = mu;
    }
    out.timings["means"] = seconds_since(t0);

    if (K == 0) out.notes["overall"] = "no kept classes: every metric is null";
    if (cfg_.compute_class_metrics && K > 0) {
        const auto t = Clock::now();
        class_metrics(kept, clf, mu, m, var, out);
        out.timings["class_metrics"] = seconds_since(t);
    }
    if (cfg_.compute_overall_metrics && K > 0) {
        const auto t = Clock::now();
        overall_entropy(kept, out);
        out.timings["overall_svd"] = seconds_since(t);
    }
    if (has_row_store()) out.row_store = {{"spilled_bytes", store_->disk_bytes()}, {"spill_flushes", store_->flushes()}};
    if (cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF && K > 0) {
        const auto t = Clock::now();
        if (spread_ready()) spread_results(kept, nullptr, &out);  // the owners' SVDs
        else token_metrics(kept, mu, out);
        out.timings["token_svd"] = seconds_since(t);
    }
    if (cfg_.compute_nc4 && K > 0) {
        const auto t = Clock::now();
        if (!clf.present()) {
            out.notes["nc4_agreement"] = "no classifier was given";
        } else if (pass2_ && pass2_nc4_ && cfg_.nc4_held_out) {
            // Held-out rows: the means of this input, the agreement on another one's rows.
            out.nc4_held_out = true;
            out.nc4_rows = pass2_rows_;
            if (pass2_rows_ > 0) out.nc4_agreement = (double)nc4_agree_ / (double)pass2_rows_;
            else out.notes["nc4_agreement"] = "no held-out row belongs to a kept class";
            out.per_class.nc4_hits = nc4_hits2_, out.per_class.nc4_rows = nc4_rows2_;
        } else if (cfg_.nc4_held_out) {
            out.notes["nc4_agreement"] = "held-out NC4 is measured in the second pass over the held-out rows";
        } else if (spread_ready() && has_row_store()) {
            // Every owner's NC4 over its classes' rows (cpu_ranks.cpp).
            out.nc4_rows = spread_->nc4_rows;
            if (spread_->nc4_rows > 0) out.nc4_agreement = (double)spread_->nc4_agree / (double)spread_->nc4_rows;
            if (cfg_.per_class_arrays) out.per_class.nc4_hits = spread_->nc4_hits, out.per_class.nc4_rows = spread_->nc4_class_rows;
        } else if (has_row_store()) {
            nc4_from_store(kept, clf, mu, out);
        } else if (pass2_ && pass2_nc4_) {
            if (pass2_rows_ == kept.rows) {
                out.nc4_agreement = (double)nc4_agree_ / (double)pass2_rows_;
                out.nc4_rows = pass2_rows_;
                out.per_class.nc4_hits = nc4_hits2_, out.per_class.nc4_rows = nc4_rows2_;
            } else {
                out.notes["nc4_agreement"] = "the second pass saw " + std::to_string(pass2_rows_) +
                                             " kept rows, the first " + std::to_string(kept.rows);
            }
        } else {
            out.notes["nc4_agreement"] = "needs a second pass over the rows (svd_mode is not exact, so no row store)";
        }
        out.timings["nc4"] = seconds_since(t);
    }
    return out;
}

void CpuBackend::class_metrics(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu,
                               const std::vector<double>& m, const std::vector<double>& var, MetricValues& out) const {
    const size_t K = kept.ids.size();
    const size_t d = (size_t)d_;
    // Norms, UNC3 cosines and finish_class_metrics's log norms.
    const HostBudget::Lease lease = budget_->reserve(mul_bytes((int64_t)K, (cfg_.per_class_arrays ? 4 : 3) * 8),
                                                     "the class vectors of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    ClassVectors v;
    v.norm.resize(K);
    for (size_t s = 0; s < K; ++s) {
        double q = 0;
        for (size_t j = 0; j < d; ++j) q += m[s * d + j] * m[s * d + j];
        v.norm[s] = std::sqrt(q);
    }
    // UNC3 and NC3: w_c is the classifier row, or the uncentred class mean in the seed-compatible mode.
    const bool use_means = cfg_.unc3_classifier == COLLAPSE_UNC3_CLASS_MEANS;
    v.duality = use_means || clf.present();
    if (v.duality) {
        auto w_row = [&](size_t s) { return use_means ? mu.data() + s * d : clf.weight.data() + (size_t)kept.ids[s] * d; };
        v.cos.resize(K);
        v.dot.resize(K);  // nc3u_uni_dual, and the per-class arrays
        double w_f2 = 0, m_f2 = 0;
        for (size_t s = 0; s < K; ++s) {
            const double* w = w_row(s);
            double wm = 0, ww = 0;
            for (size_t j = 0; j < d; ++j) wm += w[j] * m[s * d + j], ww += w[j] * w[j];
            v.cos[s] = duality_cos(wm, std::sqrt(ww), v.norm[s]);
            if (!v.dot.empty()) v.dot[s] = wm;
            w_f2 += ww;
            m_f2 += v.norm[s] * v.norm[s];
        }
        v.w_frobenius = std::sqrt(w_f2);
        v.m_frobenius = std::sqrt(m_f2);
        if (v.w_frobenius > 0 && v.m_frobenius > 0) {
            double acc = 0;
            for (size_t s = 0; s < K; ++s) {
                const double* w = w_row(s);
                for (size_t j = 0; j < d; ++j) {
                    const double diff = w[j] / v.w_frobenius - m[s * d + j] / v.m_frobenius;
                    acc += diff * diff;
                }
            }
            v.self_duality_sq = acc;
        }
    }
    finish_class_metrics(v, cfg_, out);
    if ((int64_t)K < cfg_.min_classes_for_gnc2) note_too_few_classes_for_pairs(cfg_, out);
    else pair_metrics(kept, m, var, out);
    anchor_metrics(kept, clf, mu, m, v, out);
}

// The anchor metrics from d x d products (metric_summary.hpp, finish_anchor_metrics).
void CpuBackend::anchor_metrics(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu,
                                const std::vector<double>& m, const ClassVectors& v, MetricValues& out) const {
    const int64_t K = (int64_t)kept.ids.size(), d = d_;
    if (K < 2) {
        AnchorInputs in;
        in.K = K;
        finish_anchor_metrics(in, cfg_, *budget_, out);
        return;
    }
    const bool use_means = cfg_.unc3_classifier == COLLAPSE_UNC3_CLASS_MEANS;
    // M^T M, W_K^T W_K and Sigma_W's scatter (d x d each), W_K gathered [K, d] (the classifier's
    // rows are not contiguous), the two column sums, and the K cosines against the OoD mean.
    const HostBudget::Lease lease = budget_->reserve(
        add_bytes(mul_bytes(3 * d, d, 8), add_bytes(mul_bytes(v.duality && !use_means ? K : 0, d, 8), mul_bytes(K + 2 * d, 8))),
        "the anchor metrics' d x d products (d = " + std::to_string(d) + ", K = " + std::to_string(K) + ")",
        "compute_class_metrics: false skips them; or raise host_memory_limit");
    AnchorInputs in;
    in.K = K, in.d = d, in.N = kept.rows;
    auto full_gram = [&](const double* a, std::vector<double>& g) {  // g = a^T a, a [K, d] row-major; both triangles
        g.assign((size_t)(d * d), 0.0);
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)K, 1.0, a, (int)d, 0.0, g.data(), (int)d);
        mirror_upper(g.data(), d);
    };
    auto column_sums = [&](const double* a, std::vector<double>& sum) {
        sum.assign((size_t)d, 0.0);
        for (int64_t s = 0; s < K; ++s)
            for (int64_t j = 0; j < d; ++j) sum[(size_t)j] += a[s * d + j];
    };
    full_gram(m.data(), in.gram_m);
    column_sums(m.data(), in.sum_m);
    in.duality = v.duality;
    if (v.duality) {
        std::vector<double> wk;
        if (!use_means) {
            wk.resize((size_t)(K * d));
            for (int64_t s = 0; s < K; ++s)
                std::memcpy(wk.data() + s * d, clf.weight.data() + (size_t)kept.ids[(size_t)s] * (size_t)d, (size_t)d * 8);
        }
        const double* w = use_means ? mu.data() : wk.data();
        full_gram(w, in.gram_w);
        column_sums(w, in.sum_w);
        in.dot = v.dot;
    }
    if (!ood_mean.empty()) {
        double oo = 0;
        for (int64_t j = 0; j < d; ++j) oo += ood_mean[(size_t)j] * ood_mean[(size_t)j];
        in.ood_cos.resize((size_t)K);
        for (int64_t s = 0; s < K; ++s) {
            double dot = 0, mm = 0;
            for (int64_t j = 0; j < d; ++j) dot += mu[(size_t)(s * d + j)] * ood_mean[(size_t)j], mm += mu[(size_t)(s * d + j)] * mu[(size_t)(s * d + j)];
            in.ood_cos[(size_t)s] = mm > 0 && oo > 0 ? dot / std::sqrt(mm * oo) : 0.0;
        }
    }
    in.within = within_scatter(kept, mu, &in.within_note);
    finish_anchor_metrics(in, cfg_, *budget_, out);
}

// Sigma_W's scatter sum_{kept rows} (x - mu_y)(x - mu_y)^T, full d x d (its d x d is counted by the
// caller), from the stream, the row store or the second pass (the overall Gram's three routes).
std::vector<double> CpuBackend::within_scatter(const KeptSet& kept, const std::vector<double>& mu, std::string* note) const {
    const int64_t d = d_;
    std::vector<double> w;
    auto mirror = [&] { mirror_upper(w.data(), d); };
    if (within_streaming_) {
        if (!within_valid_) {
            *note = "a loaded or merged checkpoint has no within-class scatter (written by a build or backend without it)";
            return w;
        }
        // sum (x - s)(x - s)^T = sum (x - mu)(x - mu)^T + n (mu - s)(mu - s)^T per class.
        w = within_;
        unshift_scatter(*budget_, w.data(), d, kept.ids, count_.data(), sum_.data(), shift_.data());
    } else if (spread_ready() && has_row_store()) {
        w = spread_->within;  // the owners' scatters, added (cpu_ranks.cpp)
    } else if (has_row_store()) {
        // The kept set is known only now (max_tokens_to_analyze) or nothing streamed: from the rows, about the final means.
        w.assign((size_t)(d * d), 0.0);
        store_scatter(kept, mu, w);
    } else if (pass2_ && !within2_.empty() && pass2_rows_ == kept.rows) {
        w = within2_;
    } else {
        *note = cfg_.max_tokens_to_analyze > 0
                    ? "max_tokens_to_analyze cuts the kept set, so Sigma_W of kept rows needs the row store (svd_mode: exact) or a second pass"
                    : "Sigma_W streams with the overall Gram: it needs compute_overall_metrics (or the row store, svd_mode: exact)";
        return w;
    }
    mirror();
    return w;
}

// Pair reductions over P = {(i, j): i < j} by square tiles of the K x K product M M^T: the
// ranks' merged shares when they made them for this kept set (cpu_ranks.cpp), else every tile here.
void CpuBackend::pair_metrics(const KeptSet& kept, const std::vector<double>& m, const std::vector<double>& var,
                              MetricValues& out) const {
    const int64_t K = (int64_t)kept.ids.size();
    if (const PairTotals* t = pair_spread_ ? pair_spread_->totals_for(kept) : nullptr) {
        finish_pair_metrics(*t, K, out);
        return;
    }
    finish_pair_metrics(pair_tiles(m.data(), var.data(), K, pair_tile_edge(K), 0, 1), K, out);
}

// Tile edge from a 64 MiB budget per tile (a fraction of the memory limit when that is small),
// smaller when every thread's tile and the list of tile sums would not fit what is left (the
// tiling only moves rounding). Never a K x K matrix. COLLAPSE_PAIR_TILE_EDGE (tests) sets it.
namespace {
int64_t pair_tiles_bytes(int64_t K, int64_t t, int64_t threads) {
    const int64_t n = (K + t - 1) / t;
    return add_bytes(mul_bytes(t, t, 8 * threads), mul_bytes(n * (n + 1) / 2, (int64_t)(sizeof(PairTotals) + sizeof(std::pair<int64_t, int64_t>) + 8)));
}
}  // namespace

int64_t CpuBackend::pair_tile_edge(int64_t K) const {
    if (const int64_t t = pair_tile_edge_override(K)) return t;
    const int64_t threads = omp_get_max_threads();
    const int64_t budget = std::min<int64_t>(int64_t(64) << 20, cfg_.host_memory_limit / 8);
    int64_t T = std::max<int64_t>(64, std::min<int64_t>(K, (int64_t)std::sqrt((double)budget / 8.0)));
    // pair_tiles holds the K norms (16 K bytes) beside the tiles.
    while (T > 64 && !budget_->fits(add_bytes(pair_tiles_bytes(K, T, threads), mul_bytes(K, 16)))) T = std::max<int64_t>(64, T / 2);
    return T;
}

PairTotals CpuBackend::pair_tiles(const double* m, const double* var, int64_t K, int64_t T, int rank, int P, int64_t* range) const {
    const size_t d = (size_t)d_;
    const HostBudget::Lease norms =
        budget_->reserve(mul_bytes(K, 2 * 8), "the pair metrics' norms of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    std::vector<double> q((size_t)K), a((size_t)K);
    for (int64_t s = 0; s < K; ++s) {
        double v = 0;
        for (size_t j = 0; j < d; ++j) v += m[(size_t)s * d + j] * m[(size_t)s * d + j];
        q[(size_t)s] = v;
        a[(size_t)s] = std::sqrt(v) + kNormEps;
    }
    // Mean and variance of the cosines and log kernels: each row of a tile sums deviations from its
    // own first value (so the one-pass variance loses no digits), then rows and tiles merge in a
    // fixed order with Chan's formula.
    const int64_t threads = omp_get_max_threads();
    const HostBudget::Lease tiles_lease =
        budget_->reserve(pair_tiles_bytes(K, T, threads), "the pair metrics' tiles (" + std::to_string(threads) + " threads' " + std::to_string(T) + " x " +
                                                              std::to_string(T) + " blocks of M M^T for K = " + std::to_string(K) + " kept classes)",
                         kFixKeptClasses);
    using TileSum = PairTotals;
    // Every tile in the one fixed order, and this rank's contiguous share (core/pair_part.hpp).
    const PairTiling tiling = pair_tiling(K, T, rank, P);
    const std::vector<std::pair<int64_t, int64_t>>& tiles = tiling.tiles;
    const int64_t t_begin = tiling.begin, t_end = tiling.end;
    if (range) range[0] = t_begin, range[1] = t_end, range[2] = (int64_t)tiles.size();
    std::vector<TileSum> sums((size_t)std::max<int64_t>(0, t_end - t_begin));
    const double p = cfg_.cdnv_power;
    const double inv_km1 = K > 1 ? 1.0 / (double)(K - 1) : 0.0;

    // One BLAS thread when the tiles keep our threads busy, or when a tile's product (here below
    // about a millisecond) is too small for BLAS's threads to pay: woken, they spin for ~0.1 s
    // after the call, beside the per-token SVDs' threads.
    const OneBlasThread one_blas(t_end - t_begin >= omp_get_max_threads() || T * T * d_ <= (int64_t(1) << 24));
#pragma omp parallel
    {
        std::vector<double> g((size_t)(T * T));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = t_begin; t < t_end; ++t) {
            if (interrupt_requested()) continue;  // thrown after the region
            const int64_t i0 = tiles[(size_t)t].first * T, j0 = tiles[(size_t)t].second * T;
            const int64_t ni = std::min(T, K - i0), nj = std::min(T, K - j0);
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)ni, (int)nj, (int)d, 1.0, m + (size_t)i0 * d,
                        (int)d, m + (size_t)j0 * d, (int)d, 0.0, g.data(), (int)nj);
            TileSum ts;
            for (int64_t i = 0; i < ni; ++i) {
                const int64_t gi = i0 + i;
                const int64_t jstart = (i0 == j0) ? i + 1 : 0;  // i < j only
                double n_l = 0, s_l = 0, s_l2 = 0, s_c = 0, s_c2 = 0, n_cd = 0, s_cd = 0;
                double l_shift = 0, c_shift = 0, s_d = 0, s_d2 = 0, d_shift = 0, s_e = 0, max_e = 0;
                for (int64_t j = jstart; j < nj; ++j) {
                    const int64_t gj = j0 + j;
                    const double gij = g[(size_t)(i * nj + j)], qi = q[(size_t)gi], qj = q[(size_t)gj], ai = a[(size_t)gi], aj = a[(size_t)gj];
                    const PairDistances pd = pair_distances(gij, qi, qj, ai, aj, m + (size_t)gi * d, m + (size_t)gj * d, d_);
                    const PairTerms pt = pair_terms(gij, qi, qj, ai, aj, var[gi], var[gj], p, inv_km1, pd);
                    if (j == jstart) c_shift = pt.cos, d_shift = pt.dist;
                    const double dc = pt.cos - c_shift, dd = pt.dist - d_shift;
                    s_c += dc;
                    s_c2 += dc * dc;
                    s_d += dd;
                    s_d2 += dd * dd;
                    s_e += pt.etf_dev;
                    max_e = std::max(max_e, pt.etf_dev);
                    if (!pt.gnc2_skip) {
                        if (n_l == 0) l_shift = pt.log_kernel;
                        const double dl = pt.log_kernel - l_shift;
                        n_l += 1, s_l += dl, s_l2 += dl * dl;
                    }
                    if (!pt.cdnv_skip) n_cd += 1, s_cd += pt.cdnv;
                }
                const int64_t np = nj - jstart;
                ts.pairs += np;
                ts.skip_l += np - (int64_t)n_l;
                ts.skip_cdnv += np - (int64_t)n_cd;
                ts.l.merge(Moments::from_shifted(n_l, s_l, s_l2, l_shift));
                ts.c.merge(Moments::from_shifted((double)np, s_c, s_c2, c_shift));
                ts.dist.merge(Moments::from_shifted((double)np, s_d, s_d2, d_shift));
                ts.s_etf += s_e;
                ts.max_etf = std::max(ts.max_etf, max_e);
                ts.n_cdnv += n_cd, ts.s_cdnv += s_cd;
            }
            sums[(size_t)(t - t_begin)] = ts;
        }
    }
    throw_if_interrupted();
    // Merge in tile order: the same result whatever the thread count.
    PairTotals all;
    for (const PairTotals& ts : sums) all.merge(ts);
    return all;
}

void CpuBackend::overall_entropy(const KeptSet& kept, MetricValues& out) const {
    const HostBudget::Lease lease = budget_->reserve(gram_eigen_bytes(d_), "the overall SVD's d x d Gram (d = " + std::to_string(d_) + ")",
                                                     "compute_overall_metrics: false skips it; or raise host_memory_limit");
    std::vector<double> g;
    if (gram_streaming_) {
        g = gram_;
    } else if (spread_ready() && has_row_store()) {
        g = spread_->gram;  // the owners' Grams, added (cpu_ranks.cpp)
    } else if (has_row_store()) {
        // max_tokens_to_analyze: the kept set is known only now; the Gram comes from the rows.
        g.assign((size_t)(d_ * d_), 0.0);
        store_gram(kept.ids, g);
    } else if (pass2_ && pass2_gram_ && pass2_rows_ == kept.rows) {
        g = gram2_;
    } else {
        out.notes["overall_svd_entropy"] =
            "max_tokens_to_analyze cuts the kept set, so the Gram of kept rows needs the row store (svd_mode: exact) or a second pass";
        return;
    }
    const std::vector<double> s = singular_from_gram(g, d_, std::min<int64_t>(kept.rows, d_));
    bool zero = false;
    const double h = spectrum_entropy(s, &zero);
    out.overall_svd_entropy = h;
    out.overall_effective_rank = std::exp(h);
}

void CpuBackend::token_metrics(const KeptSet& kept, const std::vector<double>& mu, MetricValues& out) const {
    const size_t d = (size_t)d_;
    const int64_t K = (int64_t)kept.ids.size();
    // Whole classes wait in `jobs` until their group of the row store has been read (their rows stay
    // valid until then), and then go to the threads.
    struct Job {
        int32_t c;
        const double* x;
        int64_t n;
    };
    const HostBudget::Lease lease =
        budget_->reserve(mul_bytes(K, (int64_t)(sizeof(TokenMetrics) + sizeof(Job) + sizeof(std::exception_ptr) + 3 * 8 + 1)),
                         "the per-token results of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
    std::vector<TokenMetrics> tokens((size_t)K);
    std::vector<Job> jobs;
    jobs.reserve((size_t)K);
    HostBudget::Lease g_lease = budget_->lease();
    std::vector<double> g;  // Gram of a class too large to load at once
    const int64_t load = load_budget();
    auto center_of = [&](int32_t c) { return cfg_.svd_center ? mu.data() + (size_t)kept.slot[(size_t)c] * d : nullptr; };
    auto record = [&](int32_t c, int64_t n, double h, bool zero) {
        TokenMetrics& tm = tokens[(size_t)kept.slot[(size_t)c]];
        tm.id = c;
        tm.num_samples = count_[(size_t)c];
        tm.svd_rows = n;
        tm.sampled = n < tm.num_samples;
        token_from_entropy(h, zero, n, d_, tm, out);
    };
    auto record_spectrum = [&](int32_t c, int64_t n, const std::vector<double>& sv) {
        bool zero = false;
        const double h = spectrum_entropy(sv, &zero);
        record(c, n, h, zero);
    };
    // A group's whole classes. Classes of at most kPooledElements go to the threads, largest first,
    // each SVD on one BLAS thread: OpenBLAS's threads only spin on matrices this small (measured:
    // 1 thread beat 2 on 8 x 1024 classes), while classes are independent. Larger ones run one at a
    // time with BLAS's threads, which pay off there (blocked bidiagonalisation of a few thousand
    // rows) and would otherwise leave the other threads idle behind one long job; so do classes
    // whose LAPACK workspace does not fit (singular_values then goes through the Gram). Which path
    // a class takes does not depend on the thread count, so neither do the results.
    constexpr int64_t kPooledElements = int64_t(1) << 22;  // 32 MiB of doubles
    auto run_group = [&] {
        std::vector<size_t> pool;
        int64_t most = 0;
        for (size_t k = 0; k < jobs.size(); ++k) {
            const Job& j = jobs[k];
            const int64_t bytes = token_svd_bytes(j.n, d_);
            if (j.n > 0 && j.n * d_ <= kPooledElements && budget_->fits(bytes)) {
                pool.push_back(k);
                most = std::max(most, bytes);
                continue;
            }
            auto what = [&] {
                return "the per-token SVD of class " + std::to_string(j.c) + " (" + std::to_string(j.n) + " rows of width " + std::to_string(d_) + ")";
            };
            record_spectrum(j.c, j.n, singular_values(*budget_, j.x, j.n, d_, center_of(j.c), what));
        }
        if (!pool.empty()) {
            // Each thread's copy and LAPACK workspace, counted here on the calling thread (the budget is
            // not thread-safe): as many threads as fit.
            int64_t T = std::min<int64_t>(std::max(1, omp_get_max_threads()), (int64_t)pool.size());
            while (T > 1 && !budget_->fits(mul_bytes(T, most))) --T;
            const HostBudget::Lease work = budget_->reserve(
                mul_bytes(T, most), "the per-token SVDs' workspace (" + std::to_string(T) + " threads, " + format_bytes(most) + " each)", kFixTokenSvd);
            auto cost = [&](size_t k) { return (double)jobs[k].n * (double)d_ * (double)std::min<int64_t>(jobs[k].n, d_); };
            std::stable_sort(pool.begin(), pool.end(), [&](size_t a, size_t b) { return cost(a) > cost(b); });
            std::vector<double> h(pool.size());
            std::vector<uint8_t> zero(pool.size());
            std::vector<std::exception_ptr> err(pool.size());
            {
                const OneBlasThread one(true);
#pragma omp parallel num_threads((int)T)
                {
                    std::vector<double> a;  // this thread's copy of a class
#pragma omp for schedule(dynamic, 1)
                    for (int64_t q = 0; q < (int64_t)pool.size(); ++q) {
                        const Job& j = jobs[pool[(size_t)q]];
                        if (interrupt_requested()) continue;  // thrown after the region
                        try {
                            bool z = false;
                            h[(size_t)q] = spectrum_entropy(class_singular_values(j.x, j.n, d_, center_of(j.c), a), &z);
                            zero[(size_t)q] = z ? 1 : 0;
                        } catch (...) {
                            err[(size_t)q] = std::current_exception();
                        }
                    }
                }
            }
            throw_if_interrupted();
            for (const std::exception_ptr& e : err)
                if (e) std::rethrow_exception(e);
            for (size_t q = 0; q < pool.size(); ++q) record(jobs[pool[q]].c, jobs[pool[q]].n, h[q], zero[q] != 0);
        }
        jobs.clear();
    };
    store_->for_each_class(
        kept.ids, load,
        [&](int32_t c, const double* x, int64_t n, int64_t first, bool last) {
            if (first == 0 && last) {
                jobs.push_back({c, x, n});
                return;
            }
            // Spilled and larger than the load budget: its d x d Gram, piece by piece.
            const double* center = center_of(c);
            if (first == 0) {
                // add_centered_gram's block is at most a piece: the load budget.
                g_lease.resize(add_bytes(gram_eigen_bytes(d_), std::min(mul_bytes(512, d_, 8), load)),
                               "the per-token Gram of class " + std::to_string(c) + " (" + std::to_string(count_[(size_t)c]) +
                                   " rows, larger than the load budget, of width " + std::to_string(d_) + ")",
                               kFixTokenSvd);
                g.assign(d * d, 0.0);
            }
            add_centered_gram(x, n, d_, center, g.data());
            if (!last) return;
            n += first;
            if (n < d_)
                fail(COLLAPSE_ERR_OUT_OF_MEMORY, "class ", c, " has ", n, " rows of width ", d_, " (", format_bytes(n * d_ * 8),
                     "): with fewer rows than columns its exact SVD needs every row in memory at once; raise host_memory_limit");
            record_spectrum(c, n, singular_from_gram(g, d_, d_));
        },
        run_group);
    run_group();
    out.tokens = std::move(tokens);
}

void CpuBackend::nc4_from_store(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu,
                                MetricValues& out) const {
    const size_t K = kept.ids.size();
    const HostBudget::Lease lease = budget_->reserve(mul_bytes((int64_t)K, 8), "NC4's norms of K = " + std::to_string(K) + " kept means", kFixKeptClasses);
    std::vector<double> mu_sq(K, 0.0);
    for (size_t s = 0; s < K; ++s)
        for (int64_t j = 0; j < d_; ++j) mu_sq[s] += mu[s * (size_t)d_ + (size_t)j] * mu[s * (size_t)d_ + (size_t)j];
    int64_t rows = 0;
    if (cfg_.per_class_arrays) out.per_class.nc4_hits.assign(K, 0), out.per_class.nc4_rows.assign(K, 0);
    // Rows of many classes per block: one pass of W per block, not per class (most classes have a few rows).
    Nc4Blocks nc4(*budget_, d_, clf, V_, mu, mu_sq, kept.ids, kept.rows, cfg_.per_class_arrays ? out.per_class.nc4_hits.data() : nullptr);
    store_->for_each_class(kept.ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
        const int32_t s = kept.slot[(size_t)c];
        nc4.add(x, n, s);
        rows += n;
        if (cfg_.per_class_arrays) out.per_class.nc4_rows[(size_t)s] += n;
    });
    const int64_t agree = nc4.finish();
    out.nc4_rows = rows;
    if (rows > 0) out.nc4_agreement = (double)agree / (double)rows;
}

// compute()'s passes over the row store, also run by a rank on the classes it owns (cpu_ranks.cpp).
void CpuBackend::store_variances(const KeptSet& kept, const std::vector<double>& mu, std::vector<double>& var) const {
    const size_t d = (size_t)d_;
    std::vector<double> acc(kept.ids.size(), 0.0);
    store_->for_each_class(kept.ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t first, bool last) {
        const size_t s = (size_t)kept.slot[(size_t)c];
        for (int64_t r = 0; r < n; ++r)
            for (size_t j = 0; j < d; ++j) {
                const double dv = x[(size_t)r * d + j] - mu[s * d + j];
                acc[s] += dv * dv;
            }
        if (last) var[s] = first + n > 0 ? acc[s] / (double)(first + n) : 0.0;
    });
}

void CpuBackend::store_gram(const std::vector<int32_t>& ids, std::vector<double>& g) const {
    store_->for_each_class(ids, load_budget(), [&](int32_t, const double* x, int64_t n, int64_t, bool) {
        if (n > 0) cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)n, 1.0, x, (int)d_, 1.0, g.data(), (int)d_);
    });
}

void CpuBackend::store_scatter(const KeptSet& kept, const std::vector<double>& mu, std::vector<double>& w) const {
    const HostBudget::Lease lease = budget_->reserve(mul_bytes(std::min<int64_t>(512, std::max<int64_t>(kept.rows, 1)), d_, 8),
                                                     "Sigma_W's block of centred rows", kFixBatchRows);
    store_->for_each_class(kept.ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
        add_centered_gram(x, n, d_, mu.data() + (size_t)kept.slot[(size_t)c] * (size_t)d_, w.data());
    });
}

}  // namespace collapse::internal
