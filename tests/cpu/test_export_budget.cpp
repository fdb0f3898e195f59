// host_memory_limit covers the --export-dir files and the --ood-features reader too: their host
// allocations are counted before they are made, a refusal names the step (and the flag to leave
// out), and nothing is half-written.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/atomic_file.hpp"
#include "core/host_budget.hpp"
#include "driver/ood_mean.hpp"
#include "io/tensor_file.hpp"
#include "report/exports.hpp"

namespace test_export_budget {
namespace {

using namespace collapse::internal;
namespace fs = std::filesystem;

std::string fresh_dir(const std::string& name) {
    const std::string dir = ::testing::TempDir() + "export_budget_" + name + "_" + std::to_string(::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    return dir;
}

// A result of K kept classes of width d with its report's token_analysis, as the CLI hands them over.
struct Exportable {
    Result r;
    nlohmann::json doc;
};
Exportable make_result(int64_t K, int64_t d) {
    Exportable e;
    e.r.engine.dim = d;
    e.r.counts.classes_kept = K;
    e.doc["token_analysis"] = nlohmann::json::object();
    for (int64_t c = 0; c < K; ++c) {
        TokenMetrics t;
        t.id = 3 * c + 1;
        t.num_samples = 5 + c;
        t.within_variance = 0.5 + (double)c;
        t.has_per_class = true;
        e.r.metrics.tokens.push_back(t);
        e.doc["token_analysis"][std::to_string(t.id)] = {{"num_samples", t.num_samples}, {"within_variance", *t.within_variance}};
    }
    e.r.metrics.class_means.assign((size_t)(K * d), 0.25);
    return e;
}

::testing::AssertionResult refused_naming(const std::function<void()>& f, const std::vector<std::string>& pieces) {
    try {
        f();
    } catch (const Error& e) {
        if (e.status() != COLLAPSE_ERR_OUT_OF_MEMORY) return ::testing::AssertionFailure() << "status " << e.status() << ": " << e.what();
        for (const std::string& p : pieces)
            if (std::string(e.what()).find(p) == std::string::npos) return ::testing::AssertionFailure() << "no \"" << p << "\" in: " << e.what();
        return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure() << "not refused";
}

TEST(ExportBudget, TooSmallHostMemoryLimitRefusesTheExportsBeforeAnyFile) {
    const Exportable e = make_result(2000, 16);  // class_means alone: 2000 x 16 doubles = 250 KiB
    const std::string dir = fresh_dir("small");
    HostBudget small(64 << 10);
    EXPECT_TRUE(refused_naming([&] { (void)write_exports(dir, e.r, e.doc, small); }, {"--export-dir", dir, "host_memory_limit", "no file was written"}));
    EXPECT_TRUE(fs::is_empty(dir)) << "a refused export left files in " << dir;
    EXPECT_EQ(small.held(), 0);  // nothing stays counted
    // What is held already counts: a budget that fits the exports alone refuses them beside a lease.
    HostBudget shared(8 << 20);
    {
        const HostBudget::Lease session = shared.reserve((8 << 20) - (128 << 10), "the session's state");
        EXPECT_TRUE(refused_naming([&] { (void)write_exports(dir, e.r, e.doc, shared); }, {"--export-dir"}));
        EXPECT_TRUE(fs::is_empty(dir));
    }
    // With room, every file is written and the budget is given back.
    const std::vector<std::string> files = write_exports(dir, e.r, e.doc, shared);
    EXPECT_EQ(shared.held(), 0);
    for (const std::string& f : files) EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
    const io::Tensor means = io::open_npy(dir + "/class_means.npy");
    EXPECT_EQ(means.shape, (std::vector<int64_t>{2000, 16}));
    fs::remove_all(dir);
}

TEST(ExportBudget, CsvBoundCoversTheCsvWithTokenStrings) {
    Exportable e = make_result(50, 2);
    std::vector<int64_t> ids;
    for (const TokenMetrics& t : e.r.metrics.tokens) ids.push_back(t.id);
    // Strings that need quoting (their quotes doubled) and the widest numbers.
    for (size_t k = 0; k < ids.size(); ++k) {
        auto& entry = e.doc["token_analysis"][std::to_string(ids[k])];
        entry["token"] = std::string(k % 7 + 1, '"') + ",x\n";
        entry["duality_cos"] = -1.2345678901234567e-300;
        entry["nc4_rows"] = INT64_MIN;
    }
    EXPECT_LE((int64_t)token_table_csv(e.doc, ids).size(), token_table_csv_bound(e.doc, ids));
}

TEST(ExportBudget, TooSmallHostMemoryLimitRefusesTheOodReaderNamingIt) {
    const std::string dir = fresh_dir("ood");
    const int64_t n = 1000, d = 64;  // 250 KiB of float32 rows: one read piece
    std::vector<float> x((size_t)(n * d));
    std::mt19937 rng(5);
    std::normal_distribution<float> g(0.0f, 1.0f);
    for (float& v : x) v = 2.0f + g(rng);
    const std::string f = dir + "/ood.npy";
    write_file_atomically(f, io::npy_bytes(COLLAPSE_F32, {n, d}, x.data()), "test");
    HostBudget small(16 << 10);
    EXPECT_TRUE(refused_naming([&] { (void)driver::ood_mean_of_npy(f, small); }, {"--ood-features", f, "read buffer", "host_memory_limit"}));
    EXPECT_EQ(small.held(), 0);
    HostBudget enough(8 << 20);
    const std::vector<double> mean = driver::ood_mean_of_npy(f, enough);
    ASSERT_EQ((int64_t)mean.size(), d);
    for (int64_t j = 0; j < d; ++j) {
        long double s = 0;
        for (int64_t i = 0; i < n; ++i) s += x[(size_t)(i * d + j)];
        EXPECT_NEAR(mean[(size_t)j], (double)(s / n), 1e-12) << j;
    }
    EXPECT_EQ(enough.held(), 0);
    fs::remove_all(dir);
}

}  // namespace
}  // namespace test_export_budget
