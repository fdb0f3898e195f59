// The analysis driver (src/driver/analysis.hpp) on sources whose behaviour the test controls: the
// second pass skips what the first pass skipped, a resume refuses an input position beyond the
// input, and input_difference names what differs.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "common/file_helpers.hpp"
#include "core/session.hpp"
#include "driver/analysis.hpp"
#include "io/session_checkpoint.hpp"

namespace test_driver {
namespace {

using namespace collapse::internal;

// Rows in memory; the labels of one range can be made bad for the first `bad_calls` visits, which
// is how a transient failure (a full disk) looks to the driver.
class MemorySource : public driver::RowSource {
public:
    MemorySource(int64_t n, int64_t d, int64_t V, uint32_t seed) : n_(n), d_(d), x_((size_t)(n * d)), y_((size_t)n) {
        std::mt19937 rng(seed);
        std::normal_distribution<float> g;
        for (int64_t i = 0; i < n; ++i) {
            y_[(size_t)i] = (int32_t)(rng() % (uint32_t)V);
            for (int64_t k = 0; k < d; ++k) x_[(size_t)(i * d + k)] = g(rng) + 3.0f * (float)((y_[(size_t)i] + k) % 3 == 0);
        }
        info_.kind = "synthetic";
        info_.synthetic_spec = "{\"memory\": " + std::to_string(seed) + "}";
        info_.fingerprint = "mem" + std::to_string(seed);
    }
    void fail_range(int64_t first, int64_t calls) { bad_first_ = first, bad_calls_ = calls; }
    int visits_of_bad_range() const { return visits_; }

    bool sequences() const override { return false; }
    int64_t length() const override { return n_; }
    int64_t rows_per_position() const override { return 1; }
    int64_t dim() const override { return d_; }
    int64_t label_bound() const override { return 0; }
    driver::SourceBatch batch(int64_t first, int64_t count) override {
        driver::SourceBatch b;
        b.first = first;
        b.count = count;
        labels_.assign(y_.begin() + first, y_.begin() + first + b.count);
        if (first == bad_first_) {
            ++visits_;
            if (visits_ <= bad_calls_) labels_[0] = 1 << 30;  // out of range: the batch is refused
        }
        b.x = collapse_buffer{x_.data() + first * d_, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, b.count, d_, 0};
        b.y = collapse_buffer{labels_.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, b.count, 1, 0};
        return b;
    }
    const driver::InputInfo& info() const override { return info_; }

    const std::vector<float>& x() const { return x_; }

private:
    int64_t n_, d_;
    std::vector<float> x_;
    std::vector<int32_t> y_, labels_;
    int64_t bad_first_ = -1, bad_calls_ = 0;
    int visits_ = 0;
    driver::InputInfo info_;
};

Config small_config(int64_t V) {
    Config c;
    c.num_classes = V;
    c.batch_rows = 100;
    c.continue_on_error = true;
    return c;
}

void set_classifier(Session& s, int64_t V, int64_t d) {
    std::vector<float> w((size_t)(V * d));
    for (int64_t i = 0; i < V * d; ++i) w[(size_t)i] = std::sin(0.7 * (double)i);
    const collapse_buffer wb{w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, V, d, 0};
    s.set_classifier(&wb, nullptr);
}

// NC4 without a row store needs the rows twice. A batch that failed in the first pass (here: a
// transient failure that would succeed the second time) must not reach the second pass, or NC4
// would count rows the first pass never counted.
TEST(Driver, SecondPassSkipsWhatTheFirstPassSkipped) {
    const int64_t V = 7, d = 5;
    MemorySource src(1000, d, V, 1);
    src.fail_range(300, 1);
    Config cfg = small_config(V);
    cfg.svd_mode = COLLAPSE_SVD_SAMPLED;  // no row store: NC4 takes a second pass
    cfg.compute_nc4 = true;
    Session s(cfg);
    set_classifier(s, V, d);
    std::vector<std::string> warnings;
    driver::AnalysisOptions o;
    o.warn = [&](const std::string& w) { warnings.push_back(w); };
    const driver::AnalysisOutcome out = driver::run_analysis(s, src, o);
    EXPECT_EQ(src.visits_of_bad_range(), 1) << "the second pass visited the skipped batch again";
    ASSERT_EQ(warnings.size(), 1u);
    EXPECT_NE(warnings[0].find("positions 300 to 399"), std::string::npos) << warnings[0];
    EXPECT_EQ(out.result.engine.batches_failed, 1);
    EXPECT_EQ(out.result.engine.rows_skipped, 100);
    EXPECT_EQ(out.result.counts.rows_seen, 900);
    ASSERT_TRUE(out.result.metrics.nc4_agreement.has_value()) << out.report["overall_analysis"]["notes"].dump();
    EXPECT_EQ(out.result.metrics.nc4_rows, out.result.counts.rows_kept);
    EXPECT_EQ(out.report["counts"]["batches_failed"], 1);
    EXPECT_EQ(out.report["input"]["kind"], "synthetic");
}

// A checkpoint that records no input (made through the C API) still cannot resume past the end.
class DriverResume : public testutil::TempDirTest {};

TEST_F(DriverResume, RefusesAPositionBeyondTheInput) {
    const int64_t V = 7, d = 5;
    MemorySource big(3000, d, V, 2);
    const std::string ckpt = path("c.ckpt");
    {
        Session s(small_config(V));
        const collapse_buffer x{big.x().data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 3000, d, 0};
        std::vector<int32_t> y(3000, 1);
        const collapse_buffer yb{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 3000, 1, 0};
        s.ingest_rows(&x, &yb, nullptr, nullptr);
        ASSERT_EQ(s.input_position(), 3000);
        ASSERT_TRUE(s.input_identity().empty());
        io::save_checkpoint(s, ckpt);
    }
    MemorySource small(2000, d, V, 2);
    Session s(small_config(V));
    driver::AnalysisOptions o;
    o.checkpoint = ckpt;
    o.resume = true;
    testutil::expect_error([&] { driver::run_analysis(s, small, o); }, {"cannot resume", "3000", "beyond the input's end", "2000"},
                          COLLAPSE_ERR_INVALID_ARGUMENT);
}

TEST(Driver, InputDifferenceNamesTheTensorAndTheField) {
    driver::InputInfo a;
    a.kind = "npy";
    a.parts.push_back({"features", "a/features.npy", "", "float32", {10, 4}, 256, "00000001"});
    a.fingerprint = "aaaa";
    driver::InputInfo b = a;
    EXPECT_EQ(driver::input_difference(driver::to_json(a).dump(), b), "");
    EXPECT_EQ(driver::input_difference("", b), "") << "a checkpoint that records no input is not refused for it";
    b.parts[0].shape = {12, 4};
    b.parts[0].path = "b/features.npy";
    b.fingerprint = "bbbb";
    const std::string diff = driver::input_difference(driver::to_json(a).dump(), b);
    EXPECT_NE(diff.find("features differ in shape"), std::string::npos) << diff;
    EXPECT_NE(diff.find("a/features.npy [10,4]"), std::string::npos) << diff;
    EXPECT_NE(diff.find("b/features.npy [12,4]"), std::string::npos) << diff;
}

}  // namespace
}  // namespace test_driver
