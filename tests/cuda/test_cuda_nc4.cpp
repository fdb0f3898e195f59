// NC4 from the device row buffer (issue 11): in exact mode, while every row is still on the device,
// a CUDA session needs no second pass for NC4 (Backend::nc4_from_rows) and compute() takes it from
// the device rows in blocks (cuda/cuda_metrics.cu, nc4_from_device). Against the CPU backend (its
// exact row store, nc4_from_store) and a float64 brute force of docs/METRICS.md, over dtypes,
// widths, a bias, classes below min_samples_per_token and a cut kept set; rows that left the device
// (a dtype switch) fall back to the second pass with the same numbers. Then load_state replacing
// the state of a CUDA backend whose rows are on the device: none of them may survive. Skipped
// without a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.hpp"
#include "collapse/collapse.h"
#include "core/backend.hpp"
#include "core/batch.hpp"
#include "core/config.hpp"
#include "core/session.hpp"
#include "io/checkpoint_file.hpp"
#include "reference/brute_force.hpp"

namespace ci = collapse::internal;

namespace test_cuda_nc4 {
namespace {

#define SKIP_WITHOUT_DEVICE()                        \
    if (collapse_backend_available("cuda") == 0) \
    GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped"

// Zipf-like labels (many small classes), rows about class centres, in one dtype per batch, with
// their exact float64 values; a float32 classifier near the centres and a float32 bias.
struct Data {
    int64_t n = 0, d = 0, V = 0, batch = 0;
    std::vector<collapse_dtype> dtype;  // per batch
    std::vector<uint8_t> x;             // rows in their batch's dtype, batch after batch
    std::vector<double> exact;          // [n, d]
    std::vector<int32_t> y;
    std::vector<float> w, b;
};

Data make_data(int64_t n, int64_t d, int64_t V, const std::vector<collapse_dtype>& dtypes, int64_t batch, uint32_t seed) {
    Data D;
    D.n = n, D.d = d, D.V = V, D.batch = batch;
    std::mt19937_64 g(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> p((size_t)V);
    for (int64_t c = 0; c < V; ++c) p[(size_t)c] = 1.0 / (double)(c + 1);
    std::discrete_distribution<int32_t> lab(p.begin(), p.end());
    std::vector<double> centre((size_t)(V * d));
    for (double& c : centre) c = 1.5 * nd(g);
    for (int64_t i = 0; i < n; ++i) {
        const int32_t c = lab(g);
        D.y.push_back(c);
        const collapse_dtype t = dtypes[(size_t)(i / batch) % dtypes.size()];
        if (i % batch == 0) D.dtype.push_back(t);
        for (int64_t j = 0; j < d; ++j) {
            const float v = (float)(centre[(size_t)(c * d + j)] + nd(g));
            if (t == COLLAPSE_F32) {
                const size_t at = D.x.size();
                D.x.resize(at + 4);
                std::memcpy(D.x.data() + at, &v, 4);
                D.exact.push_back(v);
            } else {
                const uint16_t h = t == COLLAPSE_F16 ? ci::float_to_half(v) : ci::float_to_bf16(v);
                const size_t at = D.x.size();
                D.x.resize(at + 2);
                std::memcpy(D.x.data() + at, &h, 2);
                D.exact.push_back(t == COLLAPSE_F16 ? ci::half_to_float(h) : ci::bf16_to_float(h));
            }
        }
    }
    // W near the centres (noise large enough that many rows disagree), a bias of a few tenths.
    for (int64_t k = 0; k < V * d; ++k) D.w.push_back((float)(centre[(size_t)k] + 2.0 * nd(g)));
    for (int64_t c = 0; c < V; ++c) D.b.push_back((float)(0.3 * nd(g)));
    return D;
}

void feed(ci::Session& s, const Data& D) {
    size_t at = 0;
    for (int64_t r0 = 0, k = 0; r0 < D.n; r0 += D.batch, ++k) {
        const int64_t m = std::min(D.batch, D.n - r0);
        const collapse_dtype t = D.dtype[(size_t)k];
        const collapse_buffer x{D.x.data() + at, t, COLLAPSE_MEMORY_HOST, m, D.d, 0};
        const collapse_buffer y{D.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, m, 1, 0};
        s.ingest_rows(&x, &y, nullptr, nullptr);
        at += (size_t)(m * D.d) * ci::dtype_size(t);
    }
}

struct Case {
    const char* name;
    std::vector<collapse_dtype> dtypes;
    int64_t n, d, V, min_samples, max_tokens;
    bool bias;
    bool resident;  // every row stays on the device (no second pass for NC4)
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Outcome {
    ci::Result result;
    bool second_pass = false;
};

Outcome run_session(collapse_backend backend, const Data& D, const Case& k) {
    ci::Config cfg;
    cfg.num_classes = D.V;
    cfg.backend = backend;
    cfg.device = backend == COLLAPSE_BACKEND_CUDA ? "cuda" : "cpu";
    cfg.svd_mode = COLLAPSE_SVD_EXACT;
    cfg.compute_nc4 = true;
    cfg.per_class_arrays = true;
    cfg.min_samples_per_token = k.min_samples;
    cfg.max_tokens_to_analyze = k.max_tokens;
    ci::Session s(cfg);
    const collapse_buffer w{D.w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, D.V, D.d, 0};
    const collapse_buffer b{D.b.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, D.V, 1, 0};
    s.set_classifier(&w, k.bias ? &b : nullptr);
    feed(s, D);
    Outcome r;
    r.second_pass = s.needs_second_pass();
    if (r.second_pass) {
        s.begin_second_pass();
        feed(s, D);
    }
    r.result = s.compute(true);
    return r;
}

class DeviceNc4 : public ::testing::TestWithParam<Case> {};

TEST_P(DeviceNc4, MatchesCpuAndBruteForce) {
    SKIP_WITHOUT_DEVICE();
    const Case& k = GetParam();
    const Data D = make_data(k.n, k.d, k.V, k.dtypes, 500, (uint32_t)(k.n + k.d));
    const Outcome cpu = run_session(COLLAPSE_BACKEND_CPU, D, k), gpu = run_session(COLLAPSE_BACKEND_CUDA, D, k);
    // The CUDA session skips the second pass for NC4 exactly when every row stayed on the device; a
    // cut kept set still needs it for the Gram of the kept rows.
    EXPECT_EQ(gpu.second_pass, !k.resident || k.max_tokens > 0);

    ref::Options o;
    o.num_classes = D.V;
    o.min_samples = k.min_samples;
    o.max_tokens = k.max_tokens;
    o.compute_nc4 = true;
    const std::vector<double> W(D.w.begin(), D.w.end()), B(D.b.begin(), D.b.end());
    const std::vector<int64_t> y(D.y.begin(), D.y.end());
    const ref::Result want = ref::compute(D.exact, y, D.d, W.data(), k.bias ? B.data() : nullptr, o);

    const ci::MetricValues &g = gpu.result.metrics, &c = cpu.result.metrics;
    ASSERT_TRUE(want.nc4_agreement && c.nc4_agreement && g.nc4_agreement) << (g.notes.count("nc4_agreement") ? g.notes.at("nc4_agreement") : "");
    EXPECT_GT(*want.nc4_agreement, 0.05) << "a test whose rows all disagree checks little";
    EXPECT_LT(*want.nc4_agreement, 0.98) << "a test whose rows all agree checks little";
    EXPECT_EQ(g.nc4_rows, want.rows_kept);
    EXPECT_EQ(g.nc4_rows, c.nc4_rows);
    // Integer counts over the same rows: equal unless a row sits on a tie to 1e-15 (random data: none).
    EXPECT_DOUBLE_EQ(*g.nc4_agreement, *want.nc4_agreement);
    EXPECT_DOUBLE_EQ(*g.nc4_agreement, *c.nc4_agreement);
    ASSERT_EQ(g.tokens.size(), c.tokens.size());
    int64_t hits = 0;
    for (size_t t = 0; t < g.tokens.size(); ++t) {
        EXPECT_EQ(g.tokens[t].id, c.tokens[t].id);
        EXPECT_EQ(g.tokens[t].nc4_rows, c.tokens[t].nc4_rows) << "token " << g.tokens[t].id;
        EXPECT_EQ(g.tokens[t].nc4_rows, g.tokens[t].num_samples) << "token " << g.tokens[t].id;
        EXPECT_EQ(g.tokens[t].nc4_hits, c.tokens[t].nc4_hits) << "token " << g.tokens[t].id;
        hits += g.tokens[t].nc4_hits;
    }
    EXPECT_DOUBLE_EQ((double)hits / (double)g.nc4_rows, *g.nc4_agreement);
    if (k.max_tokens > 0) EXPECT_LT(want.rows_kept, D.n) << "the cut leaves rows of other classes in the buffer";
}

INSTANTIATE_TEST_SUITE_P(
    Table, DeviceNc4,
    ::testing::Values(Case{"f32_d16_bias", {COLLAPSE_F32}, 3000, 16, 40, 2, 0, true, true},
                      Case{"f16_d64_min5", {COLLAPSE_F16}, 4000, 64, 300, 5, 0, false, true},
                      Case{"bf16_d33_cut50_bias", {COLLAPSE_BF16}, 3000, 33, 120, 2, 50, true, true},
                      // f16 then bf16 batches: the buffer's rows move to the host store, NC4 is the second pass's
                      Case{"f16_bf16_moved_to_host", {COLLAPSE_F16, COLLAPSE_BF16}, 2500, 24, 60, 2, 0, true, false}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// load_state replacing a CUDA backend's state while its rows are in the device row buffer: the
// rows before it go (the bug was that they stayed in the buffer and joined the loaded ones at the
// next compute). The backend then equals a fresh one that loaded the same state, before and after
// more rows.
TEST(CudaLoadState, ReplaceDropsTheDeviceRows) {
    SKIP_WITHOUT_DEVICE();
    const int64_t d = 12, V = 20;
    const Data A = make_data(900, d, V, {COLLAPSE_F16}, 300, 1), L = make_data(700, d, V, {COLLAPSE_F16}, 350, 2),
               M = make_data(400, d, V, {COLLAPSE_F16}, 400, 3);
    ci::Config cfg;
    cfg.num_classes = V;
    cfg.dim = d;
    cfg.svd_mode = COLLAPSE_SVD_EXACT;
    auto ingest = [&](ci::Backend& be, const Data& D) {
        size_t at = 0;
        for (int64_t r0 = 0; r0 < D.n; r0 += D.batch) {
            const int64_t m = std::min(D.batch, D.n - r0);
            const collapse_buffer x{D.x.data() + at, COLLAPSE_F16, COLLAPSE_MEMORY_HOST, m, d, 0};
            const collapse_buffer y{D.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, m, 1, 0};
            be.ingest(ci::describe_rows(&x, &y, nullptr, d), nullptr);
            at += (size_t)(m * d) * 2;
        }
        be.sync();
    };
    // The state to load: L's rows, saved by a CPU backend.
    const std::string path = ::testing::TempDir() + "/cuda_load_replace.ckpt";
    {
        const std::unique_ptr<ci::Backend> cpu = ci::make_cpu_backend(cfg, V, d);
        ingest(*cpu, L);
        ci::io::CheckpointWriter w(path);
        cpu->save_state(w);
        w.commit();
    }
    const ci::io::CheckpointReader r(path);
    const std::unique_ptr<ci::Backend> used = ci::make_cuda_backend(cfg, V, d), fresh = ci::make_cuda_backend(cfg, V, d);
    ingest(*used, A);  // rows in the device buffer
    ASSERT_TRUE(used->nc4_from_rows()) << "A's rows are on the device";
    used->load_state(r, false);
    fresh->load_state(r, false);
    ci::Classifier none;
    for (int round = 0; round < 2; ++round) {
        SCOPED_TRACE(round == 0 ? "just loaded" : "after more rows");
        EXPECT_EQ(used->class_counts(), fresh->class_counts());
        EXPECT_EQ(used->row_counts().rows_seen, fresh->row_counts().rows_seen);
        EXPECT_EQ(used->row_counts().rows_seen, round == 0 ? L.n : L.n + M.n);
        ci::Counts counts;
        const ci::KeptSet kept = ci::select_kept(fresh->class_counts(), cfg, &counts);
        const ci::MetricValues got = used->compute(kept, none), want = fresh->compute(kept, none);
        ASSERT_EQ(got.tokens.size(), want.tokens.size());
        ASSERT_GT(got.tokens.size(), 0u);
        for (size_t t = 0; t < want.tokens.size(); ++t) {
            ASSERT_TRUE(got.tokens[t].svd_entropy && want.tokens[t].svd_entropy);
            EXPECT_EQ(got.tokens[t].svd_rows, want.tokens[t].svd_rows) << "token " << want.tokens[t].id;
            EXPECT_NEAR(*got.tokens[t].svd_entropy, *want.tokens[t].svd_entropy, 1e-12) << "token " << want.tokens[t].id;
        }
        ASSERT_TRUE(got.overall_svd_entropy && want.overall_svd_entropy);
        EXPECT_NEAR(*got.overall_svd_entropy, *want.overall_svd_entropy, 1e-12);
        if (round == 0) {
            ingest(*used, M);
            ingest(*fresh, M);
        }
    }
    std::remove(path.c_str());
}

}  // namespace
}  // namespace test_cuda_nc4
