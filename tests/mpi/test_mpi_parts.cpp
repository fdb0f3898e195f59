// The per-token section of a rank's part of the row-store metrics (core/spread_part.hpp, one
// layout for the CPU and CUDA backends; no MPI needed): what one backend writes, another reads
// back as it was, absent values included; a malformed part is refused naming the section.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/spread_part.hpp"
#include "io/checkpoint_file.hpp"

#include <unistd.h>

namespace test_mpi_parts {
namespace {

namespace ci = collapse::internal;

class MpiTokenPart : public ::testing::Test {
protected:
    void SetUp() override {
        dir_ = std::filesystem::temp_directory_path() / ("collapse_token_part_" + std::to_string(::getpid()));
        std::filesystem::create_directories(dir_);
    }
    void TearDown() override { std::filesystem::remove_all(dir_); }
    std::string file(const std::string& name) const { return (dir_ / name).string(); }
    std::filesystem::path dir_;
};

TEST_F(MpiTokenPart, RoundTripKeepsEveryFieldAndAbsentValues) {
    std::vector<ci::TokenMetrics> t(3);
    t[0].svd_entropy = 1.25, t[0].effective_rank = 3.4903429574618414, t[0].normalized_entropy = 0.625, t[0].svd_rows = 17;
    t[1].svd_rows = 1000, t[1].sampled = true, t[1].svd_entropy = -0.0, t[1].effective_rank = 1.0;  // normalised entropy absent
    t[2].svd_rows = 4, t[2].zero_matrix = true;                                                   // every value absent
    {
        ci::io::CheckpointWriter w(file("part.ckpt"));
        ci::write_token_part(w, t, 3);
        w.commit();
    }
    const ci::io::CheckpointReader r(file("part.ckpt"));
    const ci::TokenPart p = ci::read_token_part(r, 3);
    for (int64_t i = 0; i < 3; ++i) {
        SCOPED_TRACE(i);
        ci::TokenMetrics back;
        p.take(i, back);
        const ci::TokenMetrics& a = t[(size_t)i];
        EXPECT_EQ(back.svd_rows, a.svd_rows);
        EXPECT_EQ(back.sampled, a.sampled);
        EXPECT_EQ(back.zero_matrix, a.zero_matrix);
        EXPECT_EQ(back.svd_entropy, a.svd_entropy);
        EXPECT_EQ(back.effective_rank, a.effective_rank);
        EXPECT_EQ(back.normalized_entropy, a.normalized_entropy);
    }
}

TEST_F(MpiTokenPart, MalformedPartsAreRefusedNamingTheSection) {
    const double f[6] = {1, 2, 3, 4, 5, 6};
    const int64_t good[6] = {5, 0, 0, 6, 1, 0}, negative[6] = {5, 0, 0, -1, 0, 0};
    auto expect_refused = [&](const std::string& name, const std::function<void(ci::StateWriter&)>& write, const std::string& says) {
        SCOPED_TRACE(name);
        {
            ci::io::CheckpointWriter w(file(name));
            write(w);
            w.commit();
        }
        const ci::io::CheckpointReader r(file(name));
        try {
            ci::read_token_part(r, 2);
            ADD_FAILURE() << "accepted";
        } catch (const ci::Error& e) {
            EXPECT_EQ(e.status(), COLLAPSE_ERR_IO);
            EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
        }
    };
    expect_refused("missing", [&](ci::StateWriter& w) { w.add("part_tokens_f", COLLAPSE_F64, {2, 3}, f, sizeof f); }, "lacks section part_tokens_i");
    expect_refused("shape", [&](ci::StateWriter& w) {
        w.add("part_tokens_f", COLLAPSE_F64, {3, 2}, f, sizeof f);
        w.add("part_tokens_i", COLLAPSE_I64, {2, 3}, good, sizeof good);
    }, "section part_tokens_f is not float64 [2, 3]");
    expect_refused("dtype", [&](ci::StateWriter& w) {
        w.add("part_tokens_f", COLLAPSE_F64, {2, 3}, f, sizeof f);
        w.add("part_tokens_i", COLLAPSE_F64, {2, 3}, f, sizeof f);
    }, "section part_tokens_i is not int64 [2, 3]");
    expect_refused("rows", [&](ci::StateWriter& w) {
        w.add("part_tokens_f", COLLAPSE_F64, {2, 3}, f, sizeof f);
        w.add("part_tokens_i", COLLAPSE_I64, {2, 3}, negative, sizeof negative);
    }, "holds -1 rows at 1");
}

}  // namespace
}  // namespace test_mpi_parts
