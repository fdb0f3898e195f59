// Every metric of docs/METRICS.md on the CPU, from the accumulators of cpu_backend.cpp.
// Pair metrics are reduced tile by tile (a dgemm of centred means, then one fused loop): no K x K
// matrix is ever allocated.
#include <cblas.h>
#include <lapacke.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "base/error.hpp"
#include "core/metric_math.hpp"
#include "core/metric_summary.hpp"
#include "cpu/cpu_backend.hpp"

namespace collapse::internal {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

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
std::vector<double> singular_values(HostBudget& budget, const double* x, int64_t n, int64_t d, const double* center,
                                    const std::function<std::string()>& what) {
    const int64_t r = std::min(n, d);
    if (r == 0) return {};
    constexpr int64_t kDirectElements = int64_t(1) << 25;  // 256 MiB of doubles
    // dgesdd with jobz = 'N': the copy, the singular values, an integer workspace of 8r and (the
    // optimal) real workspace of about 3r + max(n, d, 7r) + (n + d) * 64 doubles.
    const int64_t mx = std::max(n, d);
    const int64_t direct = add_bytes(mul_bytes(n, d, 8), mul_bytes(add_bytes(4 * r + std::max(mx, 7 * r), mul_bytes(n + d, 64)), 8) + 32 * r);
    HostBudget::Lease lease;
    if (n * d <= kDirectElements && budget.fits(direct)) {
        lease = budget.reserve(direct, what());
        std::vector<double> a((size_t)(n * d));
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < d; ++j) a[(size_t)(i * d + j)] = x[i * d + j] - (center ? center[j] : 0.0);
        std::vector<double> s((size_t)r);
        // The row-major n x d matrix is the column-major d x n one: same singular values, and
        // column-major takes the dummy leading dimensions of jobz = 'N'.
        const int info = LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'N', (int)d, (int)n, a.data(), (int)d, s.data(), nullptr, 1,
                                        nullptr, 1);
        if (info != 0) fail(COLLAPSE_ERR_INTERNAL, "LAPACKE_dgesdd failed with info = ", info, " (", n, " x ", d, ")");
        return s;
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

void symmetric_eigenvalues(double* g, int64_t n, double* w, const char* what) {
    // A row-major upper triangle is LAPACK's column-major lower one: asking for that spares
    // LAPACKE's transposed n x n copy (memory the budget does not count, and time: a third of a
    // 64 x 64 window's eigenvalues).
    const int info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'L', (int)n, g, (int)n, w);
    if (info != 0) fail(COLLAPSE_ERR_INTERNAL, "LAPACKE_dsyevd failed with info = ", info, " (", what, ", n = ", n, ")");
}

// ---------------------------------------------------------------------------------------------
int64_t nc4_agreements(HostBudget& budget, const double* x, int64_t rows, int64_t d, const Classifier& clf, int64_t V,
                       const std::vector<double>& mu_kept, const std::vector<double>& mu_sq,
                       const std::vector<int32_t>& kept_ids, const int32_t* row_slot, int64_t* slot_hits) {
    const int64_t K = (int64_t)kept_ids.size();
    if (rows <= 0) return 0;
    // Rows per chunk so that the logits stay near 32 MiB.
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(rows, (int64_t(4) << 20) / std::max(V, K)));
    const HostBudget::Lease lease =
        budget.reserve(mul_bytes(chunk, V + K, 8), "NC4's logits of " + std::to_string(chunk) + " rows against V = " + std::to_string(V) +
                                                       " classifier rows and K = " + std::to_string(K) + " kept means",
                       "compute_nc4: false skips NC4; or raise host_memory_limit");
    std::vector<double> logits((size_t)(chunk * V)), dots((size_t)(chunk * K));
    int64_t agree = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t nr = std::min(chunk, rows - r0);
        const double* xb = x + r0 * d;
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)V, (int)d, 1.0, xb, (int)d,
                    clf.weight.data(), (int)d, 0.0, logits.data(), (int)V);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)K, (int)d, 1.0, xb, (int)d, mu_kept.data(),
                    (int)d, 0.0, dots.data(), (int)K);
        for (int64_t i = 0; i < nr; ++i) {
            const double* l = logits.data() + i * V;
            int64_t best = 0;
            double best_v = l[0] + (clf.bias.empty() ? 0.0 : clf.bias[0]);
            for (int64_t c = 1; c < V; ++c) {
                const double v = l[c] + (clf.bias.empty() ? 0.0 : clf.bias[(size_t)c]);
                if (v > best_v) best_v = v, best = c;  // ties: the smaller id stays
            }
            // ||x - mu||^2 = ||x||^2 - 2 x.mu + ||mu||^2; ||x||^2 is the same for every class.
            const double* g = dots.data() + i * K;
            int64_t near = 0;
            double near_v = mu_sq[0] - 2.0 * g[0];
            for (int64_t s = 1; s < K; ++s) {
                const double v = mu_sq[(size_t)s] - 2.0 * g[s];
                if (v < near_v) near_v = v, near = s;  // kept ids ascend: ties keep the smaller id
            }
            const bool hit = best == kept_ids[(size_t)near];
            agree += hit ? 1 : 0;
            if (hit && row_slot) ++slot_hits[row_slot[r0 + i]];
        }
    }
    return agree;
}

// ---------------------------------------------------------------------------------------------
MetricValues CpuBackend::compute(const KeptSet& kept, const Classifier& clf) {
    MetricValues out;
    const auto t0 = Clock::now();
    const size_t K = kept.ids.size();
    const size_t d = (size_t)d_;
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
    std::vector<double> mu(K * d), var(K), m(K * d);
    std::vector<double> mu_g(d, 0.0);
    double weight_total = 0;
    for (size_t s = 0; s < K; ++s) {
        const int32_t c = kept.ids[s];
        const double n = (double)count_[(size_t)c];
        double q = 0;
        for (size_t j = 0; j < d; ++j) {
            const double v = sum_[(size_t)c * d + j] / n;
            mu[s * d + j] = v;
            q += v * v;
        }
        var[s] = std::max(0.0, sqnorm_[(size_t)c] / n - q);  // E||x||^2 - ||mu||^2
        const double w = cfg_.global_mean == COLLAPSE_MEAN_TOKEN_WEIGHTED ? n : 1.0;
        for (size_t j = 0; j < d; ++j) mu_g[j] += w * mu[s * d + j];
        weight_total += w;
    }
    // With every row kept (exact mode), the within-class variance is taken about the final mean:
    // E||x||^2 - ||mu||^2 loses digits in proportion to ||mu||^2 / var_c for tight classes.
    if (has_row_store()) {
        std::vector<double> acc(K, 0.0);
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
    for (size_t j = 0; j < d; ++j) mu_g[j] = weight_total > 0 ? mu_g[j] / weight_total : 0.0;
    for (size_t s = 0; s < K; ++s)
        for (size_t j = 0; j < d; ++j) m[s * d + j] = mu[s * d + j] - mu_g[j];
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
        token_metrics(kept, mu, out);
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
        for (int64_t i = 0; i < d; ++i)
            for (int64_t j = 0; j < i; ++j) g[(size_t)(i * d + j)] = g[(size_t)(j * d + i)];
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
    const int64_t K = (int64_t)kept.ids.size(), d = d_;
    std::vector<double> w;
    auto mirror = [&] {
        for (int64_t i = 0; i < d; ++i)
            for (int64_t j = 0; j < i; ++j) w[(size_t)(i * d + j)] = w[(size_t)(j * d + i)];
    };
    if (within_streaming_) {
        if (!within_valid_) {
            *note = "a loaded or merged checkpoint has no within-class scatter (written by a build or backend without it)";
            return w;
        }
        // sum (x - s)(x - s)^T = sum (x - mu)(x - mu)^T + n (mu - s)(mu - s)^T per class; with
        // e_c = (S_c - n_c s_c) / sqrt(n_c) (S_c the class sum: S_c - n_c s_c is exact for float32
        // rows) the correction is sum_c e_c e_c^T, one dsyrk.
        const HostBudget::Lease lease = budget_->reserve(mul_bytes(K, d, 8), "Sigma_W's correction rows [K, d] (K = " + std::to_string(K) + ")",
                                                         kFixKeptClasses);
        std::vector<double> e((size_t)(K * d));
        for (int64_t s = 0; s < K; ++s) {
            const size_t c = (size_t)kept.ids[(size_t)s];
            const double n = (double)count_[c], rn = 1.0 / std::sqrt(n);
            for (int64_t j = 0; j < d; ++j)
                e[(size_t)(s * d + j)] = (sum_[c * (size_t)d + (size_t)j] - n * (double)shift_[c * (size_t)d + (size_t)j]) * rn;
        }
        w = within_;
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)K, -1.0, e.data(), (int)d, 1.0, w.data(), (int)d);
    } else if (has_row_store()) {
        // The kept set is known only now (max_tokens_to_analyze) or nothing streamed: from the rows, about the final means.
        const HostBudget::Lease lease = budget_->reserve(mul_bytes(std::min<int64_t>(512, std::max<int64_t>(kept.rows, 1)), d, 8),
                                                         "Sigma_W's block of centred rows", kFixBatchRows);
        w.assign((size_t)(d * d), 0.0);
        store_->for_each_class(kept.ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
            add_centered_gram(x, n, d, mu.data() + (size_t)kept.slot[(size_t)c] * (size_t)d, w.data());
        });
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

// Pair reductions over P = {(i, j): i < j} by square tiles of the K x K product M M^T.
void CpuBackend::pair_metrics(const KeptSet& kept, const std::vector<double>& m, const std::vector<double>& var,
                              MetricValues& out) const {
    const int64_t K = (int64_t)kept.ids.size();
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

    // Tile edge from a 64 MiB budget per tile (a fraction of the memory limit when that is small),
    // smaller when every thread's tile and the list of tile sums would not fit what is left (the
    // tiling only moves rounding). Never a K x K matrix.
    const int64_t threads = omp_get_max_threads();
    auto tiles_bytes = [&](int64_t t) {
        const int64_t n = (K + t - 1) / t;
        return add_bytes(mul_bytes(t, t, 8 * threads), mul_bytes(n * (n + 1) / 2, (int64_t)(sizeof(PairTotals) + sizeof(std::pair<int64_t, int64_t>))));
    };
    const int64_t budget = std::min<int64_t>(int64_t(64) << 20, cfg_.host_memory_limit / 8);
    int64_t T = std::max<int64_t>(64, std::min<int64_t>(K, (int64_t)std::sqrt((double)budget / 8.0)));
    while (T > 64 && !budget_->fits(tiles_bytes(T))) T = std::max<int64_t>(64, T / 2);
    const HostBudget::Lease tiles_lease =
        budget_->reserve(tiles_bytes(T), "the pair metrics' tiles (" + std::to_string(threads) + " threads' " + std::to_string(T) + " x " +
                                             std::to_string(T) + " blocks of M M^T for K = " + std::to_string(K) + " kept classes)",
                         kFixKeptClasses);
    const int64_t nt = (K + T - 1) / T;

    using TileSum = PairTotals;
    std::vector<std::pair<int64_t, int64_t>> tiles;
    for (int64_t bi = 0; bi < nt; ++bi)
        for (int64_t bj = bi; bj < nt; ++bj) tiles.emplace_back(bi, bj);
    std::vector<TileSum> sums(tiles.size());
    const double p = cfg_.cdnv_power;
    const double inv_km1 = K > 1 ? 1.0 / (double)(K - 1) : 0.0;

#pragma omp parallel
    {
        std::vector<double> g((size_t)(T * T));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < (int64_t)tiles.size(); ++t) {
            const int64_t i0 = tiles[(size_t)t].first * T, j0 = tiles[(size_t)t].second * T;
            const int64_t ni = std::min(T, K - i0), nj = std::min(T, K - j0);
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)ni, (int)nj, (int)d, 1.0, m.data() + (size_t)i0 * d,
                        (int)d, m.data() + (size_t)j0 * d, (int)d, 0.0, g.data(), (int)nj);
            TileSum ts;
            for (int64_t i = 0; i < ni; ++i) {
                const int64_t gi = i0 + i;
                const int64_t jstart = (i0 == j0) ? i + 1 : 0;  // i < j only
                double n_l = 0, s_l = 0, s_l2 = 0, s_c = 0, s_c2 = 0, n_cd = 0, s_cd = 0;
                double l_shift = 0, c_shift = 0, s_d = 0, s_d2 = 0, d_shift = 0, s_e = 0, max_e = 0;
                for (int64_t j = jstart; j < nj; ++j) {
                    const int64_t gj = j0 + j;
                    const PairTerms pt = pair_terms(g[(size_t)(i * nj + j)], q[(size_t)gi], q[(size_t)gj], a[(size_t)gi],
                                                    a[(size_t)gj], var[(size_t)gi], var[(size_t)gj], p, inv_km1);
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
            sums[(size_t)t] = ts;
        }
    }
    // Merge in tile order: the same result whatever the thread count.
    PairTotals all;
    for (const PairTotals& ts : sums) all.merge(ts);
    finish_pair_metrics(all, K, out);
}

void CpuBackend::overall_entropy(const KeptSet& kept, MetricValues& out) const {
    const HostBudget::Lease lease = budget_->reserve(gram_eigen_bytes(d_), "the overall SVD's d x d Gram (d = " + std::to_string(d_) + ")",
                                                     "compute_overall_metrics: false skips it; or raise host_memory_limit");
    std::vector<double> g;
    if (gram_streaming_) {
        g = gram_;
    } else if (has_row_store()) {
        // max_tokens_to_analyze: the kept set is known only now; the Gram comes from the rows.
        g.assign((size_t)(d_ * d_), 0.0);
        store_->for_each_class(kept.ids, load_budget(), [&](int32_t, const double* x, int64_t n, int64_t, bool) {
            if (n > 0) cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d_, (int)n, 1.0, x, (int)d_, 1.0, g.data(), (int)d_);
        });
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
    const HostBudget::Lease lease = budget_->reserve(mul_bytes((int64_t)kept.ids.size(), (int64_t)sizeof(TokenMetrics)),
                                                     "the per-token results of K = " + std::to_string(kept.ids.size()) + " kept classes", kFixKeptClasses);
    std::vector<TokenMetrics> tokens(kept.ids.size());
    HostBudget::Lease g_lease = budget_->lease();
    std::vector<double> g;  // Gram of a class too large to load at once
    const int64_t load = load_budget();
    store_->for_each_class(kept.ids, load, [&](int32_t c, const double* x, int64_t n, int64_t first, bool last) {
        const size_t s = (size_t)kept.slot[(size_t)c];
        const double* center = cfg_.svd_center ? mu.data() + s * d : nullptr;
        TokenMetrics& tm = tokens[s];
        std::vector<double> sv;
        auto what = [&] {
            return "the per-token SVD of class " + std::to_string(c) + " (" + std::to_string(n) + " rows of width " + std::to_string(d_) + ")";
        };
        if (first == 0 && last) {
            sv = singular_values(*budget_, x, n, d_, center, what);
        } else {
            // Spilled and larger than the load budget: its d x d Gram, piece by piece.
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
            sv = singular_from_gram(g, d_, d_);
        }
        tm.id = c;
        tm.num_samples = count_[(size_t)c];
        tm.svd_rows = n;
        tm.sampled = n < tm.num_samples;
        token_from_spectrum(sv, n, d_, tm, out);
    });
    out.tokens = std::move(tokens);
}

void CpuBackend::nc4_from_store(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu,
                                MetricValues& out) const {
    const size_t K = kept.ids.size();
    const HostBudget::Lease lease = budget_->reserve(mul_bytes((int64_t)K, 8), "NC4's norms of K = " + std::to_string(K) + " kept means", kFixKeptClasses);
    std::vector<double> mu_sq(K, 0.0);
    for (size_t s = 0; s < K; ++s)
        for (int64_t j = 0; j < d_; ++j) mu_sq[s] += mu[s * (size_t)d_ + (size_t)j] * mu[s * (size_t)d_ + (size_t)j];
    int64_t agree = 0, rows = 0;
    if (cfg_.per_class_arrays) out.per_class.nc4_hits.assign(K, 0), out.per_class.nc4_rows.assign(K, 0);
    store_->for_each_class(kept.ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
        const int64_t a = nc4_agreements(*budget_, x, n, d_, clf, V_, mu, mu_sq, kept.ids);
        agree += a;
        rows += n;
        if (cfg_.per_class_arrays) {
            const size_t s = (size_t)kept.slot[(size_t)c];
            out.per_class.nc4_hits[s] += a, out.per_class.nc4_rows[s] += n;
        }
    });
    out.nc4_rows = rows;
    if (rows > 0) out.nc4_agreement = (double)agree / (double)rows;
}

}  // namespace collapse::internal
