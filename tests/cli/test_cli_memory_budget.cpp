// Issue 15, as the user met it: a 64-row file with one label of 50,000,000 (V = largest label + 1)
// under host_memory_limit: 2GiB. `collapse analyze` must refuse with the bytes, the limit and the
// keys to change, before the memory is taken: its peak resident set (wait4's ru_maxrss) stays far
// below the 4.3 GiB the per-class state would need (it peaked at 4.9 GiB before the fix).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/peak_rss.hpp"
#include "io/tensor_file.hpp"

namespace test_cli_memory_budget {
namespace {

namespace fs = std::filesystem;

TEST(CliMemoryBudget, OneHugeLabelIsRefusedBeforeTheMemoryIsTaken) {
    if (std::string(COLLAPSE_CLI_PATH).empty() || !fs::exists(COLLAPSE_CLI_PATH)) GTEST_SKIP() << "the collapse binary was not built";
    const std::string dir = (fs::path(::testing::TempDir()) / "collapse_cli_budget").string();
    fs::remove_all(dir);
    fs::create_directories(dir);
    const int64_t n = 64, d = 2;
    std::vector<float> x((size_t)(n * d));
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = (int32_t)(i % 8);
        for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] = (float)(i % 8) + 0.01f * (float)j;
    }
    y[5] = 50000000;
    collapse::internal::io::write_npy(dir + "/features.npy", COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(dir + "/labels.npy", COLLAPSE_I32, {n}, y.data());
    std::ofstream(dir + "/cfg.yaml") << "host_memory_limit: 2GiB\n";

    const testutil::ChildRun r = testutil::run_child({COLLAPSE_CLI_PATH, "analyze", "--features", dir + "/features.npy", "--labels", dir + "/labels.npy",
                                                      "--config", dir + "/cfg.yaml", "-o", dir + "/report.json", "-q"},
                                                     dir + "/log.txt");
    std::ifstream log_in(dir + "/log.txt");
    const std::string log((std::istreambuf_iterator<char>(log_in)), std::istreambuf_iterator<char>());
    EXPECT_NE(r.status, 0) << log;
    for (const char* piece : {"collapse: error:", "V = 50000001", "bytes) of host memory", "host_memory_limit = 2 GiB", "num_classes"})
        EXPECT_NE(log.find(piece), std::string::npos) << "the message lacks '" << piece << "': " << log;
    std::cout << "[budget] collapse analyze peaked at " << r.peak_rss / (1 << 20) << " MiB\n";
    EXPECT_LT(r.peak_rss, int64_t(256) << 20) << log;
    EXPECT_FALSE(fs::exists(dir + "/report.json"));
    fs::remove_all(dir);
}

}  // namespace
}  // namespace test_cli_memory_budget
