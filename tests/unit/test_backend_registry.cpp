// The backend registry (src/core/backend_registry.cpp): the CUDA backend is a module opened on first
// use, so a CPU analysis and `collapse --version` never map a CUDA library; without the module or
// without a device, COLLAPSE_ERR_NO_CUDA says which; an Error thrown inside the module reaches the C
// API with its status. The fake module (fake_cuda_module/) runs these paths without CUDA.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "common/capi_helpers.hpp"
#include "common/file_helpers.hpp"

extern char** environ;

namespace test_backend_registry {
namespace {

using testutil::SessionPtr;

// The shared objects a CPU-only process must never map.
const char* const kCudaLibraries[] = {"libcudart", "libcublas", "libcusolver", "libcusparse", "libcuda.so", "libnvJitLink"};

// Sets (or unsets, value nullptr) an environment variable for one test.
class ScopedEnv {
public:
    ScopedEnv(const char* name, const char* value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old;
        value ? setenv(name, value, 1) : unsetenv(name);
    }
    ~ScopedEnv() { old_ ? setenv(name_, old_->c_str(), 1) : unsetenv(name_); }

private:
    const char* name_;
    std::optional<std::string> old_;
};

collapse_options options(collapse_backend backend, int64_t V, int64_t d) {
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = V;
    o.dim = d;
    o.backend = backend;
    return o;
}

// collapse_session_create for backend cuda; the status, and the message in *message.
collapse_status create_cuda(int64_t V, int64_t d, SessionPtr* session, std::string* message) {
    const collapse_options o = options(COLLAPSE_BACKEND_CUDA, V, d);
    collapse_session* s = nullptr;
    const collapse_status st = collapse_session_create(&o, &s);
    session->reset(s);
    *message = collapse_last_error();
    return st;
}


TEST(BackendRegistry, CpuAnalysisMapsNoCudaLibrary) {
    // Another test of this process may have opened the real module (ctest runs each test alone).
    if (testutil::read_file("/proc/self/maps").find("libcollapse_cuda") != std::string::npos)
        GTEST_SKIP() << "the CUDA module was opened by an earlier test in this process";
    const int64_t V = 3, d = 2, n = 6;
    const float x[n * d] = {1, 0, 1.5f, 0, 0, 2, 0, 2.5f, -1, -1, -2, -1};
    const int32_t y[n] = {0, 0, 1, 1, 2, 2};
    const collapse_options o = options(COLLAPSE_BACKEND_CPU, V, 0);
    collapse_session* s = nullptr;
    ASSERT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    SessionPtr hold(s);
    const collapse_buffer xb = {x, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, d, 0};
    const collapse_buffer yb = {y, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
    ASSERT_EQ(collapse_session_ingest_rows(s, &xb, &yb, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    collapse_report* r = nullptr;
    ASSERT_EQ(collapse_session_compute(s, &r), COLLAPSE_OK) << collapse_last_error();
    testutil::ReportPtr report(r);
    double rows = 0;
    int is_null = 1;
    ASSERT_EQ(collapse_report_get_scalar(r, "counts.rows_kept", &rows, &is_null), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(rows, n);

    const std::string maps = testutil::read_file("/proc/self/maps");
    ASSERT_FALSE(maps.empty());
    for (const char* lib : kCudaLibraries) EXPECT_EQ(maps.find(lib), std::string::npos) << lib << " is mapped:\n" << maps;
    EXPECT_EQ(maps.find("libcollapse_cuda"), std::string::npos) << "the CUDA module was opened by a CPU analysis";
}

// Without an NVIDIA driver (no /dev/nvidiactl, /proc/driver/nvidia or /dev/dxg) and without
// $COLLAPSE_CUDA_MODULE, asking whether CUDA is available opens no module (that maps the CUDA
// runtime: 0.2-0.8 s measured on a machine without a GPU); backend cuda still looks for it and says
// what it found.
TEST(BackendRegistry, NoDriverAnswersWithoutLoadingTheModule) {
    for (const char* p : {"/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg"})
        if (access(p, F_OK) == 0) GTEST_SKIP() << p << " exists: this machine has an NVIDIA driver";
    if (testutil::read_file("/proc/self/maps").find("libcollapse_cuda") != std::string::npos)
        GTEST_SKIP() << "the CUDA module was opened by an earlier test in this process";
    ScopedEnv env("COLLAPSE_CUDA_MODULE", nullptr);
    EXPECT_EQ(collapse_backend_available("cuda"), 0);
    const std::string maps = testutil::read_file("/proc/self/maps");
    ASSERT_FALSE(maps.empty());
    EXPECT_EQ(maps.find("libcollapse_cuda"), std::string::npos) << "the CUDA module was opened without a driver";
    for (const char* lib : kCudaLibraries) EXPECT_EQ(maps.find(lib), std::string::npos) << lib << " is mapped";
    SessionPtr s;
    std::string msg;
    EXPECT_EQ(create_cuda(4, 2, &s, &msg), COLLAPSE_ERR_NO_CUDA);
    EXPECT_NE(msg.find("the CUDA module"), std::string::npos) << msg;
}

TEST(BackendRegistry, MissingModuleFileIsNamed) {
    const std::string missing = ::testing::TempDir() + "/no_such_dir/libcollapse_cuda.so";
    ScopedEnv env("COLLAPSE_CUDA_MODULE", missing.c_str());
    SessionPtr s;
    std::string msg;
    EXPECT_EQ(create_cuda(4, 2, &s, &msg), COLLAPSE_ERR_NO_CUDA);
    EXPECT_EQ(s, nullptr);
    EXPECT_NE(msg.find("could not be loaded"), std::string::npos) << msg;
    EXPECT_NE(msg.find(missing + ": cannot open shared object file"), std::string::npos) << msg;  // the path and dlerror
    EXPECT_EQ(collapse_backend_available("cuda"), 0);
    EXPECT_EQ(collapse_backend_available("cpu"), 1);
}

TEST(BackendRegistry, ModuleWithoutDeviceSaysSo) {
    ScopedEnv env("COLLAPSE_CUDA_MODULE", COLLAPSE_FAKE_CUDA_MODULE);
    ScopedEnv no_device("FAKE_CUDA_NO_DEVICE", "1");
    SessionPtr s;
    std::string msg;
    EXPECT_EQ(create_cuda(4, 0, &s, &msg), COLLAPSE_ERR_NO_CUDA);
    EXPECT_NE(msg.find("is loaded, but no CUDA device is usable: cudaErrorNoDevice"), std::string::npos) << msg;
    EXPECT_NE(msg.find("libcollapse_fake_cuda_module.so"), std::string::npos) << msg;
    EXPECT_EQ(collapse_backend_available("cuda"), 0);
}

// The module this build made, found beside the binary (build/tests/../lib) with no variable set;
// a build without nvcc reports each place it looked.
TEST(BackendRegistry, BuiltModuleIsFoundOrThePlacesTriedAreNamed) {
    ScopedEnv env("COLLAPSE_CUDA_MODULE", nullptr);
    const std::string built = COLLAPSE_REAL_CUDA_MODULE;
    SessionPtr s;
    std::string msg;
    const collapse_status st = create_cuda(4, 0, &s, &msg);
    if (built.empty()) {
        EXPECT_EQ(st, COLLAPSE_ERR_NO_CUDA);
        // build/tests/libcollapse_cuda.so, then build/lib/libcollapse_cuda.so (../lib), then the default path.
        char real[PATH_MAX];
        ASSERT_NE(realpath(COLLAPSE_BINARY_DIR, real), nullptr);
        const std::string build_dir = real;
        EXPECT_NE(msg.find(build_dir + "/tests/libcollapse_cuda.so: cannot open shared object file"), std::string::npos) << msg;
        EXPECT_NE(msg.find(build_dir + "/lib/libcollapse_cuda.so: cannot open shared object file"), std::string::npos) << msg;
        EXPECT_NE(msg.find("; libcollapse_cuda.so: cannot open shared object file"), std::string::npos) << msg;
        EXPECT_NE(msg.find("-DCOLLAPSE_CUDA=ON"), std::string::npos) << msg;
    } else if (st == COLLAPSE_OK) {  // a machine with a GPU
        EXPECT_EQ(collapse_backend_available("cuda"), 1);
    } else {
        EXPECT_EQ(st, COLLAPSE_ERR_NO_CUDA) << msg;
        char real[PATH_MAX];
        ASSERT_NE(realpath(built.c_str(), real), nullptr) << built;
        // The CUDA error's name and text follow (cudaErrorNoDevice, cudaErrorInsufficientDriver, ...).
        EXPECT_NE(msg.find("the CUDA module " + std::string(real) + " is loaded, but no CUDA device is usable: cuda"),
                  std::string::npos) << msg;
        EXPECT_EQ(collapse_backend_available("cuda"), 0);
    }
}

TEST(BackendRegistry, ErrorsThrownInTheModuleKeepTheirStatus) {
    ScopedEnv env("COLLAPSE_CUDA_MODULE", COLLAPSE_FAKE_CUDA_MODULE);
    ScopedEnv device("FAKE_CUDA_NO_DEVICE", nullptr);
    EXPECT_EQ(collapse_backend_available("cuda"), 1);
    SessionPtr s;
    std::string msg;
    ASSERT_EQ(create_cuda(4, 2, &s, &msg), COLLAPSE_OK) << msg;

    const float x[4] = {1, 2, 3, 4};
    const int32_t y[2] = {0, 1};
    const collapse_buffer xb = {x, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 2, 2, 0};
    const collapse_buffer yb = {y, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 2, 1, 0};
    EXPECT_EQ(collapse_session_ingest_rows(s.get(), &xb, &yb, nullptr, nullptr), COLLAPSE_ERR_BAD_INPUT);
    EXPECT_STREQ(collapse_last_error(), "fake cuda module: refused a batch of 2 rows");
    EXPECT_EQ(collapse_session_sync(s.get()), COLLAPSE_ERR_OUT_OF_MEMORY);
    EXPECT_STREQ(collapse_last_error(), "fake cuda module: device out of memory");

    // The factory's own error (a C-linkage entry point) arrives the same way.
    SessionPtr refused;
    EXPECT_EQ(create_cuda(13, 2, &refused, &msg), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(msg, "fake cuda module: num_classes 13 refused by the factory");
    EXPECT_EQ(refused, nullptr);
}

// `collapse --version` maps no CUDA library (LD_DEBUG lists every library the loader opens) and
// starts fast. The bound is generous (the goal is well under 0.05 s); the figure is printed.
TEST(BackendRegistry, CliVersionLoadsNoCudaAndStartsFast) {
    const std::string cli = COLLAPSE_CLI_PATH;
    ASSERT_TRUE(testutil::exists(cli)) << "the collapse binary was not built: " << cli;
    const testutil::CliRun run = testutil::run_cli(cli, ::testing::TempDir(), "--version");
    ASSERT_EQ(run.status, 0) << run.err;
    EXPECT_NE(run.out.find(collapse_version_string()), std::string::npos) << run.out;

    const std::string dir = ::testing::TempDir();
    const testutil::CliRun traced = testutil::run_cli("env", dir, "LD_DEBUG=libs " + testutil::quote(cli) + " --version");
    ASSERT_EQ(traced.status, 0) << traced.err;
    ASSERT_NE(traced.err.find("calling init"), std::string::npos) << "LD_DEBUG gave no trace:\n" << traced.err;
    for (const char* lib : kCudaLibraries) EXPECT_EQ(traced.err.find(lib), std::string::npos) << lib << ":\n" << traced.err;

    double best = 1e9;
    for (int i = 0; i < 5; ++i) {
        char* argv[] = {const_cast<char*>(cli.c_str()), const_cast<char*>("--version"), nullptr};
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        const auto t0 = std::chrono::steady_clock::now();
        pid_t pid = 0;
        ASSERT_EQ(posix_spawn(&pid, cli.c_str(), &fa, nullptr, argv, environ), 0);
        int status = 0;
        ASSERT_EQ(waitpid(pid, &status, 0), pid);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        posix_spawn_file_actions_destroy(&fa);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    std::printf("collapse --version: %.4f s (best of 5)\n", best);
    RecordProperty("version_seconds", std::to_string(best));
    EXPECT_LT(best, 0.5);
}

}  // namespace
}  // namespace test_backend_registry
