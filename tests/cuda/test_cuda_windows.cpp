// Generation-time windows on the CUDA backend against the CPU backend (the reference, itself tested
// against a brute-force float64 evaluation in tests/cpu/test_windows.cpp): the same tagged batches
// (interleaved sequences, out-of-order positions, gaps, masked and non-finite rows; float32,
// float64 and bfloat16 features in host or device memory) into both, every per-sequence value and
// every window_summary value within 1e-5; W = 2, 33 and 64 (beyond syevjBatched's 32), Grams of
// both sides (W <= d and d < W); a full reduce queue; snapshots that consume nothing; checkpoints
// both ways; the sequences layout. Skips without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"
#include "common/capi_helpers.hpp"

namespace test_cuda_windows {
namespace {

using nlohmann::json;
using testutil::SessionPtr;

bool have_device() { return collapse_backend_available("cuda") != 0; }

constexpr int64_t kV = 6;

collapse_options opts(collapse_backend backend, int64_t W) {
    collapse_options o;
    EXPECT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = kV;
    o.backend = backend;
    o.window_size = W;
    o.nonfinite_policy = COLLAPSE_NONFINITE_SKIP_ROW;
    return o;
}

// One tagged batch, as both sessions take it.
struct Batch {
    int64_t n = 0, d = 0;
    collapse_dtype dtype = COLLAPSE_F32;
    std::vector<uint8_t> x;  // [n, d] of dtype
    std::vector<int32_t> y;
    std::vector<uint8_t> valid;
    std::vector<int64_t> seq, pos;
};

void put_value(std::vector<uint8_t>& x, collapse_dtype t, size_t i, float v) {
    if (t == COLLAPSE_F32) {
        std::memcpy(x.data() + i * 4, &v, 4);
    } else if (t == COLLAPSE_F64) {
        const double w = v;
        std::memcpy(x.data() + i * 8, &w, 8);
    } else {  // bfloat16: the upper half of the float32 bits
        uint32_t u;
        std::memcpy(&u, &v, 4);
        const uint16_t b = (uint16_t)(u >> 16);
        std::memcpy(x.data() + i * 2, &b, 2);
    }
}

size_t dtype_bytes(collapse_dtype t) { return t == COLLAPSE_F64 ? 8 : t == COLLAPSE_F32 ? 4 : 2; }

// Random sequences (lengths up to max_len, an occasional gap), interleaved in arrival order with
// positions shuffled locally, cut into batches of random sizes. Features: noise with a drift so
// that windows differ; some rows masked, some non-finite (skipped by nonfinite_policy: skip_row).
std::vector<Batch> make_batches(uint32_t seed, int64_t seqs, int64_t max_len, int64_t d, collapse_dtype dt, int64_t max_batch) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0.f, 1.f);
    std::uniform_real_distribution<double> u(0, 1);
    struct Row {
        int64_t seq, pos;
        double key;
    };
    std::vector<Row> rows;
    for (int64_t s = 0; s < seqs; ++s) {
        const int64_t n = std::uniform_int_distribution<int64_t>(max_len / 2, max_len)(rng);
        int64_t p = 0;
        for (int64_t t = 0; t < n; ++t) {
            rows.push_back({s * 5 - 2, p, (double)p + u(rng) * 6});
            p += u(rng) < 0.05 ? 2 : 1;
        }
    }
    std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.key < b.key; });
    std::vector<Batch> out;
    for (size_t i = 0; i < rows.size();) {
        Batch b;
        b.n = std::min<int64_t>((int64_t)(rows.size() - i), std::uniform_int_distribution<int64_t>(1, max_batch)(rng));
        b.d = d;
        b.dtype = dt;
        b.x.resize((size_t)(b.n * d) * dtype_bytes(dt));
        for (int64_t r = 0; r < b.n; ++r) {
            const Row& row = rows[i + (size_t)r];
            const bool nonfinite = u(rng) < 0.03;
            for (int64_t k = 0; k < d; ++k) {
                const float v = nonfinite && k == d / 2 ? std::numeric_limits<float>::quiet_NaN()
                                                        : g(rng) + 0.05f * (float)row.pos * (float)(k % 3) + 0.3f * (float)row.seq;
                put_value(b.x, dt, (size_t)(r * d + k), v);
            }
            b.y.push_back((int32_t)((i + (size_t)r) % kV));
            b.valid.push_back(u(rng) < 0.1 ? 0 : 1);
            b.seq.push_back(row.seq);
            b.pos.push_back(row.pos);
        }
        i += (size_t)b.n;
        out.push_back(std::move(b));
    }
    return out;
}

// Batches [from, to) into s; features, labels and mask in device memory when `device` (the tags
// stay on the host, as the C API requires).
void feed(collapse_session* s, const std::vector<Batch>& batches, size_t from, size_t to, bool device) {
    for (size_t i = from; i < to; ++i) {
        const Batch& b = batches[i];
        const void *x = b.x.data(), *y = b.y.data(), *v = b.valid.data();
        void *dx = nullptr, *dy = nullptr, *dv = nullptr;
        const collapse_memory mem = device ? COLLAPSE_MEMORY_DEVICE : COLLAPSE_MEMORY_HOST;
        if (device) {
            ASSERT_EQ(cudaMalloc(&dx, b.x.size()), cudaSuccess);
            ASSERT_EQ(cudaMalloc(&dy, b.y.size() * 4), cudaSuccess);
            ASSERT_EQ(cudaMalloc(&dv, b.valid.size()), cudaSuccess);
            ASSERT_EQ(cudaMemcpy(dx, b.x.data(), b.x.size(), cudaMemcpyHostToDevice), cudaSuccess);
            ASSERT_EQ(cudaMemcpy(dy, b.y.data(), b.y.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
            ASSERT_EQ(cudaMemcpy(dv, b.valid.data(), b.valid.size(), cudaMemcpyHostToDevice), cudaSuccess);
            x = dx, y = dy, v = dv;
        }
        const collapse_buffer f = testutil::buf(x, b.dtype, b.n, b.d, 0, mem), l = testutil::buf(y, COLLAPSE_I32, b.n, 1, 0, mem),
                              m = testutil::buf(v, COLLAPSE_U8, b.n, 1, 0, mem), sq = testutil::buf(b.seq.data(), COLLAPSE_I64, b.n),
                              ps = testutil::buf(b.pos.data(), COLLAPSE_I64, b.n);
        const collapse_status st = collapse_session_ingest_tagged_rows(s, &f, &l, &m, &sq, &ps, nullptr);
        if (device) {
            EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // the batch's work is done before its buffers go
            cudaFree(dx), cudaFree(dy), cudaFree(dv);
        }
        ASSERT_EQ(st, COLLAPSE_OK) << "batch " << i << ": " << collapse_last_error();
    }
}

json report_of(collapse_session* s, bool snapshot = false) {
    collapse_report* r = nullptr;
    const collapse_status st = snapshot ? collapse_session_snapshot(s, &r) : collapse_session_compute(s, &r);
    EXPECT_EQ(st, COLLAPSE_OK) << collapse_last_error();
    testutil::ReportPtr p(r);
    return r ? testutil::report_json(r) : json();
}

// Numbers within 1e-5 (integers exactly), everything else equal.
void expect_near(const json& got, const json& want, const std::string& path) {
    if (got.is_number() && want.is_number() && (got.is_number_float() || want.is_number_float())) {
        EXPECT_NEAR(got.get<double>(), want.get<double>(), 1e-5) << path;
    } else if (got.is_object() && want.is_object()) {
        EXPECT_EQ(got.size(), want.size()) << path;
        for (auto it = want.begin(); it != want.end(); ++it) {
            if (!got.contains(it.key())) {
                ADD_FAILURE() << path << "." << it.key() << " missing";
                continue;
            }
            expect_near(got[it.key()], it.value(), path + "." + it.key());
        }
    } else if (got.is_array() && want.is_array()) {
        ASSERT_EQ(got.size(), want.size()) << path;
        for (size_t i = 0; i < want.size(); ++i) expect_near(got[i], want[i], path + "[" + std::to_string(i) + "]");
    } else {
        EXPECT_EQ(got, want) << path;
    }
}

// The windows of a CUDA report against the CPU's; the CPU's must have windows to compare.
void expect_same_windows(const json& cuda, const json& cpu, const std::string& what) {
    ASSERT_TRUE(cpu["sequence_analysis"].is_object()) << what << ": " << cpu["overall_analysis"]["notes"].dump();
    int64_t windows = 0;
    for (const auto& q : cpu["sequence_analysis"]) windows += q["num_valid_chunks"].get<int64_t>();
    EXPECT_GT(windows, 0) << what;
    expect_near(cuda["sequence_analysis"], cpu["sequence_analysis"], what + ": sequence_analysis");
    expect_near(cuda["window_summary"], cpu["window_summary"], what + ": window_summary");
    EXPECT_EQ(cuda["counts"], cpu["counts"]) << what;
}

struct Shape {
    int64_t W, d, seqs, max_len;
    collapse_dtype dtype;
    bool device;
};

// Both backends fed the same batches, a snapshot half-way (unless told not to) and the final report compared.
void check_shape(const Shape& sh, uint32_t seed, bool snapshot = true) {
    const std::string what = "W = " + std::to_string(sh.W) + ", d = " + std::to_string(sh.d) + (sh.device ? ", device" : ", host");
    const std::vector<Batch> batches = make_batches(seed, sh.seqs, sh.max_len, sh.d, sh.dtype, 3 * sh.W / 2 + 5);
    const SessionPtr cpu = testutil::make_session(opts(COLLAPSE_BACKEND_CPU, sh.W)), gpu = testutil::make_session(opts(COLLAPSE_BACKEND_CUDA, sh.W));
    ASSERT_TRUE(cpu && gpu);
    const size_t half = batches.size() / 2;
    feed(cpu.get(), batches, 0, half, false);
    feed(gpu.get(), batches, 0, half, sh.device);
    // A snapshot answers as if the input ended here, and consumes nothing.
    if (snapshot) expect_same_windows(report_of(gpu.get(), true), report_of(cpu.get(), true), what + " (snapshot)");
    feed(cpu.get(), batches, half, batches.size(), false);
    feed(gpu.get(), batches, half, batches.size(), sh.device);
    expect_same_windows(report_of(gpu.get()), report_of(cpu.get()), what);
}

TEST(CudaWindows, MatchCpuOnRandomTaggedInputsWithSnapshots) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    const Shape shapes[] = {
        {2, 5, 6, 40, COLLAPSE_F32, false},    {2, 7, 5, 40, COLLAPSE_BF16, true},   // 2 x 2 Grams (syevjBatched)
        {33, 40, 4, 110, COLLAPSE_F32, true},  {33, 16, 4, 110, COLLAPSE_F64, false},  // 33 x 33 (XsyevBatched); d x d (d < W)
        {64, 80, 3, 200, COLLAPSE_F64, true},  {64, 12, 3, 200, COLLAPSE_F32, true},   // 64 x 64; 12 x 12
    };
    uint32_t seed = 1;
    for (const Shape& sh : shapes) check_shape(sh, seed++);
}

// The queue of windows to reduce holds 16 MiB of rows: 128 windows of W = 64, d = 512; about 180
// windows, with no snapshot in between (a snapshot empties the queue), fill it in mid-ingest.
TEST(CudaWindows, MatchCpuWhenTheReduceQueueFills) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    check_shape({64, 512, 6, 3000, COLLAPSE_F32, true}, 99, false);
}

TEST(CudaWindows, CheckpointsInteroperateWithTheCpu) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    const int64_t W = 4, d = 9;
    const std::vector<Batch> batches = make_batches(77, 5, 60, d, COLLAPSE_F32, 11);
    const size_t half = batches.size() / 2;
    const std::string dir = testing::TempDir() + "collapse_cuda_windows_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    const SessionPtr ref = testutil::make_session(opts(COLLAPSE_BACKEND_CPU, W));
    feed(ref.get(), batches, 0, batches.size(), false);
    const json want = report_of(ref.get());
    for (const bool cpu_first : {true, false}) {
        const collapse_backend first = cpu_first ? COLLAPSE_BACKEND_CPU : COLLAPSE_BACKEND_CUDA;
        const collapse_backend second = cpu_first ? COLLAPSE_BACKEND_CUDA : COLLAPSE_BACKEND_CPU;
        const std::string path = dir + (cpu_first ? "/cpu.ckpt" : "/cuda.ckpt"), what = cpu_first ? "cpu -> cuda" : "cuda -> cpu";
        {
            const SessionPtr a = testutil::make_session(opts(first, W));
            feed(a.get(), batches, 0, half, !cpu_first);
            ASSERT_EQ(collapse_session_save(a.get(), path.c_str()), COLLAPSE_OK) << collapse_last_error();
        }
        const SessionPtr b = testutil::make_session(opts(second, W));
        ASSERT_EQ(collapse_session_load(b.get(), path.c_str()), COLLAPSE_OK) << what << ": " << collapse_last_error();
        feed(b.get(), batches, half, batches.size(), cpu_first);
        const json got = report_of(b.get());
        if (cpu_first) expect_same_windows(got, want, what);
        else expect_same_windows(want, got, what);  // the CPU finishes: its numbers against the CPU's one run
    }
    std::filesystem::remove_all(dir);
}

TEST(CudaWindows, SequencesLayoutMatchesCpu) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    const int64_t B = 3, T = 41, d = 6, W = 5;
    std::mt19937 rng(5);
    std::normal_distribution<float> g(0.f, 1.f);
    std::vector<float> h((size_t)(B * T * d));
    for (size_t i = 0; i < h.size(); ++i) h[i] = g(rng) + 0.01f * (float)(i / (size_t)d % (size_t)T);
    std::vector<int32_t> ids((size_t)(B * T));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = (int32_t)((i * 5) % kV);
    std::vector<uint8_t> mask((size_t)(B * T), 1);
    for (size_t i = 0; i < mask.size(); i += 7) mask[i] = 0;
    json docs[2];
    for (int k = 0; k < 2; ++k) {
        const SessionPtr s = testutil::make_session(opts(k == 0 ? COLLAPSE_BACKEND_CPU : COLLAPSE_BACKEND_CUDA, W));
        const collapse_buffer hb = testutil::buf(h.data(), COLLAPSE_F32, B * T, d), ib = testutil::buf(ids.data(), COLLAPSE_I32, B, T),
                              mb = testutil::buf(mask.data(), COLLAPSE_U8, B, T);
        ASSERT_EQ(collapse_session_ingest_sequences(s.get(), &hb, &ib, &mb, B, T, nullptr), COLLAPSE_OK) << collapse_last_error();
        ASSERT_EQ(collapse_session_ingest_sequences(s.get(), &hb, &ib, nullptr, B, T, nullptr), COLLAPSE_OK) << collapse_last_error();
        docs[k] = report_of(s.get());
    }
    expect_same_windows(docs[1], docs[0], "sequences layout");
}

TEST(CudaWindows, ExplicitRequestIsAccepted) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    collapse_options o = opts(COLLAPSE_BACKEND_CUDA, 2);
    o.compute_window_metrics = 1;
    collapse_session* s = nullptr;
    ASSERT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    collapse_session_destroy(s);
}

}  // namespace
}  // namespace test_cuda_windows
