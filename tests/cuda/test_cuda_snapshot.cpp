// Live snapshots on the CUDA backend (the CPU twin: tests/cpu/test_snapshot.cpp). A snapshot after N
// rows equals the compute of a fresh CUDA session given exactly those rows, for several N; the
// session then goes on (host and device buffers, the session's stream and a caller's stream) and
// its final compute equals one session's over all rows: the snapshot consumes nothing (the device
// row buffer moved to the host store, reservoirs, hold rows, the second pass after it). Class sums
// are float64 atomics (their order varies between runs), so numbers agree to 1e-9 relative, counts
// exactly. NC4 from a second pass (sampled mode) and the Gram of a cut kept set are null in a
// snapshot with the note; in exact mode, with every row still in the device buffer, a snapshot's NC4
// comes from those rows, as on the CPU from its row store. Skips without a usable device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "common/compare.hpp"

using nlohmann::json;

namespace test_cuda_snapshot {
namespace {

constexpr const char* kNote = "needs the second pass; not in a snapshot";
constexpr double kRel = 1e-9;

struct Data {
    int64_t n = 0, d = 24, V = 96;
    std::vector<float> x, w;
    std::vector<int32_t> y;
    std::vector<int64_t> start;
};

Data make_data(uint64_t seed) {
    Data D;
    const std::vector<int64_t> rows = {700, 1300, 200, 900, 1100, 800};
    D.start.push_back(0);
    for (int64_t r : rows) D.start.push_back(D.start.back() + r);
    D.n = D.start.back();
    std::mt19937_64 g(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> cdf((size_t)D.V);
    double s = 0;
    for (int64_t k = 0; k < D.V; ++k) cdf[(size_t)k] = (s += 1.0 / std::pow((double)k + 1.0, 1.05));
    std::uniform_real_distribution<double> u(0.0, s);
    std::vector<double> mean((size_t)(D.V * D.d));
    for (auto& m : mean) m = 3.0 * nd(g);
    D.y.resize((size_t)D.n);
    for (auto& l : D.y) l = (int32_t)std::min<int64_t>(D.V - 1, std::lower_bound(cdf.begin(), cdf.end(), u(g)) - cdf.begin());
    D.x.resize((size_t)(D.n * D.d));
    for (int64_t i = 0; i < D.n; ++i)
        for (int64_t j = 0; j < D.d; ++j) D.x[(size_t)(i * D.d + j)] = (float)(mean[(size_t)(D.y[(size_t)i] * D.d + j)] + nd(g));
    D.w.resize((size_t)(D.V * D.d));
    for (size_t k = 0; k < D.w.size(); ++k) D.w[k] = (float)(mean[k] + 0.1 * nd(g));
    return D;
}

// Batches [b0, b1) of D, from host memory or from a device copy, on `stream`.
struct Feeder {
    const Data& D;
    bool device;
    cudaStream_t stream;
    float* dx = nullptr;
    int32_t* dy = nullptr;
    Feeder(const Data& data, bool dev, cudaStream_t s) : D(data), device(dev), stream(s) {
        if (!device) return;
        EXPECT_EQ(cudaMalloc(&dx, D.x.size() * 4), cudaSuccess);
        EXPECT_EQ(cudaMalloc(&dy, D.y.size() * 4), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(dx, D.x.data(), D.x.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(dy, D.y.data(), D.y.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
    ~Feeder() {
        if (dx) cudaFree(dx);
        if (dy) cudaFree(dy);
    }
    void operator()(collapse::Session& s, size_t b0, size_t b1) const {
        const collapse_memory mem = device ? COLLAPSE_MEMORY_DEVICE : COLLAPSE_MEMORY_HOST;
        for (size_t b = b0; b < b1; ++b) {
            const int64_t r0 = D.start[b], n = D.start[b + 1] - r0;
            const float* x = (device ? dx : D.x.data()) + r0 * D.d;
            const int32_t* y = (device ? dy : D.y.data()) + r0;
            s.ingest_rows(collapse_buffer{x, COLLAPSE_F32, mem, n, D.d, 0}, collapse_buffer{y, COLLAPSE_I32, mem, n, 1, 0}, nullptr, stream);
        }
    }
};

json doc(const collapse::Report& r) {
    json j = json::parse(r.json());
    j["engine"].erase("timings_seconds");
    return j;
}

collapse::Session make_session(const collapse_options& o, const Data& D) {
    collapse_options oo = o;
    oo.num_classes = D.V;
    collapse::Session s(oo);
    s.set_classifier(collapse::host_buffer(D.w.data(), D.V, D.d));
    return s;
}

json finish(collapse::Session& s, const Feeder& feed) {
    if (s.needs_second_pass()) {
        s.begin_second_pass();
        feed(s, 0, feed.D.start.size() - 1);
    }
    return doc(s.compute());
}

struct Case {
    const char* name;
    collapse_svd_mode svd;
    bool nc4;
    int64_t max_tokens;
    bool device, user_stream;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class CudaSnapshot : public ::testing::TestWithParam<Case> {};

TEST_P(CudaSnapshot, EqualsFreshSessionAndConsumesNothing) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    const Case& tc = GetParam();
    const Data D = make_data(11);
    collapse_options o = collapse::default_options();
    o.backend = COLLAPSE_BACKEND_CUDA;
    o.svd_mode = tc.svd;
    o.svd_max_rows_per_token = 16;
    o.compute_nc4 = tc.nc4 ? 1 : 0;
    o.max_tokens_to_analyze = tc.max_tokens;
    o.min_samples_per_token = 3;
    // exact: the rows stay in the device buffer between snapshots; each compute groups them there
    cudaStream_t stream = nullptr;
    if (tc.user_stream) ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    {
        const Feeder feed(D, tc.device, stream);
        const size_t batches = D.start.size() - 1;
        collapse::Session s = make_session(o, D);
        size_t done = 0;
        for (size_t upto : {size_t(1), size_t(2), size_t(4)}) {
            SCOPED_TRACE("snapshot after batch " + std::to_string(upto));
            feed(s, done, upto);
            done = upto;
            json got = doc(s.snapshot());
            EXPECT_EQ(got["counts"]["rows_seen"], D.start[upto]);
            const json& oa = got["overall_analysis"];
            const bool nc4_from_rows = tc.svd == COLLAPSE_SVD_EXACT;  // the rows are in the device buffer
            if (tc.nc4 && !nc4_from_rows) EXPECT_EQ(oa["notes"].value("nc4_agreement", ""), kNote) << oa.dump(1);
            if (tc.nc4 && nc4_from_rows) EXPECT_FALSE(oa["nc4_agreement"].is_null()) << oa.dump(1);
            if (tc.max_tokens > 0) EXPECT_EQ(oa["notes"].value("overall_svd_entropy", ""), kNote) << oa.dump(1);
            collapse::Session f = make_session(o, D);
            feed(f, 0, upto);
            json want = doc(f.compute());
            for (json* j : {&got, &want}) {
                auto& notes = (*j)["overall_analysis"]["notes"];
                if (tc.nc4) notes.erase("nc4_agreement");
                if (tc.max_tokens > 0) notes.erase("overall_svd_entropy"), notes.erase("overall_effective_rank");
                if (tc.max_tokens > 0) notes.erase("nc1_pinv"), notes.erase("nc1_svd"), notes.erase("nc1_quot");  // Sigma_W of the cut kept set
            }
            testutil::expect_same_json(got, want, kRel, 1e-9);
        }
        feed(s, done, batches);
        collapse::Session ref = make_session(o, D);
        feed(ref, 0, batches);
        const json want = finish(ref, feed);
        const json got = finish(s, feed);
        if (tc.nc4) EXPECT_FALSE(got["overall_analysis"]["nc4_agreement"].is_null());
        testutil::expect_same_json(got, want, kRel, 1e-9);
    }
    if (stream) cudaStreamDestroy(stream);
}

INSTANTIATE_TEST_SUITE_P(Modes, CudaSnapshot,
                         ::testing::Values(Case{"exact_host", COLLAPSE_SVD_EXACT, false, 0, false, false},
                                           Case{"exact_device_user_stream", COLLAPSE_SVD_EXACT, false, 0, true, true},
                                           Case{"sampled_host_user_stream", COLLAPSE_SVD_SAMPLED, false, 0, false, true},
                                           Case{"exact_nc4_device_rows", COLLAPSE_SVD_EXACT, true, 0, true, false},
                                           Case{"sampled_max_tokens_nc4_second_pass", COLLAPSE_SVD_SAMPLED, true, 40, false, true}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(CudaSnapshotRefusal, SecondPassAndAfterCompute) {
    if (!collapse_backend_available("cuda")) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    const Data D = make_data(12);
    collapse_options o = collapse::default_options();
    o.backend = COLLAPSE_BACKEND_CUDA;
    o.compute_nc4 = 1;
    o.svd_mode = COLLAPSE_SVD_SAMPLED;  // NC4 from a second pass (exact mode takes it from the device rows)
    const Feeder feed(D, false, nullptr);
    collapse::Session s = make_session(o, D);
    feed(s, 0, 3);
    EXPECT_EQ(doc(s.snapshot())["counts"]["rows_seen"], D.start[3]);
    ASSERT_TRUE(s.needs_second_pass());
    s.begin_second_pass();
    try {
        (void)s.snapshot();
        ADD_FAILURE() << "snapshot in the second pass was accepted";
    } catch (const collapse::ApiError& e) {
        EXPECT_EQ(e.status(), COLLAPSE_ERR_STATE) << e.what();
    }
    feed(s, 0, 3);
    EXPECT_FALSE(doc(s.compute())["overall_analysis"]["nc4_agreement"].is_null());
    try {
        (void)s.snapshot();
        ADD_FAILURE() << "snapshot after compute was accepted";
    } catch (const collapse::ApiError& e) {
        EXPECT_EQ(e.status(), COLLAPSE_ERR_STATE) << e.what();
    }
}

}  // namespace
}  // namespace test_cuda_snapshot
