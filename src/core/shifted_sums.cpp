#include "core/shifted_sums.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "base/error.hpp"
#include "core/metric_math.hpp"

namespace collapse::internal {

namespace {

inline double at(const float* s, int64_t j) { return s ? (double)s[j] : 0.0; }

constexpr int64_t kMoveBlock = 256;  // classes per dsyr2k of merge_shifted_state

}  // namespace

double shifted_mean_norm2(int64_t n, const double* sum, const float* shift, int64_t d) {
    double dd = 0;
    for (int64_t j = 0; j < d; ++j) {
        const double e = sum[j] - (double)n * at(shift, j);
        dd += e * e;
    }
    return dd;
}

double class_variance(double q, int64_t n, const double* sum, const float* shift, int64_t d) {
    return n > 0 ? shifted_variance(q, (double)n, shifted_mean_norm2(n, sum, shift, d)) : 0.0;
}

double move_sqdev(double q, int64_t n, const double* sum, const float* from, const float* to, int64_t d) {
    if (from == to) return q;
    double cross = 0, tt = 0;
    for (int64_t j = 0; j < d; ++j) {
        const double t = at(from, j) - at(to, j);
        cross += t * (sum[j] - (double)n * at(from, j));
        tt += t * t;
    }
    return q + 2.0 * cross + (double)n * tt;
}

ShiftedSections read_shifted_sections(const StateReader& r, int64_t V, int64_t d) {
    ShiftedSections t;
    const std::string what = r.description();
    if (!r.has("within_shift")) return t;
    const StateSection s = r.section("within_shift");
    if (s.dtype_code != (uint32_t)COLLAPSE_F32 || s.shape != std::vector<int64_t>{V, d})
        fail(COLLAPSE_ERR_IO, what, ": section within_shift is not float32 [V, d] with V = ", V, ", d = ", d);
    t.shift = static_cast<const float*>(s.data);
    for (int64_t k = 0; k < V * d; ++k)
        if (!std::isfinite(t.shift[k])) fail(COLLAPSE_ERR_IO, what, ": section within_shift holds a non-finite value at row ", k / d);
    if (r.has("class_sqdev")) {
        const StateSection q = r.section("class_sqdev");
        if (q.dtype_code != (uint32_t)COLLAPSE_F64 || q.shape != std::vector<int64_t>{V})
            fail(COLLAPSE_ERR_IO, what, ": section class_sqdev is not float64 [V] with V = ", V);
        t.sqdev = static_cast<const double*>(q.data);
        for (int64_t c = 0; c < V; ++c)
            if (!(t.sqdev[c] >= 0) || !std::isfinite(t.sqdev[c]))
                fail(COLLAPSE_ERR_IO, what, ": section class_sqdev is negative or not finite at class ", c, " (", t.sqdev[c], ")");
    }
    if (r.has("within_scatter")) {
        const StateSection a = r.section("within_scatter");
        if (a.dtype_code != (uint32_t)COLLAPSE_F64 || a.shape != std::vector<int64_t>{d, d})
            fail(COLLAPSE_ERR_IO, what, ": section within_scatter is not float64 [d, d] with d = ", d);
        t.scatter = static_cast<const double*>(a.data);
        for (int64_t i = 0; i < d; ++i)
            for (int64_t j = i; j < d; ++j)
                if (!std::isfinite(t.scatter[i * d + j]))
                    fail(COLLAPSE_ERR_IO, what, ": section within_scatter holds a non-finite value at (", i, ", ", j, ")");
    }
    return t;
}

void write_shifted_state(StateWriter& w, HostBudget& budget, const Counts& rows, int64_t V, int64_t d, const int64_t* counts,
                         const double* sums, const float* shift, const double* sqdev, const double* scatter) {
    if (!shift) {
        write_state_core(w, rows, V, d, counts, sums, sqdev);
    } else {
        const HostBudget::Lease lease = budget.reserve(mul_bytes(V, 8), "the class sums of squares of V = " + std::to_string(V) + " classes on their way to the checkpoint",
                                                       kFixNumClasses);
        std::vector<double> plain((size_t)V);
        for (int64_t c = 0; c < V; ++c)
            plain[(size_t)c] = std::max(0.0, move_sqdev(sqdev[c], counts[c], sums + c * d, shift + c * d, nullptr, d));
        write_state_core(w, rows, V, d, counts, sums, plain.data());
        w.add("within_shift", COLLAPSE_F32, {V, d}, shift, (size_t)(V * d) * 4);
        w.add("class_sqdev", COLLAPSE_F64, {V}, sqdev, (size_t)V * 8);
    }
    if (shift && scatter) w.add("within_scatter", COLLAPSE_F64, {d, d}, scatter, (size_t)(d * d) * 8);
}

int64_t merge_shifted_bytes(int64_t V, int64_t d, bool scatter) { return scatter ? mul_bytes(2 * std::min<int64_t>(kMoveBlock, V), d, 8) : 0; }

void merge_shifted_state(HostBudget& budget, int64_t V, int64_t d, int64_t min_samples, const int64_t* before, const StateView& v,
                         const ShiftedSections& t, float* shift, double* sqdev, double* scatter) {
    if (scatter && (!t.scatter || !t.shift)) fail(COLLAPSE_ERR_INTERNAL, "merge_shifted_state: no scatter to merge");
    const int64_t block = scatter ? std::min<int64_t>(kMoveBlock, V) : 0;
    const HostBudget::Lease lease =
        budget.reserve(merge_shifted_bytes(V, d, scatter != nullptr), "the rows that move a shard's Sigma_W scatter to this session's reference rows", kFixNumClasses);
    std::vector<double> A((size_t)(block * d)), B((size_t)(block * d));
    int64_t m = 0;
    auto flush = [&] {
        if (m > 0)
            cblas_dsyr2k(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)m, 1.0, A.data(), (int)d, B.data(), (int)d, 1.0, scatter, (int)d);
        m = 0;
    };
    if (scatter)
        for (int64_t a = 0; a < d; ++a)  // upper triangle only: the lower one is not part of the format
            for (int64_t b = a; b < d; ++b) scatter[a * d + b] += t.scatter[a * d + b];
    for (int64_t c = 0; c < V; ++c) {
        const int64_t n = v.counts[c];
        if (n == 0) continue;
        const double* S = v.sums + c * d;
        const float* theirs = t.shift ? t.shift + c * d : nullptr;
        float* mine = shift ? shift + c * d : nullptr;
        if (mine && before[c] == 0) {  // a class new here: its reference row is the other state's
            for (int64_t j = 0; j < d; ++j) mine[j] = theirs ? theirs[j] : 0.0f;
            sqdev[c] = 0;
        }
        const double q = t.sqdev ? t.sqdev[c] : v.sqnorms[c];
        sqdev[c] += move_sqdev(q, n, S, t.sqdev ? theirs : nullptr, mine, d);
        if (!scatter || before[c] == 0 || n < min_samples) continue;
        double* a = A.data() + m * d;
        double* b = B.data() + m * d;
        bool moves = false;
        for (int64_t j = 0; j < d; ++j) {
            b[j] = at(theirs, j) - at(mine, j);
            a[j] = S[j] - (double)n * at(theirs, j) + 0.5 * (double)n * b[j];  // D + n t / 2: D t^T + t D^T + n t t^T in one dsyr2k
            moves = moves || b[j] != 0;
        }
        if (moves && ++m == block) flush();
    }
    flush();
}

void unshift_scatter(HostBudget& budget, double* w, int64_t d, const std::vector<int32_t>& ids, const int64_t* counts, const double* sums,
                     const float* shift) {
    const int64_t K = (int64_t)ids.size();
    if (K == 0) return;
    const HostBudget::Lease lease = budget.reserve(mul_bytes(K, d, 8), "Sigma_W's correction rows [K, d] (K = " + std::to_string(K) + ")",
                                                   kFixKeptClasses);
    std::vector<double> e((size_t)(K * d));
    for (int64_t s = 0; s < K; ++s) {
        const int64_t c = ids[(size_t)s];
        const double n = (double)counts[c];
        for (int64_t j = 0; j < d; ++j) e[(size_t)(s * d + j)] = unshift_term(sums[c * d + j], n, (double)shift[c * d + j]);
    }
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)K, -1.0, e.data(), (int)d, 1.0, w, (int)d);
}

}  // namespace collapse::internal
