// The CUDA backend against the CPU backend (the reference) on the same seeded inputs, to the
// docs/METRICS.md "Accuracy contract": 1e-5 relative for metrics, 1e-5 absolute for per-token SVD entropy, counts
// exact. Every test skips with a message when no CUDA device is usable (CI has none).
#include <cuda_runtime.h>
#include <sys/stat.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "base/dtype.hpp"
#include "core/backend.hpp"
#include "core/batch.hpp"
#include "core/config.hpp"
#include "core/session.hpp"
#include "io/checkpoint_file.hpp"
#include "io/tensor_file.hpp"
#include "../../cuda/cuda_backend.cuh"  // CudaBackend::allocation_calls (inline)

using nlohmann::json;

namespace test_cuda_backend {
namespace {

bool have_device() { return collapse_backend_available("cuda") != 0; }

#define SKIP_WITHOUT_DEVICE() \
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped"

struct Data {
    int64_t n = 0, d = 0, V = 0;
    collapse_dtype dtype = COLLAPSE_F32;
    std::vector<uint8_t> x;  // [n, d] in dtype
    std::vector<int32_t> y;
    std::vector<float> w;  // [V, d]
};

Data make_data(int64_t n, int64_t d, int64_t V, collapse_dtype t, uint64_t seed) {
    Data D;
    D.n = n, D.d = d, D.V = V, D.dtype = t;
    std::mt19937_64 g(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> means((size_t)(V * d));
    for (auto& m : means) m = 3.0 * nd(g);
    // Zipf-like labels: classes split across batches, some below min_samples.
    std::vector<double> cdf((size_t)V);
    double s = 0;
    for (int64_t k = 0; k < V; ++k) cdf[(size_t)k] = (s += 1.0 / std::pow((double)k + 1.0, 1.05));
    std::uniform_real_distribution<double> u(0.0, s);
    D.y.resize((size_t)n);
    for (auto& l : D.y) l = (int32_t)std::min<int64_t>(V - 1, std::lower_bound(cdf.begin(), cdf.end(), u(g)) - cdf.begin());
    const size_t es = collapse::internal::dtype_size(t);
    D.x.resize((size_t)(n * d) * es);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) {
            const float v = (float)(means[(size_t)(D.y[(size_t)i] * d + j)] + nd(g));
            uint8_t* p = D.x.data() + (size_t)(i * d + j) * es;
            if (t == COLLAPSE_F32) std::memcpy(p, &v, 4);
            else if (t == COLLAPSE_F16) { const uint16_t h = collapse::internal::float_to_half(v); std::memcpy(p, &h, 2); }
            else { const uint16_t h = collapse::internal::float_to_bf16(v); std::memcpy(p, &h, 2); }
        }
    D.w.resize((size_t)(V * d));
    for (size_t k = 0; k < D.w.size(); ++k) D.w[k] = (float)(means[k] + 0.1 * nd(g));
    return D;
}

// Runs one backend over the data in batches (device buffers when `device`), with the CLI's
// two-pass protocol, and returns the report.
// save_midway: a checkpoint there after half of the batches. tail (host batches only): the rows
// from half-way on come from it (the same rows in another dtype).
json run(const Data& D, collapse_options o, int64_t batch, bool device, cudaStream_t stream = nullptr, const std::string& save_midway = "",
         const Data* tail = nullptr) {
    o.num_classes = D.V;
    collapse::Session s(o);
    const collapse_buffer w = collapse::host_buffer(D.w.data(), COLLAPSE_F32, D.V, D.d);
    s.set_classifier(w);
    const size_t es = collapse::internal::dtype_size(D.dtype);
    void* dx = nullptr;
    void* dy = nullptr;
    if (device) {
        EXPECT_EQ(cudaMalloc(&dx, D.x.size()), cudaSuccess);
        EXPECT_EQ(cudaMalloc(&dy, D.y.size() * 4), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(dx, D.x.data(), D.x.size(), cudaMemcpyHostToDevice), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(dy, D.y.data(), D.y.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
    auto pass = [&] {
        for (int64_t r0 = 0; r0 < D.n; r0 += batch) {
            const int64_t nb = std::min(batch, D.n - r0);
            const Data& src = tail && !device && r0 >= D.n / 2 ? *tail : D;
            const size_t ses = collapse::internal::dtype_size(src.dtype);
            const void* xp = device ? (const void*)((uint8_t*)dx + (size_t)(r0 * D.d) * es) : (const void*)(src.x.data() + (size_t)(r0 * D.d) * ses);
            const void* yp = device ? (const void*)((int32_t*)dy + r0) : (const void*)(D.y.data() + r0);
            const collapse_memory mem = device ? COLLAPSE_MEMORY_DEVICE : COLLAPSE_MEMORY_HOST;
            const collapse_buffer fx{xp, src.dtype, mem, nb, D.d, 0}, fy{yp, COLLAPSE_I32, mem, nb, 1, 0};
            s.ingest_rows(fx, fy, nullptr, stream);
            if (!save_midway.empty() && r0 < D.n / 2 && r0 + batch >= D.n / 2 && !s.needs_second_pass()) s.save(save_midway);
        }
        s.sync();
    };
    pass();
    if (s.needs_second_pass()) {
        s.begin_second_pass();
        pass();
    }
    json r = json::parse(s.compute().json());
    if (device) {
        cudaFree(dx);
        cudaFree(dy);
    }
    return r;
}

void expect_close(const json& cpu, const json& gpu, double rel = 1e-5) {
    for (const char* sec : {"counts"})
        for (auto it = cpu[sec].begin(); it != cpu[sec].end(); ++it) EXPECT_EQ(gpu[sec][it.key()], it.value()) << it.key();
    const auto& c = cpu["overall_analysis"];
    const auto& g = gpu["overall_analysis"];
    for (auto it = c.begin(); it != c.end(); ++it) {
        if (!it.value().is_number_float()) continue;
        ASSERT_TRUE(g[it.key()].is_number()) << it.key() << " is null on the GPU";
        const double a = it.value().get<double>(), b = g[it.key()].get<double>();
        EXPECT_LE(std::fabs(a - b), rel * std::fabs(a) + 1e-9) << it.key() << ": cpu " << a << ", cuda " << b;
    }
    for (auto it = cpu["token_analysis"].begin(); it != cpu["token_analysis"].end(); ++it) {
        const auto& gt = gpu["token_analysis"][it.key()];
        ASSERT_TRUE(gt.is_object()) << "token " << it.key();
        EXPECT_EQ(gt["num_samples"], it.value()["num_samples"]);
        EXPECT_NEAR(gt["svd_entropy"].get<double>(), it.value()["svd_entropy"].get<double>(), 1e-5) << "token " << it.key();
    }
}

struct Case {
    const char* name;
    int64_t n, d, V, batch;
    collapse_dtype dtype;
    collapse_svd_mode svd;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class CudaVsCpu : public ::testing::TestWithParam<Case> {};

TEST_P(CudaVsCpu, SameReport) {
    SKIP_WITHOUT_DEVICE();
    const Case& c = GetParam();
    const Data D = make_data(c.n, c.d, c.V, c.dtype, 7 + (uint64_t)c.d);
    collapse_options o = collapse::default_options();
    o.svd_mode = c.svd;
    o.svd_max_rows_per_token = 16;
    o.compute_nc4 = 1;
    const json cpu = run(D, o, c.batch, false);
    o.backend = COLLAPSE_BACKEND_CUDA;
    expect_close(cpu, run(D, o, c.batch, false));  // host buffers: pinned double-buffered staging
    expect_close(cpu, run(D, o, c.batch, true));   // device buffers
}

INSTANTIATE_TEST_SUITE_P(Table, CudaVsCpu,
                         ::testing::Values(Case{"d1_f32", 4000, 1, 50, 777, COLLAPSE_F32, COLLAPSE_SVD_EXACT},
                                           Case{"d31_f16", 6000, 31, 300, 1000, COLLAPSE_F16, COLLAPSE_SVD_EXACT},
                                           Case{"d64_bf16", 8000, 64, 512, 4096, COLLAPSE_BF16, COLLAPSE_SVD_EXACT},
                                           Case{"d64_f32_sampled", 8000, 64, 512, 999, COLLAPSE_F32, COLLAPSE_SVD_SAMPLED},
                                           Case{"d1000_f16", 3000, 1000, 200, 512, COLLAPSE_F16, COLLAPSE_SVD_EXACT},
                                           Case{"d4096_f32", 2000, 4096, 100, 700, COLLAPSE_F32, COLLAPSE_SVD_OFF},
                                           Case{"K50k_d4_f32", 150000, 4, 50000, 65536, COLLAPSE_F32, COLLAPSE_SVD_OFF}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(CudaBackend, UserStreamAndDeviceBuffers) {
    SKIP_WITHOUT_DEVICE();
    const Data D = make_data(5000, 48, 128, COLLAPSE_F32, 99);
    collapse_options o = collapse::default_options();
    const json cpu = run(D, o, 1024, false);
    cudaStream_t st = nullptr;
    ASSERT_EQ(cudaStreamCreate(&st), cudaSuccess);
    o.backend = COLLAPSE_BACKEND_CUDA;
    expect_close(cpu, run(D, o, 1024, true, st));
    cudaStreamDestroy(st);
}

// A bad device batch is a no-op; its error (row and value) comes with the next call or sync.
TEST(CudaBackend, DeviceSideLabelErrorIsDeferredAndChangesNothing) {
    SKIP_WITHOUT_DEVICE();
    const Data D = make_data(3000, 16, 64, COLLAPSE_F32, 5);
    collapse_options o = collapse::default_options();
    o.num_classes = D.V;
    o.backend = COLLAPSE_BACKEND_CUDA;
    std::vector<int32_t> bad(D.y);
    bad[1234] = 999;
    void *dx = nullptr, *dy = nullptr, *db = nullptr;
    ASSERT_EQ(cudaMalloc(&dx, D.x.size()), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dy, D.y.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&db, bad.size() * 4), cudaSuccess);
    cudaMemcpy(dx, D.x.data(), D.x.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(dy, D.y.data(), D.y.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(db, bad.data(), bad.size() * 4, cudaMemcpyHostToDevice);
    const collapse_buffer fx{dx, COLLAPSE_F32, COLLAPSE_MEMORY_DEVICE, D.n, D.d, 0};
    const collapse_buffer fy{dy, COLLAPSE_I32, COLLAPSE_MEMORY_DEVICE, D.n, 1, 0};
    const collapse_buffer fb{db, COLLAPSE_I32, COLLAPSE_MEMORY_DEVICE, D.n, 1, 0};
    collapse::Session s(o);
    s.ingest_rows(fx, fy);
    s.ingest_rows(fx, fb);  // refused on the device
    EXPECT_EQ(collapse_session_sync(s.get()), COLLAPSE_ERR_BAD_INPUT);
    EXPECT_NE(std::string(collapse_last_error()).find("label 999 at row 1234"), std::string::npos) << collapse_last_error();
    EXPECT_EQ(collapse_session_sync(s.get()), COLLAPSE_OK);  // reported once
    const json got = json::parse(s.compute().json());
    collapse::Session clean(o);
    clean.ingest_rows(fx, fy);
    const json want = json::parse(clean.compute().json());
    EXPECT_EQ(got["counts"], want["counts"]);
    // fp64 atomics make the GPU's summation order vary: equal to rounding, not bit for bit.
    const double a = got["overall_analysis"]["overall_gnc2"].get<double>(), b = want["overall_analysis"]["overall_gnc2"].get<double>();
    EXPECT_NEAR(a, b, 1e-12 * std::fabs(b));
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(db);
}

// The finiteness scan reads rows with 16-byte loads where they are aligned and element by element
// otherwise: both report the first bad row, its column and value, and leave the batch a no-op; with
// skip_row both drop exactly the bad rows (the report equals the CPU's). Shapes: d = 200 (rows of
// 400 / 800 bytes: the vector path), d = 203 (element loads), and d = 200 at a base one element off
// 16-byte alignment (element loads on the same rows).
TEST(CudaBackend, NonFiniteRowsOnBothScanPaths) {
    SKIP_WITHOUT_DEVICE();
    struct Shape {
        int64_t d;
        size_t offset;  // elements added to the device base pointer
    };
    for (const collapse_dtype t : {COLLAPSE_F16, COLLAPSE_BF16, COLLAPSE_F32})
        for (const Shape sh : {Shape{200, 0}, Shape{203, 0}, Shape{200, 1}}) {
            SCOPED_TRACE("dtype " + std::to_string((int)t) + ", d " + std::to_string(sh.d) + ", offset " + std::to_string(sh.offset));
            const Data D = make_data(3000, sh.d, 64, t, 11);
            const size_t es = collapse::internal::dtype_size(t), off = sh.offset * es;
            Data bad = D;  // the same rows with two bad values
            auto put = [&](int64_t r, int64_t k, float v) {
                uint8_t* p = bad.x.data() + (size_t)(r * D.d + k) * es;
                if (t == COLLAPSE_F32) std::memcpy(p, &v, 4);
                else if (t == COLLAPSE_F16) { const uint16_t h = collapse::internal::float_to_half(v); std::memcpy(p, &h, 2); }
                else { const uint16_t h = collapse::internal::float_to_bf16(v); std::memcpy(p, &h, 2); }
            };
            put(2000, 3, std::numeric_limits<float>::quiet_NaN());  // a later bad row: the first one is reported
            put(1234, 77, std::numeric_limits<float>::infinity());
            collapse_options o = collapse::default_options();
            o.num_classes = D.V;
            o.backend = COLLAPSE_BACKEND_CUDA;
            uint8_t* dx = nullptr;
            uint8_t* dbad = nullptr;
            void* dy = nullptr;
            ASSERT_EQ(cudaMalloc(&dx, D.x.size() + 16), cudaSuccess);
            ASSERT_EQ(cudaMalloc(&dbad, D.x.size() + 16), cudaSuccess);
            ASSERT_EQ(cudaMalloc(&dy, D.y.size() * 4), cudaSuccess);
            cudaMemcpy(dx + off, D.x.data(), D.x.size(), cudaMemcpyHostToDevice);
            cudaMemcpy(dbad + off, bad.x.data(), bad.x.size(), cudaMemcpyHostToDevice);
            cudaMemcpy(dy, D.y.data(), D.y.size() * 4, cudaMemcpyHostToDevice);
            const collapse_buffer fx{dx + off, t, COLLAPSE_MEMORY_DEVICE, D.n, D.d, 0};
            const collapse_buffer fb{dbad + off, t, COLLAPSE_MEMORY_DEVICE, D.n, D.d, 0};
            const collapse_buffer fy{dy, COLLAPSE_I32, COLLAPSE_MEMORY_DEVICE, D.n, 1, 0};
            {
                collapse::Session s(o);
                s.ingest_rows(fx, fy);
                s.ingest_rows(fb, fy);  // refused on the device
                EXPECT_EQ(collapse_session_sync(s.get()), COLLAPSE_ERR_BAD_INPUT);
                const std::string msg = collapse_last_error();
                EXPECT_NE(msg.find("feature value inf"), std::string::npos) << msg;
                EXPECT_NE(msg.find("at row 1234 of the batch, column 77"), std::string::npos) << msg;
                const json got = json::parse(s.compute().json());
                collapse::Session clean(o);
                clean.ingest_rows(fx, fy);
                const json want = json::parse(clean.compute().json());
                EXPECT_EQ(got["counts"], want["counts"]);
                const double a = got["overall_analysis"]["overall_gnc2"].get<double>();
                const double b = want["overall_analysis"]["overall_gnc2"].get<double>();
                EXPECT_NEAR(a, b, 1e-12 * std::fabs(b));
            }
            {
                // skip_row: the two bad rows dropped, everything else as on the CPU from the same rows.
                o.nonfinite_policy = COLLAPSE_NONFINITE_SKIP_ROW;
                collapse::Session s(o);
                s.ingest_rows(fb, fy);
                const json got = json::parse(s.compute().json());
                collapse_options oc = o;
                oc.backend = COLLAPSE_BACKEND_CPU;
                collapse::Session cpu(oc);
                cpu.ingest_rows(collapse::host_buffer(bad.x.data(), t, D.n, D.d), collapse::host_buffer(D.y.data(), COLLAPSE_I32, D.n, 1));
                const json want = json::parse(cpu.compute().json());
                EXPECT_EQ(got["counts"], want["counts"]);
                EXPECT_EQ(got["counts"]["rows_nonfinite"], 2) << got["counts"].dump();
                expect_close(want, got);
            }
            cudaFree(dx);
            cudaFree(dbad);
            cudaFree(dy);
        }
}

TEST(CudaBackend, RealDataMatchesCpu) {
    SKIP_WITHOUT_DEVICE();
    const std::string dir = std::string(COLLAPSE_SHARED_DIR) + "/data/stories260k";
    const char* carried = std::getenv("COLLAPSE_REAL_DATA_DIR");  // the device machine has no ../shared
    const std::string base = carried ? carried : dir;
    FILE* f = std::fopen((base + "/features.npy").c_str(), "rb");
    if (!f) GTEST_SKIP() << "real data not found at " << base;
    std::fclose(f);
    const auto X = collapse::internal::io::open_npy(base + "/features.npy");
    const auto Y = collapse::internal::io::open_npy(base + "/labels.npy");
    const auto W = collapse::internal::io::open_npy(base + "/classifier.npy");
    Data D;
    D.n = X.shape[0], D.d = X.shape[1], D.V = W.shape[0], D.dtype = X.dtype;
    D.x.assign((const uint8_t*)X.data(), (const uint8_t*)X.data() + X.numel() * 2);
    D.y.assign((const int32_t*)Y.data(), (const int32_t*)Y.data() + Y.numel());
    D.w.assign((const float*)W.data(), (const float*)W.data() + W.numel());
    collapse_options o = collapse::default_options();
    const int64_t ex[3] = {0, 1, 2};
    o.exclude_token_ids = ex;
    o.num_exclude_token_ids = 3;
    o.compute_nc4 = 1;
    const json cpu = run(D, o, 65536, false);
    o.backend = COLLAPSE_BACKEND_CUDA;
    expect_close(cpu, run(D, o, 65536, true));
}

// Exact mode: rows stay in the device buffer until something moves them (here float16 rows meeting
// float32 ones half-way; a full buffer does the same); then, beyond host_memory_limit, they go to
// disk under intermediate_save_dir, and the per-token SVD takes that spill path for every row
// (those still on the device join the host store). With device batches a checkpoint is saved
// half-way instead: written from the device buffer, whose rows stay there. Either way the report
// is the CPU's, and nothing is left behind.
TEST(CudaBackend, RowBufferMovesToHostAndSpills) {
    SKIP_WITHOUT_DEVICE();
    const Data D = make_data(8000, 64, 300, COLLAPSE_F16, 5);
    Data D32 = D;  // the same values as float32 (exact)
    D32.dtype = COLLAPSE_F32;
    D32.x.resize((size_t)(D.n * D.d) * 4);
    for (int64_t k = 0; k < D.n * D.d; ++k) {
        uint16_t h;
        std::memcpy(&h, D.x.data() + (size_t)k * 2, 2);
        const float f = collapse::internal::half_to_float(h);
        std::memcpy(D32.x.data() + (size_t)k * 4, &f, 4);
    }
    collapse_options o = collapse::default_options();
    const json cpu = run(D, o, 700, false);
    o.backend = COLLAPSE_BACKEND_CUDA;
    o.host_memory_limit = int64_t(1) << 20;  // 512 KiB of rows in host memory: 4 MB spill
    const std::string dir = ::testing::TempDir() + "/cuda_spill";
    std::snprintf(o.intermediate_save_dir, sizeof o.intermediate_save_dir, "%s", dir.c_str());
    const std::string ckpt = ::testing::TempDir() + "/cuda_spill_midway.ckpt";
    for (bool device : {false, true}) {
        const json gpu = device ? run(D, o, 700, true, nullptr, ckpt) : run(D, o, 700, false, nullptr, "", &D32);
        expect_close(cpu, gpu);
        if (!device) EXPECT_GT(gpu["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0);
        else EXPECT_EQ(gpu["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0) << "the checkpoint moved the rows off the device";
    }
    struct stat st;
    EXPECT_NE(::stat(dir.c_str(), &st), 0) << "spill directory left behind";
    std::remove(ckpt.c_str());
}

// ------------------------------------------------------------------------- pooled device resources

namespace ci = collapse::internal;

// |a - b| <= rel * |b| + floor, and null exactly where b is null.
void expect_near_opt(const char* what, const std::optional<double>& a, const std::optional<double>& b, double rel, double floor) {
    ASSERT_EQ(a.has_value(), b.has_value()) << what;
    if (b) {
        EXPECT_LE(std::fabs(*a - *b), rel * std::fabs(*b) + floor) << what << ": cuda " << *a << ", cpu " << *b;
    }
}

// Inside a server, a cudaMalloc/cudaFree stalls every other stream on the device. After a warm-up
// (batches and a compute) of a shape, the same batches and compute again make no device allocation:
// finalisation's temporaries are leases from the session's pool (cuda/resources.cuh) and the ingest
// buffers were sized by the first batch. Exact mode's pinned upload stage grows with the rows kept;
// the other modes make no pinned allocation either. Both computes give the CPU's numbers (a slab
// handed out while still in use would not).
// A session on another device than the caller's current one (an MPI rank's, a server's) makes
// its device current only inside its calls: the caller's stays current through create, ingest,
// compute and destroy (the members' buffers are freed on the session's device, and the caller's
// comes back after them). With one device both are device 0: still checked, more weakly.
TEST(CudaBackend, CallersDeviceStaysCurrent) {
    SKIP_WITHOUT_DEVICE();
    int devices = 0;
    ASSERT_EQ(cudaGetDeviceCount(&devices), cudaSuccess);
    const int session_device = devices - 1;
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    auto current = [] {
        int d = -1;
        EXPECT_EQ(cudaGetDevice(&d), cudaSuccess);
        return d;
    };
    Data D = make_data(2000, 16, 20, COLLAPSE_F32, 5);
    ci::Classifier clf;
    clf.weight.assign(D.w.begin(), D.w.end());
    for (collapse_svd_mode svd : {COLLAPSE_SVD_EXACT, COLLAPSE_SVD_SAMPLED}) {
        SCOPED_TRACE("svd_mode " + std::to_string((int)svd));
        collapse_options o = collapse::default_options();
        o.num_classes = D.V;
        o.svd_mode = svd;
        o.backend = COLLAPSE_BACKEND_CUDA;
        o.device = session_device;
        const ci::Config cfg = ci::from_options(o);
        {
            const std::unique_ptr<ci::Backend> gpu = ci::make_cuda_backend(cfg, D.V, D.d);
            EXPECT_EQ(current(), 0) << "after create";
            const collapse_buffer fx{D.x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, D.n, D.d, 0};
            const collapse_buffer fy{D.y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, D.n, 1, 0};
            gpu->ingest(ci::describe_rows(&fx, &fy, nullptr, D.d), nullptr);
            EXPECT_EQ(current(), 0) << "after ingest";
            ci::Counts counts;
            (void)gpu->compute(ci::select_kept(gpu->class_counts(), cfg, &counts), clf);
            EXPECT_EQ(current(), 0) << "after compute";
        }
        EXPECT_EQ(current(), 0) << "after destroy";
    }
}

TEST(CudaBackend, NoAllocationsAfterWarmUp) {
    SKIP_WITHOUT_DEVICE();
    Data D = make_data(4000, 32, 50, COLLAPSE_F32, 11);
    // Every class kept and with at least d rows from the first compute on: the same Gram sizes then.
    for (size_t i = 0; i < D.y.size(); ++i) D.y[i] = (int32_t)(i % (size_t)D.V);
    ci::Classifier clf;
    clf.weight.assign(D.w.begin(), D.w.end());
    for (collapse_svd_mode svd : {COLLAPSE_SVD_SAMPLED, COLLAPSE_SVD_EXACT, COLLAPSE_SVD_OFF}) {
        SCOPED_TRACE("svd_mode " + std::to_string((int)svd));
        collapse_options o = collapse::default_options();
        o.num_classes = D.V;
        o.svd_mode = svd;
        o.svd_max_rows_per_token = 16;
        // exact: the rows stay in the device buffer; both computes group them there
        const ci::Config cfg = ci::from_options(o);
        const std::unique_ptr<ci::Backend> cpu = ci::make_cpu_backend(cfg, D.V, D.d);
        const std::unique_ptr<ci::Backend> gpu = ci::make_cuda_backend(cfg, D.V, D.d);
        ASSERT_STREQ(gpu->name(), "cuda");
        // static_cast, not dynamic_cast: the class's type info stays inside the CUDA module.
        auto calls = [&] { return static_cast<const ci::cuda::CudaBackend&>(*gpu).allocation_calls(); };
        auto sequence = [&](ci::Backend& b) {
            for (int64_t r0 = 0; r0 < D.n; r0 += 1000) {
                const collapse_buffer fx{D.x.data() + (size_t)(r0 * D.d) * 4, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 1000, D.d, 0};
                const collapse_buffer fy{D.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 1000, 1, 0};
                b.ingest(ci::describe_rows(&fx, &fy, nullptr, D.d), nullptr);
            }
            ci::Counts counts;
            return b.compute(ci::select_kept(b.class_counts(), cfg, &counts), clf);
        };
        for (int round = 0; round < 2; ++round) {
            const ci::cuda::AllocationCalls before = calls();
            const ci::MetricValues want = sequence(*cpu), got = sequence(*gpu);
            const ci::cuda::AllocationCalls made{calls().device - before.device, calls().pinned - before.pinned};
            if (round == 0) {
                EXPECT_GT(made.device, 0) << "the warm-up allocates: the counter counts";
            } else {
                EXPECT_EQ(made.device, 0) << "cudaMalloc/cudaFree calls in a repeated sequence";
                if (svd != COLLAPSE_SVD_EXACT) {
                    EXPECT_EQ(made.pinned, 0) << "cudaMallocHost/cudaFreeHost calls in a repeated sequence";
                }
            }
            expect_near_opt("overall_gnc2", got.overall_gnc2, want.overall_gnc2, 1e-5, 1e-9);
            expect_near_opt("nc2_equiangular_mean", got.nc2_equiangular_mean, want.nc2_equiangular_mean, 1e-5, 1e-9);
            expect_near_opt("nc1_cdnv", got.nc1_cdnv, want.nc1_cdnv, 1e-5, 1e-9);
            expect_near_opt("overall_unc3", got.overall_unc3, want.overall_unc3, 1e-5, 1e-9);
            expect_near_opt("nc3_self_duality", got.nc3_self_duality, want.nc3_self_duality, 1e-5, 1e-9);
            expect_near_opt("overall_svd_entropy", got.overall_svd_entropy, want.overall_svd_entropy, 1e-5, 1e-9);
            ASSERT_EQ(got.tokens.size(), want.tokens.size());
            for (size_t t = 0; t < want.tokens.size(); ++t)
                expect_near_opt("svd_entropy", got.tokens[t].svd_entropy, want.tokens[t].svd_entropy, 0, 1e-5);
        }
    }
}

// ------------------------------------------------------------------------- checkpoints

// Checkpoints share one layout across backends (src/core/state_sections.hpp): a GPU checkpoint
// resumes on the CPU and a CPU one on the GPU, GPU shards merge, and every combination gives the
// CPU's single run to the CUDA contract. Batches of 1000 rows; shards split at batch 4 of 8.
class CudaCheckpoint : public ::testing::TestWithParam<collapse_svd_mode> {
protected:
    void SetUp() override {
        SKIP_WITHOUT_DEVICE();
        D_ = make_data(8000, 31, 300, COLLAPSE_F32, 99);
        o_ = collapse::default_options();
        o_.num_classes = D_.V;
        o_.svd_mode = GetParam();
        o_.svd_max_rows_per_token = 16;
        o_.min_samples_per_token = 5;  // classes below it in one shard and above it overall
        dir_ = ::testing::TempDir();
    }
    collapse_options on(collapse_backend b) const {
        collapse_options o = o_;
        o.backend = b;
        return o;
    }
    void ingest(collapse::Session& s, int64_t b0, int64_t b1) const {
        for (int64_t b = b0; b < b1; ++b) {
            const collapse_buffer fx{D_.x.data() + (size_t)(b * 1000 * D_.d) * 4, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 1000, D_.d, 0};
            const collapse_buffer fy{D_.y.data() + b * 1000, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 1000, 1, 0};
            s.ingest_rows(fx, fy, nullptr, nullptr);
        }
        s.sync();
    }
    static json report(collapse::Session& s) { return json::parse(s.compute().json()); }
    std::string path(const std::string& name) const { return dir_ + "/cuda_ckpt_" + name; }
    Data D_;
    collapse_options o_{};
    std::string dir_;
};

TEST_P(CudaCheckpoint, ResumesAcrossBackendsAndMerges) {
    const bool sampled = GetParam() == COLLAPSE_SVD_SAMPLED;
    json want;
    {
        collapse::Session s(on(COLLAPSE_BACKEND_CPU));
        ingest(s, 0, 8);
        want = report(s);
    }
    // Shards saved by each backend.
    for (collapse_backend b : {COLLAPSE_BACKEND_CPU, COLLAPSE_BACKEND_CUDA})
        for (int shard : {0, 1}) {
            collapse::Session s(on(b));
            ingest(s, shard * 4, shard * 4 + 4);
            s.save(path(std::to_string(b) + "_" + std::to_string(shard)));
        }
    const std::string cpu0 = path("0_0"), cpu1 = path("0_1"), gpu0 = path("1_0"), gpu1 = path("1_1");
    if (!sampled) {
        // A GPU checkpoint resumed on the CPU, and a CPU one on the GPU.
        collapse::Session a(on(COLLAPSE_BACKEND_CPU));
        a.load(gpu0);
        ingest(a, 4, 8);
        expect_close(want, report(a));
        collapse::Session b(on(COLLAPSE_BACKEND_CUDA));
        b.load(cpu0);
        ingest(b, 4, 8);
        expect_close(want, report(b));
    }
    // GPU shards merged on the GPU and on the CPU; sampled reservoirs are re-sampled the same way
    // whichever backend merges, so the reference is the CPU's merge of the CPU shards.
    json ref = want;
    if (sampled) {
        collapse::Session m(on(COLLAPSE_BACKEND_CPU));
        m.load(cpu0);
        m.merge(cpu1);
        ref = report(m);
    }
    for (collapse_backend b : {COLLAPSE_BACKEND_CUDA, COLLAPSE_BACKEND_CPU}) {
        collapse::Session m(on(b));
        m.load(gpu0);
        m.merge(gpu1);
        expect_close(ref, report(m));
    }
    // A GPU session saves what it loaded: the same sections, integers equal, floats within 1e-12
    // (the Gram goes through the device layout and back).
    collapse::Session g(on(COLLAPSE_BACKEND_CUDA));
    g.load(gpu0);
    g.save(path("again"));
    {
        collapse::internal::io::CheckpointReader a(gpu0), b(path("again"));
        ASSERT_EQ(a.names(), b.names());
        for (const std::string& name : a.names()) {
            if (name == "meta") continue;
            const auto x = a.section(name), y = b.section(name);
            ASSERT_EQ(x.shape, y.shape) << name;
            ASSERT_EQ(x.bytes, y.bytes) << name;
            if (x.dtype_code != COLLAPSE_F64) {
                EXPECT_EQ(std::memcmp(x.data, y.data, x.bytes), 0) << name;
                continue;
            }
            const double* p = static_cast<const double*>(x.data);
            const double* q = static_cast<const double*>(y.data);
            double scale = 0;
            for (size_t k = 0; k < x.bytes / 8; ++k) scale = std::max(scale, std::fabs(p[k]));
            for (size_t k = 0; k < x.bytes / 8; ++k) ASSERT_LE(std::fabs(p[k] - q[k]), 1e-12 * scale) << name << "[" << k << "]";
        }
    }
    collapse::Session c(on(COLLAPSE_BACKEND_CPU));
    c.load(path("again"));
    ingest(c, 4, 8);
    collapse::Session c2(on(COLLAPSE_BACKEND_CPU));
    c2.load(gpu0);
    ingest(c2, 4, 8);
    expect_close(report(c2), report(c), 1e-12);
}

INSTANTIATE_TEST_SUITE_P(Modes, CudaCheckpoint, ::testing::Values(COLLAPSE_SVD_EXACT, COLLAPSE_SVD_SAMPLED),
                         [](const auto& info) { return std::string(info.param == COLLAPSE_SVD_EXACT ? "exact" : "sampled"); });

}  // namespace
}  // namespace test_cuda_backend
