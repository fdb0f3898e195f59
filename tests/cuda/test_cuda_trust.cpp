// Issue 15 on the CUDA backend: ignore_index is validated on the device with the CPU's counts, and
// the backend's host memory (pinned staging and download buffers, the host row store, downloads) is
// counted against the session's host_memory_limit like the CPU backend's. Skips without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "collapse/collapse.h"
#include "collapse/collapse.hpp"
#include "core/config.hpp"
#include "core/host_budget.hpp"
#include "core/session.hpp"

namespace test_cuda_trust {
namespace {

using nlohmann::json;
namespace ci = collapse::internal;

bool have_device() { return collapse_backend_available("cuda") != 0; }

#define SKIP_WITHOUT_DEVICE() \
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped"

// Rows with labels -100 (ignored), masked rows (some of them -100 too), an excluded class and
// non-finite rows (skip_row): the CUDA counts are the CPU's, for host and device buffers, in both layouts.
TEST(CudaTrust, IgnoredRowsCountAsOnTheCpu) {
    SKIP_WITHOUT_DEVICE();
    const int64_t B = 40, T = 33, d = 12, V = 60, n = B * T;
    std::mt19937_64 g(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::vector<float> x((size_t)(n * d));
    for (float& v : x) v = nd(g);
    std::vector<int32_t> y((size_t)n);
    std::vector<uint8_t> mask((size_t)n, 1);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = u(g) < 0.25 ? -100 : (int32_t)(u(g) * V) % V;
        if (u(g) < 0.1) mask[(size_t)i] = 0;
        if (u(g) < 0.02) x[(size_t)(i * d + 5)] = NAN;
    }
    collapse_options o = collapse::default_options();
    o.num_classes = V;
    o.nonfinite_policy = COLLAPSE_NONFINITE_SKIP_ROW;
    const int64_t ex[1] = {4};
    o.exclude_token_ids = ex;
    o.num_exclude_token_ids = 1;
    void *dx = nullptr, *dy = nullptr, *dm = nullptr;
    ASSERT_EQ(cudaMalloc(&dx, x.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dy, y.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dm, mask.size()), cudaSuccess);
    cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dy, y.data(), y.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dm, mask.data(), mask.size(), cudaMemcpyHostToDevice);
    auto run = [&](collapse_backend backend, bool device, bool sequences) {
        collapse_options oo = o;
        oo.backend = backend;
        collapse::Session s(oo);
        const collapse_memory mem = device ? COLLAPSE_MEMORY_DEVICE : COLLAPSE_MEMORY_HOST;
        const void* px = device ? dx : (const void*)x.data();
        const void* py = device ? dy : (const void*)y.data();
        const void* pm = device ? dm : (const void*)mask.data();
        for (int64_t b0 = 0; b0 < B; b0 += 16) {  // batches of 16 sequences (or their rows)
            const int64_t nb = std::min<int64_t>(16, B - b0);
            const collapse_buffer fx{(const float*)px + b0 * T * d, COLLAPSE_F32, mem, nb * T, d, 0};
            if (sequences) {
                const collapse_buffer fi{(const int32_t*)py + b0 * T, COLLAPSE_I32, mem, nb, T, 0};
                const collapse_buffer fm{(const uint8_t*)pm + b0 * T, COLLAPSE_U8, mem, nb, T, 0};
                s.ingest_sequences(fx, fi, &fm, nb, T);
            } else {
                const collapse_buffer fy{(const int32_t*)py + b0 * T, COLLAPSE_I32, mem, nb * T, 1, 0};
                const collapse_buffer fm{(const uint8_t*)pm + b0 * T, COLLAPSE_U8, mem, nb * T, 1, 0};
                s.ingest_rows(fx, fy, &fm);
            }
        }
        s.sync();
        return json::parse(s.compute().json());
    };
    for (bool sequences : {false, true}) {
        SCOPED_TRACE(sequences ? "sequences" : "rows");
        const json cpu = run(COLLAPSE_BACKEND_CPU, false, sequences);
        ASSERT_GT(cpu["counts"]["rows_ignored"].get<int64_t>(), 0);
        ASSERT_GT(cpu["counts"]["rows_masked"].get<int64_t>(), 0);
        for (bool device : {false, true}) {
            SCOPED_TRACE(device ? "device buffers" : "host buffers");
            const json gpu = run(COLLAPSE_BACKEND_CUDA, device, sequences);
            EXPECT_EQ(gpu["counts"], cpu["counts"]);
            const double a = cpu["overall_analysis"]["overall_gnc2"].get<double>(), b = gpu["overall_analysis"]["overall_gnc2"].get<double>();
            EXPECT_NEAR(a, b, 1e-5 * std::fabs(a));
        }
    }
    // Off: -100 is refused on the device (deferred to the next call) naming the setting.
    collapse_options off = o;
    off.backend = COLLAPSE_BACKEND_CUDA;
    off.use_ignore_index = 0;
    collapse::Session s(off);
    const collapse_buffer fx{dx, COLLAPSE_F32, COLLAPSE_MEMORY_DEVICE, n, d, 0};
    const collapse_buffer fy{dy, COLLAPSE_I32, COLLAPSE_MEMORY_DEVICE, n, 1, 0};
    s.ingest_rows(fx, fy);
    EXPECT_EQ(collapse_session_sync(s.get()), COLLAPSE_ERR_BAD_INPUT);
    EXPECT_NE(std::string(collapse_last_error()).find("ignore_index is null"), std::string::npos) << collapse_last_error();
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dm);
}

// host_memory_limit binds the CUDA backend too: its V-long host row store index, and the pinned
// staging of host batches, are refused with COLLAPSE_ERR_OUT_OF_MEMORY naming host_memory_limit.
TEST(CudaTrust, TinyHostMemoryLimitIsRefusedNamingTheKey) {
    SKIP_WITHOUT_DEVICE();
    collapse_options o = collapse::default_options();
    o.backend = COLLAPSE_BACKEND_CUDA;
    o.host_memory_limit = int64_t(1) << 20;  // the smallest the key allows
    o.num_classes = 50000;                   // the exact row store's host index alone is 2.8 MB
    o.dim = 8;
    collapse_session* s = nullptr;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_ERR_OUT_OF_MEMORY);
    EXPECT_EQ(s, nullptr);
    std::string msg = collapse_last_error();
    EXPECT_NE(msg.find("host_memory_limit"), std::string::npos) << msg;
    EXPECT_NE(msg.find("row store"), std::string::npos) << msg;

    // A host batch of 8192 rows x 64 float32 (2 MiB) needs two pinned staging slots of that.
    o.num_classes = 100;
    o.dim = 64;
    o.svd_mode = COLLAPSE_SVD_OFF;
    ASSERT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    std::unique_ptr<collapse_session, void (*)(collapse_session*)> hold(s, collapse_session_destroy);
    const int64_t rows = 8192;
    std::vector<float> x((size_t)(rows * 64), 0.25f);
    std::vector<int32_t> y((size_t)rows);
    for (int64_t i = 0; i < rows; ++i) y[(size_t)i] = (int32_t)(i % 100);
    const collapse_buffer fx{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, rows, 64, 0};
    const collapse_buffer fy{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, rows, 1, 0};
    EXPECT_EQ(collapse_session_ingest_rows(s, &fx, &fy, nullptr, nullptr), COLLAPSE_ERR_OUT_OF_MEMORY);
    msg = collapse_last_error();
    EXPECT_NE(msg.find("host_memory_limit"), std::string::npos) << msg;
    EXPECT_NE(msg.find("pinned"), std::string::npos) << msg;
    EXPECT_NE(msg.find("batch_rows"), std::string::npos) << msg;
    // Smaller batches fit, and the session is usable.
    const collapse_buffer fx2{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 256, 64, 0};
    const collapse_buffer fy2{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 256, 1, 0};
    EXPECT_EQ(collapse_session_ingest_rows(s, &fx2, &fy2, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(collapse_session_sync(s), COLLAPSE_OK) << collapse_last_error();
}

// The session and its CUDA backend share one account: the pinned staging of a host batch shows in
// the session's host budget, and it is given back with the backend.
TEST(CudaTrust, PinnedStagingIsInTheSessionsHostBudget) {
    SKIP_WITHOUT_DEVICE();
    ci::Config cfg;
    cfg.backend = COLLAPSE_BACKEND_CUDA;
    cfg.num_classes = 20;
    cfg.svd_mode = COLLAPSE_SVD_OFF;
    const int64_t rows = 4096, d = 32;
    std::vector<float> x((size_t)(rows * d), 0.5f);
    std::vector<int32_t> y((size_t)rows);
    for (int64_t i = 0; i < rows; ++i) y[(size_t)i] = (int32_t)(i % 20);
    ci::Session s(cfg);
    const int64_t before = s.host_budget().held();
    const collapse_buffer fx{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, rows, d, 0};
    const collapse_buffer fy{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, rows, 1, 0};
    s.ingest_rows(&fx, &fy, nullptr, nullptr);
    s.sync();
    EXPECT_GE(s.host_budget().held() - before, 2 * rows * d * 4) << "two pinned staging slots of the batch";
}

}  // namespace
}  // namespace test_cuda_trust
