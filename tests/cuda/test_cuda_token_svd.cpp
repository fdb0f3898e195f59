// Issue 11: exact mode keeps the rows in the device row buffer in their input dtype (float16 and
// bfloat16 at 2 bytes, exactly) and computes the per-token SVD there (cuda/token_svd_device.cu).
// Per-token entropies against the CPU backend (the docs/METRICS.md "Accuracy contract": 1e-5
// absolute) and against a float64 brute force of the same (exactly converted) rows, over dtypes,
// widths, svd_center, and classes with n < d, n = d, n > d (d x d Grams), repeated rows and an
// all-zero class; then the spill path (a mixed-dtype input) and Sigma_W. Skipped without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.hpp"
#include "collapse/collapse.hpp"
#include "core/backend.hpp"
#include "core/batch.hpp"
#include "core/config.hpp"
#include "core/session.hpp"
#include "reference/brute_force.hpp"
#include "../../cuda/cuda_backend.cuh"  // CudaBackend::allocation_calls (inline)

namespace ci = collapse::internal;

namespace test_cuda_token_svd {
namespace {

#define SKIP_WITHOUT_DEVICE()                        \
    if (collapse_backend_available("cuda") == 0) \
    GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped"

// Rows of V classes of the given sizes in a shuffled order, in `dtype`, with their exact float64 values.
struct Rows {
    int64_t n = 0, d = 0, V = 0;
    std::vector<uint8_t> x;  // [n, d] in the batch's dtype
    std::vector<collapse_dtype> dtype;  // per batch of `batch` rows
    int64_t batch = 0;
    std::vector<int32_t> y;
    std::vector<double> exact;  // [n, d]
};

uint16_t encode16(float v, collapse_dtype t) { return t == COLLAPSE_F16 ? ci::float_to_half(v) : ci::float_to_bf16(v); }
double decode16(uint16_t h, collapse_dtype t) { return t == COLLAPSE_F16 ? ci::half_to_float(h) : ci::bf16_to_float(h); }

// sizes[c] rows of class c (0: none). Class `repeat` repeats two rows (rank 2); class `zero` is all zeros.
Rows make_rows(const std::vector<int64_t>& sizes, int64_t d, std::vector<collapse_dtype> dtypes, int64_t batch, uint64_t seed,
               int64_t repeat = -1, int64_t zero = -1) {
    Rows R;
    R.d = d, R.V = (int64_t)sizes.size(), R.batch = batch;
    for (int64_t c = 0; c < R.V; ++c)
        for (int64_t i = 0; i < sizes[(size_t)c]; ++i) R.y.push_back((int32_t)c);
    R.n = (int64_t)R.y.size();
    std::mt19937_64 g(seed);
    std::shuffle(R.y.begin(), R.y.end(), g);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> means((size_t)(R.V * d));
    for (double& m : means) m = 2.0 * nd(g);
    std::vector<int64_t> seen((size_t)R.V, 0);
    std::vector<float> first((size_t)(R.V * 2 * d));
    const int64_t batches = (R.n + batch - 1) / batch;
    for (int64_t b = 0; b < batches; ++b) R.dtype.push_back(dtypes[(size_t)b % dtypes.size()]);
    R.exact.resize((size_t)(R.n * d));
    for (int64_t i = 0; i < R.n; ++i) {
        const int64_t c = R.y[(size_t)i], k = seen[(size_t)c]++;
        const collapse_dtype t = R.dtype[(size_t)(i / batch)];
        for (int64_t j = 0; j < d; ++j) {
            float v = (float)(means[(size_t)(c * d + j)] + nd(g));
            if (c == zero) v = 0.0f;
            if (c == repeat && k >= 2) v = first[(size_t)((c * 2 + k % 2) * d + j)];
            if (c == repeat && k < 2) first[(size_t)((c * 2 + k) * d + j)] = v;
            double e = v;
            if (t == COLLAPSE_F32) {
                const size_t at = R.x.size();
                R.x.resize(at + 4);
                std::memcpy(R.x.data() + at, &v, 4);
            } else {
                const uint16_t h = encode16(v, t);
                e = decode16(h, t);
                if (c == repeat && k < 2) first[(size_t)((c * 2 + k) * d + j)] = (float)e;  // repeat the stored value
                const size_t at = R.x.size();
                R.x.resize(at + 2);
                std::memcpy(R.x.data() + at, &h, 2);
            }
            R.exact[(size_t)(i * d + j)] = e;
        }
    }
    return R;
}

void ingest_all(const Rows& R, ci::Backend& b) {
    size_t at = 0;
    for (int64_t r0 = 0; r0 < R.n; r0 += R.batch) {
        const int64_t m = std::min(R.batch, R.n - r0);
        const collapse_dtype t = R.dtype[(size_t)(r0 / R.batch)];
        const collapse_buffer fx{R.x.data() + at, t, COLLAPSE_MEMORY_HOST, m, R.d, 0};
        const collapse_buffer fy{R.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, m, 1, 0};
        b.ingest(ci::describe_rows(&fx, &fy, nullptr, R.d), nullptr);
        at += (size_t)(m * R.d) * ci::dtype_size(t);
    }
}

struct Both {
    ci::MetricValues cpu, gpu;
    ci::cuda::AllocationCalls compute_calls;  // allocation calls of the CUDA compute alone
};

Both run_both(const Rows& R, const ci::Config& cfg) {
    Both out;
    ci::Classifier clf;
    const std::unique_ptr<ci::Backend> cpu = ci::make_cpu_backend(cfg, R.V, R.d);
    const std::unique_ptr<ci::Backend> gpu = ci::make_cuda_backend(cfg, R.V, R.d);
    ingest_all(R, *cpu);
    ingest_all(R, *gpu);
    ci::Counts counts;
    out.cpu = cpu->compute(ci::select_kept(cpu->class_counts(), cfg, &counts), clf);
    const ci::KeptSet kept = ci::select_kept(gpu->class_counts(), cfg, &counts);
    // static_cast, not dynamic_cast: the class's type info stays inside the CUDA module.
    auto calls = [&] { return static_cast<const ci::cuda::CudaBackend&>(*gpu).allocation_calls(); };
    const ci::cuda::AllocationCalls before = calls();
    out.gpu = gpu->compute(kept, clf);
    out.compute_calls = {calls().device - before.device, calls().pinned - before.pinned};
    return out;
}

// Per-token entropies: CUDA vs CPU within 1e-5 absolute, both vs the float64 brute force.
void expect_tokens(const Rows& R, const ci::Config& cfg, const Both& r) {
    ref::Options o;
    o.num_classes = R.V;
    o.min_samples = cfg.min_samples_per_token;
    o.svd_center = cfg.svd_center;
    std::vector<int64_t> y(R.y.begin(), R.y.end());
    const ref::Result want = ref::compute(R.exact, y, R.d, nullptr, nullptr, o);
    ASSERT_EQ(r.gpu.tokens.size(), r.cpu.tokens.size());
    ASSERT_EQ(r.gpu.tokens.size(), want.tokens.size());
    EXPECT_EQ(r.gpu.svd_zero_matrices, r.cpu.svd_zero_matrices);
    EXPECT_EQ(r.gpu.svd_zero_matrices, want.svd_zero_matrices);
    for (size_t t = 0; t < r.gpu.tokens.size(); ++t) {
        const ci::TokenMetrics &g = r.gpu.tokens[t], &c = r.cpu.tokens[t];
        const ref::Token& w = want.tokens.at(g.id);
        SCOPED_TRACE("token " + std::to_string(g.id) + " (" + std::to_string(g.num_samples) + " rows, d = " + std::to_string(R.d) + ")");
        EXPECT_EQ(g.id, c.id);
        EXPECT_EQ(g.num_samples, w.n);
        EXPECT_EQ(g.svd_rows, g.num_samples);
        EXPECT_FALSE(g.sampled);
        EXPECT_EQ(g.zero_matrix, w.zero_matrix);
        ASSERT_TRUE(g.svd_entropy && c.svd_entropy && w.svd_entropy);
        EXPECT_NEAR(*g.svd_entropy, *c.svd_entropy, 1e-5);
        EXPECT_NEAR(*g.svd_entropy, *w.svd_entropy, 1e-5);
        EXPECT_NEAR(*g.effective_rank, std::exp(*w.svd_entropy), 1e-5 * std::exp(*w.svd_entropy));
        EXPECT_EQ(g.normalized_entropy.has_value(), w.normalized_entropy.has_value());
    }
}

struct Case {
    const char* name;
    collapse_dtype dtype;
    int64_t d;
    bool center;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }  // not gtest's byte dump

class DeviceTokenSvd : public ::testing::TestWithParam<Case> {};

// Every row stays on the device (no spill, no pinned upload stage: the compute makes no pinned
// allocation, which the host path's upload stage would), and the entropies are the CPU's.
TEST_P(DeviceTokenSvd, EntropiesMatchCpuAndBruteForce) {
    SKIP_WITHOUT_DEVICE();
    const Case& tc = GetParam();
    const int64_t d = tc.d;
    // n = 1 (below min_samples), 2, 3, d - 1, d, d + 1, 3 d, a rank-2 class, an all-zero class, absent.
    const std::vector<int64_t> sizes = {1, 2, 3, d - 1, d, d + 1, 3 * d, 40, 5, 0, 17, 9};
    const Rows R = make_rows(sizes, d, {tc.dtype}, 97, 3 + (uint64_t)d, /*repeat=*/7, /*zero=*/8);
    collapse_options o = collapse::default_options();
    o.svd_center = tc.center ? 1 : 0;
    o.compute_class_metrics = 1;
    const ci::Config cfg = ci::from_options(o);
    const Both r = run_both(R, cfg);
    expect_tokens(R, cfg, r);
    EXPECT_EQ(r.compute_calls.pinned, 0) << "the compute took the host path (its pinned upload stage)";
    ASSERT_EQ(r.gpu.row_store.count("spilled_bytes"), 1u);
    EXPECT_EQ(r.gpu.row_store.at("spilled_bytes"), 0);
    // Sigma_W from the device rows: the anchor metrics that need it are the CPU's.
    auto near = [](const char* name, const std::optional<double>& a, const std::optional<double>& b) {
        ASSERT_EQ(a.has_value(), b.has_value()) << name;
        if (b) EXPECT_NEAR(*a, *b, 1e-5 * std::fabs(*b) + 1e-9) << name;
    };
    near("nc1_pinv", r.gpu.nc1_pinv, r.cpu.nc1_pinv);
    near("nc1_quot", r.gpu.nc1_quot, r.cpu.nc1_quot);
}

INSTANTIATE_TEST_SUITE_P(Table, DeviceTokenSvd,
                         ::testing::Values(Case{"f32_d24", COLLAPSE_F32, 24, false}, Case{"f16_d24", COLLAPSE_F16, 24, false},
                                           Case{"bf16_d24_center", COLLAPSE_BF16, 24, true}, Case{"f16_d64_center", COLLAPSE_F16, 64, true},
                                           Case{"f32_d40", COLLAPSE_F32, 40, false}),
                         [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// A float16 buffer that meets bfloat16 or float32 batches moves its rows to the host store and
// keeps float32 from then on: the per-token SVD then takes the host (spill) path, with the same
// numbers. Float32 first and float16 after stays on the device (float32 holds float16 exactly).
TEST(DeviceTokenSvd, MixedDtypesSwitchTheBufferToFloat32) {
    SKIP_WITHOUT_DEVICE();
    const int64_t d = 20;
    const std::vector<int64_t> sizes = {30, 2, 19, 21, 60, 4, 3};
    collapse_options o = collapse::default_options();
    const ci::Config cfg = ci::from_options(o);
    {
        SCOPED_TRACE("f16, bf16, f32 batches: the host path");
        const Rows R = make_rows(sizes, d, {COLLAPSE_F16, COLLAPSE_BF16, COLLAPSE_F32}, 31, 5);
        const Both r = run_both(R, cfg);
        expect_tokens(R, cfg, r);
        EXPECT_GT(r.compute_calls.pinned, 0) << "the host path's upload stage (the rows left the device)";
    }
    {
        SCOPED_TRACE("f32, f16 batches: on the device");
        const Rows R = make_rows(sizes, d, {COLLAPSE_F32, COLLAPSE_F16}, 31, 6);
        const Both r = run_both(R, cfg);
        expect_tokens(R, cfg, r);
        EXPECT_EQ(r.compute_calls.pinned, 0);
    }
}

// Grams larger than 512 (d = 520: classes with more rows than d have a d x d Gram in a 1024 slot)
// go through the batched solver like the small ones (eigen_solvers.cu: XsyevBatched beyond 32, in
// sub-batches within its int32 extent); their entropies are the CPU's (LAPACK), centred or not.
TEST(DeviceTokenSvd, GramsLargerThan512MatchCpu) {
    SKIP_WITHOUT_DEVICE();
    const int64_t d = 520;
    const std::vector<int64_t> sizes = {600, 530, 40, 3, 0, 700, 9};
    const Rows R = make_rows(sizes, d, {COLLAPSE_F16}, 512, 21);
    for (bool center : {false, true}) {
        SCOPED_TRACE(center ? "svd_center" : "uncentred");
        collapse_options o = collapse::default_options();
        o.svd_center = center;
        const ci::Config cfg = ci::from_options(o);
        const Both r = run_both(R, cfg);
        ASSERT_EQ(r.gpu.tokens.size(), r.cpu.tokens.size());
        int64_t large = 0;
        for (size_t t = 0; t < r.gpu.tokens.size(); ++t) {
            const ci::TokenMetrics &g = r.gpu.tokens[t], &c = r.cpu.tokens[t];
            SCOPED_TRACE("token " + std::to_string(g.id) + " (" + std::to_string(g.num_samples) + " rows)");
            EXPECT_EQ(g.id, c.id);
            EXPECT_EQ(g.svd_rows, g.num_samples);
            large += g.num_samples > 512 ? 1 : 0;
            ASSERT_TRUE(g.svd_entropy && c.svd_entropy);
            EXPECT_NEAR(*g.svd_entropy, *c.svd_entropy, 1e-5);
        }
        EXPECT_EQ(large, 3) << "three classes with Grams of size 520 (in 1024 slots)";
    }
}

// A compute, more rows, a compute again (a server's snapshot): both from the device rows, both the
// CPU's, and the second allocates nothing on the device (the grouping and the workspaces are pool
// slabs sized with room to grow).
TEST(DeviceTokenSvd, RepeatedComputesReuseTheirWorkspaces) {
    SKIP_WITHOUT_DEVICE();
    const int64_t d = 16;
    const Rows R = make_rows({40, 3, 17, 16, 50, 2}, d, {COLLAPSE_F16}, 25, 9);
    const ci::Config cfg = ci::from_options(collapse::default_options());
    ci::Classifier clf;
    const std::unique_ptr<ci::Backend> cpu = ci::make_cpu_backend(cfg, R.V, R.d);
    const std::unique_ptr<ci::Backend> gpu = ci::make_cuda_backend(cfg, R.V, R.d);
    auto calls = [&] { return static_cast<const ci::cuda::CudaBackend&>(*gpu).allocation_calls(); };
    for (int round = 0; round < 2; ++round) {
        SCOPED_TRACE("round " + std::to_string(round));
        ingest_all(R, *cpu);
        ingest_all(R, *gpu);
        ci::Counts counts;
        const ci::MetricValues want = cpu->compute(ci::select_kept(cpu->class_counts(), cfg, &counts), clf);
        const ci::KeptSet kept = ci::select_kept(gpu->class_counts(), cfg, &counts);
        const int64_t before = calls().device;
        const ci::MetricValues got = gpu->compute(kept, clf);
        if (round == 1) EXPECT_EQ(calls().device - before, 0) << "cudaMalloc/cudaFree calls in the second compute";
        ASSERT_EQ(got.tokens.size(), want.tokens.size());
        for (size_t t = 0; t < got.tokens.size(); ++t) {
            ASSERT_TRUE(got.tokens[t].svd_entropy && want.tokens[t].svd_entropy);
            EXPECT_NEAR(*got.tokens[t].svd_entropy, *want.tokens[t].svd_entropy, 1e-5) << "token " << got.tokens[t].id;
        }
    }
}

}  // namespace
}  // namespace test_cuda_token_svd
