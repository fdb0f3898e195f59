// collapse_bench: the engine's throughput, each figure printed next to the ceiling it is measured
// against (measured in the same run, on the same buffers) and the ratio. bench/README.md explains
// every figure. Inputs are synthetic and generated once, before any timing starts.
//
//   collapse_bench [--quick] [--backend cpu|cuda] [--only ingest|gram|finalize|pairs|svd|spill|checkpoint]
//                  [--scratch DIR] [--json FILE]
//
// --backend cuda measures a different set of figures (C1 fp16 device ingest vs. D2D copy, C2 pair
// metrics vs. the same tile GEMMs, C3 per-token SVD and its cuSOLVER share); the device-side code
// is in cuda_helpers.cu, so this file includes no CUDA header.
#include <cblas.h>
#include <lapacke.h>
#include <omp.h>
#include <fcntl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"
#include "core/config.hpp"
#include "base/error.hpp"
#include "core/row_store.hpp"
#include "core/session.hpp"

#ifdef COLLAPSE_BENCH_CUDA
#include "cuda_helpers.hpp"
#endif

#ifndef COLLAPSE_BENCH_BUILD_TYPE
#define COLLAPSE_BENCH_BUILD_TYPE "unknown"
#endif
#ifndef COLLAPSE_BENCH_CXX_FLAGS
#define COLLAPSE_BENCH_CXX_FLAGS ""
#endif
#ifndef COLLAPSE_BENCH_COMPILER
#define COLLAPSE_BENCH_COMPILER ""
#endif

using json = nlohmann::json;
using collapse::internal::Config;
using collapse::internal::Session;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

constexpr double kGB = 1e9;
constexpr int64_t kMiB = int64_t(1) << 20;

struct Options {
    bool quick = false;
    bool cuda = false;
    std::string only;  // "" = all
    std::string json_path;
    std::string scratch;  // files of the spill and checkpoint figures
};

struct Timing {
    double best = 0, median = 0;  // seconds
};
Timing summarize(std::vector<double> t) {
    std::sort(t.begin(), t.end());
    Timing r;
    r.best = t.front();
    r.median = t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
    return r;
}

// ---- synthetic inputs (never timed) ----------------------------------------------------------

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Labels ~ Zipf(s) over ranks 1..V; rank k maps to a seeded permutation of the ids, so frequent ids
// are spread over the vocabulary (and over the accumulator rows).
std::vector<int32_t> zipf_labels(int64_t n, int64_t V, double s, uint64_t seed) {
    std::vector<double> cdf((size_t)V);
    double acc = 0;
    for (int64_t k = 0; k < V; ++k) cdf[(size_t)k] = acc += std::pow((double)(k + 1), -s);
    for (double& c : cdf) c /= acc;
    std::vector<int32_t> perm((size_t)V);
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> out((size_t)n);
    uint64_t st = seed * 7919 + 1;
    for (int64_t i = 0; i < n; ++i) {
        const double u = ((double)(splitmix(st) >> 11) + 0.5) * 0x1p-53;
        const size_t r = std::min<size_t>((size_t)(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin()), (size_t)V - 1);
        out[(size_t)i] = perm[r];
    }
    return out;
}

// Uniform floats in [-1, 1), filled in parallel blocks (page first-touch spread over the threads
// like any producer would leave it; the read loop and the engine then read it the same way).
void fill_uniform(float* x, int64_t n, uint64_t seed) {
    const int64_t blk = int64_t(1) << 16;
    const int64_t nblk = (n + blk - 1) / blk;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblk; ++b) {
        uint64_t st = seed ^ ((uint64_t)b * 0xd1b54a32d192ed03ull);
        const int64_t end = std::min(n, (b + 1) * blk);
        for (int64_t i = b * blk; i < end; ++i) x[i] = (float)((double)(splitmix(st) >> 40) * 0x1p-23 - 1.0);
    }
}

// ---- ceilings -------------------------------------------------------------------------------------

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

volatile float g_sink = 0;

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

// The pair metrics' tile GEMMs alone, exactly as src/cpu/cpu_metrics.cpp issues them: an OpenMP
// loop over the upper-triangle tiles of M M^T, one cblas_dgemm per tile. Seconds (best of reps).
int64_t pair_tile_edge(int64_t K, int64_t host_memory_limit) {
    const int64_t budget = std::min<int64_t>(int64_t(64) << 20, host_memory_limit / 8);
    return std::max<int64_t>(64, std::min<int64_t>(K, (int64_t)std::sqrt((double)budget / 8.0)));
}
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

// ---- machine --------------------------------------------------------------------------------------

std::string cpu_model() {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("model name", 0) == 0) {
            const auto p = line.find(':');
            if (p != std::string::npos) return line.substr(p + 2);
        }
    return "unknown";
}

std::string now_string() {
    char buf[64];
    const std::time_t t = std::time(nullptr);
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S %Z", std::localtime(&t));
    return buf;
}

// ---- engine runs ------------------------------------------------------------------------------------

Config base_config(const Options& o, int64_t V, int64_t d) {
    Config c;
    c.num_classes = V;
    c.dim = d;
    c.backend = o.cuda ? COLLAPSE_BACKEND_CUDA : COLLAPSE_BACKEND_CPU;
    c.device = o.cuda ? "cuda" : "cpu";
    c.log_level = "error";
    return c;
}

// A feature buffer and its labels, on the host (the CPU figures).
struct Inputs {
    std::vector<float> x;
    std::vector<int32_t> y;
    int64_t n = 0, d = 0;
    const float* xd = nullptr;  // what the session reads
    const int32_t* yd = nullptr;
    collapse_memory mem = COLLAPSE_MEMORY_HOST;
    // n rows of d uniform features (labels are the caller's).
    static Inputs uniform(int64_t n, int64_t d, uint64_t seed) {
        Inputs in;
        in.n = n;
        in.d = d;
        in.x.resize((size_t)(n * d));
        fill_uniform(in.x.data(), n * d, seed);
        return in;
    }
    void place(const Options&) {
        xd = x.data();
        yd = y.data();
    }
};

// One pass of ingest over n rows x d features (dtype ft, element size fsz) in batches of B rows, on
// `stream` (nullptr: the session's own). Seconds of host clock, sync() included.
double ingest_pass_raw(Session& s, const void* x, collapse_dtype ft, size_t fsz, const int32_t* y, collapse_memory mem, int64_t n,
                       int64_t d, int64_t B, void* stream) {
    const auto t0 = Clock::now();
    for (int64_t r0 = 0; r0 < n; r0 += B) {
        const int64_t nb = std::min(B, n - r0);
        const collapse_buffer fx{static_cast<const uint8_t*>(x) + (size_t)(r0 * d) * fsz, ft, mem, nb, d, 0};
        const collapse_buffer fy{y + r0, COLLAPSE_I32, mem, nb, 1, 0};
        s.ingest_rows(&fx, &fy, nullptr, stream);
    }
    s.sync();
    return since(t0);
}
double ingest_pass(Session& s, const Inputs& in, int64_t B) {
    return ingest_pass_raw(s, in.xd, COLLAPSE_F32, sizeof(float), in.yd, in.mem, in.n, in.d, B, nullptr);
}

double timing_of(const collapse::internal::ReportData& r, const char* phase) {
    const auto& t = r.doc["engine"]["timings_seconds"];
    return t.contains(phase) ? t[phase].get<double>() : 0.0;
}

// ---- figure 1: ingest vs. the read bandwidth of the same buffer ------------------------------------

void bench_ingest(const Options& o, json& out) {
    const std::vector<int64_t> dims = {64, 1024, 4096};
    const std::vector<int64_t> vocab = {512, 32000};
    const int64_t B = 65536;
    const int64_t min_bytes = (o.quick ? 64 : 256) * kMiB;
    const int reps = o.quick ? 2 : 3, read_reps = o.quick ? 3 : 5;
    std::printf("\n== 1. ingest: sums, counts, squared norms (svd_mode off, no Gram, no row store), f32, Zipf(1.1) ==\n");
    std::printf("   engine: one warm-up pass, then best of %d passes over the buffer; ceiling: best of %d plain"
                " single-thread read-sum passes over the SAME buffer\n", reps, read_reps);
    for (int64_t d : dims) {
        const int64_t row_bytes = d * 4;
        const int64_t n = std::max<int64_t>(o.quick ? 4096 : B, (min_bytes + row_bytes - 1) / row_bytes);
        const int64_t batch = std::min(B, n);
        Inputs in = Inputs::uniform(n, d, 0x1234 + (uint64_t)d);
        double read_gbps = 0;
        for (int64_t V : vocab) {
            in.y = zipf_labels(n, V, 1.1, 42 + (uint64_t)V);
            in.place(o);
            if (read_gbps == 0) read_gbps = read_bandwidth(in.x.data(), (size_t)(n * d), read_reps);
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
                        bytes / tm.median / kGB, "1 thread, same buffer", read_gbps,
                        ratio, goal.c_str());
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
    std::printf("\n== 2. ingest with the overall Gram (compute_overall_metrics: true), V=%lld, f32, Zipf(1.1) ==\n", (long long)V);
    std::printf("   Gram flops counted as N*d*d per pass (symmetric rank-k update: d(d+1)/2 entries x 2 flops x N rows)\n");
    std::printf("   ceiling: cblas_dsyrk (the engine's call shape) on a %lld x d block of doubles, C += A^T A, best of %d\n",
                (long long)block, reps + 2);
    for (int64_t d : dims) {
        const int64_t n = std::max<int64_t>(o.quick ? 16384 : B, ((o.quick ? 64 : 256) * kMiB) / (d * 4));
        const int64_t batch = std::min(B, n);
        Inputs in = Inputs::uniform(n, d, 0x777 + (uint64_t)d);
        in.y = zipf_labels(n, V, 1.1, 4242);
        in.place(o);
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

// ---- figure 3: finalisation (pair metrics, UNC3) vs. the tile GEMMs alone ---------------------------

void bench_finalize(const Options& o, json& out) {
    const std::vector<int64_t> Ks = o.quick ? std::vector<int64_t>{1000, 8000} : std::vector<int64_t>{1000, 32000};
    const int64_t d = 256;
    std::printf("\n== 3. finalisation: compute() with class metrics (pair metrics GNC2/CDNV/NC2, UNC3 with a classifier),"
                " svd_mode off, no overall Gram, d=%lld, 2-4 rows per class ==\n", (long long)d);
    std::printf("   GEMM flops counted as the tiles actually computed: sum over upper-triangle tiles (diagonal tiles in full)"
                " of 2*ni*nj*d\n");
    for (int64_t K : Ks) {
        // Rows: class c gets 2 + c % 3 rows, in shuffled order.
        Inputs in;
        for (int64_t c = 0; c < K; ++c)
            for (int64_t r = 0; r < 2 + c % 3; ++r) in.y.push_back((int32_t)c);
        std::shuffle(in.y.begin(), in.y.end(), std::mt19937_64(7));
        in.n = (int64_t)in.y.size();
        in.d = d;
        in.x.resize((size_t)(in.n * d));
        fill_uniform(in.x.data(), in.n * d, 99);
        std::vector<float> w((size_t)(K * d));
        fill_uniform(w.data(), K * d, 1234);
        in.place(o);
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
            t_class.push_back(timing_of(*rep, "class_metrics"));
        }
        const Timing tm = summarize(t);
        const double pairs = 0.5 * (double)K * (double)(K - 1);
        double flops = 0;
        const int64_t T = pair_tile_edge(K, Config{}.host_memory_limit);
        const double gemm_s = tile_gemm_seconds(K, d, T, reps == 1 ? 2 : 3, &flops);
        const char* what = "same tile dgemms";
        std::printf("final   K=%-6lld d=%lld  seconds=%8.4f (class_metrics phase %8.4f)  pairs/s=%9.3e  |"
                    " %s (T=%lld, %.1f GFLOP) GFLOP/s=%7.2f seconds=%8.4f  ratio gemm/finalize=%.2f\n",
                    (long long)K, (long long)d, tm.best, summarize(t_class).best, pairs / tm.best, what, (long long)T,
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
    std::printf("\n== 4. per-token exact SVD: V=%lld, d=%lld, %lld rows Zipf(1.1), f32 ==\n", (long long)V, (long long)d, (long long)n);
    const int reps = o.quick ? 2 : 3;
    std::printf("   engine: best of %d compute() with svd_mode exact minus best of %d with svd_mode off (same rows); ceiling: best of 3"
                " LAPACKE_dgesdd('N') alone on the same per-class matrices, already in double\n", reps, reps);
    Inputs in = Inputs::uniform(n, d, 555);
    in.y = zipf_labels(n, V, 1.1, 2024);
    in.place(o);
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
        *token_svd = timing_of(*rep, "token_svd");
        *kept = rep->doc["counts"]["classes_kept"].get<int64_t>();
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
    double lapack_s = 0;
    std::string ceiling;
    {
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
        double best = 1e300;
        for (int r = 0; r < 3; ++r) {
            std::vector<std::vector<double>> work = mats;  // dgesdd overwrites its input
            const auto t0 = Clock::now();
            for (auto& a : work) {
                const int64_t m = (int64_t)a.size() / d;
                std::vector<double> s((size_t)std::min(m, d));
                LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'N', (int)d, (int)m, a.data(), (int)d, s.data(), nullptr, 1, nullptr, 1);
                g_sink = g_sink + (float)s[0];
            }
            best = std::min(best, since(t0));
        }
        lapack_s = best;
        char buf[160];
        std::snprintf(buf, sizeof buf, "dgesdd alone classes/s=%9.3e seconds=%8.4f  ratio lapack/engine=%.2f",
                      (double)mats.size() / lapack_s, lapack_s, lapack_s / t_svd);
        ceiling = buf;
    }
    std::printf("svd     V=%lld d=%lld rows=%lld kept=%lld  exact-off seconds=%8.4f (token_svd phase %8.4f, compute exact %8.4f,"
                " off %8.4f)  classes/s=%9.3e  | %s\n",
                (long long)V, (long long)d, (long long)n, (long long)kept, t_svd, t_phase, t_exact, t_off, (double)kept / t_svd,
                ceiling.c_str());
    std::fflush(stdout);
    json j = {{"V", V}, {"d", d}, {"rows", n}, {"classes_kept", kept}, {"seconds_exact_minus_off", t_svd},
              {"token_svd_phase_seconds", t_phase}, {"compute_exact_seconds", t_exact}, {"compute_off_seconds", t_off},
              {"classes_per_s", (double)kept / t_svd}};
    j["dgesdd_seconds"] = lapack_s, j["ratio_lapack_over_engine"] = lapack_s / t_svd;
    out["svd"].push_back(j);
}

// ---- figure 5: row-store spill vs. plain sequential file writes and reads --------------------------

// Scratch files for figures 5 and 6 go here (--scratch, default $TMPDIR or /tmp).
std::string scratch_path(const Options& o, const std::string& name) { return o.scratch + "/" + name; }

// The ceiling of figures 5 and 6: the same number of bytes, from a buffer in memory as large as
// they are (so the source is as cold as the engine's), written to one file with pwrite in 8 MiB
// pieces (fsync'ed when `sync`), then read back into it with pread. One repetition per call: the
// figures interleave it with the engine's, because on this VM the first writes into fresh page
// cache run several times slower than later ones, and whichever ran first would look worse.
struct FileSpeed {
    double write_s = 0, read_s = 0;
};
struct PlainFile {
    std::string path;
    int64_t bytes;
    bool sync;
    std::vector<float> mem;
    FileSpeed best{1e300, 1e300};
    PlainFile(std::string p, int64_t n, bool s) : path(std::move(p)), bytes(n), sync(s), mem((size_t)(n / 4 + 1)) {
        fill_uniform(mem.data(), (int64_t)mem.size(), 99);
    }
    ~PlainFile() { ::unlink(path.c_str()); }
    void once() {
        const size_t piece = size_t(8) << 20;
        char* const buf = reinterpret_cast<char*>(mem.data());
        ::unlink(path.c_str());
        auto t0 = Clock::now();
        const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
        for (int64_t at = 0; at < bytes; at += (int64_t)piece)
            if (::pwrite(fd, buf + at, (size_t)std::min<int64_t>((int64_t)piece, bytes - at), (off_t)at) < 0)
                throw std::runtime_error("write " + path + ": " + std::strerror(errno));
        if (sync) ::fsync(fd);
        best.write_s = std::min(best.write_s, since(t0));
        t0 = Clock::now();
        for (int64_t at = 0; at < bytes; at += (int64_t)piece)
            if (::pread(fd, buf + at, (size_t)std::min<int64_t>((int64_t)piece, bytes - at), (off_t)at) < 0)
                throw std::runtime_error("read " + path + ": " + std::strerror(errno));
        best.read_s = std::min(best.read_s, since(t0));
        ::close(fd);
    }
};

void bench_spill(const Options& o, json& out) {
    const int64_t V = 4096, d = 256, budget = 64 * kMiB;
    const int64_t total = (o.quick ? 256 : 1024) * kMiB;  // float64 rows stored
    const int64_t n = total / (d * 8), B = 16384;
    std::printf("\n== 5. row-store spill: %lld MiB of float64 rows (V=%lld, d=%lld, Zipf(1.1) labels, batches of %lld rows),"
                " memory budget %lld MiB, under %s ==\n",
                (long long)(total / kMiB), (long long)V, (long long)d, (long long)B, (long long)(budget / kMiB), o.scratch.c_str());
    std::printf("   engine: RowStore make_room/append as the CPU backend calls them (write: time spent flushing) and for_each_class\n"
                "   over every class (read back, CRC checked); ceiling: pwrite then pread of the same bytes between one file and a\n"
                "   buffer as large, in 8 MiB pieces. Neither syncs: both measure the page cache unless the file outgrows RAM. Best of 3.\n");
    const std::vector<int32_t> y = zipf_labels(n, V, 1.1, 77);
    std::vector<double> row((size_t)d);
    for (int64_t k = 0; k < d; ++k) row[(size_t)k] = (double)k;
    double wbest = 1e300, rbest = 1e300;
    int64_t flushes = 0, spilled = 0;
    std::vector<int32_t> ids((size_t)V);
    std::iota(ids.begin(), ids.end(), 0);
    PlainFile plain_file(scratch_path(o, "collapse_bench_plain.bin"), total, false);
    for (int r = 0; r < 3; ++r) {
        plain_file.once();
        collapse::internal::RowStore st(V, d, budget, o.scratch);
        double wsec = 0;
        std::vector<int64_t> count((size_t)V);
        for (int64_t r0 = 0; r0 < n; r0 += B) {
            std::fill(count.begin(), count.end(), 0);
            for (int64_t i = r0; i < std::min(n, r0 + B); ++i) ++count[(size_t)y[(size_t)i]];
            const auto t0 = Clock::now();
            st.make_room([&] {
                int64_t grow = 0;
                for (int64_t c = 0; c < V; ++c) grow += count[(size_t)c] ? st.growth((int32_t)c, count[(size_t)c]) : 0;
                return grow;
            });
            wsec += since(t0);
            for (int64_t c = 0; c < V; ++c) {
                if (count[(size_t)c] == 0) continue;
                double* dst = st.append((int32_t)c, count[(size_t)c]);
                for (int64_t i = 0; i < count[(size_t)c]; ++i) std::memcpy(dst + i * d, row.data(), (size_t)d * 8);
            }
        }
        const auto t0 = Clock::now();
        st.flush();  // everything on disk, so the read below reads it all back
        wsec += since(t0);
        const auto t1 = Clock::now();
        double check = 0;
        st.for_each_class(ids, budget / 6, [&](int32_t, const double* x, int64_t m, int64_t, bool) { check += m > 0 ? x[0] : 0; });
        rbest = std::min(rbest, since(t1));
        wbest = std::min(wbest, wsec);
        g_sink = g_sink + (float)check;
        flushes = st.flushes(), spilled = st.disk_bytes();
    }
    const FileSpeed plain = plain_file.best;
    const double w = (double)spilled / wbest / kGB, rr = (double)spilled / rbest / kGB;
    const double pw = (double)spilled / plain.write_s / kGB, pr = (double)spilled / plain.read_s / kGB;
    std::printf("spill   bytes=%lld flushes=%lld  write GB/s=%7.3f read GB/s=%7.3f  | plain file write GB/s=%7.3f read GB/s=%7.3f"
                "  ratio write=%.2f read=%.2f\n",
                (long long)spilled, (long long)flushes, w, rr, pw, pr, w / pw, rr / pr);
    std::fflush(stdout);
    out["spill"] = {{"V", V}, {"d", d}, {"bytes", spilled}, {"flushes", flushes}, {"memory_budget", budget},
                    {"write_gb_s", w}, {"read_gb_s", rr}, {"plain_write_gb_s", pw}, {"plain_read_gb_s", pr},
                    {"ratio_write", w / pw}, {"ratio_read", rr / pr}};
}

// ---- figure 6: checkpoint of V = 32000, d = 4096 accumulators vs. a plain fsync'ed file write ------

void bench_checkpoint(const Options& o, json& out) {
    const int64_t V = o.quick ? 8000 : 32000, d = 4096, n = 4096;
    std::printf("\n== 6. checkpoint of the accumulators: V=%lld, d=%lld (class sums %lld MiB, Gram %lld MiB), under %s ==\n",
                (long long)V, (long long)d, (long long)(V * d * 8 / kMiB), (long long)(d * d * 8 / kMiB), o.scratch.c_str());
    std::printf("   engine: Session::save_checkpoint (sections streamed to a temp file, CRC32C each, fsync, rename) and\n"
                "   Session::load_checkpoint into a fresh session (every CRC checked); ceiling: the same bytes from a buffer as\n"
                "   large, pwrite in 8 MiB pieces + fsync, and pread back into it. Best of 3.\n");
    Config cfg = base_config(o, V, d);
    cfg.svd_mode = COLLAPSE_SVD_OFF;  // the accumulators only
    Inputs in = Inputs::uniform(n, d, 4242);
    in.y = zipf_labels(n, V, 1.1, 4243);
    in.place(o);
    Session s(cfg);
    ingest_pass(s, in, n);
    const std::string path = scratch_path(o, "collapse_bench.ckpt");
    double wbest = 1e300, rbest = 1e300;
    s.save_checkpoint(path);  // its size, for the plain file
    PlainFile plain_file(scratch_path(o, "collapse_bench_plain.bin"), (int64_t)std::filesystem::file_size(path), true);
    for (int r = 0; r < 3; ++r) {
        plain_file.once();
        auto t0 = Clock::now();
        s.save_checkpoint(path);
        wbest = std::min(wbest, since(t0));
        Session fresh(cfg);
        t0 = Clock::now();
        fresh.load_checkpoint(path);
        rbest = std::min(rbest, since(t0));
    }
    const int64_t bytes = (int64_t)std::filesystem::file_size(path);
    ::unlink(path.c_str());
    const FileSpeed plain = plain_file.best;
    std::printf("ckpt    V=%lld d=%lld bytes=%lld  save s=%7.3f (GB/s=%6.3f) load s=%7.3f (GB/s=%6.3f)  | plain write+fsync s=%7.3f"
                " read s=%7.3f  ratio save=%.2f load=%.2f\n",
                (long long)V, (long long)d, (long long)bytes, wbest, bytes / wbest / kGB, rbest, bytes / rbest / kGB, plain.write_s,
                plain.read_s, plain.write_s / wbest, plain.read_s / rbest);
    std::fflush(stdout);
    out["checkpoint"] = {{"V", V}, {"d", d}, {"bytes", bytes}, {"save_seconds", wbest}, {"load_seconds", rbest},
                         {"plain_write_fsync_seconds", plain.write_s}, {"plain_read_seconds", plain.read_s},
                         {"ratio_save", plain.write_s / wbest}, {"ratio_load", plain.read_s / rbest}};
}

// ---- the CUDA figures (--backend cuda): bench/README.md "The CUDA figures" ----------------------

#ifdef COLLAPSE_BENCH_CUDA
struct DevMem {
    void* p = nullptr;
    explicit DevMem(size_t bytes) : p(bench_cuda::alloc_device(bytes)) {}
    DevMem(const void* host, size_t bytes) : p(bench_cuda::to_device(host, bytes)) {}
    ~DevMem() { bench_cuda::free_device(p); }
    DevMem(const DevMem&) = delete;
    DevMem& operator=(const DevMem&) = delete;
};
struct DevStream {
    void* s = bench_cuda::create_stream();
    DevStream() = default;
    ~DevStream() { bench_cuda::destroy_stream(s); }
    DevStream(const DevStream&) = delete;
    DevStream& operator=(const DevStream&) = delete;
};

// C1. fp16 ingest (sums, squared norms, counts) from device buffers vs. D2D copy of the same buffer.
void cuda_ingest(const Options& o, json& out) {
    const int64_t d = 4096, V = 32000, B = 16384, n = 8 * B;  // 131072 rows x 4096 x 2 bytes = 1 GiB
    const int reps = o.quick ? 3 : 5, copy_reps = o.quick ? 5 : 10;
    const size_t bytes = (size_t)(n * d) * 2;
    std::printf("\n== C1. cuda ingest: fp16 device buffers, d=%lld, V=%lld Zipf(1.1), %lld-row batches, svd_mode off, no overall"
                " metrics, no token metrics (sums + squared norms + counts) ==\n", (long long)d, (long long)V, (long long)B);
    std::printf("   engine: Session::ingest_rows(COLLAPSE_MEMORY_DEVICE, the bench's stream) over the whole buffer + sync(), host"
                " clock; one warm-up pass, best of %d; GB/s = feature bytes read / s\n", reps);
    std::printf("   ceiling: cudaMemcpyAsync device-to-device of the SAME %.0f MiB buffer, (read + written bytes) / s, best of %d"
                " after a warm-up; goal: ratio >= 0.6\n", (double)bytes / kMiB, copy_reps);
    DevMem x(bytes);
    bench_cuda::fill_uniform_f16(x.p, (size_t)(n * d), 0x1234);
    const std::vector<int32_t> y = zipf_labels(n, V, 1.1, 42 + (uint64_t)V);
    DevMem yd(y.data(), y.size() * sizeof(int32_t));
    DevStream st;
    Config cfg = base_config(o, V, d);
    cfg.svd_mode = COLLAPSE_SVD_OFF;
    cfg.compute_overall_metrics = false;
    cfg.compute_token_metrics = false;
    std::vector<double> t;
    {
        Session s(cfg);
        const auto* yp = static_cast<const int32_t*>(yd.p);
        ingest_pass_raw(s, x.p, COLLAPSE_F16, 2, yp, COLLAPSE_MEMORY_DEVICE, n, d, B, st.s);  // warm-up: scratch, modules
        for (int r = 0; r < reps; ++r) t.push_back(ingest_pass_raw(s, x.p, COLLAPSE_F16, 2, yp, COLLAPSE_MEMORY_DEVICE, n, d, B, st.s));
        const int64_t seen = s.row_counts().rows_seen;
        if (seen != n * (reps + 1))
            throw std::runtime_error("cuda ingest: the session counted " + std::to_string(seen) + " rows, expected " +
                                     std::to_string(n * (reps + 1)));
    }
    const double copy_gbps = bench_cuda::d2d_copy_gbps(x.p, bytes, copy_reps);
    const Timing tm = summarize(t);
    const double gbps = (double)bytes / tm.best / kGB, ratio = gbps / copy_gbps;
    const bool met = ratio >= 0.6;
    std::printf("cuda-ingest  f16 d=%lld V=%lld rows=%lld (%.0f MiB, batch %lld)  rows/s=%9.3e  GB/s read=%7.1f (median %7.1f)"
                "  | D2D copy GB/s (read+write)=%7.1f  ratio=%.2f  goal>=0.6 %s\n",
                (long long)d, (long long)V, (long long)n, (double)bytes / kMiB, (long long)B, (double)n / tm.best, gbps,
                (double)bytes / tm.median / kGB, copy_gbps, ratio, met ? "met" : "MISSED");
    std::fflush(stdout);
    out["cuda_ingest"] = {{"dtype", "f16"}, {"d", d}, {"V", V}, {"rows", n}, {"batch_rows", B}, {"buffer_bytes", (double)bytes},
                          {"passes", reps}, {"seconds_best", tm.best}, {"seconds_median", tm.median},
                          {"rows_per_s", (double)n / tm.best}, {"GBps", gbps}, {"GBps_median", (double)bytes / tm.median / kGB},
                          {"d2d_copy_GBps_read_plus_write", copy_gbps}, {"ratio", ratio}, {"goal", ">= 0.6"}, {"goal_met", met}};
}

// The pair-tile edge of CudaBackend::compute (cuda/cuda_backend.cu): a quarter of the free budget,
// T = max(256, min(K, 16384, sqrt(free / 4 / 8))). The budget is device_memory_limit, or 90% of the
// device's total memory; `used` is what the session holds at that point, estimated here from the
// backend's allocations (class state, batch scratch, the means and centred means): the CUB
// workspace and the status slots (a few MiB) are left out, which only matters below the 16384 cap.
int64_t cuda_pair_tile_edge(int64_t V, int64_t K, int64_t d, int64_t scratch_rows, int64_t limit) {
    const int64_t used = V * (8 + 8 + 8 + 1) + V * d * 8 + scratch_rows * 6 * 4 + K * 4 + 2 * K * d * 8 + 4 * K * 8 + d * 8;
    const int64_t free_bytes = limit - used;
    const int64_t edge = free_bytes > 0 ? (int64_t)std::sqrt((double)free_bytes / 4 / 8) : 0;
    return std::max<int64_t>(256, std::min<int64_t>({K, int64_t(16384), edge}));
}

// C2. Pair metrics (GNC2, equiangularity, CDNV) in compute() vs. the same tile GEMMs alone.
void cuda_pairs(const Options& o, json& out) {
    const int64_t K = o.quick ? 8000 : 32000, d = o.quick ? 1024 : 4096, n = 2 * K, B = 65536;
    const int reps = o.quick ? 2 : 3;
    std::printf("\n== C2. cuda pair metrics: compute() with class metrics (GNC2, equiangularity, CDNV; no classifier, so no UNC3),"
                " svd_mode off, no overall metrics, K=%lld, d=%lld, 2 rows per class (fp32, device) ==\n", (long long)K, (long long)d);
    std::printf("   engine: the whole compute() (host clock): one warm-up session, then best of %d fresh sessions; ceiling: the tile"
                " loop of CudaBackend::compute alone (cublasDgemm OP_T/OP_N, same T, upper-triangle tiles), events, best of %d;"
                " goal: engine <= 1.5 x GEMM\n", reps, reps);
    DevMem x((size_t)(n * d) * 4);
    bench_cuda::fill_uniform_f32(x.p, (size_t)(n * d), 99);
    std::vector<int32_t> y;
    for (int64_t c = 0; c < K; ++c) y.push_back((int32_t)c), y.push_back((int32_t)c);
    std::shuffle(y.begin(), y.end(), std::mt19937_64(7));
    DevMem yd(y.data(), y.size() * sizeof(int32_t));
    Config cfg = base_config(o, K, d);
    cfg.svd_mode = COLLAPSE_SVD_OFF;
    cfg.compute_overall_metrics = false;
    cfg.compute_token_metrics = false;
    cfg.compute_class_metrics = true;
    cfg.compute_nc4 = false;
    std::vector<double> t;
    double phase = -1, gnc2 = std::nan("");
    int64_t pairs_done = 0;
    for (int r = 0; r <= reps; ++r) {  // r = 0 warms up
        Session s(cfg);
        ingest_pass_raw(s, x.p, COLLAPSE_F32, 4, static_cast<const int32_t*>(yd.p), COLLAPSE_MEMORY_DEVICE, n, d, B, nullptr);
        const auto t0 = Clock::now();
        auto rep = s.compute(true);
        const double sec = since(t0);
        if (r == 0) continue;
        t.push_back(sec);
        const auto& tt = rep->doc["engine"]["timings_seconds"];
        if (tt.contains("class_metrics")) phase = phase < 0 ? tt["class_metrics"].get<double>() : std::min(phase, tt["class_metrics"].get<double>());
        const auto& oa = rep->doc["overall_analysis"];
        if (oa["overall_gnc2"].is_number()) gnc2 = oa["overall_gnc2"].get<double>();
        pairs_done = oa["gnc2_pairs"].get<int64_t>();
    }
    const Timing tm = summarize(t);
    const int64_t limit = cfg.device_memory_limit > 0 ? cfg.device_memory_limit : bench_cuda::device_total_bytes() / 10 * 9;
    const int64_t T = cuda_pair_tile_edge(K, K, d, std::max(std::min(B, n), cfg.batch_rows), limit);
    double flops = 0;
    int64_t tiles = 0;
    const double gemm_s = bench_cuda::pair_gemm_seconds(K, d, T, reps, &flops, &tiles);
    const double ratio = tm.best / gemm_s;
    const bool met = ratio <= 1.5;
    char ph[96];
    if (phase >= 0) std::snprintf(ph, sizeof ph, "class_metrics phase %.4f s", phase);
    else std::snprintf(ph, sizeof ph, "no class_metrics phase recorded by the backend: whole compute() timed");
    std::printf("cuda-pairs   K=%lld d=%lld pairs=%lld gnc2=%.4g  compute seconds=%8.4f (median %8.4f; %s)  pairs/s=%9.3e"
                "  | tile cublasDgemm alone (T=%lld, %lld tiles, %.1f GFLOP) seconds=%8.4f GFLOP/s=%8.1f  ratio engine/GEMM=%.2f"
                "  goal<=1.5 %s\n",
                (long long)K, (long long)d, (long long)pairs_done, gnc2, tm.best, tm.median, ph, 0.5 * (double)K * (double)(K - 1) / tm.best,
                (long long)T, (long long)tiles, flops / kGB, gemm_s, flops / gemm_s / kGB, ratio, met ? "met" : "MISSED");
    std::fflush(stdout);
    json j = {{"K", K}, {"d", d}, {"rows", n}, {"compute_seconds_best", tm.best}, {"compute_seconds_median", tm.median},
              {"timed", phase >= 0 ? "class_metrics phase" : "whole compute() (the cuda backend records no class_metrics phase)"},
              {"pairs", pairs_done}, {"pairs_per_s", 0.5 * (double)K * (double)(K - 1) / tm.best}, {"tile_edge", T}, {"tiles", tiles},
              {"gemm_flops", flops}, {"gemm_seconds", gemm_s}, {"gemm_GFLOPs", flops / gemm_s / kGB}, {"ratio_engine_over_gemm", ratio},
              {"goal", "engine <= 1.5 x GEMM"}, {"goal_met", met}};
    if (phase >= 0) j["class_metrics_seconds"] = phase;
    out["cuda_pairs"] = j;
}

// C3. Per-token exact SVD entropies (32000 Zipf classes, d=64) and the share of cuSOLVER in them.
void cuda_token_svd(const Options& o, json& out) {
    const int64_t V = 32000, d = 64, n = o.quick ? 262144 : 1048576, B = 65536;
    const int reps = o.quick ? 2 : 3;
    std::printf("\n== C3. cuda per-token exact SVD entropies: V=%lld Zipf(1.1), d=%lld, %lld rows fp32 (device), class and overall"
                " metrics off ==\n", (long long)V, (long long)d, (long long)n);
    std::printf("   engine: compute() with svd_mode exact minus compute() with svd_mode off (or the token_svd phase if recorded),"
                " one warm-up each, best of %d; ceiling: the same batched eigen-solver calls (Gram size M = pow2 >= min(n, d),"
                " same group counts and chunks) on random symmetric matrices, events around the solver calls only, best of %d\n",
                reps, reps);
    DevMem x((size_t)(n * d) * 4);
    bench_cuda::fill_uniform_f32(x.p, (size_t)(n * d), 555);
    const std::vector<int32_t> y = zipf_labels(n, V, 1.1, 2024);
    DevMem yd(y.data(), y.size() * sizeof(int32_t));
    json tokens;
    int64_t kept = 0;
    auto run = [&](collapse_svd_mode mode, double* phase) {
        Config cfg = base_config(o, V, d);
        cfg.svd_mode = mode;
        cfg.compute_overall_metrics = false;
        cfg.compute_class_metrics = false;
        cfg.compute_token_metrics = true;
        Session s(cfg);
        ingest_pass_raw(s, x.p, COLLAPSE_F32, 4, static_cast<const int32_t*>(yd.p), COLLAPSE_MEMORY_DEVICE, n, d, B, nullptr);
        const auto t0 = Clock::now();
        auto rep = s.compute(true);
        const double sec = since(t0);
        const auto& tt = rep->doc["engine"]["timings_seconds"];
        *phase = tt.contains("token_svd") ? tt["token_svd"].get<double>() : -1;
        if (mode == COLLAPSE_SVD_EXACT) {
            tokens = rep->doc["token_analysis"];
            kept = rep->doc["counts"]["classes_kept"].get<int64_t>();
        }
        return sec;
    };
    std::vector<double> te, toff, tph;
    for (int r = 0; r <= reps; ++r) {  // r = 0 warms up
        double ph = -1, dummy = -1;
        const double e = run(COLLAPSE_SVD_EXACT, &ph);
        const double f = run(COLLAPSE_SVD_OFF, &dummy);
        if (r > 0) te.push_back(e), toff.push_back(f), tph.push_back(ph);
    }
    const double t_exact = summarize(te).best, t_off = summarize(toff).best, t_phase = summarize(tph).best;
    const bool have_phase = t_phase >= 0;
    const double t_engine = have_phase ? t_phase : std::max(t_exact - t_off, 1e-12);

    // The engine's groups: kept classes in ascending id, M = smallest power of two >= min(svd_rows, d), from 2.
    std::vector<std::pair<int64_t, int>> rows_by_id;
    for (auto it = tokens.begin(); it != tokens.end(); ++it)
        rows_by_id.emplace_back(std::stoll(it.key()), (int)std::min<int64_t>(it.value()["svd_rows"].get<int64_t>(), d));
    std::sort(rows_by_id.begin(), rows_by_id.end());
    std::map<int64_t, bench_cuda::EigGroup> by_m;
    for (const auto& [id, m] : rows_by_id) {
        int64_t M = 2;
        while (M < m) M *= 2;
        by_m[M].M = M;
        by_m[M].m.push_back(m);
    }
    std::vector<bench_cuda::EigGroup> groups;
    for (auto& [M, g] : by_m) groups.push_back(std::move(g));
    const bench_cuda::EigTiming eig = bench_cuda::eig_solver_seconds(groups, reps);
    const double share = eig.seconds / t_engine;
    std::string per_group;
    json jg = json::array();
    for (size_t g = 0; g < groups.size(); ++g) {
        const int64_t M = groups[g].M;
        const char* solver = M <= 32 ? "syevjBatched" : M <= 512 ? "XsyevBatched" : "Xsyevd";
        char buf[128];
        std::snprintf(buf, sizeof buf, "%sM=%lld:%zu/%s/%.4fs", g ? " " : "", (long long)M, groups[g].m.size(), solver,
                      eig.group_seconds[g]);
        per_group += buf;
        jg.push_back({{"M", M}, {"classes", groups[g].m.size()}, {"solver", solver}, {"calls", eig.group_calls[g]},
                      {"seconds", eig.group_seconds[g]}});
    }
    std::printf("cuda-svd     V=%lld d=%lld rows=%lld kept=%lld  per-token seconds=%8.4f (%s; compute exact %8.4f, off %8.4f)"
                "  classes/s=%9.3e  | cuSOLVER calls alone seconds=%8.4f  share of per-token time in cuSOLVER=%.2f\n",
                (long long)V, (long long)d, (long long)n, (long long)kept, t_engine, have_phase ? "token_svd phase" : "exact - off",
                t_exact, t_off, (double)kept / t_engine, eig.seconds, share);
    std::printf("             groups (M:classes/solver/seconds): %s\n", per_group.c_str());
    std::fflush(stdout);
    out["cuda_token_svd"] = {{"V", V}, {"d", d}, {"rows", n}, {"classes_kept", kept}, {"per_token_seconds", t_engine},
                             {"timed", have_phase ? "token_svd phase" : "compute exact - compute off"},
                             {"compute_exact_seconds", t_exact}, {"compute_off_seconds", t_off},
                             {"classes_per_s", (double)kept / t_engine}, {"cusolver_seconds", eig.seconds},
                             {"cusolver_share", share}, {"groups", jg}};
}
#endif

int usage(const char* argv0, const char* why) {
    if (why) std::fprintf(stderr, "collapse_bench: %s\n", why);
    std::fprintf(stderr, "usage: %s [--quick] [--backend cpu|cuda] [--only ingest|gram|finalize|pairs|svd|spill|checkpoint]"
                         " [--scratch DIR] [--json FILE]\n", argv0);
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&](const char* flag) -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(std::string(flag) + " needs a value");
            return argv[++i];
        };
        try {
            if (a == "--quick") o.quick = true;
            else if (a == "--backend") {
                const std::string b = value("--backend");
                if (b != "cpu" && b != "cuda") return usage(argv[0], "--backend must be cpu or cuda");
                o.cuda = b == "cuda";
            } else if (a == "--only") {
                o.only = value("--only");
                if (o.only == "pairs") o.only = "finalize";
                if (o.only != "ingest" && o.only != "gram" && o.only != "finalize" && o.only != "svd" && o.only != "spill" &&
                    o.only != "checkpoint")
                    return usage(argv[0], "--only must be ingest, gram, finalize (or pairs), svd, spill or checkpoint");
            } else if (a == "--json") o.json_path = value("--json");
            else if (a == "--scratch") o.scratch = value("--scratch");
            else if (a == "-h" || a == "--help") return usage(argv[0], nullptr), 0;
            else return usage(argv[0], ("unknown argument " + a).c_str());
        } catch (const std::exception& e) {
            return usage(argv[0], e.what());
        }
    }

    if (o.scratch.empty()) o.scratch = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
    json out;
    const std::string model = cpu_model();
    const unsigned hw = std::thread::hardware_concurrency();
    utsname un{};
    uname(&un);
    std::printf("collapse_bench  %s\n", now_string().c_str());
    std::printf("machine: %s, %u logical cores (online), %s %s\n", model.c_str(), hw, un.sysname, un.release);
    std::printf("build:   %s (%s; flags: %s), collapse %s\n", COLLAPSE_BENCH_BUILD_TYPE, COLLAPSE_BENCH_COMPILER,
                COLLAPSE_BENCH_CXX_FLAGS, collapse_version_string());
    std::printf("threads: OpenMP max %d, OpenBLAS %d (%s)\n", omp_get_max_threads(), openblas_get_num_threads(),
                openblas_get_config());
    std::printf("backend: %s%s\n", o.cuda ? "cuda" : "cpu", o.quick ? "  (--quick: smaller sizes)" : "");
    out["date"] = now_string();
    out["machine"] = {{"cpu", model}, {"logical_cores", hw}, {"kernel", un.release}};
    out["build"] = {{"type", COLLAPSE_BENCH_BUILD_TYPE}, {"compiler", COLLAPSE_BENCH_COMPILER}, {"flags", COLLAPSE_BENCH_CXX_FLAGS},
                    {"version", collapse_version_string()}};
    out["threads"] = {{"openmp", omp_get_max_threads()}, {"openblas", openblas_get_num_threads()}};
    out["backend"] = o.cuda ? "cuda" : "cpu";
    out["quick"] = o.quick;

    if (o.cuda) {
        if (!collapse_backend_available("cuda")) {
            std::printf("cuda backend not built/available: skipping every figure\n");
            out["skipped"] = "cuda backend not built/available";
            if (!o.json_path.empty()) std::ofstream(o.json_path) << out.dump(2) << "\n";
            return 0;
        }
#ifdef COLLAPSE_BENCH_CUDA
        std::string name, why;
        double gib = 0;
        if (bench_cuda::device_info(&name, &gib, &why)) {
            std::printf("device:  %s, %.1f GiB\n", name.c_str(), gib);
            out["device"] = {{"name", name}, {"memory_gib", gib}};
        }
#else
        std::printf("cuda backend available but collapse_bench was built without the CUDA toolkit: skipping\n");
        out["skipped"] = "collapse_bench built without CUDA";
        if (!o.json_path.empty()) std::ofstream(o.json_path) << out.dump(2) << "\n";
        return 0;
#endif
    }

    const auto t0 = Clock::now();
    try {
        if (o.cuda) {
#ifdef COLLAPSE_BENCH_CUDA
            // The three figures of the CUDA issue (bench/README.md): C1 ingest, C2 pair metrics, C3 per-token SVD.
            if (o.only == "gram") std::printf("\n(gram: no CUDA figure; the CUDA figures are ingest, pairs and svd)\n");
            if (o.only.empty() || o.only == "ingest") cuda_ingest(o, out);
            if (o.only.empty() || o.only == "finalize") cuda_pairs(o, out);
            if (o.only.empty() || o.only == "svd") cuda_token_svd(o, out);
#endif
        } else {
            if (o.only.empty() || o.only == "ingest") bench_ingest(o, out);
            if (o.only.empty() || o.only == "gram") bench_gram(o, out);
            if (o.only.empty() || o.only == "finalize") bench_finalize(o, out);
            if (o.only.empty() || o.only == "svd") bench_svd(o, out);
            if (o.only.empty() || o.only == "spill") bench_spill(o, out);
            if (o.only.empty() || o.only == "checkpoint") bench_checkpoint(o, out);
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "collapse_bench: error: %s\n", e.what());
        return 1;
    }
    std::printf("\ntotal %.1f s\n", since(t0));
    out["total_seconds"] = since(t0);
    if (!o.json_path.empty()) {
        std::ofstream f(o.json_path);
        f << out.dump(2) << "\n";
        if (!f) {
            std::fprintf(stderr, "collapse_bench: error: cannot write %s\n", o.json_path.c_str());
            return 1;
        }
        std::printf("figures written to %s\n", o.json_path.c_str());
    }
    return 0;
}
