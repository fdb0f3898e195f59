// `collapse analyze` on labels that use the Hugging Face "no target" label -100: the rows are dropped
// and reported (counts.rows_ignored, the summary line), V comes from the other labels, and with
// `ignore_index: null` the old out-of-range error names the row.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli_fixture.hpp"
#include "io/tensor_file.hpp"

namespace test_cli_ignore_index {
namespace {

using nlohmann::json;
namespace io = collapse::internal::io;

class CliIgnoreIndex : public testutil::CliTest {
protected:
    void SetUp() override {
        testutil::CliTest::SetUp();
        if (IsSkipped()) return;
        std::vector<float> x((size_t)(kN * kD));
        for (size_t i = 0; i < x.size(); ++i) x[i] = (float)((i * 2654435761u) % 1000) / 250.0f - 2.0f;
        std::vector<int64_t> y((size_t)kN);
        for (int64_t i = 0; i < kN; ++i) y[(size_t)i] = i % 7 == 3 ? -100 : i % 11;
        io::write_npy(path("x.npy"), COLLAPSE_F32, {kN, kD}, x.data());
        io::write_npy(path("y.npy"), COLLAPSE_I64, {kN}, y.data());
        for (int64_t i = 0; i < kN; ++i) ignored_ += y[(size_t)i] == -100;
    }
    static constexpr int64_t kN = 700, kD = 4;
    int64_t ignored_ = 0;
};

TEST_F(CliIgnoreIndex, MinusHundredLabelsAreIgnoredAndReported) {
    const testutil::CliRun r = run_ok("analyze --features x.npy --labels y.npy --batch-rows 128 -o r.json");
    const json rep = report("r.json");
    EXPECT_EQ(rep["counts"]["rows_seen"], kN);
    EXPECT_EQ(rep["counts"]["rows_ignored"], ignored_);
    EXPECT_EQ(rep["counts"]["rows_kept"], kN - ignored_);
    EXPECT_EQ(rep["engine"]["num_classes"], 11);  // the largest label + 1: -100 is no class
    EXPECT_EQ(rep["config"]["ignore_index"], -100);
    EXPECT_NE(r.out.find("(" + std::to_string(ignored_) + " ignored: label -100)"), std::string::npos) << r.out;
}

TEST_F(CliIgnoreIndex, OffGivesTheOutOfRangeErrorAndAClassIdIsRefused) {
    testutil::spit(path("off.yaml"), "ignore_index: null\n");
    expect_error("analyze -q --config off.yaml --features x.npy --labels y.npy -o r.json",
                 {"label -100 at row 3", "outside [0, 11)", "ignore_index is null"});
    testutil::spit(path("class.yaml"), "ignore_index: 5\n");
    expect_error("analyze -q --config class.yaml --features x.npy --labels y.npy -o r.json", {"ignore_index", "is 5", "[0, num_classes = 11)"});
}

}  // namespace
}  // namespace test_cli_ignore_index
