#include "common.hpp"

#include <algorithm>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <utility>

namespace bench {

volatile float g_sink = 0;

namespace {
double g_synth_seconds = 0;
}

double synth_seconds() { return g_synth_seconds; }

Timing summarize(std::vector<double> t) {
    std::sort(t.begin(), t.end());
    Timing r;
    r.best = t.front();
    r.median = t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
    return r;
}

const SynthGenerator& synth_generator(int64_t V, int64_t d) {
    static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<SynthGenerator>> cache;
    auto& g = cache[{V, d}];
    if (!g) {
        collapse::internal::SynthSpec s;
        s.classes = V;
        s.dim = d;
        // Rows are addressed by index only; the largest count the generator accepts for this d.
        s.rows = std::numeric_limits<int64_t>::max() / 8 / d;
        s.zipf_s = kZipf;
        s.collapse = kCollapse;
        s.seed = kSeed;
        s.dtype = COLLAPSE_F32;
        const auto t0 = Clock::now();
        g = std::make_unique<SynthGenerator>(s);
        g_synth_seconds += since(t0);
    }
    return *g;
}

void synth_features(const SynthGenerator& gen, int64_t first_row, int64_t n, const int32_t* labels, float* out) {
    const int64_t d = gen.spec().dim;
    const int64_t blk = std::max<int64_t>(1, (int64_t(1) << 16) / d);  // about 256 KiB of rows per block
    const int64_t nblk = (n + blk - 1) / blk;
    const auto t0 = Clock::now();
    std::exception_ptr error;  // an exception may not leave an OpenMP region
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblk; ++b) {
        const int64_t r0 = b * blk, cnt = std::min(blk, n - r0);
        try {
            gen.features(first_row + r0, cnt, labels + r0, out + (size_t)(r0 * d));
        } catch (...) {
#pragma omp critical(bench_synth_error)
            if (!error) error = std::current_exception();
        }
    }
    g_synth_seconds += since(t0);
    if (error) std::rethrow_exception(error);
}

Inputs Inputs::synth(const SynthGenerator& gen, int64_t n) {
    std::vector<int32_t> y((size_t)n);
    gen.labels(0, n, y.data());
    return with_labels(gen, std::move(y));
}

Inputs Inputs::with_labels(const SynthGenerator& gen, std::vector<int32_t> labels) {
    Inputs in;
    in.y = std::move(labels);
    in.n = (int64_t)in.y.size();
    in.d = gen.spec().dim;
    in.x.resize((size_t)(in.n * in.d));
    synth_features(gen, 0, in.n, in.y.data(), in.x.data());
    return in;
}

std::vector<int32_t> exact_class_labels(int64_t K, int lo, int hi) {
    std::vector<int32_t> y;
    for (int round = 0; round < hi; ++round)
        for (int64_t c = 0; c < K; ++c)
            if (round < lo + c % (hi - lo + 1)) y.push_back((int32_t)c);
    return y;
}

Config base_config(const Options& o, int64_t V, int64_t d) {
    Config c;
    c.num_classes = V;
    c.dim = d;
    c.backend = o.cuda ? COLLAPSE_BACKEND_CUDA : COLLAPSE_BACKEND_CPU;
    c.device = o.cuda ? "cuda" : "cpu";
    c.log_level = "error";
    return c;
}

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
    return ingest_pass_raw(s, in.x.data(), COLLAPSE_F32, sizeof(float), in.y.data(), COLLAPSE_MEMORY_HOST, in.n, in.d, B, nullptr);
}

double timing_of(const collapse::internal::Result& r, const char* phase, double missing) {
    const auto it = r.engine.timings.find(phase);
    return it == r.engine.timings.end() ? missing : it->second;
}

}  // namespace bench
