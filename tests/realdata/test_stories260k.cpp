// Real hidden states of a real LM (../shared/data/stories260k): the CLI's report against this
// test's own float64 evaluation of docs/METRICS.md. Skips when the data folder is absent.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/compare.hpp"
#include "base/dtype.hpp"
#include "io/tensor_file.hpp"
#include "reference/brute_force.hpp"

namespace fs = std::filesystem;
using testutil::close;

namespace test_stories260k {
namespace {

const std::string kData = std::string(COLLAPSE_SHARED_DIR) + "/data/stories260k";

bool have_data() { return fs::exists(kData + "/features.npy") && fs::exists(kData + "/labels.npy") && fs::exists(kData + "/classifier.npy"); }

struct RealData {
    int64_t n = 0, d = 0, V = 0;
    std::vector<double> x, w;
    std::vector<int64_t> y;
};

RealData load() {
    RealData r;
    const auto f = collapse::internal::io::open_npy(kData + "/features.npy");
    const auto l = collapse::internal::io::open_npy(kData + "/labels.npy");
    const auto c = collapse::internal::io::open_npy(kData + "/classifier.npy");
    r.n = f.shape[0];
    r.d = f.shape[1];
    r.V = c.shape[0];
    r.x.resize((size_t)(r.n * r.d));
    for (int64_t i = 0; i < r.n * r.d; ++i) r.x[(size_t)i] = collapse::internal::load_as_double(f.data(), f.dtype, i);
    r.y.resize((size_t)r.n);
    for (int64_t i = 0; i < r.n; ++i) r.y[(size_t)i] = collapse::internal::load_as_int(l.data(), l.dtype, i);
    r.w.resize((size_t)(r.V * r.d));
    for (int64_t i = 0; i < r.V * r.d; ++i) r.w[(size_t)i] = collapse::internal::load_as_double(c.data(), c.dtype, i);
    return r;
}

nlohmann::json run_cli(const std::string& dir, const std::string& config_yaml, const std::string& extra) {
    const std::string cfg = dir + "/config.yaml", out = dir + "/report.json";
    std::ofstream(cfg) << config_yaml;
    const std::string cmd = std::string(COLLAPSE_CLI_PATH) + " analyze --features " + kData + "/features.npy --labels " + kData +
                            "/labels.npy --classifier " + kData + "/classifier.npy --config " + cfg + " --quiet " + extra +
                            " --output " + out + " 2>" + dir + "/stderr.txt";
    const int rc = std::system(cmd.c_str());
    std::ifstream err(dir + "/stderr.txt");
    std::stringstream es;
    es << err.rdbuf();
    EXPECT_EQ(rc, 0) << cmd << "\n" << es.str();
    std::ifstream in(out);
    return nlohmann::json::parse(in);
}

void expect_matches(const nlohmann::json& rep, const ref::Result& want) {
    const auto& o = rep["overall_analysis"];
    EXPECT_EQ(rep["counts"]["rows_kept"].get<int64_t>(), want.rows_kept);
    EXPECT_EQ(rep["counts"]["rows_excluded"].get<int64_t>(), want.rows_excluded);
    EXPECT_EQ(rep["counts"]["classes_kept"].get<int64_t>(), want.classes_kept);
    EXPECT_EQ(rep["counts"]["classes_seen"].get<int64_t>(), want.classes_seen);
    EXPECT_EQ(rep["counts"]["classes_below_min"].get<int64_t>(), want.classes_below_min);
    EXPECT_TRUE(close("overall_svd_entropy", o["overall_svd_entropy"], want.overall_svd_entropy));
    EXPECT_TRUE(close("overall_effective_rank", o["overall_effective_rank"], want.overall_effective_rank));
    EXPECT_TRUE(close("overall_gnc2", o["overall_gnc2"], want.overall_gnc2));
    EXPECT_TRUE(close("gnc2_var", o["gnc2_var"], want.gnc2_var));
    EXPECT_TRUE(close("gnc2_cov", o["gnc2_cov"], want.gnc2_cov));
    EXPECT_TRUE(close("overall_unc3", o["overall_unc3"], want.overall_unc3));
    EXPECT_TRUE(close("unc3_mean_cos", o["unc3_mean_cos"], want.unc3_mean_cos));
    EXPECT_TRUE(close("unc3_std_cos", o["unc3_std_cos"], want.unc3_std_cos));
    EXPECT_TRUE(close("nc1_cdnv", o["nc1_cdnv"], want.nc1_cdnv));
    EXPECT_TRUE(close("nc2_equinorm_cov", o["nc2_equinorm_cov"], want.nc2_equinorm_cov));
    EXPECT_TRUE(close("nc2_log_norm_std", o["nc2_log_norm_std"], want.nc2_log_norm_std));
    EXPECT_TRUE(close("nc2_equiangular_mean", o["nc2_equiangular_mean"], want.nc2_equiangular_mean));
    EXPECT_TRUE(close("nc2_equiangular_std", o["nc2_equiangular_std"], want.nc2_equiangular_std));
    EXPECT_TRUE(close("nc3_self_duality", o["nc3_self_duality"], want.nc3_self_duality));
    EXPECT_TRUE(close("nc4_agreement", o["nc4_agreement"], want.nc4_agreement, 0, 0));
    EXPECT_EQ(o["gnc2_skipped_pairs"].get<int64_t>(), want.gnc2_skipped_pairs);
    EXPECT_EQ(o["cdnv_skipped_pairs"].get<int64_t>(), want.cdnv_skipped_pairs);
    const auto& ta = rep["token_analysis"];
    ASSERT_EQ(ta.size(), want.tokens.size());
    for (const auto& [id, tok] : want.tokens) {
        const std::string key = std::to_string(id);
        ASSERT_TRUE(ta.contains(key)) << "token " << id;
        EXPECT_EQ(ta[key]["num_samples"].get<int64_t>(), tok.n) << "token " << id;
        EXPECT_TRUE(close("svd_entropy of token " + key, ta[key]["svd_entropy"], tok.svd_entropy));
        EXPECT_TRUE(close("normalized_entropy of token " + key, ta[key]["normalized_entropy"], tok.normalized_entropy));
    }
    EXPECT_TRUE(close("avg_svd_entropy", rep["summary"]["avg_svd_entropy"], want.avg_svd_entropy));
    EXPECT_TRUE(close("std_svd_entropy", rep["summary"]["std_svd_entropy"], want.std_svd_entropy));
}

class Stories260k : public ::testing::Test {
protected:
    void SetUp() override {
        if (!have_data()) GTEST_SKIP() << "real data not found at " << kData << " (a clone without ../shared): skipped";
        if (std::string(COLLAPSE_CLI_PATH).empty()) GTEST_SKIP() << "the collapse command is not built";
        dir_ = fs::temp_directory_path() / ("collapse_real_" + std::to_string(::getpid()) + "_" +
                                            ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::create_directories(dir_);
    }
    void TearDown() override {
        if (!dir_.empty()) fs::remove_all(dir_);
    }
    fs::path dir_;
};


// The configuration of the issue: the classifier, eos/bos/unk excluded, NC4 on, exact SVD.
TEST_F(Stories260k, CliReportMatchesFloat64Reference) {
    const RealData r = load();
    ASSERT_EQ(r.n, 200054);
    ASSERT_EQ(r.d, 64);
    ASSERT_EQ(r.V, 512);
    ref::Options opt;
    opt.num_classes = r.V;
    opt.exclude = {0, 1, 2};
    opt.compute_nc4 = true;
    const ref::Result want = ref::compute(r.x, r.y, r.d, r.w.data(), nullptr, opt);
    // Facts of the data set's README, as a check on the reference's reading of it.
    EXPECT_EQ(want.rows_seen, 200054);
    EXPECT_EQ(want.rows_excluded, 473);  // BOS is the label 473 times; 0 and 2 never occur

    const nlohmann::json rep = run_cli(dir_.string(), "exclude_token_ids: [0, 1, 2]\ncompute_nc4: true\n", "--batch-rows 50000");
    expect_matches(rep, want);
    // Published-magnitude sanity (docs/METRICS.md, "Reference sanity values"): a tiny LM is far from collapse.
    EXPECT_GT(rep["overall_analysis"]["nc4_agreement"].get<double>(), 0.0);
}

// Sampled mode with a second pass (no row store): NC4 and the class geometry are unchanged,
// token entropies come from reservoirs of at most 64 rows.
TEST_F(Stories260k, SampledModeSecondPassGivesSameGeometry) {
    const RealData r = load();
    ref::Options opt;
    opt.num_classes = r.V;
    opt.exclude = {0, 1, 2};
    opt.compute_nc4 = true;
    opt.max_tokens = 100;  // the Gram of kept rows then needs the second pass too
    const ref::Result want = ref::compute(r.x, r.y, r.d, r.w.data(), nullptr, opt);
    const nlohmann::json rep = run_cli(dir_.string(),
                                       "exclude_token_ids: [0, 1, 2]\ncompute_nc4: true\nsvd_mode: sampled\n"
                                       "svd_max_rows_per_token: 64\nmax_tokens_to_analyze: 100\n",
                                       "");
    const auto& o = rep["overall_analysis"];
    EXPECT_EQ(rep["counts"]["classes_kept"].get<int64_t>(), 100);
    EXPECT_EQ(rep["counts"]["rows_kept"].get<int64_t>(), want.rows_kept);
    EXPECT_TRUE(close("overall_svd_entropy", o["overall_svd_entropy"], want.overall_svd_entropy));
    EXPECT_TRUE(close("overall_gnc2", o["overall_gnc2"], want.overall_gnc2));
    EXPECT_TRUE(close("nc1_cdnv", o["nc1_cdnv"], want.nc1_cdnv));
    EXPECT_TRUE(close("overall_unc3", o["overall_unc3"], want.overall_unc3));
    EXPECT_TRUE(close("nc4_agreement", o["nc4_agreement"], want.nc4_agreement, 0, 0));
    for (const auto& [id, tok] : want.tokens) {
        const auto& t = rep["token_analysis"][std::to_string(id)];
        EXPECT_EQ(t["sampled"].get<bool>(), tok.n > 64) << id;
        EXPECT_EQ(t["svd_rows"].get<int64_t>(), std::min<int64_t>(tok.n, 64)) << id;
        if (tok.n <= 64) EXPECT_TRUE(close("svd_entropy of " + std::to_string(id), t["svd_entropy"], tok.svd_entropy));
    }
}

}  // namespace
}  // namespace test_stories260k
