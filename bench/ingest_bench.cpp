// Figures 1 and 2: ingest throughput, without and with the overall Gram, against the read
// bandwidth of the same buffer and against the engine's own dsyrk call alone.
#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "common.hpp"

namespace bench {
namespace {

// The plain read: every float of the buffer summed into 32 independent accumulators (the inner
// loop has no dependency between lanes, so it vectorises under the project's own flags).
__attribute__((noinline)) float read_sum(const float* p, size_t n) {
    constexpr size_t L = 32;
    float acc[L] = {};
    size_t i = 0;
    for (; i + L <= n; i += L)
        for (size_t j = 0; j < L; ++j) acc[j] += p[i + j];
    float s = 0;
    for (; i < n; ++i) s += p[i];
    for (size_t j = 0; j < L; ++j) s += acc[j];
    return s;
}

// Single-thread read bandwidth over the buffer: best of `reps` (after one warm-up pass), GB/s.
double read_bandwidth(const float* p, size_t n, int reps) {
    double best = 1e300;
    for (int r = 0; r <= reps; ++r) {
        const auto t0 = Clock::now();
        g_sink = g_sink + read_sum(p, n);
        const double s = since(t0);
        if (r > 0) best = std::min(best, s);
    }
    return (double)n * sizeof(float) / best / kGB;
}

// cblas_dsyrk on a k x d block (row-major, C += A^T A upper: the engine's Gram call), best of reps.
// The block's values are a fixed pattern: dsyrk's speed does not depend on them.
double dsyrk_gflops(int64_t d, int64_t k, int reps) {
    std::vector<double> a((size_t)(k * d)), c((size_t)(d * d), 0.0);
    for (size_t i = 0; i < a.size(); ++i) a[i] = (double)((i * 2654435761u) % 1000u) * 1e-3 - 0.5;
    const double flops_per = (double)k * (double)d * (double)d;
    // Enough calls for ~0.2 s at 50 GFLOP/s.
    const int64_t iters = std::max<int64_t>(4, (int64_t)(1e10 / flops_per));
    double best = 1e300;
    for (int r = 0; r <= reps; ++r) {
        const auto t0 = Clock::now();
        for (int64_t i = 0; i < iters; ++i)
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)k, 1.0, a.data(), (int)d, 1.0, c.data(), (int)d);
        const double s = since(t0);
        if (r > 0) best = std::min(best, s);
    }
    g_sink = g_sink + (float)c[0];
    return flops_per * (double)iters / best / kGB;
}

}  // namespace

// ---- figure 1: ingest vs. the read bandwidth of the same buffer ------------------------------------

void bench_ingest(const Options& o, json& out) {
    const std::vector<int64_t> dims = {64, 1024, 4096};
    const std::vector<int64_t> vocab = {512, 32000};
    const int64_t B = 65536;
    const int64_t min_bytes = (o.quick ? 64 : 256) * kMiB;
    const int reps = o.quick ? 2 : 3, read_reps = o.quick ? 3 : 5;
    std::printf("\n== 1. ingest: sums, counts, squared norms (svd_mode off, no Gram, no row store), f32 rows from SynthGenerator"
                " (Zipf(%.1f), collapse %.1f) ==\n", kZipf, kCollapse);
    std::printf("   engine: one warm-up pass, then best of %d passes over the buffer; ceiling: best of %d plain"
                " single-thread read-sum passes over the SAME buffer\n", reps, read_reps);
    for (int64_t d : dims) {
        const int64_t row_bytes = d * 4;
        const int64_t n = std::max<int64_t>(o.quick ? 4096 : B, (min_bytes + row_bytes - 1) / row_bytes);
        const int64_t batch = std::min(B, n);
        for (int64_t V : vocab) {
            // The rows depend on V (each is its class mean plus noise), so each (d, V) has its own buffer.
            const Inputs in = Inputs::synth(synth_generator(V, d), n);
            const double read_gbps = read_bandwidth(in.x.data(), (size_t)(n * d), read_reps);
            Config cfg = base_config(o, V, d);
            cfg.svd_mode = COLLAPSE_SVD_OFF;
            cfg.compute_overall_metrics = false;
            cfg.compute_token_metrics = false;
            Session s(cfg);
            ingest_pass(s, in, batch);  // warm-up: scratch vectors grow, pages are touched
            std::vector<double> t;
            for (int r = 0; r < reps; ++r) t.push_back(ingest_pass(s, in, batch));
            const Timing tm = summarize(t);
            const double bytes = (double)n * (double)row_bytes;
            const double gbps = bytes / tm.best / kGB, rows = (double)n / tm.best;
            const double ratio = gbps / read_gbps;
            std::string goal;
            if (d == 1024 && V == 32000) goal = ratio >= 0.5 ? "  goal>=0.5 met" : "  goal>=0.5 MISSED";
            std::printf("ingest  d=%-5lld V=%-6lld rows=%-8lld (%4.0f MiB, batch %lld)  rows/s=%9.3e  GB/s=%6.2f (median %6.2f)"
                        "  | read BW (%s) GB/s=%6.2f  ratio=%.2f%s\n",
                        (long long)d, (long long)V, (long long)n, bytes / kMiB, (long long)batch, rows, gbps,
                        bytes / tm.median / kGB, "1 thread, same buffer", read_gbps, ratio, goal.c_str());
            std::fflush(stdout);
            json j = {{"d", d}, {"V", V}, {"rows", n}, {"batch_rows", batch}, {"buffer_bytes", bytes},
                      {"seconds_best", tm.best}, {"seconds_median", tm.median}, {"rows_per_s", rows},
                      {"GBps", gbps}, {"GBps_median", bytes / tm.median / kGB}, {"read_GBps", read_gbps},
                      {"ratio", ratio}};
            if (!goal.empty()) j["goal_0_5_met"] = ratio >= 0.5;
            out["ingest"].push_back(j);
        }
    }
}

// ---- figure 2: ingest with the overall Gram vs. dsyrk ----------------------------------------------

void bench_gram(const Options& o, json& out) {
    const std::vector<int64_t> dims = {64, 1024};
    const int64_t V = 32000, B = 65536, block = 256;  // 256: the engine's kGramBlockRows
    const int reps = o.quick ? 2 : 3;
    std::printf("\n== 2. ingest with the overall Gram (compute_overall_metrics: true), V=%lld, f32 rows from SynthGenerator"
                " (Zipf(%.1f), collapse %.1f) ==\n", (long long)V, kZipf, kCollapse);
    std::printf("   Gram flops counted as N*d*d per pass (symmetric rank-k update: d(d+1)/2 entries x 2 flops x N rows)\n");
    std::printf("   ceiling: cblas_dsyrk (the engine's call shape) on a %lld x d block of doubles, C += A^T A, best of %d\n",
                (long long)block, reps + 2);
    for (int64_t d : dims) {
        const int64_t n = std::max<int64_t>(o.quick ? 16384 : B, ((o.quick ? 64 : 256) * kMiB) / (d * 4));
        const int64_t batch = std::min(B, n);
        const Inputs in = Inputs::synth(synth_generator(V, d), n);
        Config cfg = base_config(o, V, d);
        cfg.svd_mode = COLLAPSE_SVD_OFF;
        cfg.compute_overall_metrics = true;
        cfg.compute_token_metrics = false;
        Session s(cfg);
        ingest_pass(s, in, batch);
        std::vector<double> t;
        for (int r = 0; r < reps; ++r) t.push_back(ingest_pass(s, in, batch));
        const Timing tm = summarize(t);
        const double ceil_gflops = dsyrk_gflops(d, block, reps + 2);
        const double flops = (double)n * (double)d * (double)d;
        const double gflops = flops / tm.best / kGB, rows = (double)n / tm.best;
        std::printf("gram    d=%-5lld V=%-6lld rows=%-8lld  rows/s=%9.3e  GB/s=%6.2f  Gram GFLOP/s=%7.2f (median %7.2f)"
                    "  | dsyrk %lldxd GFLOP/s=%7.2f  ratio=%.2f\n",
                    (long long)d, (long long)V, (long long)n, rows, (double)n * d * 4 / tm.best / kGB, gflops,
                    flops / tm.median / kGB, (long long)block, ceil_gflops, gflops / ceil_gflops);
        std::fflush(stdout);
        out["gram"].push_back({{"d", d}, {"V", V}, {"rows", n}, {"seconds_best", tm.best}, {"seconds_median", tm.median},
                               {"rows_per_s", rows}, {"gram_GFLOPs", gflops}, {"dsyrk_block_rows", block},
                               {"dsyrk_GFLOPs", ceil_gflops}, {"ratio", gflops / ceil_gflops}});
    }
}

}  // namespace bench
