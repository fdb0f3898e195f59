// The CUDA figures (--backend cuda), bench/README.md "The CUDA figures": C1 fp16 device ingest vs.
// a D2D copy of the same buffer, C2 pair metrics vs. the same tile GEMMs, C3 per-token SVD and its
// cuSOLVER share. Built only with the CUDA toolkit; the device side is in cuda_helpers.cu, so this
// file includes no CUDA header.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "base/dtype.hpp"
#include "common.hpp"
#include "io/tensor_file.hpp"
#include "cuda_helpers.hpp"

namespace bench {
namespace {

struct DevMem {
    void* p = nullptr;
    explicit DevMem(size_t bytes) : p(bench_cuda::alloc_device(bytes)) {}
    DevMem(const void* host, size_t bytes) : p(bench_cuda::to_device(host, bytes)) {}
    ~DevMem() { bench_cuda::free_device(p); }
    DevMem(DevMem&& o) noexcept : p(o.p) { o.p = nullptr; }  // returned by synth_to_device
    DevMem(const DevMem&) = delete;
    DevMem& operator=(const DevMem&) = delete;
    DevMem& operator=(DevMem&&) = delete;
};
struct DevStream {
    void* s = bench_cuda::create_stream();
    DevStream() = default;
    ~DevStream() { bench_cuda::destroy_stream(s); }
    DevStream(const DevStream&) = delete;
    DevStream& operator=(const DevStream&) = delete;
};

// The generator's rows for the given labels, on the device as float32 or float16 (the float32
// values rounded to nearest even, as SynthGenerator rounds them): generated on the host 64 MiB of
// float32 at a time and copied up, before any clock starts.
DevMem synth_to_device(const SynthGenerator& gen, const std::vector<int32_t>& y, collapse_dtype dt) {
    if (dt != COLLAPSE_F32 && dt != COLLAPSE_F16) throw std::invalid_argument("synth_to_device: float32 or float16 only");
    const int64_t n = (int64_t)y.size(), d = gen.spec().dim;
    const size_t esz = dt == COLLAPSE_F16 ? 2 : 4;
    DevMem x((size_t)(n * d) * esz);
    const int64_t chunk = std::max<int64_t>(1, (64 * kMiB) / (d * 4));
    std::vector<float> f;
    std::vector<uint16_t> h;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const int64_t cnt = std::min(chunk, n - r0), elems = cnt * d;
        f.resize((size_t)elems);
        synth_features(gen, r0, cnt, y.data() + r0, f.data());
        const void* src = f.data();
        if (dt == COLLAPSE_F16) {
            h.resize((size_t)elems);
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < elems; ++i) h[(size_t)i] = collapse::internal::float_to_half(f[(size_t)i]);
            src = h.data();
        }
        bench_cuda::copy_to_device(x.p, (size_t)(r0 * d) * esz, src, (size_t)elems * esz);
    }
    return x;
}

// Labels on the device.
DevMem labels_to_device(const std::vector<int32_t>& y) { return DevMem(y.data(), y.size() * sizeof(int32_t)); }

// The pair-tile edge of CudaBackend::compute (cuda/cuda_backend.cu): a quarter of the free budget,
// T = max(256, min(K, 16384, sqrt(free / 4 / 8))). The budget is device_memory_limit, or 90% of the
// device's total memory; `used` is what the session holds at that point, estimated here from the
// backend's allocations (class state, batch scratch, the means and centred means): the CUB
// workspace and the status slots (a few MiB) are left out, which only matters below the 16384 cap.
int64_t cuda_pair_tile_edge(int64_t V, int64_t K, int64_t d, int64_t scratch_rows, int64_t limit) {
    const int64_t used = V * (8 + 8 + 8 + 1) + V * d * 8 + scratch_rows * 4 * 4 + K * 4 + 2 * K * d * 8 + 4 * K * 8 + d * 8;
    const int64_t free_bytes = limit - used;
    const int64_t edge = free_bytes > 0 ? (int64_t)std::sqrt((double)free_bytes / 4 / 8) : 0;
    return std::max<int64_t>(256, std::min<int64_t>({K, int64_t(16384), edge}));
}

// The engine's eigen groups for classes of m rows (m = min(rows, d)), in the given order:
// M = the smallest power of two >= m, from 2; groups by ascending M.
std::vector<bench_cuda::EigGroup> eig_groups(const std::vector<int>& sizes) {
    std::map<int64_t, bench_cuda::EigGroup> by_m;
    for (const int m : sizes) {
        int64_t M = 2;
        while (M < m) M *= 2;
        by_m[M].M = M;
        by_m[M].m.push_back(m);
    }
    std::vector<bench_cuda::EigGroup> groups;
    for (auto& [M, g] : by_m) groups.push_back(std::move(g));
    return groups;
}

}  // namespace

// C1's bytes-moved model (bench/README.md, "C1's bytes-moved model"): what the ingest kernels of one
// pass must move, batch by batch, with class metrics on and no row store (svd_mode off), every class
// already seen (the timed passes follow a warm-up pass): the features read twice (validation, then
// the class sums; a 128 MiB batch does not stay in L2), and per distinct class of the batch its
// float64 sum row read and written back plus its float32 reference row read (20 d bytes); keys,
// row ids, the sort and the counts about 80 bytes a row.
struct IngestModel {
    double feature_bytes = 0, class_bytes = 0, index_bytes = 0;
    int64_t distinct = 0;  // distinct classes summed over the batches
    double total() const { return feature_bytes + class_bytes + index_bytes; }
};

IngestModel ingest_model(const std::vector<int32_t>& y, int64_t d, int64_t esz, int64_t B) {
    IngestModel m;
    const int64_t n = (int64_t)y.size();
    for (int64_t r0 = 0; r0 < n; r0 += B) {
        std::vector<int32_t> b(y.begin() + r0, y.begin() + std::min(n, r0 + B));
        std::sort(b.begin(), b.end());
        const int64_t kb = std::unique(b.begin(), b.end()) - b.begin();
        m.distinct += kb;
        m.feature_bytes += 2.0 * (double)b.size() * (double)(d * esz);
        m.class_bytes += (double)kb * (double)d * (8 + 8 + 4);
        m.index_bytes += 80.0 * (double)b.size();
    }
    return m;
}

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
    const SynthGenerator& gen = synth_generator(V, d);
    std::vector<int32_t> y((size_t)n);
    gen.labels(0, n, y.data());
    const DevMem x = synth_to_device(gen, y, COLLAPSE_F16);
    const DevMem yd = labels_to_device(y);
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
    // The model's bytes next to the same run's time and D2D rate: its bound on the ratio (every
    // modelled byte at the D2D rate) and the fraction of the D2D rate the kernels reach on them.
    const IngestModel mdl = ingest_model(y, d, 2, B);
    const double amp = mdl.total() / (double)bytes, model_gbps = mdl.total() / tm.best / kGB;
    std::printf("   model per pass: %.0f MB = features read twice %.0f MB + class rows (sum r/w, reference row) %.0f MB"
                " [%.1f distinct classes per batch] + keys/sort/counts %.0f MB = %.2f x the feature bytes;"
                " bound on the ratio 1/%.2f = %.2f; model bytes / time = %.1f GB/s = %.2f of the D2D copy\n",
                mdl.total() / 1e6, mdl.feature_bytes / 1e6, mdl.class_bytes / 1e6, (double)mdl.distinct / (double)((n + B - 1) / B),
                mdl.index_bytes / 1e6, amp, amp, 1.0 / amp, model_gbps, model_gbps / copy_gbps);
    std::fflush(stdout);
    out["cuda_ingest"] = {{"dtype", "f16"}, {"d", d}, {"V", V}, {"rows", n}, {"batch_rows", B}, {"buffer_bytes", (double)bytes},
                          {"passes", reps}, {"seconds_best", tm.best}, {"seconds_median", tm.median},
                          {"rows_per_s", (double)n / tm.best}, {"GBps", gbps}, {"GBps_median", (double)bytes / tm.median / kGB},
                          {"d2d_copy_GBps_read_plus_write", copy_gbps}, {"ratio", ratio}, {"goal", ">= 0.6"}, {"goal_met", met},
                          {"model", {{"bytes_per_pass", mdl.total()}, {"feature_bytes", mdl.feature_bytes}, {"class_row_bytes", mdl.class_bytes},
                                     {"index_bytes", mdl.index_bytes}, {"distinct_classes_per_batch", (double)mdl.distinct / (double)((n + B - 1) / B)},
                                     {"amplification", amp}, {"ratio_bound", 1.0 / amp}, {"GBps", model_gbps},
                                     {"fraction_of_d2d", model_gbps / copy_gbps}}}};
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
    // Exactly 2 rows per class (Zipf labels cannot give that), the generator's rows for them.
    const std::vector<int32_t> y = exact_class_labels(K, 2, 2);
    const DevMem x = synth_to_device(synth_generator(K, d), y, COLLAPSE_F32);
    const DevMem yd = labels_to_device(y);
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
        const double cm = timing_of(rep, "class_metrics", -1);
        if (cm >= 0) phase = phase < 0 ? cm : std::min(phase, cm);
        if (rep.metrics.overall_gnc2) gnc2 = *rep.metrics.overall_gnc2;
        pairs_done = rep.metrics.gnc2_pairs;
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
    const SynthGenerator& gen = synth_generator(V, d);
    std::vector<int32_t> y((size_t)n);
    gen.labels(0, n, y.data());
    const DevMem x = synth_to_device(gen, y, COLLAPSE_F32);
    const DevMem yd = labels_to_device(y);
    std::vector<collapse::internal::TokenMetrics> tokens;
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
        *phase = timing_of(rep, "token_svd", -1);
        if (mode == COLLAPSE_SVD_EXACT) {
            tokens = rep.metrics.tokens;
            kept = rep.counts.classes_kept;
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
    for (const auto& t : tokens) rows_by_id.emplace_back(t.id, (int)std::min<int64_t>(t.svd_rows, d));
    std::sort(rows_by_id.begin(), rows_by_id.end());
    std::vector<int> sizes;
    for (const auto& [id, m] : rows_by_id) sizes.push_back(m);
    const std::vector<bench_cuda::EigGroup> groups = eig_groups(sizes);
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
// C4. End to end (issue 11): `collapse analyze --backend cuda` through the same driver
// (collapse_analyze_files) on synthetic .npy files in the page cache, exact per-token SVD, classifier
// and NC4, file -> report; next to its floor: reading the files from the page cache + the bare
// cuSOLVER calls of the per-token SVD (figure 3's ceiling on the report's classes) + the NC4
// logits GEMMs (cublasDgemm over every row in the engine's blocks; the rows stay on the device, so
// compute() takes NC4 from them and there is no second pass over the files).
void cuda_end_to_end(const Options& o, json& out) {
    const int64_t n = o.quick ? 100000 : 300000, d = 1024, V = o.quick ? 8000 : 32000;
    const int reps = o.quick ? 2 : 3;
    std::printf("\n== C4. cuda end to end: collapse analyze --backend cuda (collapse_analyze_files), %lld x %lld fp16 rows, V=%lld"
                " Zipf(1.1), svd_mode exact + classifier + NC4, files in the page cache ==\n", (long long)n, (long long)d, (long long)V);
    std::printf("   engine: the whole call, file -> report (host clock), one warm-up, best of %d; floor: page-cache read of the"
                " files (pread, best of %d) + the per-token cuSOLVER calls alone + NC4's logits DGEMMs alone (events); goal (issue 11,"
                " 300k rows on an H200): <= 1.0 s\n", reps, reps);
    collapse::internal::SynthSpec spec;
    spec.rows = n, spec.dim = d, spec.classes = V, spec.zipf_s = kZipf, spec.collapse = kCollapse, spec.dtype = COLLAPSE_F16, spec.seed = 11;
    const SynthGenerator gen(spec);
    const std::filesystem::path dir = std::filesystem::path(o.scratch) / ("collapse_bench_e2e_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    struct RemoveDir {
        std::filesystem::path p;
        ~RemoveDir() {
            std::error_code ec;
            std::filesystem::remove_all(p, ec);
        }
    } const remove_dir{dir};
    const std::string fx = (dir / "features.npy").string(), fy = (dir / "labels.npy").string(), fw = (dir / "classifier.npy").string();
    {  // written as `collapse synth` writes them, a chunk at a time
        collapse::internal::io::NpyWriter xw(fx, COLLAPSE_F16, {n, d});
        collapse::internal::io::NpyWriter yw(fy, COLLAPSE_I32, {n});
        const int64_t chunk = 16384;
        std::vector<int32_t> y((size_t)chunk);
        std::vector<uint16_t> x((size_t)(chunk * d));
        for (int64_t r0 = 0; r0 < n; r0 += chunk) {
            const int64_t m = std::min(chunk, n - r0);
            gen.labels(r0, m, y.data());
            gen.features(r0, m, y.data(), x.data());
            xw.append(x.data(), (size_t)(m * d) * 2);
            yw.append(y.data(), (size_t)m * 4);
        }
        xw.close();
        yw.close();
        std::vector<float> w((size_t)(V * d));
        gen.classifier(w.data());
        collapse::internal::io::write_npy(fw, COLLAPSE_F32, {V, d}, w.data());
    }
    // The file part of the floor: every byte of the three files through pread (page cache).
    std::vector<char> buf((size_t)(64 * kMiB));
    auto read_files = [&] {
        const auto t0 = Clock::now();
        for (const std::string& f : {fx, fy, fw}) {
            const int fd = ::open(f.c_str(), O_RDONLY);
            if (fd < 0) throw std::runtime_error("cannot open " + f);
            off_t at = 0;
            for (ssize_t got; (got = ::pread(fd, buf.data(), buf.size(), at)) > 0;) at += got;
            ::close(fd);
        }
        return since(t0);
    };
    std::vector<double> tr;
    for (int r = 0; r <= reps; ++r) tr.push_back(read_files());  // r = 0 fills the page cache
    tr.erase(tr.begin());
    const double t_read = summarize(tr).best;

    collapse_analysis a{};
    a.struct_size = sizeof a;
    a.config_yaml = "backend: cuda\nsvd_mode: exact\ncompute_nc4: true\n";
    a.config_source = "collapse_bench C4";
    a.features = fx.c_str(), a.labels = fy.c_str(), a.classifier = fw.c_str();
    std::vector<double> t;
    json report, timings = json::object();
    for (int r = 0; r <= reps; ++r) {  // r = 0 warms up (module load, pool)
        collapse_report* rep = nullptr;
        const auto t0 = Clock::now();
        const collapse_status st = collapse_analyze_files(&a, &rep);
        const double sec = since(t0);
        if (st != COLLAPSE_OK) throw std::runtime_error(std::string("collapse_analyze_files: ") + collapse_last_error());
        const char* js = nullptr;
        if (r == reps && collapse_report_json(rep, &js) == COLLAPSE_OK) report = json::parse(js);
        collapse_report_destroy(rep);
        if (r > 0) t.push_back(sec);
    }
    const Timing tm = summarize(t);
    if (report.contains("engine") && report["engine"].contains("timings_seconds")) timings = report["engine"]["timings_seconds"];
    // The per-token solver calls on the report's classes (figure 3's groups), and NC4's GEMMs.
    std::vector<int> sizes;
    for (auto it = report["token_analysis"].begin(); it != report["token_analysis"].end(); ++it)
        sizes.push_back((int)std::min<int64_t>(it.value()["svd_rows"].get<int64_t>(), d));
    const int64_t K = (int64_t)sizes.size();
    const std::vector<bench_cuda::EigGroup> groups = eig_groups(sizes);
    const double t_eig = groups.empty() ? 0.0 : bench_cuda::eig_solver_seconds(groups, reps).seconds;
    // NC4's blocks as compute() takes them from the device rows (cuda_metrics.cu, nc4_from_device).
    const int64_t nc4_chunk = std::max<int64_t>(1, (int64_t(256) << 20) / (8 * (V + K + d)));
    const double t_gemm = bench_cuda::chunked_gemm_seconds(V, nc4_chunk, d, n, reps);
    const double floor_s = t_read + t_eig + t_gemm, ratio = tm.best / floor_s;
    std::printf("cuda-e2e     f16 n=%lld d=%lld V=%lld kept=%lld  file->report seconds=%8.4f (median %8.4f)  | floor=%8.4f (read %.4f +"
                " cuSOLVER %.4f + NC4 DGEMM %.4f)  ratio=%.2f  goal (300k, H200) <= 1.0 s %s\n",
                (long long)n, (long long)d, (long long)V, (long long)K, tm.best, tm.median, floor_s, t_read, t_eig, t_gemm, ratio,
                o.quick ? "(quick: not the goal's size)" : tm.best <= 1.0 ? "met" : "MISSED");
    std::printf("             phases: %s\n", timings.dump().c_str());
    std::fflush(stdout);
    out["cuda_end_to_end"] = {{"rows", n}, {"d", d}, {"V", V}, {"dtype", "f16"}, {"classes_kept", K}, {"seconds_best", tm.best},
                              {"seconds_median", tm.median}, {"phases", timings}, {"floor_seconds", floor_s}, {"read_seconds", t_read},
                              {"file_bytes", (double)(std::filesystem::file_size(fx) + std::filesystem::file_size(fy) + std::filesystem::file_size(fw))},
                              {"cusolver_seconds", t_eig}, {"nc4_gemm_seconds", t_gemm}, {"ratio_over_floor", ratio},
                              {"goal", "<= 1.0 s at 300k rows on an H200"}, {"goal_met", !o.quick && tm.best <= 1.0}};
}
}  // namespace bench
