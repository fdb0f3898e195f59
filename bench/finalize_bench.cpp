// Figures 3 and 4: finalisation. compute() with the pair metrics against the same tile GEMMs alone,
// and the exact per-token SVD entropies against LAPACK's dgesdd alone on the same matrices.
#include <cblas.h>
#include <lapacke.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "common.hpp"
#include "cpu/cpu_backend.hpp"

namespace bench {
namespace {

// The pair metrics' tile GEMMs alone, exactly as src/cpu/cpu_metrics.cpp issues them: an OpenMP
// loop over the upper-triangle tiles of M M^T, one cblas_dgemm per tile. Seconds (best of reps).
int64_t pair_tile_edge(int64_t K, int64_t host_memory_limit) {
    const int64_t budget = std::min<int64_t>(int64_t(64) << 20, host_memory_limit / 8);
    return std::max<int64_t>(64, std::min<int64_t>(K, (int64_t)std::sqrt((double)budget / 8.0)));
}
// M's values are a fixed pattern: dgemm's speed does not depend on them.
double tile_gemm_seconds(int64_t K, int64_t d, int64_t T, int reps, double* flops) {
    std::vector<double> m((size_t)(K * d));
    for (size_t i = 0; i < m.size(); ++i) m[i] = (double)((i * 2654435761u) % 1000u) * 1e-3 - 0.5;
    const int64_t nt = (K + T - 1) / T;
    std::vector<std::pair<int64_t, int64_t>> tiles;
    for (int64_t bi = 0; bi < nt; ++bi)
        for (int64_t bj = bi; bj < nt; ++bj) tiles.emplace_back(bi, bj);
    *flops = 0;
    for (const auto& t : tiles)
        *flops += 2.0 * (double)std::min(T, K - t.first * T) * (double)std::min(T, K - t.second * T) * (double)d;
    double best = 1e300;
    for (int r = 0; r < reps; ++r) {
        const auto t0 = Clock::now();
        double check = 0;
#pragma omp parallel reduction(+ : check)
        {
            std::vector<double> g((size_t)(T * T));
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < (int64_t)tiles.size(); ++t) {
                const int64_t i0 = tiles[(size_t)t].first * T, j0 = tiles[(size_t)t].second * T;
                const int64_t ni = std::min(T, K - i0), nj = std::min(T, K - j0);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)ni, (int)nj, (int)d, 1.0, m.data() + (size_t)i0 * d,
                            (int)d, m.data() + (size_t)j0 * d, (int)d, 0.0, g.data(), (int)nj);
                check += g[0];
            }
        }
        best = std::min(best, since(t0));
        g_sink = g_sink + (float)check;
    }
    return best;
}

}  // namespace

// ---- figure 3: finalisation (pair metrics, UNC3) vs. the tile GEMMs alone ---------------------------

void bench_finalize(const Options& o, json& out) {
    const std::vector<int64_t> Ks = o.quick ? std::vector<int64_t>{1000, 8000} : std::vector<int64_t>{1000, 32000};
    const int64_t d = 256;
    std::printf("\n== 3. finalisation: compute() with class metrics (pair metrics GNC2/CDNV/NC2, UNC3 with a classifier),"
                " svd_mode off, no overall Gram, d=%lld, 2-4 rows per class from SynthGenerator (collapse %.1f) ==\n",
                (long long)d, kCollapse);
    std::printf("   GEMM flops counted as the tiles actually computed: sum over upper-triangle tiles (diagonal tiles in full)"
                " of 2*ni*nj*d\n");
    for (int64_t K : Ks) {
        // The figure fixes the rows per class (class c gets 2 + c % 3), which Zipf labels cannot
        // give: exact labels, the generator's rows and classifier for them.
        const SynthGenerator& gen = synth_generator(K, d);
        const Inputs in = Inputs::with_labels(gen, exact_class_labels(K, 2, 4));
        std::vector<float> w((size_t)(K * d));
        gen.classifier(w.data());
        const int reps = K <= 8000 ? 3 : 1;
        std::vector<double> t, t_class;
        for (int r = 0; r < reps; ++r) {
            Config cfg = base_config(o, K, d);
            cfg.svd_mode = COLLAPSE_SVD_OFF;
            cfg.compute_overall_metrics = false;
            cfg.compute_token_metrics = false;
            cfg.compute_class_metrics = true;
            cfg.unc3_classifier = COLLAPSE_UNC3_WEIGHTS;
            Session s(cfg);
            ingest_pass(s, in, in.n);
            const collapse_buffer wb{w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, K, d, 0};
            s.set_classifier(&wb, nullptr);
            const auto t0 = Clock::now();
            auto rep = s.compute(true);
            t.push_back(since(t0));
            t_class.push_back(timing_of(rep, "class_metrics"));
        }
        const Timing tm = summarize(t);
        const double pairs = 0.5 * (double)K * (double)(K - 1);
        double flops = 0;
        const int64_t T = pair_tile_edge(K, Config{}.host_memory_limit);
        const double gemm_s = tile_gemm_seconds(K, d, T, reps == 1 ? 2 : 3, &flops);
        std::printf("final   K=%-6lld d=%lld  seconds=%8.4f (class_metrics phase %8.4f)  pairs/s=%9.3e  |"
                    " same tile dgemms (T=%lld, %.1f GFLOP) GFLOP/s=%7.2f seconds=%8.4f  ratio gemm/finalize=%.2f\n",
                    (long long)K, (long long)d, tm.best, summarize(t_class).best, pairs / tm.best, (long long)T,
                    flops / kGB, flops / gemm_s / kGB, gemm_s, gemm_s / tm.best);
        std::fflush(stdout);
        out["finalize"].push_back({{"K", K}, {"d", d}, {"seconds_best", tm.best}, {"seconds_median", tm.median},
                                   {"class_metrics_seconds", summarize(t_class).best}, {"pairs_per_s", pairs / tm.best},
                                   {"gemm_tile", T}, {"gemm_flops", flops}, {"gemm_seconds", gemm_s},
                                   {"gemm_GFLOPs", flops / gemm_s / kGB}, {"ratio_gemm_over_finalize", gemm_s / tm.best}});
    }
}

// ---- figure 4: exact per-token SVD vs. LAPACK alone ------------------------------------------------

void bench_svd(const Options& o, json& out) {
    const int64_t V = 2048, d = 64, n = o.quick ? 50000 : 200000;
    std::printf("\n== 4. per-token exact SVD: V=%lld, d=%lld, %lld f32 rows from SynthGenerator (Zipf(%.1f), collapse %.1f) ==\n",
                (long long)V, (long long)d, (long long)n, kZipf, kCollapse);
    const int reps = o.quick ? 2 : 3;
    std::printf("   engine: best of %d compute() with svd_mode exact minus best of %d with svd_mode off (same rows); ceiling: best of 3"
                " LAPACKE_dgesdd('N') alone on the same per-class matrices, already in double\n", reps, reps);
    const Inputs in = Inputs::synth(synth_generator(V, d), n);
    auto run = [&](collapse_svd_mode mode, double* token_svd, int64_t* kept) {
        Config cfg = base_config(o, V, d);
        cfg.svd_mode = mode;
        cfg.compute_overall_metrics = false;
        cfg.compute_class_metrics = false;
        cfg.compute_token_metrics = true;
        Session s(cfg);
        ingest_pass(s, in, 65536);
        const auto t0 = Clock::now();
        auto rep = s.compute(true);
        const double sec = since(t0);
        *token_svd = timing_of(rep, "token_svd");
        *kept = rep.counts.classes_kept;
        return sec;
    };
    std::vector<double> te, toff, tsvd;
    int64_t kept = 0;
    for (int r = 0; r < reps; ++r) {
        double ts = 0, dummy = 0;
        te.push_back(run(COLLAPSE_SVD_EXACT, &ts, &kept));
        tsvd.push_back(ts);
        int64_t k2 = 0;
        toff.push_back(run(COLLAPSE_SVD_OFF, &dummy, &k2));
    }
    const double t_exact = summarize(te).best, t_off = summarize(toff).best, t_phase = summarize(tsvd).best;
    const double t_svd = std::max(t_exact - t_off, 1e-12);

    // Ceiling: dgesdd on the same matrices (classes with >= 2 rows, every row), timed alone.
    std::vector<std::vector<int64_t>> rows((size_t)V);
    for (int64_t i = 0; i < n; ++i) rows[(size_t)in.y[(size_t)i]].push_back(i);
    std::vector<std::vector<double>> mats;
    for (const auto& r : rows) {
        if (r.size() < 2) continue;
        std::vector<double> a(r.size() * (size_t)d);
        for (size_t i = 0; i < r.size(); ++i)
            for (int64_t j = 0; j < d; ++j) a[i * (size_t)d + (size_t)j] = in.x[(size_t)(r[i] * d + j)];
        mats.push_back(std::move(a));
    }
    // One thread (BLAS's own threads, as configured), and the engine's scheme: the classes spread
    // over the OpenMP threads, largest first, each dgesdd on one BLAS thread.
    const int threads = omp_get_max_threads();
    std::vector<size_t> order(mats.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return mats[a].size() > mats[b].size(); });
    double lapack_s = 1e300, lapack_t = 1e300;
    for (int r = 0; r < 3; ++r) {
        for (int par = 0; par < 2; ++par) {
            std::vector<std::vector<double>> work = mats;  // dgesdd overwrites its input
            const int blas = openblas_get_num_threads();
            if (par) openblas_set_num_threads(1);
            const auto t0 = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(par ? threads : 1)
            for (size_t q = 0; q < order.size(); ++q) {
                std::vector<double>& a = work[order[q]];
                const int64_t m = (int64_t)a.size() / d;
                std::vector<double> s((size_t)std::min(m, d));
                LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'N', (int)d, (int)m, a.data(), (int)d, s.data(), nullptr, 1, nullptr, 1);
                a[0] = s[0];
            }
            const double sec = since(t0);
            if (par) openblas_set_num_threads(blas);
            for (const auto& a : work) g_sink = g_sink + (float)a[0];
            (par ? lapack_t : lapack_s) = std::min(par ? lapack_t : lapack_s, sec);
        }
    }
    // The engine's own route alone (CholeskyQR2 for n >= 2d, else dgesdd: class_singular_values) on
    // the same matrices and threads: dgesdd alone is no longer the engine's floor since the engine
    // does not run dgesdd on tall classes, so both are printed.
    double route_t = 1e300;
    for (int r = 0; r < 3; ++r) {
        const int blas = openblas_get_num_threads();
        openblas_set_num_threads(1);
        const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads)
        {
            std::vector<double> a;
#pragma omp for schedule(dynamic, 1)
            for (size_t q = 0; q < order.size(); ++q) {
                const std::vector<double>& m = mats[order[q]];
                const std::vector<double> s = collapse::internal::class_singular_values(m.data(), (int64_t)m.size() / d, d, nullptr, a);
                if (s[0] < 0) g_sink = g_sink + 1.0f;
            }
        }
        route_t = std::min(route_t, since(t0));
        openblas_set_num_threads(blas);
    }
    const double ratio_t = lapack_t / t_svd;
    std::printf("svd     V=%lld d=%lld rows=%lld kept=%lld  exact-off seconds=%8.4f (token_svd phase %8.4f, compute exact %8.4f,"
                " off %8.4f)  classes/s=%9.3e  | dgesdd alone, 1 thread: seconds=%8.4f (ratio %.2f); on %d threads: classes/s=%9.3e"
                " seconds=%8.4f  ratio lapack/engine=%.2f | the engine's route alone (CholeskyQR2 for n >= 2d, else dgesdd) on %d threads:"
                " seconds=%8.4f  ratio route/engine=%.2f goal>=0.8 %s\n",
                (long long)V, (long long)d, (long long)n, (long long)kept, t_svd, t_phase, t_exact, t_off, (double)kept / t_svd, lapack_s,
                lapack_s / t_svd, threads, (double)mats.size() / lapack_t, lapack_t, ratio_t, threads, route_t, route_t / t_svd,
                route_t / t_svd >= 0.8 ? "met" : "MISSED");
    std::fflush(stdout);
    out["svd"].push_back({{"V", V}, {"d", d}, {"rows", n}, {"classes_kept", kept}, {"seconds_exact_minus_off", t_svd},
                          {"token_svd_phase_seconds", t_phase}, {"compute_exact_seconds", t_exact}, {"compute_off_seconds", t_off},
                          {"classes_per_s", (double)kept / t_svd}, {"dgesdd_seconds", lapack_s},
                          {"ratio_lapack_over_engine", lapack_s / t_svd}, {"threads", threads}, {"dgesdd_threads_seconds", lapack_t},
                          {"ratio_lapack_threads_over_engine", ratio_t}, {"route_threads_seconds", route_t},
                          {"ratio_route_threads_over_engine", route_t / t_svd}});
}

// ---- figure 7: NC4 from the row store vs. the GEMM floor ------------------------------------------

void bench_nc4(const Options& o, json& out) {
    struct Case {
        int64_t V, d, n;
    };
    const std::vector<Case> cases = o.quick ? std::vector<Case>{{512, 64, 98500}, {8000, 256, 20000}}
                                            : std::vector<Case>{{512, 64, 98500}, {32000, 256, 20000}, {32000, 1024, 20000}};
    std::printf("\n== 7. NC4 from the exact row store (every row: classifier argmax vs. nearest kept mean), SynthGenerator rows (Zipf(%.1f),"
                " collapse %.1f) and classifier ==\n", kZipf, kCollapse);
    std::printf("   engine: the nc4 phase of compute() (best of 2); floor: the two products NC4 needs and nothing else, N*(V+K)*d*2 flops:"
                " cblas_dgemm of 4096 rows at a time against the same [V, d] classifier and a [K, d] matrix over all N rows, timed right"
                " after each engine run (best of 2)\n");
    for (const Case& c : cases) {
        const SynthGenerator& gen = synth_generator(c.V, c.d);
        const Inputs in = Inputs::synth(gen, c.n);
        std::vector<float> w((size_t)(c.V * c.d));
        gen.classifier(w.data());
        std::vector<double> t, tf;
        int64_t K = 0, rows = 0;
        double agreement = 0;
        // The floor's operands: 4096 rows (the synthetic rows, cycled), W, and for the kept means a
        // [K, d] matrix of the same shape (W's first K rows: K <= V).
        const int64_t B = 4096;
        std::vector<double> x((size_t)(B * c.d)), wd(w.begin(), w.end()), lg((size_t)(B * c.V));
        for (size_t i = 0; i < x.size(); ++i) x[i] = in.x[i % in.x.size()];
        for (int r = 0; r < 2; ++r) {
            Config cfg = base_config(o, c.V, c.d);
            cfg.svd_mode = COLLAPSE_SVD_EXACT;
            cfg.compute_nc4 = true;
            cfg.compute_overall_metrics = false;
            cfg.compute_class_metrics = false;
            cfg.compute_token_metrics = true;  // the row store exists for the per-token SVDs (timed apart)
            Session s(cfg);
            ingest_pass(s, in, 65536);
            const collapse_buffer wb{w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, c.V, c.d, 0};
            s.set_classifier(&wb, nullptr);
            auto rep = s.compute(true);
            t.push_back(timing_of(rep, "nc4"));
            K = rep.counts.classes_kept;
            rows = rep.metrics.nc4_rows;
            agreement = rep.metrics.nc4_agreement.value_or(-1.0);
            // The floor, right after each engine run (the same load): the same products over the
            // same rows, one dgemm of 4096 rows against W and one against [K, d] at a time.
            const auto t0 = Clock::now();
            for (int64_t r0 = 0; r0 < rows; r0 += B) {
                const int64_t nr = std::min(B, rows - r0);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)c.V, (int)c.d, 1.0, x.data(), (int)c.d, wd.data(), (int)c.d,
                            0.0, lg.data(), (int)c.V);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)K, (int)c.d, 1.0, x.data(), (int)c.d, wd.data(), (int)c.d,
                            0.0, lg.data(), (int)K);
                g_sink = g_sink + (float)lg[0];
            }
            tf.push_back(since(t0));
        }
        const double flops = 2.0 * (double)rows * (double)(c.V + K) * (double)c.d;
        const double floor_s = summarize(tf).best, rate = flops / floor_s, eng = summarize(t).best, ratio = eng / floor_s;
        std::printf("nc4     V=%-6lld d=%-5lld rows=%-7lld K=%-6lld agreement=%.4f  nc4 seconds=%8.4f  | dgemm %7.2f GFLOP/s, floor %8.4f s"
                    " (%.1f GFLOP)  ratio engine/floor=%.2f goal<=1.3 %s\n",
                    (long long)c.V, (long long)c.d, (long long)rows, (long long)K, agreement, eng, rate / kGB, floor_s, flops / kGB, ratio,
                    ratio <= 1.3 ? "met" : "MISSED");
        std::fflush(stdout);
        out["nc4"].push_back({{"V", c.V}, {"d", c.d}, {"rows", rows}, {"classes_kept", K}, {"nc4_seconds", eng}, {"dgemm_GFLOPs", rate / kGB},
                              {"floor_seconds", floor_s}, {"ratio_engine_over_floor", ratio}});
    }
}

}  // namespace bench
