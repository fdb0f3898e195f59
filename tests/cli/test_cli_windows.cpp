// `collapse analyze --sequence-ids S.npy [--positions P.npy]` (generation-time window entropy):
// the rows layout with tags, in any row order, gives the sequence layout's windows; bad tag files
// are refused naming the flag or the file.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli_fixture.hpp"
#include "base/dtype.hpp"
#include "io/tensor_file.hpp"

namespace test_cli_windows {
namespace {

using nlohmann::json;
namespace io = collapse::internal::io;

class CliWindows : public testutil::CliTest {
protected:
    static constexpr int64_t kT = 20;

    void SetUp() override {
        CliTest::SetUp();
        if (IsSkipped()) return;
        synth("s", "--sequences 20");
        const io::Tensor h = io::open_npy(path("s/hidden_states.npy"));
        B_ = h.shape[0];
        d_ = h.shape[2];
        hidden_.assign(static_cast<const float*>(h.data()), static_cast<const float*>(h.data()) + B_ * kT * d_);
        const io::Tensor ids = io::open_npy(path("s/input_ids.npy"));
        for (int64_t i = 0; i < B_ * kT; ++i) ids_.push_back((int32_t)collapse::internal::load_as_int(ids.data(), ids.dtype, i));
    }

    // The rows of the sequences as a shuffled rows layout with sequence ids and positions.
    void write_tagged_rows(uint32_t seed) {
        std::vector<int64_t> order((size_t)(B_ * (kT - 1)));
        std::iota(order.begin(), order.end(), 0);
        std::mt19937 rng(seed);
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<float> x;
        std::vector<int32_t> y, pos;
        std::vector<int64_t> seq;
        for (int64_t r : order) {
            const int64_t b = r / (kT - 1), t = r % (kT - 1);
            x.insert(x.end(), hidden_.begin() + (b * kT + t) * d_, hidden_.begin() + (b * kT + t + 1) * d_);
            y.push_back(ids_[(size_t)(b * kT + t + 1)]);
            seq.push_back(b);
            pos.push_back((int32_t)t);
        }
        const int64_t n = (int64_t)y.size();
        io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d_}, x.data());
        io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
        io::write_npy(path("seq.npy"), COLLAPSE_I64, {n, 1}, seq.data());
        io::write_npy(path("pos.npy"), COLLAPSE_I32, {n}, pos.data());
    }

    int64_t B_ = 0, d_ = 0;
    std::vector<float> hidden_;
    std::vector<int32_t> ids_;
};

TEST_F(CliWindows, TaggedRowsInAnyOrderMatchTheSequenceLayout) {
    write_tagged_rows(3);
    const std::string common = " --quiet --num-classes 40 --config w.yaml";
    testutil::spit(path("w.yaml"), "window_size: 4\n");
    run_ok("analyze --hidden s/hidden_states.npy --input-ids s/input_ids.npy --batch-rows 50" + common + " -o seq.json");
    run_ok("analyze --features x.npy --labels y.npy --sequence-ids seq.npy --positions pos.npy --batch-rows 97" + common + " -o rows.json");
    const json a = report("seq.json"), b = report("rows.json");
    ASSERT_TRUE(a["sequence_analysis"].is_object());
    EXPECT_EQ(a["sequence_analysis"].size(), (size_t)B_);
    EXPECT_EQ(a["sequence_analysis"]["0"]["num_valid_chunks"], (kT - 1) / 4);
    // Same windows, same numbers up to the summation order of the float64 centring.
    for (auto it = a["sequence_analysis"].begin(); it != a["sequence_analysis"].end(); ++it) {
        const auto ea = it.value()["fixed_chunk_svd_entropies"].get<std::vector<double>>();
        const auto eb = b["sequence_analysis"][it.key()]["fixed_chunk_svd_entropies"].get<std::vector<double>>();
        ASSERT_EQ(ea.size(), eb.size()) << it.key();
        for (size_t i = 0; i < ea.size(); ++i) EXPECT_NEAR(ea[i], eb[i], 1e-12 * std::max(1.0, std::fabs(ea[i]))) << it.key();
    }
    EXPECT_NEAR(a["window_summary"]["overall_avg_svd_entropy"].get<double>(), b["window_summary"]["overall_avg_svd_entropy"].get<double>(), 1e-12);
    // The inputs are recorded (a resume refuses other tag files).
    bool seen = false;
    for (const auto& t : b["input"]["tensors"]) seen = seen || t["role"] == "sequence_ids";
    EXPECT_TRUE(seen) << b["input"].dump();
    // Windows off: null sections with a note.
    testutil::spit(path("off.yaml"), "compute_window_metrics: false\n");
    run_ok("analyze --quiet --num-classes 40 --config off.yaml --features x.npy --labels y.npy --sequence-ids seq.npy -o off.json");
    const json off = report("off.json");
    EXPECT_TRUE(off["sequence_analysis"].is_null());
    EXPECT_EQ(off["overall_analysis"]["notes"]["sequence_analysis"], "compute_window_metrics is false");
}

TEST_F(CliWindows, BadTagFilesAndFlagsAreRefused) {
    write_tagged_rows(4);
    const int64_t n = B_ * (kT - 1);
    std::vector<float> f((size_t)n, 0.f);
    io::write_npy(path("fseq.npy"), COLLAPSE_F32, {n}, f.data());
    std::vector<int64_t> shortseq((size_t)(n - 1), 0);
    io::write_npy(path("short.npy"), COLLAPSE_I64, {n - 1}, shortseq.data());
    std::vector<int64_t> neg((size_t)n, 0);
    neg[5] = -1;
    io::write_npy(path("neg.npy"), COLLAPSE_I64, {n}, neg.data());
    const std::string rows = "analyze --quiet --num-classes 40 --features x.npy --labels y.npy ";
    expect_error(rows + "--sequence-ids fseq.npy", {"sequence ids", "float32", "int32 or int64"});
    expect_error(rows + "--sequence-ids short.npy", {"sequence ids"});
    expect_error(rows + "--sequence-ids seq.npy --positions neg.npy", {"positions: row 5", "-1"});
    expect_error(rows + "--positions pos.npy", {"--positions needs --sequence-ids"});
    expect_error("analyze --quiet --hidden s/hidden_states.npy --input-ids s/input_ids.npy --sequence-ids seq.npy",
                 {"--sequence-ids", "rows layout"});
    expect_error("analyze --quiet --synthetic --sequence-ids seq.npy", {"--sequence-ids", "--synthetic"});
}

}  // namespace
}  // namespace test_cli_windows
