// `collapse compare A.json B.json [--output D.json] [--top N]` on reports made by `collapse analyze`
// (small synthetic dumps of `collapse synth`, different seeds and configs): the differences equal
// B - A computed here from the two files, the token ranking and only-in counts follow from the
// files, --output holds the same as JSON, reports of different V and d say so, window_summary in one
// report only; and every error path (one line naming the file or the flag, no output written).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli_fixture.hpp"

namespace test_cli_compare {
namespace {

using nlohmann::json;
using testutil::quote;

class CliCompare : public testutil::CliTest {
protected:
    // synth into `sub` and analyze it into `report` (with a classifier, so that every family is there).
    void make_report(const std::string& sub, const std::string& synth_args, const std::string& report, const std::string& config = "") {
        run_ok("synth --output-dir " + quote(path(sub)) + " --rows 1500 --zipf 0.8 --quiet " + synth_args);
        std::string args = "analyze --features " + sub + "/features.npy --labels " + sub + "/labels.npy --classifier " + sub +
                           "/classifier.npy -q -o " + report;
        if (!config.empty()) {
            testutil::spit(path(sub + ".yaml"), config);
            args += " --config " + sub + ".yaml";
        }
        run_ok(args);
    }
};

bool is_metric(const json& v) { return v.is_null() || (v.is_number() && !v.is_boolean()); }

TEST_F(CliCompare, DifferencesTopTokensAndOutputFollowFromTheFiles) {
    make_report("a", "--dim 8 --classes 40 --seed 5", "A.json");
    make_report("b", "--dim 8 --classes 40 --seed 6", "B.json", "svd_center: true\ncompute_nc4: true\nmax_tokens_to_analyze: 30\n");
    const json A = report("A.json"), B = report("B.json");
    const testutil::CliRun r = run_ok("compare A.json B.json --output D.json --top 5");
    const json D = report("D.json");
    ASSERT_TRUE(D.is_object());

    // Every numeric key of the compared sections: both values and B - A.
    int checked = 0;
    for (const char* sec : {"overall_analysis", "summary"}) {
        const json& sa = A[sec];
        const json& sb = B[sec];
        const json& m = D["sections"][sec]["metrics"];
        EXPECT_EQ(D["sections"][sec]["in"], "both");
        for (auto it = sa.begin(); it != sa.end(); ++it) {
            if (!is_metric(it.value())) {
                EXPECT_FALSE(m.contains(it.key())) << it.key();
                continue;
            }
            SCOPED_TRACE(std::string(sec) + "." + it.key());
            ASSERT_TRUE(m.contains(it.key()));
            EXPECT_EQ(m[it.key()]["a"], it.value());
            EXPECT_EQ(m[it.key()]["b"], sb[it.key()]);
            const json& diff = m[it.key()]["diff"];
            if (it.value().is_null() || sb[it.key()].is_null()) {
                EXPECT_TRUE(diff.is_null());
            } else {
                EXPECT_EQ(diff.get<double>(), sb[it.key()].get<double>() - it.value().get<double>());
            }
            // The printed table has the metric's row.
            EXPECT_NE(r.out.find("\n  " + it.key() + " "), std::string::npos) << it.key();
            ++checked;
        }
    }
    EXPECT_GT(checked, 20);
    EXPECT_TRUE(D["sections"]["overall_analysis"]["metrics"]["nc4_agreement"]["a"].is_null());  // NC4 off in A
    EXPECT_FALSE(D["sections"].contains("window_summary"));  // in neither report

    // Tokens: only-in counts and the ranking, from the files.
    const json& ta = A["token_analysis"];
    const json& tb = B["token_analysis"];
    struct Move {
        int64_t id;
        double diff;
    };
    std::vector<Move> moves;
    int64_t both = 0, only_a = 0, only_b = 0;
    for (auto it = ta.begin(); it != ta.end(); ++it) {
        if (!tb.contains(it.key())) {
            ++only_a;
            continue;
        }
        ++both;
        if (it.value()["svd_entropy"].is_number() && tb[it.key()]["svd_entropy"].is_number())
            moves.push_back({std::stoll(it.key()), tb[it.key()]["svd_entropy"].get<double>() - it.value()["svd_entropy"].get<double>()});
    }
    for (auto it = tb.begin(); it != tb.end(); ++it) only_b += ta.contains(it.key()) ? 0 : 1;
    EXPECT_GE(only_a, 10) << "B keeps 30 tokens (max_tokens_to_analyze), A all 40";
    std::sort(moves.begin(), moves.end(), [](const Move& p, const Move& q) {
        return std::fabs(p.diff) != std::fabs(q.diff) ? std::fabs(p.diff) > std::fabs(q.diff) : p.id < q.id;
    });
    EXPECT_EQ(D["tokens"]["in_both"], both);
    EXPECT_EQ(D["tokens"]["only_in_a"], only_a);
    EXPECT_EQ(D["tokens"]["only_in_b"], only_b);
    const json& top = D["tokens"]["largest_moves"];
    ASSERT_EQ(top.size(), 5u);
    for (size_t i = 0; i < 5; ++i) {
        EXPECT_EQ(top[i]["token"], moves[i].id);
        EXPECT_EQ(top[i]["diff"].get<double>(), moves[i].diff);
        const std::string id = std::to_string(moves[i].id);
        EXPECT_EQ(top[i]["num_samples_a"], ta[id]["num_samples"]);
        EXPECT_EQ(top[i]["num_samples_b"], tb[id]["num_samples"]);
    }
    EXPECT_NE(r.out.find(std::to_string(both) + " in both, " + std::to_string(only_a) + " only in A, " + std::to_string(only_b) + " only in B"),
              std::string::npos)
        << r.out;
    EXPECT_EQ(r.out.rfind("A: A.json (V = 40, d = 8, ", 0), 0u) << r.out;
    EXPECT_EQ(r.out.find("note:"), std::string::npos) << r.out;

    // The default --top is 10; without --output nothing is written.
    std::filesystem::remove(path("D.json"));
    const testutil::CliRun r2 = run_ok("compare A.json B.json");
    EXPECT_FALSE(std::filesystem::exists(path("D.json")));
    EXPECT_NE(r2.out.find("the 10 tokens"), std::string::npos) << r2.out;
    // A report against itself: every difference is zero.
    run_ok("compare A.json A.json -o self.json");
    const json self = report("self.json");  // named: a range-for over a temporary's member dangles
    for (const auto& [k, m] : self["sections"]["overall_analysis"]["metrics"].items())
        if (!m["diff"].is_null()) EXPECT_EQ(m["diff"].get<double>(), 0.0) << k;
}

TEST_F(CliCompare, DifferentVAndDAndWindowSummaryInOneReport) {
    make_report("a", "--dim 8 --classes 40 --seed 5", "A.json");
    make_report("b", "--dim 12 --classes 60 --seed 5", "B.json");
    // A window_summary in B only (as a report with window metrics has), with keys this code never saw.
    json B = report("B.json");
    B["window_summary"] = {{"overall_avg_svd_entropy", 2.5}, {"avg_chunk_idx_0_svd_entropy", 2.0}, {"total_processed_samples", 12}};
    testutil::spit(path("B.json"), B.dump(2));
    const testutil::CliRun r = run_ok("compare A.json B.json -o D.json");
    EXPECT_NE(r.out.find("note: the reports differ in V and d (A: V = 40, d = 8; B: V = 60, d = 12)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("note: window_summary is only in B"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("window_summary"), std::string::npos);
    EXPECT_NE(r.out.find("avg_chunk_idx_0_svd_entropy"), std::string::npos);
    const json D = report("D.json");
    EXPECT_FALSE(D["same_shape"].get<bool>());
    EXPECT_EQ(D["sections"]["window_summary"]["in"], "b");
    EXPECT_EQ(D["sections"]["window_summary"]["metrics"]["total_processed_samples"]["b"], 12);
    // Tokens 40..59 exist only in B; the rest compare by id.
    const json A = report("A.json");
    int64_t only_b = 0;
    for (const auto& [k, v] : B["token_analysis"].items()) only_b += A["token_analysis"].contains(k) ? 0 : 1;
    EXPECT_EQ(D["tokens"]["only_in_b"], only_b);
    EXPECT_GE(only_b, 1);
}

TEST_F(CliCompare, Errors) {
    make_report("a", "--dim 8 --classes 40 --seed 5", "A.json");
    testutil::spit(path("config.json"), R"({"svd_mode": "exact"})");
    testutil::spit(path("broken.json"), "{\"summary\": ");
    expect_error("compare A.json missing.json", {"missing.json", "No such file"});
    expect_error("compare missing.json A.json -o D.json", {"missing.json"});
    expect_error("compare A.json config.json", {"config.json is not a collapse report", "no overall_analysis section"});
    expect_error("compare broken.json A.json", {"broken.json", "not JSON"});
    expect_error("compare A.json " + quote(dir_), {dir_, "directory"});
    expect_error("compare A.json A.json --top 0", {"--top must be at least 1, got 0"});
    expect_error("compare A.json A.json --top -3", {"--top must be at least 1"});
    expect_error("compare A.json config.json --output A.json", {"--output", "A.json", "same file as input"});
    expect_error("compare A.json A.json --output nodir/D.json", {"nodir/D.json"});
    EXPECT_FALSE(std::filesystem::exists(path("D.json")));
    // The input is untouched by the refused run.
    EXPECT_TRUE(report("A.json").contains("overall_analysis"));
    // Arguments missing: CLI11's usage error, non-zero.
    EXPECT_NE(run("compare A.json").status, 0);
}

}  // namespace
}  // namespace test_cli_compare
