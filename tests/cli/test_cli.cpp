// The `collapse` command line, run as a separate process (COLLAPSE_CLI_PATH) in a temporary folder:
// synth -> analyze round trips in every input layout, options, and every error path (non-zero
// exit, one line "collapse: error: ..." on stderr naming the problem).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/dtype.hpp"
#include "io/tensor_file.hpp"

#ifndef COLLAPSE_CLI_PATH
#define COLLAPSE_CLI_PATH ""
#endif

#include "common/capi_helpers.hpp"
#include "common/cli_fixture.hpp"

namespace test_cli {
namespace {

using testutil::CliRun;
using testutil::quote;
using testutil::slurp;
using testutil::spit;

namespace fs = std::filesystem;
using nlohmann::json;



class Cli : public testutil::CliTest {};

// Numbers within rel (1e-12 absolute near 0), everything else equal; timings are not compared.
void expect_close(const json& a, const json& b, double rel, const std::string& at = "") {
    if (a.is_number() && b.is_number()) {
        const double x = a.get<double>(), y = b.get<double>();
        EXPECT_LE(std::fabs(x - y), std::max(1e-12, rel * std::max(std::fabs(x), std::fabs(y)))) << at << ": " << x << " vs " << y;
        return;
    }
    ASSERT_EQ(a.type(), b.type()) << at << ": " << a.dump() << " vs " << b.dump();
    if (a.is_object()) {
        std::set<std::string> keys;
        for (auto it = a.begin(); it != a.end(); ++it) keys.insert(it.key());
        for (auto it = b.begin(); it != b.end(); ++it) keys.insert(it.key());
        for (const auto& k : keys) {
            if (k == "timings_seconds") continue;
            ASSERT_TRUE(a.contains(k) && b.contains(k)) << at << "/" << k << " in only one report";
            expect_close(a[k], b[k], rel, at + "/" + k);
        }
    } else if (a.is_array()) {
        ASSERT_EQ(a.size(), b.size()) << at;
        for (size_t i = 0; i < a.size(); ++i) expect_close(a[i], b[i], rel, at + "/" + std::to_string(i));
    } else {
        EXPECT_EQ(a, b) << at;
    }
}

void expect_same_metrics(const json& a, const json& b, double rel) {
    for (const char* sec : {"summary", "overall_analysis", "token_analysis"}) {
        SCOPED_TRACE(sec);
        // The sequence layout has windows, untagged rows do not: their notes differ
        // (test_cli_windows.cpp compares the windows of the two layouts).
        json x = a[sec], y = b[sec];
        for (json* j : {&x, &y})
            if (j->contains("notes"))
                for (const char* k : {"sequence_analysis", "window_summary"}) (*j)["notes"].erase(k);
        expect_close(x, y, rel, sec);
    }
}

std::vector<int32_t> read_i32(const std::string& file) {
    const collapse::internal::io::Tensor t = collapse::internal::io::open_npy(file);
    std::vector<int32_t> v((size_t)t.numel());
    for (int64_t i = 0; i < t.numel(); ++i) v[(size_t)i] = (int32_t)collapse::internal::load_as_int(t.data(), t.dtype, i);
    return v;
}

// ------------------------------------------------------------------------------------ help

TEST_F(Cli, HelpExitsZero) {
    CliRun r = run("--help");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("analyze"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("synth"), std::string::npos) << r.out;
    r = run("analyze --help");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("--features"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("--batch-rows"), std::string::npos) << r.out;
    r = run("synth --help");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.out.find("--output-dir"), std::string::npos) << r.out;
    // No subcommand, or an unknown option: a usage error, not success.
    EXPECT_NE(run("").status, 0);
    EXPECT_NE(run("analyze --no-such-option").status, 0);
}

// ------------------------------------------------------------------------------------ round trips

TEST_F(Cli, NpyAndSafetensorsGiveIdenticalMetrics) {
    synth("npy", "--format npy");
    synth("st", "--format safetensors");
    ASSERT_TRUE(fs::exists(path("npy/features.npy")));
    ASSERT_TRUE(fs::exists(path("st/synth.safetensors")));
    run_ok("analyze --quiet --features npy/features.npy --labels npy/labels.npy --classifier npy/classifier.npy -o a.json");
    run_ok("analyze --quiet --safetensors st/synth.safetensors --classifier-key classifier -o b.json");
    const json a = report("a.json"), b = report("b.json");
    // The same bytes in the same order: the same numbers, exactly.
    expect_same_metrics(a, b, 0.0);
    expect_close(a["counts"], b["counts"], 0.0);
    expect_close(a["config"], b["config"], 0.0);
    EXPECT_EQ(a["counts"]["rows_seen"], 2000);
    EXPECT_TRUE(a["engine"]["classifier"].get<bool>());
    EXPECT_FALSE(a["overall_analysis"]["overall_unc3"].is_null());
}

TEST_F(Cli, ConfigFileAndBatchRows) {
    synth("d", "");
    spit(path("c.yaml"),
         "# test config\n"
         "min_samples_per_token: 5\n"
         "exclude_token_ids: [0, 3]\n"
         "cdnv_power: 2\n"
         "compute_nc4: true\n"
         "svd_mode: sampled\n"
         "svd_max_rows_per_token: 16\n");
    const std::string in = "--features d/features.npy --labels d/labels.npy --classifier d/classifier.npy --config c.yaml";
    run_ok("analyze --quiet " + in + " -o whole.json");
    run_ok("analyze --quiet " + in + " --batch-rows 137 -o batched.json");
    const json whole = report("whole.json"), batched = report("batched.json");
    EXPECT_EQ(whole["config"]["min_samples_per_token"], 5);
    EXPECT_EQ(whole["config"]["exclude_token_ids"], json::array({0, 3}));
    EXPECT_EQ(whole["config"]["cdnv_power"], 2.0);
    EXPECT_EQ(whole["config"]["svd_mode"], "sampled");
    EXPECT_EQ(batched["config"]["batch_rows"], 137);
    EXPECT_GT(whole["counts"]["rows_excluded"].get<int64_t>(), 0);
    EXPECT_FALSE(whole["overall_analysis"]["nc4_agreement"].is_null()) << "sampled mode + nc4: the CLI runs a second pass";
    for (const auto& [id, t] : whole["token_analysis"].items()) {
        EXPECT_NE(id, "0");
        EXPECT_NE(id, "3");
        EXPECT_GE(t["num_samples"].get<int64_t>(), 5);
    }
    // docs/METRICS.md "Accuracy contract": results do not depend on how rows are split into batches.
    expect_same_metrics(whole, batched, 1e-9);
    EXPECT_EQ(whole["counts"], batched["counts"]);
    EXPECT_EQ(batched["engine"]["batches"], (2000 + 136) / 137);
}

TEST_F(Cli, QuietPrintsNothing) {
    synth("d", "");
    const CliRun r = run_ok("analyze --quiet --features d/features.npy --labels d/labels.npy -o r.json");
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err, "");
    EXPECT_TRUE(fs::exists(path("r.json")));
    // Without --quiet the headline goes to stdout.
    const CliRun loud = run_ok("analyze --features d/features.npy --labels d/labels.npy -o r2.json");
    EXPECT_NE(loud.out.find("report written to r2.json"), std::string::npos) << loud.out;
}

// The sequence layout [B, T, d] + [B, T] against the rows it stands for: row b*T+t with label
// input_ids[b, t+1], kept where mask[b, t+1] != 0.
class CliSequences : public Cli {
protected:
    static constexpr int64_t kT = 20;

    void SetUp() override {
        Cli::SetUp();
        if (IsSkipped()) return;
        synth("s", "--sequences 20");
        ASSERT_TRUE(fs::exists(path("s/hidden_states.npy")));
        ASSERT_TRUE(fs::exists(path("s/input_ids.npy")));
        const collapse::internal::io::Tensor h = collapse::internal::io::open_npy(path("s/hidden_states.npy"));
        ASSERT_EQ(h.shape.size(), 3u);
        B_ = h.shape[0];
        ASSERT_EQ(h.shape[1], kT);
        d_ = h.shape[2];
        ASSERT_EQ(h.dtype, COLLAPSE_F32);
        hidden_.assign(static_cast<const float*>(h.data()), static_cast<const float*>(h.data()) + B_ * kT * d_);
        ids_ = read_i32(path("s/input_ids.npy"));
        ASSERT_EQ((int64_t)ids_.size(), B_ * kT);
    }

    // Writes the rows-layout equivalent of the sequences under `mask` (empty = all kept).
    void write_rows(const std::vector<uint8_t>& mask, const std::string& fname, const std::string& lname) {
        std::vector<float> x;
        std::vector<int32_t> y;
        for (int64_t b = 0; b < B_; ++b)
            for (int64_t t = 0; t + 1 < kT; ++t) {
                if (!mask.empty() && mask[(size_t)(b * kT + t + 1)] == 0) continue;
                x.insert(x.end(), hidden_.begin() + (b * kT + t) * d_, hidden_.begin() + (b * kT + t + 1) * d_);
                y.push_back(ids_[(size_t)(b * kT + t + 1)]);
            }
        const int64_t n = (int64_t)y.size();
        collapse::internal::io::write_npy(path(fname), COLLAPSE_F32, {n, d_}, x.data());
        collapse::internal::io::write_npy(path(lname), COLLAPSE_I32, {n}, y.data());
    }

    int64_t B_ = 0, d_ = 0;
    std::vector<float> hidden_;
    std::vector<int32_t> ids_;
};

TEST_F(CliSequences, WithoutMaskMatchesRows) {
    write_rows({}, "rows_x.npy", "rows_y.npy");
    const std::string V = " --num-classes 40";
    run_ok("analyze --quiet --hidden s/hidden_states.npy --input-ids s/input_ids.npy" + V + " -o seq.json");
    run_ok("analyze --quiet --hidden s/hidden_states.npy --input-ids s/input_ids.npy --batch-rows 50" + V + " -o seq_b.json");
    run_ok("analyze --quiet --features rows_x.npy --labels rows_y.npy" + V + " -o rows.json");
    const json seq = report("seq.json"), seq_b = report("seq_b.json"), rows = report("rows.json");
    EXPECT_EQ(seq["counts"]["rows_seen"], B_ * (kT - 1));
    EXPECT_EQ(seq["counts"], rows["counts"]);
    expect_same_metrics(seq, rows, 1e-12);
    expect_same_metrics(seq, seq_b, 1e-9);
    EXPECT_EQ(seq_b["counts"], rows["counts"]);
    EXPECT_GT(seq_b["engine"]["batches"].get<int64_t>(), 1);
}

TEST_F(CliSequences, WithAttentionMaskMatchesKeptRows) {
    // Right padding: sequence b keeps its first len_b positions; a few holes inside as well.
    std::vector<uint8_t> mask((size_t)(B_ * kT), 1);
    std::mt19937 rng(9);
    for (int64_t b = 0; b < B_; ++b) {
        const int64_t len = 2 + (int64_t)(rng() % (kT - 1));
        for (int64_t t = len; t < kT; ++t) mask[(size_t)(b * kT + t)] = 0;
        if (b % 7 == 0) mask[(size_t)(b * kT + 1)] = 0;
    }
    collapse::internal::io::write_npy(path("mask.npy"), COLLAPSE_U8, {B_, kT}, mask.data());
    write_rows(mask, "rows_x.npy", "rows_y.npy");
    int64_t masked = 0;
    for (int64_t b = 0; b < B_; ++b)
        for (int64_t t = 1; t < kT; ++t) masked += mask[(size_t)(b * kT + t)] == 0;
    ASSERT_GT(masked, 0);
    const std::string V = " --num-classes 40";
    run_ok("analyze --quiet --hidden s/hidden_states.npy --input-ids s/input_ids.npy --attention-mask mask.npy" + V +
           " -o seq.json");
    run_ok("analyze --quiet --features rows_x.npy --labels rows_y.npy" + V + " -o rows.json");
    const json seq = report("seq.json"), rows = report("rows.json");
    EXPECT_EQ(seq["counts"]["rows_seen"], B_ * (kT - 1));
    EXPECT_EQ(seq["counts"]["rows_masked"], masked);
    EXPECT_EQ(rows["counts"]["rows_seen"], B_ * (kT - 1) - masked);
    for (const char* k : {"rows_kept", "rows_excluded", "classes_seen", "classes_kept", "classes_below_min"})
        EXPECT_EQ(seq["counts"][k], rows["counts"][k]) << k;
    expect_same_metrics(seq, rows, 1e-12);

    // An int64 mask of the same values gives the same report.
    std::vector<int64_t> mask64(mask.begin(), mask.end());
    collapse::internal::io::write_npy(path("mask64.npy"), COLLAPSE_I64, {B_, kT}, mask64.data());
    run_ok("analyze --quiet --hidden s/hidden_states.npy --input-ids s/input_ids.npy --attention-mask mask64.npy" + V +
           " -o seq64.json");
    expect_same_metrics(seq, report("seq64.json"), 0.0);
}

// ------------------------------------------------------------------------------------ default run

TEST_F(Cli, SyntheticRunsTheBuiltInData) {
    // The built-in synthetic set (200,000 rows, d = 256): the slowest test here, some seconds.
    const CliRun r = run_ok("analyze --synthetic -o default.json");
    EXPECT_NE(r.out.find("report written to default.json"), std::string::npos) << r.out;
    for (const char* line : {"rows kept", "overall_svd_entropy", "overall_gnc2", "overall_unc3", "avg_svd_entropy"})
        EXPECT_NE(r.out.find(line), std::string::npos) << "headline lacks " << line << ":\n" << r.out;
    const json doc = report("default.json");
    EXPECT_EQ(doc["counts"]["rows_seen"], 200000);
    EXPECT_EQ(doc["engine"]["dim"], 256);
    EXPECT_EQ(doc["engine"]["num_classes"], 2048);
    EXPECT_FALSE(doc["overall_analysis"]["overall_gnc2"].is_null());
}

// ------------------------------------------------------------------------------------ report file

TEST_F(Cli, ReportIsValidJsonWithCountsOfTheInput) {
    // A hand-made input whose counts are known: V = 9, class 8 never occurs, class 7 once.
    const int64_t n = 301, d = 5;
    std::vector<float> x((size_t)(n * d));
    std::vector<int32_t> y((size_t)n);
    std::mt19937 rng(3);
    std::normal_distribution<float> g;
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = i == 0 ? 7 : (int32_t)(rng() % 7);
        for (int64_t k = 0; k < d; ++k) x[(size_t)(i * d + k)] = g(rng) + (float)(y[(size_t)i] == k);
    }
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    run_ok("analyze --quiet --features x.npy --labels y.npy --num-classes 9 -o r.json");
    const std::string text = slurp(path("r.json"));
    json doc;
    ASSERT_NO_THROW(doc = json::parse(text)) << text.substr(0, 200);
    for (const char* sec : {"summary", "counts", "overall_analysis", "token_analysis"})
        ASSERT_TRUE(doc.contains(sec) && doc[sec].is_object()) << "missing section " << sec;
    std::map<int32_t, int64_t> freq;
    for (int32_t v : y) ++freq[v];
    int64_t kept_rows = 0, kept_classes = 0, below = 0;
    for (const auto& [c, k] : freq) {
        if (k >= 2) kept_rows += k, ++kept_classes;
        else ++below;
    }
    const json& c = doc["counts"];
    EXPECT_EQ(c["rows_seen"], n);
    EXPECT_EQ(c["rows_masked"], 0);
    EXPECT_EQ(c["rows_excluded"], 0);
    EXPECT_EQ(c["rows_kept"], kept_rows);
    EXPECT_EQ(c["classes_seen"], (int64_t)freq.size());
    EXPECT_EQ(c["classes_kept"], kept_classes);
    EXPECT_EQ(c["classes_below_min"], below);
    EXPECT_EQ(doc["summary"]["total_tokens_analyzed"], kept_classes);
    EXPECT_EQ(doc["token_analysis"].size(), (size_t)kept_classes);
    for (const auto& [c2, k] : freq)
        if (k >= 2) {
            EXPECT_EQ(doc["token_analysis"][std::to_string(c2)]["num_samples"], k) << c2;
        }
    EXPECT_FALSE(doc["token_analysis"].contains("7"));
    EXPECT_EQ(doc["engine"]["num_classes"], 9);
}

// ------------------------------------------------------------------------------------ errors

TEST_F(Cli, MissingFile) {
    synth("d", "");
    expect_error("analyze --features nope.npy --labels d/labels.npy", {"nope.npy"});
    expect_error("analyze --features d/features.npy --labels d/labels.npy --classifier missing_w.npy", {"missing_w.npy"});
    expect_error("analyze --safetensors nothing.safetensors", {"nothing.safetensors"});
    expect_error("analyze --features d/features.npy --labels d/labels.npy --config no.yaml", {"no.yaml"});
}

TEST_F(Cli, TruncatedNpy) {
    synth("d", "");
    const std::string bytes = slurp(path("d/features.npy"));
    spit(path("cut.npy"), bytes.substr(0, bytes.size() / 2));
    expect_error("analyze --features cut.npy --labels d/labels.npy", {"cut.npy", "truncated"});
    spit(path("cut_header.npy"), bytes.substr(0, 20));
    expect_error("analyze --features cut_header.npy --labels d/labels.npy", {"cut_header.npy", "truncated"});
    spit(path("empty.npy"), "");
    expect_error("analyze --features empty.npy --labels d/labels.npy", {"empty.npy"});
}

TEST_F(Cli, FortranOrderNpy) {
    synth("d", "");
    std::string bytes = slurp(path("d/features.npy"));
    const size_t at = bytes.find("'fortran_order': False");
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at, std::strlen("'fortran_order': False"), "'fortran_order': True ");
    spit(path("fortran.npy"), bytes);
    expect_error("analyze --features fortran.npy --labels d/labels.npy", {"fortran.npy", "Fortran"});
}

TEST_F(Cli, WrongSafetensorsKeyListsNames) {
    synth("st", "--format safetensors");
    expect_error("analyze --safetensors st/synth.safetensors --features-key feats",
                 {"feats", "synth.safetensors", "features", "labels", "classifier"});
    expect_error("analyze --safetensors st/synth.safetensors --labels-key tokens", {"tokens", "labels"});
}

TEST_F(Cli, LabelsLengthMismatch) {
    const int64_t n = 100, d = 4;
    std::vector<float> x((size_t)(n * d), 0.5f);
    std::vector<int32_t> y(90, 1);
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {90}, y.data());
    expect_error("analyze --features x.npy --labels y.npy", {"labels", "90", "100"});
    // Sequence layout: input_ids of another shape than hidden's [B, T].
    std::vector<int32_t> ids(5 * 19, 1);
    collapse::internal::io::write_npy(path("h.npy"), COLLAPSE_F32, {5, 20, d}, x.data());
    collapse::internal::io::write_npy(path("ids.npy"), COLLAPSE_I32, {5, 19}, ids.data());
    expect_error("analyze --hidden h.npy --input-ids ids.npy", {"ids.npy", "[5, 20]"});
}

TEST_F(Cli, BadConfigKey) {
    synth("d", "");
    spit(path("bad.yaml"), "# comment\nmin_samples_per_token: 3\nmin_sample_per_tokn: 4\n");
    expect_error("analyze --features d/features.npy --labels d/labels.npy --config bad.yaml",
                 {"bad.yaml", ":3", "min_sample_per_tokn", "min_samples_per_token"});
    spit(path("type.yaml"), "svd_mode: exact\nmin_samples_per_token: many\n");
    expect_error("analyze --features d/features.npy --labels d/labels.npy --config type.yaml",
                 {"type.yaml", ":2", "min_samples_per_token"});
}

TEST_F(Cli, LabelOutOfRange) {
    const int64_t n = 40, d = 3;
    std::vector<float> x((size_t)(n * d), 0.25f);
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) y[(size_t)i] = (int32_t)(i % 5);
    y[13] = 7;
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    expect_error("analyze --features x.npy --labels y.npy --num-classes 5 -o r.json", {"label 7", "row 13", "[0, 5)"});
    EXPECT_FALSE(fs::exists(path("r.json"))) << "a failed run must not leave a report";
    y[13] = -3;
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    expect_error("analyze --features x.npy --labels y.npy --num-classes 5", {"label -3", "row 13"});
}

// ENGINE BUG (src/cli/analyze_cmd.cpp, run_analyze's batch loop / feed(): the session's message is
// passed through unchanged, and src/core/batch.cpp accept_rows names the row WITHIN THE BATCH).
// With --batch-rows 10, a bad label at file row 13 is reported as "label 7 at row 3 of the batch
// is outside [0, 5)": the user cannot find the row in the file, nor which batch it was.
// Expected: the message names the row of the file (13), e.g. by the CLI adding the batch's first
// row to the batch-relative index (or naming "batch 1, row 3" plus the file row).
TEST_F(Cli, LabelOutOfRangeNamesTheFileRowWhenBatched) {
    const int64_t n = 40, d = 3;
    std::vector<float> x((size_t)(n * d), 0.25f);
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) y[(size_t)i] = (int32_t)(i % 5);
    y[13] = 7;
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    expect_error("analyze --features x.npy --labels y.npy --num-classes 5 --batch-rows 10", {"label 7", "13"});
}

TEST_F(Cli, ClassifierRowsDifferFromV) {
    synth("d", "");  // 40 classes, d = 8
    std::vector<float> w(7 * 8, 0.1f);
    collapse::internal::io::write_npy(path("w7.npy"), COLLAPSE_F32, {7, 8}, w.data());
    expect_error("analyze --features d/features.npy --labels d/labels.npy --classifier w7.npy --num-classes 40",
                 {"classifier", "7 rows", "V = 40"});
    // Without --num-classes V comes from the classifier, and then labels >= 7 are out of range.
    expect_error("analyze --features d/features.npy --labels d/labels.npy --classifier w7.npy", {"label", "[0, 7)"});
    // Wrong width. The CLI sets the classifier first, so the session's width comes from it and the
    // features are what gets refused ("features: width 8 differs from the session's feature width 9";
    // the message does not say the 9 came from the classifier).
    std::vector<float> w9(40 * 9, 0.1f);
    collapse::internal::io::write_npy(path("w9.npy"), COLLAPSE_F32, {40, 9}, w9.data());
    expect_error("analyze --features d/features.npy --labels d/labels.npy --classifier w9.npy", {"width 8", "9"});
}

TEST_F(Cli, NonFiniteFeatureNamesRowAndPolicy) {
    const int64_t n = 30, d = 4;
    std::vector<float> x((size_t)(n * d), 0.5f);
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) y[(size_t)i] = (int32_t)(i % 3), x[(size_t)(i * d + i % d)] = (float)i;
    x[(size_t)(17 * d + 2)] = std::nanf("");
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    expect_error("analyze --features x.npy --labels y.npy", {"non-finite", "row 17", "column 2", "skip_row"});
    spit(path("skip.yaml"), "nonfinite_policy: skip_row\n");
    run_ok("analyze --quiet --features x.npy --labels y.npy --config skip.yaml -o r.json");
    EXPECT_EQ(report("r.json")["counts"]["rows_nonfinite"], 1);
}

TEST_F(Cli, ContinueOnErrorCountsFailedBatches) {
    const int64_t n = 40, d = 3;
    std::vector<float> x((size_t)(n * d));
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = (int32_t)(i % 4);
        for (int64_t k = 0; k < d; ++k) x[(size_t)(i * d + k)] = (float)((i * 7 + k * 3) % 11);
    }
    y[25] = 99;
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    spit(path("c.yaml"), "continue_on_error: true\n");
    const CliRun r = run("analyze --quiet --features x.npy --labels y.npy --num-classes 4 --batch-rows 10 --config c.yaml -o r.json");
    // Rows were dropped: the report is written, but the exit status says so (3), and so does a
    // summary line even under --quiet.
    EXPECT_EQ(r.status, 3) << r.err;
    EXPECT_NE(r.err.find("skipped"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("WARNING: 1 batch(es) with 10 rows were skipped"), std::string::npos) << r.err;
    const json doc = report("r.json");
    EXPECT_EQ(doc["counts"]["batches_failed"], 1);
    EXPECT_EQ(doc["counts"]["rows_skipped"], 10);
    EXPECT_EQ(doc["counts"]["rows_seen"], 30);
}

}  // namespace
}  // namespace test_cli
