// compute(): every metric of the kept set on the device (the twin of src/cpu/cpu_metrics.cpp).
// Temporaries are leases from the session's pool (resources.cuh), all used on the session's
// stream, so a compute of a shape seen before allocates nothing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/metric_math.hpp"
#include "core/metric_summary.hpp"
#include "core/pair_part.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.hpp"
#include "eigen_solvers.cuh"
#include "kernels.cuh"

namespace collapse::internal::cuda {

// Per-token SVD entropies from per-class Gram eigenvalues. Sampled: the reservoirs on the device.
// Exact, every row still in the device buffer: grouped_ (token_svd_device.cu). Exact after a spill
// (or when that path's workspace does not fit): the rows are in host memory or on disk; they come
// back to the device buffer a group of whole classes at a time, each group solved before the next.
void CudaBackend::per_token(const KeptSet& kept, const double* mu, MetricValues& out) {
    if (spread_phase_ == SpreadPhase::Spread && !spread_ids_.empty()) return spread_tokens(kept, out);  // the ranks' parts (cuda_ranks.cu)
    cudaStream_t s = stream_;
    const int64_t K = (int64_t)kept.ids.size();
    const int64_t cap = cfg_.svd_max_rows_per_token;
    // The per-token results (handed over in `out`) and their row ranges; sampled: the reservoir index.
    const HostBudget::Lease lease = host_.reserve(
        add_bytes(mul_bytes(K, 16 + (int64_t)sizeof(TokenMetrics)), sampled_ ? mul_bytes(K, add_bytes(mul_bytes(cap, 4), 8)) : 0),
        "the per-token results of K = " + std::to_string(K) + " kept classes" +
            (sampled_ ? " and their reservoirs' index (" + std::to_string(cap) + " rows each)" : std::string()),
        kFixKeptClasses);
    std::vector<int64_t> offset((size_t)K), nrows((size_t)K);
    std::vector<TokenMetrics> tokens((size_t)K);
    auto describe = [&](int64_t t) {
        TokenMetrics& tm = tokens[(size_t)t];
        tm.id = kept.ids[(size_t)t];
        tm.num_samples = kept.counts[(size_t)t];
        tm.svd_rows = nrows[(size_t)t];
        tm.sampled = tm.svd_rows < tm.num_samples;
    };
    if (sampled_) {
        std::vector<int32_t> h((size_t)(K * cap));
        std::vector<int64_t> all((size_t)K);
        for (int64_t t = 0; t < K; ++t) {
            offset[(size_t)t] = t * cap;
            nrows[(size_t)t] = std::min<int64_t>(kept.counts[(size_t)t], cap);
            for (int64_t j = 0; j < cap; ++j) h[(size_t)(t * cap + j)] = (int32_t)((int64_t)kept.ids[(size_t)t] * cap + j);
            all[(size_t)t] = t;
            describe(t);
        }
        Lease<int32_t> index = res_.take<int32_t>(h.size(), "reservoir index");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(index.data(), h.data(), h.size() * 4, cudaMemcpyHostToDevice, s));
        class_spectra(res_, d_, cfg_.svd_center, reservoir_.data(), index.data(), all, offset, nrows, kept, mu, tokens, out);
    } else {
        bool done = false;
        if (grouped_) {
            for (int64_t t = 0; t < K; ++t) {
                nrows[(size_t)t] = kept.counts[(size_t)t];
                describe(t);
            }
            try {
                done = grouped_->token_entropies(cfg_.svd_center, mu, tokens, out);
            } catch (const Error& e) {
                // The plan counts its own buffers but not the solvers' workspaces: short of device
                // memory there, the classes take the path below, as when the plan does not fit.
                if (e.status() != COLLAPSE_ERR_OUT_OF_MEMORY) throw;
            }
        }
        if (!done)
            upload_store(kept, offset, nrows, [&](const std::vector<int64_t>& members) {
                for (int64_t t : members) describe(t);
                class_spectra(res_, d_, cfg_.svd_center, reinterpret_cast<const float*>(store_.data()), nullptr, members, offset, nrows, kept,
                              mu, tokens, out);
            });
        out.row_store = {{"spilled_bytes", host_store_->disk_bytes()}, {"spill_flushes", host_store_->flushes()}};
    }
    out.tokens = std::move(tokens);
}

// NC4 of the rows in the device row buffer (every row is there: rows_on_device), the twin of the CPU's
// nc4_from_store: blocks of rows (of every class; rows outside the kept set are skipped by the
// compare) converted exactly to float64, one cublasDgemm of each block against W (W read once per
// block, the logits in a bounded scratch) and one against the kept means, then argmax, nearest mean,
// agreement and per-class hits on the device (launch_nc4_compare, as the second pass). Only the
// counts come back.
void nc4_products(cublasHandle_t h, const double* W, int64_t V, const double* mu, int64_t K, const double* xd, int64_t nr, int64_t d,
                  double* logits, double* dots) {
    const double one = 1.0, zero = 0.0;
    COLLAPSE_CUBLAS_TRY(cublasDgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)V, (int)nr, (int)d, &one, W, (int)d, xd, (int)d, &zero, logits, (int)V));
    COLLAPSE_CUBLAS_TRY(cublasDgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)K, (int)nr, (int)d, &one, mu, (int)d, xd, (int)d, &zero, dots, (int)K));
}

void CudaBackend::nc4_from_device(const KeptSet& kept, const Classifier& clf, const double* mu, const int32_t* ids, MetricValues& out) {
    cudaStream_t s = stream_;  // leases: the session's stream only (resources.cuh)
    const int64_t K = (int64_t)kept.ids.size(), d = d_, V = V_;
    const DeviceRows rows = device_rows();
    // Rows per block: the block's logits, means' dots and float64 rows within 256 MiB (less under a
    // small device_memory_limit); fixed per session, so a later compute reuses the same pool slabs.
    const int64_t block_bytes = std::min<int64_t>(int64_t(256) << 20, budget_.limit() / 8);
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(INT32_MAX / std::max(V, K), block_bytes / (8 * (V + K + d))));
    const HostBudget::Lease lease = host_.reserve(mul_bytes(2 * K + 1, 8), "NC4's per-class counts of K = " + std::to_string(K) + " kept classes",
                                                  kFixKeptClasses);
    Lease<double> W = res_.take<double>(clf.weight.size(), "classifier [V, d] (float64, NC4)");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(W.data(), clf.weight.data(), clf.weight.size() * 8, cudaMemcpyHostToDevice, s));
    Lease<double> bias;
    if (!clf.bias.empty()) {
        bias = res_.take<double>(clf.bias.size(), "classifier bias (NC4)");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(bias.data(), clf.bias.data(), clf.bias.size() * 8, cudaMemcpyHostToDevice, s));
    }
    Lease<int32_t> slot = res_.take<int32_t>((size_t)V, "kept slots (NC4)");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(slot.data(), kept.slot.data(), (size_t)V * 4, cudaMemcpyHostToDevice, s));
    Lease<double> mu_sq = res_.take<double>((size_t)K, "NC4's kept mean norms"), unused = res_.take<double>((size_t)K, "NC4's kept mean norms");
    launch_duality(nullptr, mu, ids, mu, K, d, mu_sq.data(), unused.data(), s);  // w = m = mu: ||mu_c||^2
    Lease<unsigned long long> counts = res_.take<unsigned long long>((size_t)(2 * K + 1), "NC4 counters");
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(counts.data(), 0, counts.bytes(), s));
    unsigned long long *hits = counts.data(), *per_rows = counts.data() + K, *agree = counts.data() + 2 * K;
    Lease<double> xd = res_.take<double>((size_t)(block * d), "NC4 rows (float64)", "raise device_memory_limit");
    Lease<double> logits = res_.take<double>((size_t)(block * V), "NC4 logits", "raise device_memory_limit");
    Lease<double> dots = res_.take<double>((size_t)(block * K), "NC4 distances", "raise device_memory_limit");
    const int64_t elem = row_buffer_elem_bytes(rows.dtype);
    for (int64_t r0 = 0; r0 < rows.n; r0 += block) {
        const int64_t nr = std::min(block, rows.n - r0);
        launch_buffer_rows_to_double(static_cast<const uint8_t*>(rows.data) + r0 * d * elem, rows.dtype, nullptr, nr, d, xd.data(), s);
        nc4_products(res_.blas(s), W.data(), V, mu, K, xd.data(), nr, d, logits.data(), dots.data());
        launch_nc4_compare(logits.data(), bias.data(), V, dots.data(), mu_sq.data(), ids, K, nr, agree, s, rows.labels + r0, slot.data(),
                           nullptr, hits, per_rows);
    }
    std::vector<unsigned long long> h((size_t)(2 * K + 1));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h.data(), counts.data(), counts.bytes(), cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    int64_t total = 0;
    for (int64_t t = 0; t < K; ++t) total += (int64_t)h[(size_t)(K + t)];
    if (total != kept.rows)
        fail(COLLAPSE_ERR_INTERNAL, "NC4 from the device row buffer saw ", total, " kept rows, the class counts say ", kept.rows);
    out.nc4_rows = total;
    if (total > 0) out.nc4_agreement = (double)h[(size_t)(2 * K)] / (double)total;
    if (cfg_.per_class_arrays) {
        out.per_class.nc4_hits.assign(h.begin(), h.begin() + K);
        out.per_class.nc4_rows.assign(h.begin() + K, h.begin() + 2 * K);
    }
}

// The anchor metrics (core/metric_summary.hpp, finish_anchor_metrics): M^T M and W_K^T W_K by
// cublasDsyrk, column sums and the OoD cosines on the device; the d x d eigen-decomposition on the host.
void CudaBackend::anchor_metrics(const KeptSet& kept, const Classifier& clf, const double* mu, const double* m, const int32_t* ids,
                                 const ClassVectors& v, MetricValues& out) {
    cudaStream_t s = stream_;
    const int64_t K = (int64_t)kept.ids.size(), d = d_;
    AnchorInputs in;
    in.K = K, in.d = d, in.N = kept.rows;
    if (K < 2) {
        finish_anchor_metrics(in, cfg_, host_, out);
        return;
    }
    const bool use_means = cfg_.unc3_classifier == COLLAPSE_UNC3_CLASS_MEANS;
    // Host: M^T M, W_K^T W_K, Sigma_W (d x d each), the gathered W_K [K, d], two column sums, the
    // OoD dots and norms [K] each.
    const HostBudget::Lease lease = host_.reserve(
        add_bytes(mul_bytes(3 * d, d, 8), add_bytes(mul_bytes(v.duality && !use_means ? K : 0, d, 8), mul_bytes(2 * K + 3 * d, 8))),
        "the anchor metrics' d x d products (d = " + std::to_string(d) + ", K = " + std::to_string(K) + ")",
        "compute_class_metrics: false skips them; or raise host_memory_limit");
    const double one = 1.0, zero = 0.0;
    Lease<double> g = res_.take<double>((size_t)(d * d), "anchor metrics' d x d product");
    Lease<double> colsum = res_.take<double>((size_t)d, "anchor metrics' column sums");
    // rows [K, d] row-major is the column-major d x K matrix A: A A^T = rows^T rows.
    auto gram_of = [&](const double* rows, std::vector<double>& host) {
        COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d, (int)K, &one, rows, (int)d, &zero, g.data(), (int)d));
        host.resize((size_t)(d * d));
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(host.data(), g.data(), g.bytes(), cudaMemcpyDeviceToHost, s));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
        for (int64_t j = 0; j < d; ++j)  // the upper triangle (column-major) to both
            for (int64_t i = 0; i < j; ++i) host[(size_t)(j + i * d)] = host[(size_t)(i + j * d)];
    };
    auto sums_of = [&](const double* rows, std::vector<double>& host) {
        launch_column_sums(rows, nullptr, K, d, colsum.data(), s);
        host.resize((size_t)d);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(host.data(), colsum.data(), colsum.bytes(), cudaMemcpyDeviceToHost, s));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    };
    gram_of(m, in.gram_m);
    sums_of(m, in.sum_m);
    in.duality = v.duality;
    if (v.duality) {
        Lease<double> wk;
        const double* rows = mu;  // class_means mode: w_c = mu_c
        if (!use_means) {
            std::vector<double> h((size_t)(K * d));
            for (int64_t t = 0; t < K; ++t)
                std::copy(clf.weight.begin() + (std::ptrdiff_t)kept.ids[(size_t)t] * d, clf.weight.begin() + (std::ptrdiff_t)(kept.ids[(size_t)t] + 1) * d,
                          h.begin() + t * d);
            wk = res_.take<double>(h.size(), "the kept classifier rows W_K [K, d]");
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(wk.data(), h.data(), h.size() * 8, cudaMemcpyHostToDevice, s));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));  // h goes out of scope
            rows = wk.data();
        }
        gram_of(rows, in.gram_w);
        sums_of(rows, in.sum_w);
        in.dot = v.dot;
    }
    if (!ood_mean.empty()) {
        Lease<double> od = res_.take<double>((size_t)d, "the OoD mean"), dots = res_.take<double>((size_t)K, "OoD dots"),
                      nrm = res_.take<double>((size_t)K, "class mean norms"), nrm2 = res_.take<double>((size_t)K, "class mean norms");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(od.data(), ood_mean.data(), (size_t)d * 8, cudaMemcpyHostToDevice, s));
        COLLAPSE_CUBLAS_TRY(cublasDgemv(res_.blas(s), CUBLAS_OP_T, (int)d, (int)K, &one, mu, (int)d, od.data(), 1, &zero, dots.data(), 1));
        launch_duality(nullptr, mu, ids, mu, K, d, nrm.data(), nrm2.data(), s);  // w = m = mu: ||mu_c||^2
        std::vector<double> hd((size_t)K), hn((size_t)K);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hd.data(), dots.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hn.data(), nrm.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
        double oo = 0;
        for (double x : ood_mean) oo += x * x;
        in.ood_cos.resize((size_t)K);
        for (int64_t t = 0; t < K; ++t)
            in.ood_cos[(size_t)t] = hn[(size_t)t] > 0 && oo > 0 ? hd[(size_t)t] / std::sqrt(hn[(size_t)t] * oo) : 0.0;
    }
    in.within = within_scatter(kept, mu, &in.within_note);
    finish_anchor_metrics(in, cfg_, host_, out);
}

// Sigma_W's scatter on this backend, by the CPU's routes (src/cpu/cpu_metrics.cpp): streamed on the
// device; else from the exact rows (on the device, or back on the host) or the second pass, about
// the final means.
std::vector<double> CudaBackend::within_scatter(const KeptSet& kept, const double* mu, std::string* note) {
    std::vector<double> w;
    const int64_t d = d_;
    auto mirror = [&] { mirror_upper(w.data(), d); };
    if (within_streaming_) {
        if (!within_valid_) {
            *note = "a loaded or merged checkpoint has no within-class scatter (written by a build or backend without it)";
            return w;
        }
        const HostBudget::Lease counts = host_.reserve(mul_bytes(V_, 8), "the class counts of V = " + std::to_string(V_) + " (Sigma_W)", kFixNumClasses);
        w = streamed_within(class_counts(), &kept);
        mirror();
        return w;
    }
    if (grouped_) return grouped_->within_scatter(mu);  // every row still on the device
    // The host store holds every kept row, unless the rows were spread over ranks by class (the
    // second pass over every rank's rows gives Sigma_W then, cuda_ranks.cu).
    const bool rows_here = exact_store_ && host_store_ && spread_phase_ != SpreadPhase::Spread;
    unsigned long long pass2_rows = 0;
    if (pass2_ && within2_.data()) COLLAPSE_CUDA_TRY(cudaMemcpy(&pass2_rows, pass2_rows_dev_.data(), 8, cudaMemcpyDeviceToHost));
    if (!rows_here && within2_.data() && (int64_t)pass2_rows == kept.rows) {
        // The second pass's scatter about the kept means (column-major upper on the device).
        const HostBudget::Lease lease = host_.reserve(mul_bytes(d, d, 8), "the second pass's Sigma_W d x d on its way to the host", kFixKeptClasses);
        std::vector<double> h((size_t)(d * d));
        COLLAPSE_CUDA_TRY(cudaMemcpy(h.data(), within2_.data(), within2_.bytes(), cudaMemcpyDeviceToHost));
        w.assign((size_t)(d * d), 0.0);
        for (int64_t a = 0; a < d; ++a)
            for (int64_t b = a; b < d; ++b) w[(size_t)(a * d + b)] = h[(size_t)(a + b * d)];
        mirror();
        return w;
    }
    if (!rows_here) {
        *note = cfg_.max_tokens_to_analyze > 0
                    ? "max_tokens_to_analyze cuts the kept set, so Sigma_W of kept rows needs the row store (svd_mode: exact) or a second pass"
                    : "Sigma_W streams with the overall Gram: it needs compute_overall_metrics (or the row store, svd_mode: exact)";
        return w;
    }
    const int64_t K = (int64_t)kept.ids.size();
    const HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes(K, d, 8), mul_bytes(512, d, 8)),
                                                  "Sigma_W's class means [K, d] and block of centred rows", kFixKeptClasses);
    std::vector<double> muh((size_t)(K * d));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(muh.data(), mu, muh.size() * 8, cudaMemcpyDeviceToHost, stream_));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(stream_));
    w.assign((size_t)(d * d), 0.0);
    host_store_->for_each_class(kept.ids, load_budget(), [&](int32_t c, const double* x, int64_t n, int64_t, bool) {
        add_centered_gram(x, n, d, muh.data() + (size_t)kept.slot[(size_t)c] * (size_t)d, w.data());
    });
    mirror();
    return w;
}

std::vector<int32_t> CudaBackend::held_index(const std::vector<int64_t>& counts) const {
    std::vector<int32_t> index;
    for (int64_t c = 0; c < V_ && hold_rows_ > 0; ++c)
        if (counts[(size_t)c] > 0 && counts[(size_t)c] < cfg_.min_samples_per_token)
            for (int64_t r = 0; r < counts[(size_t)c]; ++r) index.push_back((int32_t)(c * hold_rows_ + r));
    return index;
}

void CudaBackend::subtract_held_rows(const std::vector<int32_t>& index, bool shifted, double* g) {
    cudaStream_t s = stream_;  // leases: the session's stream only (resources.cuh)
    const int64_t d = d_, held = (int64_t)index.size();
    if (held == 0) return;
    const double one = 1.0, minus = -1.0;
    const int64_t chunk = std::min(held, within_chunk_rows(d));
    Lease<double> x = res_.take<double>((size_t)(chunk * d), "held-back rows (float64)");
    Lease<int32_t> idx = res_.take<int32_t>((size_t)chunk, "held-back row index");
    for (int64_t r0 = 0; r0 < held; r0 += chunk) {
        const int64_t m = std::min(chunk, held - r0);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(idx.data(), index.data() + r0, (size_t)m * 4, cudaMemcpyHostToDevice, s));
        if (shifted)
            launch_held_shifted_rows(hold_.data(), idx.data(), m, hold_rows_, d, shift_.data(), x.data(), s);
        else
            launch_rows_to_double(hold_.data(), idx.data(), m, d, nullptr, x.data(), s);
        COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d, (int)m, &minus, x.data(), (int)d, &one, g, (int)d));
    }
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));  // before the caller's index goes
}

std::vector<double> CudaBackend::streamed_within(const std::vector<int64_t>& counts, const KeptSet* kept) {
    cudaStream_t s = stream_;  // leases: the session's stream only (resources.cuh)
    const int64_t d = d_;
    const double one = 1.0, minus = -1.0;
    Lease<double> g = res_.take<double>((size_t)(d * d), "Sigma_W's scatter d x d");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(g.data(), within_.data(), within_.bytes(), cudaMemcpyDeviceToDevice, s));
    // The rows of classes below min_samples_per_token (all of them in the hold area) come out, as
    // the Gram's do (cuda_checkpoint.cu).
    int64_t held = 0;
    for (int64_t c = 0; c < V_; ++c)
        if (counts[(size_t)c] > 0 && counts[(size_t)c] < cfg_.min_samples_per_token) held += counts[(size_t)c];
    const HostBudget::Lease lease = host_.reserve(add_bytes(mul_bytes(held, 4), mul_bytes(d, d, 8)),
                                                  "Sigma_W's d x d on its way to the host and the index of " + std::to_string(held) + " held-back rows",
                                                  kFixNumClasses);
    if (held > 0) subtract_held_rows(held_index(counts), true, g.data());
    const int64_t K = kept ? (int64_t)kept->ids.size() : 0;
    if (K > 0) {  // about the means: unshift_scatter (core/shifted_sums.hpp) on the device
        Lease<int32_t> ids = res_.take<int32_t>((size_t)K, "kept ids (Sigma_W)");
        Lease<double> e = res_.take<double>((size_t)(K * d), "Sigma_W's correction rows [K, d]");
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(ids.data(), kept->ids.data(), (size_t)K * 4, cudaMemcpyHostToDevice, s));
        launch_unshift_rows(sum_.data(), shift_.data(), count_.data(), ids.data(), K, d, e.data(), s);
        COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, (int)d, (int)K, &minus, e.data(), (int)d, &one, g.data(),
                                        (int)d));
    }
    std::vector<double> h((size_t)(d * d)), out((size_t)(d * d), 0.0);
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h.data(), g.data(), (size_t)(d * d) * 8, cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    for (int64_t a = 0; a < d; ++a)
        for (int64_t b = a; b < d; ++b) out[(size_t)(a * d + b)] = h[(size_t)(a + b * d)];
    return out;
}

// The kept means as compute() makes them, on the session's stream: ids, means mu [K, d], variances
// and weights [K], the global mean's column sums [d], the centred means m [K, d], their squared
// norms q and direction scales a [K].
CudaBackend::KeptMeans CudaBackend::kept_means(const KeptSet& kept) {
    cudaStream_t s = stream_;
    const int64_t K = (int64_t)kept.ids.size(), d = d_;
    KeptMeans k;
    k.ids = res_.take<int32_t>((size_t)K, "kept ids");
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(k.ids.data(), kept.ids.data(), (size_t)K * 4, cudaMemcpyHostToDevice, s));
    k.mu = res_.take<double>((size_t)(K * d), "class means [K, d]"), k.var = res_.take<double>((size_t)K, "variances");
    k.weight = res_.take<double>((size_t)K, "weights"), k.mug = res_.take<double>((size_t)d, "global mean");
    k.m = res_.take<double>((size_t)(K * d), "centred means"), k.q = res_.take<double>((size_t)K, "norms");
    k.a = res_.take<double>((size_t)K, "direction scales");
    const bool token_weighted = cfg_.global_mean == COLLAPSE_MEAN_TOKEN_WEIGHTED;
    launch_means(sum_.data(), sqdev_.data(), shift_.data(), count_.data(), k.ids.data(), K, d, token_weighted, k.mu.data(), k.var.data(),
                 k.weight.data(), s);
    launch_column_sums(k.mu.data(), k.weight.data(), K, d, k.mug.data(), s);
    const double total_weight = token_weighted ? (double)kept.rows : (double)K;
    launch_center(k.mu.data(), k.mug.data(), total_weight, K, d, k.m.data(), k.q.data(), k.a.data(), s);
    return k;
}

// Tiles of M M^T: the edge from a quarter of the free budget, at most 16384 (COLLAPSE_PAIR_TILE_EDGE: tests).
int64_t CudaBackend::pair_tile_edge(int64_t K) const {
    if (const int64_t t = pair_tile_edge_override(K)) return t;
    const int64_t free_bytes = budget_.limit() - budget_.used();
    return std::max<int64_t>(256, std::min<int64_t>({K, int64_t(16384), (int64_t)std::sqrt((double)free_bytes / 4 / 8)}));
}

// The merged pair moments of the share of rank `rank` of P of the tiles (core/pair_part.hpp's
// tiling; P = 1: every tile), from device m [K, d], q, a, var [K]: the one pair reduction of the
// single process and of the ranks. Each tile's terms go into the blocks' running slots, merged in
// block order at the end.
PairTotals CudaBackend::pair_tiles(const double* m, const double* q, const double* a, const double* var, int64_t K, int64_t T, int rank, int P,
                                   int64_t* range) {
    cudaStream_t s = stream_;
    const int64_t d = d_;
    const int64_t nt = (K + T - 1) / T;
    const HostBudget::Lease lease = host_.reserve(mul_bytes(nt * (nt + 1) / 2, 24), "the list of the pair metrics' " + std::to_string(T) + " x " +
                                                                                        std::to_string(T) + " tiles for K = " + std::to_string(K) + " kept classes",
                                                  kFixKeptClasses);
    const PairTiling tiling = pair_tiling(K, T, rank, P);
    if (range) range[0] = tiling.begin, range[1] = tiling.end, range[2] = (int64_t)tiling.tiles.size();
    // A rank with no tiles (more ranks than tiles) takes no tile-sized buffer.
    const int64_t edge = tiling.begin < tiling.end ? std::min(T, K) : 1;
    Lease<double> tile = res_.take<double>((size_t)(edge * edge), "pair tile",
                                           "raise device_memory_limit (the tile edge shrinks with the limit)");
    Lease<double> acc = res_.take<double>((size_t)(kPairBlocks * kPairFields), "pair accumulators");
    COLLAPSE_CUDA_TRY(cudaMemsetAsync(acc.data(), 0, acc.bytes(), s));
    const double one = 1.0, zero = 0.0;
    for (int64_t t = tiling.begin; t < tiling.end; ++t) {
        const int64_t i0 = tiling.tiles[(size_t)t].first * T, j0 = tiling.tiles[(size_t)t].second * T;
        const int64_t ni = std::min(T, K - i0), nj = std::min(T, K - j0);
        // Diagonal tiles: only i < j is read, the upper triangle of a SYRK.
        if (i0 == j0)
            COLLAPSE_CUBLAS_TRY(cublasDsyrk(res_.blas(s), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, (int)ni, (int)d, &one, m + i0 * d, (int)d, &zero,
                                            tile.data(), (int)ni));
        else
            COLLAPSE_CUBLAS_TRY(cublasDgemm(res_.blas(s), CUBLAS_OP_T, CUBLAS_OP_N, (int)ni, (int)nj, (int)d, &one, m + i0 * d, (int)d, m + j0 * d,
                                            (int)d, &zero, tile.data(), (int)ni));
        launch_pair_reduce(tile.data(), i0, j0, ni, nj, m, d, q, a, var, cfg_.cdnv_power, 1.0 / (double)(K - 1), acc.data(), s);
    }
    std::vector<double> h((size_t)(kPairBlocks * kPairFields));
    COLLAPSE_CUDA_TRY(cudaMemcpyAsync(h.data(), acc.data(), acc.bytes(), cudaMemcpyDeviceToHost, s));
    COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
    PairTotals all;
    for (int b = 0; b < kPairBlocks; ++b) {
        const double* f = h.data() + b * kPairFields;
        PairTotals t;
        t.l = Moments{f[0], f[1], f[2]};
        t.c = Moments{f[3], f[4], f[5]};
        t.n_cdnv = f[6], t.s_cdnv = f[7];
        t.pairs = (int64_t)f[3];
        t.skip_l = (int64_t)f[8], t.skip_cdnv = (int64_t)f[9];
        t.dist = Moments{f[10], f[11], f[12]};
        t.s_etf = f[13], t.max_etf = f[14];
        all.merge(t);
    }
    return all;
}

MetricValues CudaBackend::compute(const KeptSet& kept, const Classifier& clf) {
    DeviceGuard guard(cfg_.device_ordinal);
    sync();
    MetricValues out;
    cudaStream_t s = stream_;  // the leases below are used on this stream only (resources.cuh)
    last_stream_ = s;
    // A batch after this compute (a snapshot's session goes on) on another stream waits for its
    // work: pick_stream waits on last_done_ when the stream changes, so it must mark this work's end.
    struct RecordDone {
        cudaEvent_t event;
        cudaStream_t stream;
        ~RecordDone() { COLLAPSE_CUDA_TRY_NO_THROW(cudaEventRecord(event, stream)); }
    } const record_done{last_done_, s};
    const int64_t K = (int64_t)kept.ids.size();
    if (K == 0) {
        out.notes["overall"] = "no kept classes: every metric is null";
        return out;
    }
    // Exact mode with every row still in the device buffer: grouped by kept class there, for the
    // per-token SVD and Sigma_W (grouped_, for this compute only).
    std::optional<DeviceClassRows> grouping;
    struct ResetGrouped {
        DeviceClassRows*& p;
        ~ResetGrouped() { p = nullptr; }
    } const reset_grouped{grouped_};
    if (rows_on_device()) {
        const DeviceRows rows = device_rows();
        // Row-long workspaces for a power of two of rows (at least 2^20, at most the buffer's
        // capacity), so that later computes with more rows mostly reuse the same pool slabs.
        int64_t max_rows = int64_t(1) << 20;
        while (max_rows < rows.n) max_rows *= 2;
        max_rows = std::min<int64_t>(max_rows, std::max<int64_t>((int64_t)store_labels_.size(), rows.n));
        if (DeviceClassRows::grouping_bytes(max_rows, V_, K) <= budget_.limit() - budget_.used()) {
            grouping.emplace(res_, rows, max_rows, kept);
            grouped_ = &*grouping;
        }
    }
    using Clock = std::chrono::steady_clock;
    auto since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
    Clock::time_point t_nc4;
    unsigned long long pass2_rows = 0;
    if (pass2_) COLLAPSE_CUDA_TRY(cudaMemcpy(&pass2_rows, pass2_rows_dev_.data(), 8, cudaMemcpyDeviceToHost));
    const int64_t d = d_;
    KeptMeans km = kept_means(kept);
    const Lease<int32_t>& ids = km.ids;
    const Lease<double>&mu = km.mu, &var = km.var, &m = km.m, &q = km.q, &a = km.a;
    // NC4 from the device row buffer (the session skipped the second pass: nc4_from_rows), before
    // anything below may move the rows to the host.
    const bool nc4_here = cfg_.compute_nc4 && clf.present() && !cfg_.nc4_held_out && !(pass2_ && pass2_nc4_) && rows_on_device();
    if (nc4_here) {
        t_nc4 = Clock::now();
        nc4_from_device(kept, clf, mu.data(), ids.data(), out);
        out.timings["nc4"] = since(t_nc4);
    }
    // Otherwise finalisation needs room: as on the CPU, the exact store's rows (those still on the
    // device join them first) go to disk when they take more host memory than is left free; they
    // come back a group of classes at a time.
    if (exact_store_ && !grouped_) {
        move_store_to_host();
        if (host_store_->memory_bytes() > 0 && host_store_->memory_bytes() >= host_.available()) {
            host_store_->spill_memory();
            store_held_.update(host_store_->memory_bytes());
        }
    }
    // Per-class arrays and exports: the same variances and means the metrics use, on the host.
    if (cfg_.per_class_arrays) {
        host_.check(mul_bytes(K, 8), "the per-class variances of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
        out.per_class.within_variance.resize((size_t)K);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(out.per_class.within_variance.data(), var.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
    }
    if (cfg_.keep_class_means) {
        host_.check(mul_bytes(K, 2 * d, 8), "a copy of the class means [K, d] = [" + std::to_string(K) + ", " + std::to_string(d) + "] for the exports",
                    kFixKeptClasses);
        out.class_means.resize((size_t)(K * d));
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(out.class_means.data(), mu.data(), (size_t)(K * d) * 8, cudaMemcpyDeviceToHost, s));
    }
    if (cfg_.per_class_arrays || cfg_.keep_class_means) COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));

    auto t_phase = Clock::now();
    if (cfg_.compute_class_metrics) {
        // Five K-long vectors on the host: norms, the two duality terms, cosines and norms' roots.
        const HostBudget::Lease lease =
            host_.reserve(mul_bytes(K, 5 * 8), "the class vectors of K = " + std::to_string(K) + " kept classes", kFixKeptClasses);
        ClassVectors v;
        std::vector<double> hq((size_t)K);
        COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hq.data(), q.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
        const bool use_means = cfg_.unc3_classifier == COLLAPSE_UNC3_CLASS_MEANS;
        v.duality = use_means || clf.present();
        Lease<double> W;
        if (v.duality) {
            if (!use_means) {
                W = res_.take<double>(clf.weight.size(), "classifier [V, d] (float64)");
                COLLAPSE_CUDA_TRY(cudaMemcpyAsync(W.data(), clf.weight.data(), clf.weight.size() * 8, cudaMemcpyHostToDevice, s));
            }
            Lease<double> wm = res_.take<double>((size_t)K, "duality"), ww = res_.take<double>((size_t)K, "duality");
            launch_duality(use_means ? nullptr : W.data(), mu.data(), ids.data(), m.data(), K, d, wm.data(), ww.data(), s);
            std::vector<double> hwm((size_t)K), hww((size_t)K);
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hwm.data(), wm.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hww.data(), ww.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
            COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
            double wf2 = 0, mf2 = 0;
            v.dot = hwm;  // nc3u_uni_dual and the per-class arrays; before the self-duality terms reuse the buffer
            v.cos.resize((size_t)K);
            for (int64_t i = 0; i < K; ++i) {
                v.cos[(size_t)i] = duality_cos(hwm[(size_t)i], std::sqrt(hww[(size_t)i]), std::sqrt(hq[(size_t)i]));
                wf2 += hww[(size_t)i];
                mf2 += hq[(size_t)i];
            }
            v.w_frobenius = std::sqrt(wf2);
            v.m_frobenius = std::sqrt(mf2);
            if (v.w_frobenius > 0 && v.m_frobenius > 0) {
                launch_self_duality(use_means ? nullptr : W.data(), mu.data(), ids.data(), m.data(), K, d, v.w_frobenius, v.m_frobenius,
                                    wm.data(), s);
                COLLAPSE_CUDA_TRY(cudaMemcpyAsync(hwm.data(), wm.data(), (size_t)K * 8, cudaMemcpyDeviceToHost, s));
                COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
                double acc = 0;
                for (double x : hwm) acc += x;
                v.self_duality_sq = acc;
            }
        }
        COLLAPSE_CUDA_TRY(cudaStreamSynchronize(s));
        v.norm.resize((size_t)K);
        for (int64_t i = 0; i < K; ++i) v.norm[(size_t)i] = std::sqrt(hq[(size_t)i]);
        finish_class_metrics(v, cfg_, out);

        if (K < cfg_.min_classes_for_gnc2) {
            note_too_few_classes_for_pairs(cfg_, out);
        } else {
            // The ranks' merged shares when they made them for this kept set (cuda_ranks.cu), else every tile here.
            const PairTotals* spread = pair_spread_ ? pair_spread_->totals_for(kept, totals_.rows_seen) : nullptr;
            finish_pair_metrics(spread ? *spread : pair_tiles(m.data(), q.data(), a.data(), var.data(), K, pair_tile_edge(K), 0, 1), K, out);
        }
        anchor_metrics(kept, clf, mu.data(), m.data(), ids.data(), v, out);
        out.timings["class_metrics"] = since(t_phase);
    }
    t_phase = Clock::now();

    if (cfg_.compute_overall_metrics) {
        Lease<double> g = res_.take<double>((size_t)(d * d), "overall Gram");
        bool have = false;
        if (gram_streaming_) {
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(g.data(), gram_.data(), g.bytes(), cudaMemcpyDeviceToDevice, s));
            // Subtract the rows of classes that never reached min_samples_per_token (all in the hold area).
            HostBudget::Lease lease =
                host_.reserve(mul_bytes(V_, 8), "the class counts of V = " + std::to_string(V_) + " (for the Gram's held-back rows)", kFixNumClasses);
            const std::vector<int64_t> counts = class_counts();
            int64_t held = 0;
            for (int64_t c = 0; c < V_ && hold_rows_ > 0; ++c)
                if (counts[(size_t)c] > 0 && counts[(size_t)c] < cfg_.min_samples_per_token) held += counts[(size_t)c];
            lease.resize(add_bytes(lease.bytes(), mul_bytes(held, 4)), "the index of " + std::to_string(held) + " held-back rows", "raise host_memory_limit");
            if (held > 0) subtract_held_rows(held_index(counts), false, g.data());
            have = true;
        } else if (pass2_ && pass2_gram_ && (int64_t)pass2_rows == kept.rows) {
            COLLAPSE_CUDA_TRY(cudaMemcpyAsync(g.data(), gram2_.data(), g.bytes(), cudaMemcpyDeviceToDevice, s));
            have = true;
        } else {
            out.notes["overall_svd_entropy"] =
                "max_tokens_to_analyze cuts the kept set: the cuda backend needs a second pass for the Gram of kept rows";
        }
        if (have) {
            const std::vector<double> e = eigenvalues_sym(res_, g.data(), d, s);
            bool zero = false;
            const double h = spectrum_entropy(singular_values_from_eigen(e.data(), d, std::min<int64_t>(kept.rows, d)), &zero);
            out.overall_svd_entropy = h;
            out.overall_effective_rank = std::exp(h);
        }
        out.timings["overall_svd"] = since(t_phase);
    }

    if (cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF) {
        t_phase = Clock::now();
        per_token(kept, mu.data(), out);
        out.timings["token_svd"] = since(t_phase);
    }

    if (cfg_.compute_nc4) {
        if (!clf.present()) {
            out.notes["nc4_agreement"] = "no classifier was given";
        } else if (nc4_here) {
            // nc4_from_device filled it in
        } else if (!cfg_.nc4_held_out && spread_nc4(kept, out)) {
            // the owners' parts (cuda_ranks.cu)
        } else if (pass2_ && pass2_nc4_) {
            unsigned long long agree = 0;
            COLLAPSE_CUDA_TRY(cudaMemcpy(&agree, agree_.data(), 8, cudaMemcpyDeviceToHost));
            auto per_class = [&] {
                if (!cfg_.per_class_arrays) return;
                std::vector<unsigned long long> h((size_t)K), r((size_t)K);
                COLLAPSE_CUDA_TRY(cudaMemcpy(h.data(), nc4_slot_hits_.data(), (size_t)K * 8, cudaMemcpyDeviceToHost));
                COLLAPSE_CUDA_TRY(cudaMemcpy(r.data(), nc4_slot_rows_.data(), (size_t)K * 8, cudaMemcpyDeviceToHost));
                out.per_class.nc4_hits.assign(h.begin(), h.end());
                out.per_class.nc4_rows.assign(r.begin(), r.end());
            };
            if (cfg_.nc4_held_out) {  // held-out rows: the means of this input, the agreement on other rows
                out.nc4_held_out = true;
                out.nc4_rows = (int64_t)pass2_rows;
                if (pass2_rows > 0) out.nc4_agreement = (double)agree / (double)pass2_rows;
                else out.notes["nc4_agreement"] = "no held-out row belongs to a kept class";
                per_class();
            } else if ((int64_t)pass2_rows == kept.rows) {
                out.nc4_agreement = (double)agree / (double)pass2_rows;
                out.nc4_rows = (int64_t)pass2_rows;
                per_class();
            } else {
                out.notes["nc4_agreement"] = "the second pass saw " + std::to_string(pass2_rows) + " kept rows, the first " + std::to_string(kept.rows);
            }
        } else {
            out.notes["nc4_agreement"] = "the cuda backend computes NC4 in a second pass over the rows";
        }
    }
    return out;
}

}  // namespace collapse::internal::cuda
