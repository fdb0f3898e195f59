// The command line never analyses the wrong rows silently: every flag acts or is refused, reports
// record what was analysed, a resume refuses another input, rows dropped under continue_on_error
// change the exit status, and signals end a run cleanly. Each case is what a new user hit.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli_fixture.hpp"
#include "io/tensor_file.hpp"

namespace {

using nlohmann::json;
using testutil::CliRun;
using testutil::quote;
namespace fs = std::filesystem;
namespace io = collapse::internal::io;

class CliTrust : public testutil::CliTest {
protected:
    void SetUp() override {
        testutil::CliTest::SetUp();
        if (IsSkipped()) return;
        synth("A", "");
        synth("B", "--collapse 0.3");  // another data set of the same shape
        synth("S", "--format safetensors");  // A's rows in one .safetensors file
    }
    std::string rows(const std::string& d) const { return "--features " + d + "/features.npy --labels " + d + "/labels.npy"; }
};

TEST_F(CliTrust, EmptyPathIsAnErrorNotTheBuiltInData) {
    expect_error("analyze -q --features \"\" -o trap.json", {"--features", "empty"});
    expect_error("analyze -q " + rows("A") + " --classifier \"\" -o trap.json", {"--classifier", "empty"});
    EXPECT_FALSE(fs::exists(path("trap.json")));
}

TEST_F(CliTrust, NoInputNeedsSynthetic) {
    expect_error("analyze -q -o trap.json", {"no input", "--synthetic"});
    expect_error("analyze -q --synthetic " + rows("A") + " -o trap.json", {"--synthetic takes no input files"});
}

TEST_F(CliTrust, ReportRecordsTheInput) {
    run_ok("analyze -q " + rows("A") + " --classifier A/classifier.npy -o a.json");
    const json in = report("a.json")["input"];
    EXPECT_EQ(in["kind"], "npy");
    ASSERT_EQ(in["tensors"].size(), 2u);
    EXPECT_EQ(in["tensors"][0]["role"], "features");
    EXPECT_EQ(in["tensors"][0]["path"], "A/features.npy");
    EXPECT_EQ(in["tensors"][0]["shape"], json({2000, 8}));
    EXPECT_EQ(in["tensors"][0]["dtype"], "float32");
    EXPECT_EQ(in["tensors"][0]["file_bytes"], (int64_t)fs::file_size(path("A/features.npy")));
    EXPECT_EQ(in["tensors"][1]["role"], "labels");
    EXPECT_NE(report("a.json")["run"]["command"].get<std::string>().find("--classifier A/classifier.npy"), std::string::npos);
    // Another data set, another fingerprint; the same one, the same fingerprint.
    run_ok("analyze -q " + rows("B") + " -o b.json");
    run_ok("analyze -q " + rows("A") + " -o a2.json");
    EXPECT_NE(report("b.json")["input"]["fingerprint"], in["fingerprint"]);
    EXPECT_EQ(report("a2.json")["input"]["fingerprint"], in["fingerprint"]);
    EXPECT_NE(report("b.json")["input"]["tensors"][0]["fingerprint"], in["tensors"][0]["fingerprint"]);
}

TEST_F(CliTrust, ResumeRefusesAnotherInput) {
    run_ok("analyze -q " + rows("A") + " --checkpoint a.ckpt -o a.json");
    const CliRun r = run("analyze -q " + rows("B") + " --checkpoint a.ckpt --resume -o mixed.json");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.err.find("another input"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("fingerprint"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(path("mixed.json")));
    // The same input resumes (here: at its end) and gives the same report.
    run_ok("analyze -q " + rows("A") + " --checkpoint a.ckpt --resume -o again.json");
    EXPECT_EQ(report("again.json")["overall_analysis"], report("a.json")["overall_analysis"]);
}

TEST_F(CliTrust, LayoutForeignAndConflictingFlagsAreRefused) {
    io::write_npy(path("mask.npy"), COLLAPSE_U8, {3, 4}, std::vector<uint8_t>(12, 1).data());
    expect_error("analyze -q " + rows("A") + " --attention-mask mask.npy -o x.json", {"both the rows layout", "sequence layout"});
    expect_error("analyze -q " + rows("A") + " --hidden A/features.npy --input-ids A/labels.npy -o x.json", {"choose one"});
    expect_error("analyze -q " + rows("A") + " --features-key f -o x.json", {"--safetensors"});
    expect_error("analyze -q " + rows("A") + " --classifier-key classifier -o x.json", {"--safetensors"});
    expect_error("analyze -q --safetensors S/synth.safetensors --features A/features.npy --labels A/labels.npy -o x.json",
                 {"by key"});
    expect_error("analyze -q " + rows("A") + " --bias A/labels.npy -o x.json", {"--bias needs a classifier"});
    EXPECT_FALSE(fs::exists(path("x.json")));
}

TEST_F(CliTrust, OutputsNeverReplaceInputsOrEachOther) {
    const std::string labels_before = testutil::slurp(path("A/labels.npy"));
    expect_error("analyze -q " + rows("A") + " -o A/labels.npy", {"--output", "--labels"});
    expect_error("analyze -q " + rows("A") + " -o ./A/../A/features.npy", {"--output", "--features"});
    expect_error("analyze -q " + rows("A") + " --checkpoint r.json -o r.json", {"--checkpoint", "--output"});
    expect_error("analyze -q " + rows("A") + " --checkpoint A/labels.npy -o r.json", {"--checkpoint", "--labels"});
    EXPECT_EQ(testutil::slurp(path("A/labels.npy")), labels_before);
    // A character device is written through, never replaced by a regular file.
    run_ok("analyze -q " + rows("A") + " -o /dev/null");
    struct stat st {};
    ASSERT_EQ(::stat("/dev/null", &st), 0);
    EXPECT_TRUE(S_ISCHR(st.st_mode));
}

TEST_F(CliTrust, MaskForTheRowsLayoutActs) {
    std::vector<uint8_t> valid(2000, 1);
    for (size_t i = 0; i < valid.size(); i += 4) valid[i] = 0;
    io::write_npy(path("valid.npy"), COLLAPSE_U8, {2000}, valid.data());
    run_ok("analyze -q " + rows("A") + " --mask valid.npy -o m.json");
    const json c = report("m.json")["counts"];
    EXPECT_EQ(c["rows_seen"], 2000);
    EXPECT_EQ(c["rows_masked"], 500);
    io::write_npy(path("short.npy"), COLLAPSE_U8, {1999}, valid.data());
    expect_error("analyze -q " + rows("A") + " --mask short.npy -o x.json", {"valid mask", "[1999]", "2000"});
}

TEST_F(CliTrust, LabelsOfTheWrongShapeAreRefused) {
    std::vector<int32_t> y(4000, 1);
    io::write_npy(path("y2.npy"), COLLAPSE_I32, {2000, 2}, y.data());
    expect_error("analyze -q --features A/features.npy --labels y2.npy -o x.json", {"labels", "[2000, 2]", "[2000] or [2000, 1]"});
    io::write_npy(path("y1.npy"), COLLAPSE_I32, {1, 2000}, y.data());
    expect_error("analyze -q --features A/features.npy --labels y1.npy -o x.json", {"labels", "[1, 2000]"});
    io::write_npy(path("yc.npy"), COLLAPSE_I32, {2000, 1}, y.data());
    run_ok("analyze -q --features A/features.npy --labels yc.npy -o col.json");
    EXPECT_EQ(report("col.json")["counts"]["rows_seen"], 2000);
}

TEST_F(CliTrust, SafetensorsClassifierIsFoundByItsConventionalName) {
    const CliRun r = run_ok("analyze --safetensors S/synth.safetensors -o s.json");
    EXPECT_NE(r.err.find("classifier: tensor 'classifier'"), std::string::npos) << r.err;
    const json doc = report("s.json");
    EXPECT_TRUE(doc["engine"]["classifier"].get<bool>());
    EXPECT_FALSE(doc["overall_analysis"]["overall_unc3"].is_null());
    // The npy run with the same classifier gives the same numbers.
    run_ok("analyze -q " + rows("A") + " --classifier A/classifier.npy -o a.json");
    EXPECT_EQ(doc["overall_analysis"]["overall_unc3"], report("a.json")["overall_analysis"]["overall_unc3"]);
}

TEST_F(CliTrust, TransposedClassifierIsNamed) {
    const io::Tensor w = io::open_npy(path("A/classifier.npy"));  // [40, 8]
    std::vector<float> t((size_t)w.numel());
    const float* src = static_cast<const float*>(w.data());
    for (int64_t r = 0; r < 40; ++r)
        for (int64_t k = 0; k < 8; ++k) t[(size_t)(k * 40 + r)] = src[r * 8 + k];
    io::write_npy(path("wt.npy"), COLLAPSE_F32, {8, 40}, t.data());
    expect_error("analyze -q " + rows("A") + " --num-classes 40 --classifier wt.npy -o x.json", {"classifier", "transposed"});
}

TEST_F(CliTrust, FromCheckpointWithoutItsClassifierIsRefused) {
    run_ok("analyze -q " + rows("A") + " --classifier A/classifier.npy --checkpoint a.ckpt -o a.json");
    expect_error("analyze -q --from-checkpoint a.ckpt -o x.json", {"was made with a classifier", "--classifier"});
    run_ok("analyze -q --from-checkpoint a.ckpt --classifier A/classifier.npy -o fc.json");
    EXPECT_EQ(report("fc.json")["overall_analysis"]["overall_unc3"], report("a.json")["overall_analysis"]["overall_unc3"]);
    EXPECT_EQ(report("fc.json")["input"]["kind"], "checkpoint");
}

TEST_F(CliTrust, EveryNullMetricHasANote) {
    // No classifier, svd off, class metrics off: many nulls, each with its reason.
    testutil::spit(path("c.yaml"), "svd_mode: off\ncompute_class_metrics: false\ncompute_nc4: true\n");
    run_ok("analyze -q " + rows("A") + " --config c.yaml -o n.json");
    const json doc = report("n.json");
    const json& notes = doc["overall_analysis"]["notes"];
    for (const char* sec : {"overall_analysis", "summary"})
        for (auto it = doc[sec].begin(); it != doc[sec].end(); ++it)
            if (it.value().is_null() && std::string(sec) == "overall_analysis") {
                ASSERT_TRUE(notes.contains(it.key())) << it.key() << " is null without a note";
                EXPECT_NE(notes[it.key()], "not computed for this input") << it.key();
            }
    EXPECT_EQ(notes["overall_gnc2"], "compute_class_metrics is false");
    EXPECT_EQ(notes["nc4_agreement"], "no classifier was given");
    EXPECT_EQ(notes["avg_svd_entropy"], "svd_mode is off");
}

TEST_F(CliTrust, ResumeKeepsSkippedBatchesSkipped) {
    // Batch 2 of 4 has a label out of range; a resume after the run counts it once, not twice.
    std::vector<int32_t> y(2000);
    const io::Tensor lab = io::open_npy(path("A/labels.npy"));
    for (int64_t i = 0; i < 2000; ++i) y[(size_t)i] = static_cast<const int32_t*>(lab.data())[i];
    y[1200] = 40;
    io::write_npy(path("ybad.npy"), COLLAPSE_I32, {2000}, y.data());
    testutil::spit(path("c.yaml"), "continue_on_error: true\nsave_every: 1\n");
    const std::string args = "analyze -q --features A/features.npy --labels ybad.npy --num-classes 40 --batch-rows 500 --config c.yaml "
                             "--checkpoint k.ckpt ";
    EXPECT_EQ(run(args + "-o first.json").status, 3);
    EXPECT_EQ(report("first.json")["counts"]["batches_failed"], 1);
    const CliRun r = run(args + "--resume -o resumed.json");
    EXPECT_EQ(r.status, 3) << r.err;
    const json doc = report("resumed.json");
    EXPECT_EQ(doc["counts"]["batches_failed"], 1);
    EXPECT_EQ(doc["counts"]["rows_skipped"], 500);
    EXPECT_EQ(doc["overall_analysis"], report("first.json")["overall_analysis"]);
}

// SIGTERM while a run spills: exit 128 + 15, no report, and no spill directory left behind.
TEST_F(CliTrust, SignalEndsTheRunCleanly) {
    run_ok("synth --output-dir " + quote(path("big")) + " --rows 400000 --dim 32 --classes 512 --seed 1 --quiet");
    testutil::spit(path("c.yaml"), "host_memory_limit: 16MiB\nintermediate_save_dir: spill\n");
    for (int sig : {SIGTERM, SIGINT, SIGHUP}) {
        SCOPED_TRACE(sig);
        const pid_t pid = fork();
        ASSERT_GE(pid, 0);
        if (pid == 0) {
            if (chdir(dir_.c_str()) != 0) _exit(126);
            execl(COLLAPSE_CLI_PATH, COLLAPSE_CLI_PATH, "analyze", "-q", "--features", "big/features.npy", "--labels",
                  "big/labels.npy", "--batch-rows", "2000", "--config", "c.yaml", "-o", "sig.json", (char*)nullptr);
            _exit(127);
        }
        // Wait until the spill directory exists, then signal.
        const auto t0 = std::chrono::steady_clock::now();
        bool spilled = false;
        while (!spilled && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
            std::error_code ec;
            if (fs::exists(path("spill"), ec))
                for (const auto& e : fs::directory_iterator(path("spill"), ec)) spilled = spilled || e.is_directory();
            if (!spilled) std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        ASSERT_TRUE(spilled) << "the run never spilled";
        kill(pid, sig);
        int status = 0;
        ASSERT_EQ(waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status)) << "killed by the signal instead of ending cleanly";
        EXPECT_EQ(WEXITSTATUS(status), 128 + sig);
        EXPECT_FALSE(fs::exists(path("sig.json")));
        std::error_code ec;
        EXPECT_FALSE(fs::exists(path("spill"), ec) && !fs::is_empty(path("spill"), ec)) << "spill files left behind";
    }
}

}  // namespace
