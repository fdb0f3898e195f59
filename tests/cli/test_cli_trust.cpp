// The command line never analyses the wrong rows silently: every flag acts or is refused, reports
// record what was analysed, a resume refuses another input, rows dropped under continue_on_error
// change the exit status, and signals end a run cleanly. Each case is what a new user hit.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/cli_fixture.hpp"
#include "io/tensor_file.hpp"

namespace test_cli_trust {
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

// Hostile-input audit (2026-12-02): each case below is what a user hit.

// Usage errors exited with CLI11's own codes (104-109) and messages ("Value 0 not in range
// 0.000000 to 1797693134862315708...", "abc" "not in range"): now one line and status 1.
TEST_F(CliTrust, UsageErrorsAreOneLineAndStatusOne) {
    const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
        {"analyze -q --synthetic --batch-rows 0 -o x.json", {"--batch-rows", "must be > 0, got 0"}},
        {"analyze -q --synthetic --num-classes abc -o x.json", {"--num-classes", "'abc' is not a number"}},
        {"analyze -q --synthetic --bogus -o x.json", {"--bogus"}},
        {"synth --output-dir s --noise inf", {"--noise", "finite"}},
        {"synth", {"--output-dir"}},
        {"frobnicate", {"subcommand"}},
    };
    for (const auto& [args, needles] : cases) {
        SCOPED_TRACE(args);
        expect_error(args, needles);
        EXPECT_EQ(run(args).status, 1);
    }
    EXPECT_FALSE(fs::exists(path("x.json")));
    EXPECT_FALSE(fs::exists(path("s")));
    EXPECT_EQ(run("--version").status, 0);
}

// A --*-key of the sequence layout without --safetensors was silently ignored.
TEST_F(CliTrust, EveryKeyWithoutSafetensorsIsRefused) {
    for (const char* key : {"--hidden-key h", "--input-ids-key i", "--attention-mask-key m", "--mask-key m"})
        expect_error("analyze -q " + rows("A") + " " + key + " -o x.json", {"--safetensors", "not given"});
    EXPECT_FALSE(fs::exists(path("x.json")));
}

// Re-analysing exported class means into the same --export-dir overwrote the input, and an
// --output inside it was replaced by an export.
TEST_F(CliTrust, ExportsNeverReplaceInputsOrOutputs) {
    fs::create_directory(path("E"));
    fs::copy_file(path("A/features.npy"), path("E/class_means.npy"));
    const std::string before = testutil::slurp(path("E/class_means.npy"));
    expect_error("analyze -q --features E/class_means.npy --labels A/labels.npy --export-dir E -o r.json", {"--export-dir", "--features"});
    EXPECT_EQ(testutil::slurp(path("E/class_means.npy")), before);
    expect_error("analyze -q " + rows("A") + " --export-dir F -o F/class_means.npy", {"--export-dir", "--output"});
    EXPECT_FALSE(fs::exists(path("r.json")));
}

// An int64 label of 2^63 - 1 made "largest label + 1" overflow (undefined behaviour), and the
// error then named row 0's valid label.
TEST_F(CliTrust, HugeLabelIsNamedWithItsRow) {
    std::vector<int64_t> y(20, 1);
    y[5] = INT64_MAX;
    io::write_npy(path("y.npy"), COLLAPSE_I64, {20}, y.data());
    std::vector<float> x(20 * 4, 0.5f);
    io::write_npy(path("x.npy"), COLLAPSE_F32, {20, 4}, x.data());
    expect_error("analyze -q --features x.npy --labels y.npy -o r.json", {"label 9223372036854775807", "row 5", "y.npy", "2^31 - 1"});
    EXPECT_FALSE(fs::exists(path("r.json")));
}

// A FIFO as --output with no reader blocked open() for good, through SIGINT and SIGTERM.
TEST_F(CliTrust, FifoWithoutReaderIsRefused) {
    ASSERT_EQ(::mkfifo(path("out.fifo").c_str(), 0600), 0);
    expect_error("analyze -q " + rows("A") + " -o out.fifo", {"out.fifo", "FIFO that no process reads"});
}

// A path that is not UTF-8 (legal on Linux) made the report's JSON fail after the whole run.
TEST_F(CliTrust, PathsThatAreNotUtf8AreReported) {
    const std::string name = "f\xff.npy";
    fs::copy_file(path("A/features.npy"), path(name));
    run_ok("analyze -q --features " + quote(name) + " --labels A/labels.npy -o r.json");
    EXPECT_EQ(report("r.json")["input"]["tensors"][0]["path"], "f\xEF\xBF\xBD.npy");  // U+FFFD for the byte
    EXPECT_EQ(report("r.json")["overall_analysis"], [&] {
        run_ok("analyze -q " + rows("A") + " -o a.json");
        return report("a.json")["overall_analysis"];
    }());
}

// `merge s.ckpt s.ckpt` counted every row twice; `merge a b -o a` replaced a shard.
TEST_F(CliTrust, MergeRefusesAShardTwiceAndOutputOverAShard) {
    run_ok("analyze -q " + rows("A") + " --checkpoint a.ckpt -o a.json");
    run_ok("analyze -q " + rows("B") + " --checkpoint b.ckpt -o b.json");
    expect_error("merge a.ckpt ./a.ckpt -o m.ckpt", {"a.ckpt", "same file", "counted twice"});
    const std::string before = testutil::slurp(path("a.ckpt"));
    expect_error("merge a.ckpt b.ckpt -o a.ckpt", {"--output", "a.ckpt", "same file"});
    EXPECT_EQ(testutil::slurp(path("a.ckpt")), before);
    EXPECT_FALSE(fs::exists(path("m.ckpt")));
}

// synth wrote a data set of inf under --mean-norm past the dtype's range (analyze then refused it),
// started writing ~94 TB before the disk refused, and a late failure (a directory where
// classifier.npy goes) left new features beside the old classifier.
TEST_F(CliTrust, SynthRefusesBeforeWriting) {
    expect_error("synth --output-dir s --rows 100 --dim 8 --classes 5 --mean-norm 1e6 --dtype f16", {"float16", "--mean-norm"});
    EXPECT_FALSE(fs::exists(path("s")));
    expect_error("synth --output-dir t --rows 100000000000 --dim 256 --classes 100", {"needs about", "free"});
    EXPECT_FALSE(fs::exists(path("t")));
    // A write that fails (here: past a file size limit, EFBIG) left the directories it had made.
    for (const char* format : {"npy", "safetensors"}) {
        SCOPED_TRACE(format);
        const std::string cmd = "cd " + testutil::quote(dir_) + " && (trap '' XFSZ; ulimit -f 64; " + testutil::quote(COLLAPSE_CLI_PATH) +
                                " synth --output-dir f/g --rows 100000 --dim 8 --classes 5 --quiet --format " + format + ") 2>efbig.txt";
        const int rc = std::system(cmd.c_str());
        EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 1) << rc;
        EXPECT_NE(testutil::slurp(path("efbig.txt")).find("File too large"), std::string::npos) << testutil::slurp(path("efbig.txt"));
        EXPECT_FALSE(fs::exists(path("f")));
    }
    fs::create_directories(path("M/classifier.npy"));
    testutil::spit(path("M/features.npy"), "old");
    expect_error("synth --output-dir M --rows 100 --dim 8 --classes 5", {"classifier.npy"});
    EXPECT_EQ(testutil::slurp(path("M/features.npy")), "old");
    EXPECT_FALSE(fs::exists(path("M/labels.npy")));
}

// A report or checkpoint path in a missing directory failed only after every batch was analysed.
TEST_F(CliTrust, UnwritableOutputsAreRefusedBeforeTheRun) {
    expect_error("analyze -q " + rows("A") + " -o nodir/r.json", {"--output nodir/r.json", "nodir", "No such file"});
    expect_error("analyze -q " + rows("A") + " --checkpoint nodir/c.ckpt -o r.json", {"--checkpoint nodir/c.ckpt", "No such file"});
    expect_error("analyze -q " + rows("A") + " -o A", {"--output A", "is a directory"});
    expect_error("merge nothing.ckpt -o nodir/m.ckpt", {"--output nodir/m.ckpt", "No such file"});
    EXPECT_FALSE(fs::exists(path("r.json")));
}

// "label -1 at row 7 of the batch" did not say whether --labels or --nc4-labels held it.
TEST_F(CliTrust, BatchErrorsNameTheirInput) {
    std::vector<int32_t> y(2000, 1);
    y[7] = -1;
    io::write_npy(path("bad_labels.npy"), COLLAPSE_I32, {2000}, y.data());
    expect_error("analyze -q " + rows("A") + " --classifier A/classifier.npy --nc4-features A/features.npy --nc4-labels bad_labels.npy -o r.json",
                 {"held-out NC4 input", "bad_labels.npy", "batch from row 0", "label -1 at row 7"});
    expect_error("analyze -q --features A/features.npy --labels bad_labels.npy -o r.json", {"input (features A/features.npy, labels bad_labels.npy)", "label -1 at row 7"});
    EXPECT_FALSE(fs::exists(path("r.json")));
}

}  // namespace
}  // namespace test_cli_trust
