// compare_reports (src/report/compare.hpp), the logic of `collapse compare`, on small hand-made
// reports: differences B - A, nulls and keys only one report has, sections absent in one or both,
// the ranking of tokens by the move of their entropy (ties by id), only-in counts, reports of
// different V and d, the text table, and every refusal (naming the file and what is missing).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/file.hpp"
#include "common/file_helpers.hpp"
#include "report/compare.hpp"

namespace test_compare {
namespace {

using nlohmann::json;
using collapse::internal::compare_reports;

// A minimal report: the sections compare_reports reads, tokens id -> (entropy, samples).
json report(int64_t V, int64_t d, const std::vector<std::tuple<int, json, int>>& tokens) {
    json r;
    r["summary"] = {{"avg_svd_entropy", 1.5}, {"std_svd_entropy", nullptr}, {"total_tokens_analyzed", 3}};
    r["counts"] = {{"rows_seen", 100}};
    r["overall_analysis"] = {{"overall_gnc2", 0.25}, {"nc4_agreement", nullptr}, {"gnc2_pairs", 10},
                             {"notes", {{"nc4_agreement", "compute_nc4 is false"}}}, {"unc3_note", "text"}};
    r["token_analysis"] = json::object();
    for (const auto& [id, h, n] : tokens) r["token_analysis"][std::to_string(id)] = {{"svd_entropy", h}, {"num_samples", n}};
    r["config"] = json::object();
    r["engine"] = {{"num_classes", V}, {"dim", d}, {"backend", "cpu"}};
    return r;
}

// The error of f: its status and message.
template <class F>
std::pair<collapse_status, std::string> error_of(F&& f) {
    try {
        f();
    } catch (const collapse::internal::Error& e) {
        return {e.status(), e.what()};
    }
    return {COLLAPSE_OK, ""};
}

TEST(Compare, DifferencesAreBMinusAWithNullsAndOneSidedKeys) {
    json a = report(10, 4, {{1, 2.0, 5}});
    json b = report(10, 4, {{1, 2.5, 6}});
    b["overall_analysis"]["overall_gnc2"] = 0.75;
    b["overall_analysis"]["nc4_agreement"] = 0.5;  // null in A
    b["overall_analysis"]["gnc2_pairs"] = 7;      // integers stay integers
    b["overall_analysis"]["new_metric"] = 3.0;    // only in B: no code knows it
    a["summary"]["old_metric"] = 1.0;             // only in A
    const json c = compare_reports(a, b, 10, "a.json", "b.json");
    const json& o = c["sections"]["overall_analysis"]["metrics"];
    EXPECT_EQ(o["overall_gnc2"]["diff"].get<double>(), 0.75 - 0.25);
    EXPECT_TRUE(o["nc4_agreement"]["a"].is_null());
    EXPECT_TRUE(o["nc4_agreement"]["diff"].is_null());
    EXPECT_EQ(o["gnc2_pairs"]["diff"], json(-3));
    EXPECT_TRUE(o["gnc2_pairs"]["diff"].is_number_integer());
    // As read from files (a parser makes non-negative integers unsigned): still integer differences.
    const json cp = compare_reports(json::parse(a.dump()), json::parse(b.dump()), 10);
    EXPECT_EQ(cp["sections"]["overall_analysis"]["metrics"]["gnc2_pairs"]["diff"].dump(), "-3");
    EXPECT_EQ(cp["sections"]["summary"]["metrics"]["total_tokens_analyzed"]["diff"].dump(), "0");
    EXPECT_EQ(cp["sections"]["overall_analysis"]["metrics"]["overall_gnc2"]["diff"].get<double>(), 0.75 - 0.25);
    EXPECT_FALSE(o.contains("notes"));  // not a number
    EXPECT_FALSE(o.contains("unc3_note"));
    EXPECT_FALSE(o["new_metric"].contains("a"));
    EXPECT_EQ(o["new_metric"]["only_in"], "b");
    EXPECT_TRUE(o["new_metric"]["diff"].is_null());
    const json& s = c["sections"]["summary"]["metrics"];
    EXPECT_EQ(s["old_metric"]["only_in"], "a");
    EXPECT_EQ(s["avg_svd_entropy"]["diff"].get<double>(), 0.0);
    EXPECT_TRUE(s["std_svd_entropy"]["diff"].is_null());
    EXPECT_FALSE(c["sections"].contains("counts"));  // not a compared section
    EXPECT_FALSE(c["sections"].contains("window_summary"));  // in neither
    EXPECT_TRUE(c["same_shape"].get<bool>());
    EXPECT_TRUE(c["notes"].empty());
    EXPECT_EQ(c["a"]["name"], "a.json");
    EXPECT_EQ(c["b"]["tokens"], 1);
}

TEST(Compare, WindowSummaryInOneOrBoth) {
    json a = report(10, 4, {});
    a["window_summary"] = nullptr;  // a run without window metrics: the section is null, compared as absent
    json b = report(10, 4, {});
    EXPECT_FALSE(compare_reports(a, b, 10)["sections"].contains("window_summary"));
    b["window_summary"] = {{"overall_avg_svd_entropy", 3.0}, {"avg_chunk_idx_10_svd_entropy", 2.0}, {"avg_chunk_idx_2_svd_entropy", 1.0}};
    json c = compare_reports(a, b, 10);
    EXPECT_EQ(c["sections"]["window_summary"]["in"], "b");
    EXPECT_EQ(c["sections"]["window_summary"]["metrics"]["overall_avg_svd_entropy"]["only_in"], "b");
    ASSERT_EQ(c["notes"].size(), 1u);
    EXPECT_NE(c["notes"][0].get<std::string>().find("window_summary is only in B"), std::string::npos);
    const std::string text = collapse::internal::format_comparison(c);
    EXPECT_NE(text.find("absent"), std::string::npos) << text;
    // Window indices in numeric order.
    EXPECT_LT(text.find("avg_chunk_idx_2_"), text.find("avg_chunk_idx_10_")) << text;

    a["window_summary"] = {{"overall_avg_svd_entropy", 2.0}, {"valid_samples_for_summary", 4}};
    c = compare_reports(a, b, 10);
    EXPECT_EQ(c["sections"]["window_summary"]["in"], "both");
    EXPECT_EQ(c["sections"]["window_summary"]["metrics"]["overall_avg_svd_entropy"]["diff"].get<double>(), 1.0);
    EXPECT_EQ(c["sections"]["window_summary"]["metrics"]["valid_samples_for_summary"]["only_in"], "a");
    EXPECT_TRUE(c["notes"].empty());
}

TEST(Compare, TopTokensByAbsoluteMoveTiesByIdAndOnlyInCounts) {
    // Moves: 7: +0.5, 3: -0.5 (tie with 7: 3 first), 9: +0.25, 2: -1.0, 4: 0; 5: null in B (not
    // ranked, still in both); 11 and 12 only in A, 13 only in B.
    const json a = report(20, 4, {{2, 3.0, 10}, {3, 1.0, 11}, {4, 1.0, 12}, {5, 1.0, 13}, {7, 1.0, 14}, {9, 1.0, 15}, {11, 1.0, 2}, {12, 1.0, 2}});
    const json b = report(20, 4, {{2, 2.0, 20}, {3, 0.5, 21}, {4, 1.0, 22}, {5, nullptr, 23}, {7, 1.5, 24}, {9, 1.25, 25}, {13, 1.0, 3}});
    json c = compare_reports(a, b, 4);
    const json& t = c["tokens"];
    EXPECT_EQ(t["in_both"], 6);
    EXPECT_EQ(t["only_in_a"], 2);
    EXPECT_EQ(t["only_in_b"], 1);
    EXPECT_EQ(t["ranked"], 5);
    const json& m = t["largest_moves"];
    ASSERT_EQ(m.size(), 4u);
    const int want[] = {2, 3, 7, 9};
    for (size_t i = 0; i < 4; ++i) EXPECT_EQ(m[i]["token"], want[i]) << m.dump();
    EXPECT_EQ(m[0]["diff"].get<double>(), -1.0);
    EXPECT_EQ(m[0]["a"].get<double>(), 3.0);
    EXPECT_EQ(m[0]["num_samples_a"], 10);
    EXPECT_EQ(m[0]["num_samples_b"], 20);
    // More than there are: all of them.
    c = compare_reports(a, b, 100);
    EXPECT_EQ(c["tokens"]["largest_moves"].size(), 5u);
    EXPECT_EQ(c["tokens"]["largest_moves"][4]["token"], 4);
    c = compare_reports(a, b, 1);
    ASSERT_EQ(c["tokens"]["largest_moves"].size(), 1u);
    EXPECT_EQ(c["tokens"]["largest_moves"][0]["token"], 2);
    const std::string text = collapse::internal::format_comparison(c);
    EXPECT_NE(text.find("6 in both, 2 only in A, 1 only in B"), std::string::npos) << text;
}

TEST(Compare, DifferentVAndDCompareWhatTheyShare) {
    const json a = report(10, 4, {{1, 1.0, 5}, {8, 2.0, 5}});
    const json b = report(30, 6, {{1, 1.5, 5}, {25, 2.0, 5}});
    const json c = compare_reports(a, b, 10, "small.json", "big.json");
    EXPECT_FALSE(c["same_shape"].get<bool>());
    ASSERT_EQ(c["notes"].size(), 1u);
    const std::string note = c["notes"][0];
    EXPECT_NE(note.find("V and d"), std::string::npos) << note;
    EXPECT_NE(note.find("V = 10, d = 4"), std::string::npos) << note;
    EXPECT_NE(note.find("V = 30, d = 6"), std::string::npos) << note;
    EXPECT_EQ(c["tokens"]["in_both"], 1);
    EXPECT_EQ(c["tokens"]["only_in_a"], 1);
    EXPECT_EQ(c["tokens"]["only_in_b"], 1);
    EXPECT_EQ(c["sections"]["overall_analysis"]["metrics"]["overall_gnc2"]["diff"].get<double>(), 0.0);
    const std::string text = collapse::internal::format_comparison(c);
    EXPECT_EQ(text.rfind("A: small.json (V = 10, d = 4, 2 tokens)\nB: big.json (V = 30, d = 6, 2 tokens)\nnote: ", 0), 0u) << text;
    // Only V differs.
    const json c2 = compare_reports(a, report(30, 4, {}), 10);
    EXPECT_NE(c2["notes"][0].get<std::string>().find("differ in V "), std::string::npos);
}

TEST(Compare, TextColumnsAlign) {
    json a = report(10, 4, {{1, 1.0, 5}});
    json b = report(10, 4, {{1, 1.5, 50000}});
    b["overall_analysis"]["overall_gnc2"] = 123456.789;
    const std::string text = collapse::internal::format_comparison(compare_reports(a, b, 10));
    // Every row of the metric table ends at the same column.
    std::istringstream in(text);
    std::string line;
    size_t width = 0, rows = 0;
    bool table = false;
    while (std::getline(in, line)) {
        if (line.rfind("overall_analysis", 0) == 0) table = true;
        if (line.rfind("tokens:", 0) == 0) break;
        if (!table || line.empty()) continue;
        if (width == 0) width = line.size();
        EXPECT_EQ(line.size(), width) << "'" << line << "'\n" << text;
        ++rows;
    }
    EXPECT_GT(rows, 5u);
    EXPECT_NE(text.find("null"), std::string::npos);
}

TEST(Compare, Refusals) {
    const json good = report(10, 4, {{1, 1.0, 5}});
    auto refused = [&](json bad, const std::string& needle) {
        const auto [st, msg] = error_of([&] { compare_reports(good, bad, 10, "A.json", "B.json"); });
        EXPECT_EQ(st, COLLAPSE_ERR_BAD_INPUT) << msg;
        EXPECT_NE(msg.find("B.json is not a collapse report"), std::string::npos) << msg;
        EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    };
    refused(json::array(), "not a JSON object");
    for (const char* sec : {"overall_analysis", "summary", "token_analysis", "engine"}) {
        json b = good;
        b.erase(sec);
        refused(b, std::string("no ") + sec + " section");
        b[sec] = 3;
        refused(b, std::string(sec) + " section is not an object");
    }
    json b = good;
    b["engine"].erase("dim");
    refused(b, "engine.dim");
    b = good;
    b["engine"]["num_classes"] = "ten";
    refused(b, "engine.num_classes");
    b = good;
    b["window_summary"] = json::array();
    refused(b, "window_summary section is not an object or null");
    b = good;
    b["token_analysis"]["x7"] = json::object();
    refused(b, "'x7' is not a token id");
    b = good;
    b["token_analysis"]["7"] = 1;
    refused(b, "token_analysis.7 is not an object");
    b = good;
    b["token_analysis"]["1"]["svd_entropy"] = "high";
    refused(b, "token_analysis.1.svd_entropy");
    // A first, named as A.
    const auto [st, msg] = error_of([&] { compare_reports(json::object(), good, 10, "A.json", "B.json"); });
    EXPECT_NE(msg.find("A.json is not a collapse report"), std::string::npos) << msg;
    for (int64_t top : {0, -1}) {
        const auto [st2, msg2] = error_of([&] { compare_reports(good, good, top); });
        EXPECT_EQ(st2, COLLAPSE_ERR_INVALID_ARGUMENT);
        EXPECT_NE(msg2.find("at least 1"), std::string::npos) << msg2;
    }
}

class CompareFiles : public testutil::TempDirTest {};

TEST_F(CompareFiles, ReadReportFileErrorsNameTheFile) {
    using collapse::internal::read_report_file;
    auto write = [&](const std::string& name, const std::string& text) {
        std::ofstream(path(name)) << text;
        return path(name);
    };
    auto expect = [&](const std::string& p, collapse_status want, const std::string& needle) {
        const auto [st, msg] = error_of([&] { read_report_file(p); });
        EXPECT_EQ(st, want) << msg;
        EXPECT_NE(msg.find(p), std::string::npos) << msg;
        EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    };
    expect(path("missing.json"), COLLAPSE_ERR_IO, "No such file");
    expect(dir_, COLLAPSE_ERR_IO, "directory");
    expect(write("text.json", "not json {"), COLLAPSE_ERR_IO, "not JSON");
    expect(write("empty.json", ""), COLLAPSE_ERR_IO, "not JSON");
    expect(write("other.json", R"({"summary": {}})"), COLLAPSE_ERR_BAD_INPUT, "no overall_analysis section");
    const json good = report(10, 4, {{1, 1.0, 5}});
    EXPECT_EQ(read_report_file(write("good.json", good.dump())), good);
}

// The bounded read behind reports and configs (base/file.hpp).
TEST_F(CompareFiles, ReadRegularFileRefusesMoreThanItsLimit) {
    std::ofstream(path("f.txt")) << std::string(2048, 'x');
    EXPECT_EQ(collapse::internal::read_regular_file(path("f.txt"), "report", 2048), std::string(2048, 'x'));
    const auto [st, msg] = error_of([&] { collapse::internal::read_regular_file(path("f.txt"), "report", 1024); });
    EXPECT_EQ(st, COLLAPSE_ERR_IO);
    EXPECT_NE(msg.find("cannot read report " + path("f.txt") + ": it has 2048 bytes, more than the limit of 1024 (1 KiB)"),
              std::string::npos)
        << msg;
}

}  // namespace
}  // namespace test_compare
