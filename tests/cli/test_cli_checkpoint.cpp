// `collapse analyze --checkpoint/--resume/--from-checkpoint` and `collapse merge`, run as separate
// processes (COLLAPSE_CLI_PATH). Reports are compared minus engine.timings_seconds:
//  - a checkpointing run, and every run resumed after a SIGKILL, equals the uninterrupted run bit
//    for bit (the state is restored exactly and the input continues at a batch boundary);
//  - after a SIGKILL the checkpoint path holds nothing or a whole, valid checkpoint, never a part;
//  - merge + --from-checkpoint equals one run over the concatenated shards: counts exactly,
//    numbers within 1e-12 relative (the shards' float64 sums and Gram are added in another order).
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/atomic_file.hpp"
#include "base/error.hpp"
#include "io/checkpoint_file.hpp"
#include "io/tensor_file.hpp"

#ifndef COLLAPSE_CLI_PATH
#define COLLAPSE_CLI_PATH ""
#endif

#include "common/capi_helpers.hpp"

#include "common/compare.hpp"

namespace test_cli_checkpoint {
namespace {

using testutil::CliRun;
using testutil::quote;
using testutil::slurp;

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;




// Reports minus timings. rel = 0: bit-identical numbers; else integers exact, floats within rel.
void expect_same(const json& a, const json& b, double rel, const std::string& at = "") {
    testutil::expect_same_json(a, b, rel, 0.0, at);
}

// The data sets are made once for the whole suite (synth is deterministic).
class CliCheckpoint : public ::testing::Test {
protected:
    static std::string dir_;
    static bool ready_;

    static void SetUpTestSuite() {
        if (std::string(COLLAPSE_CLI_PATH).empty() || !fs::exists(COLLAPSE_CLI_PATH)) return;
        std::string tmpl = (fs::path(::testing::TempDir()) / "collapse_cli_ckpt_XXXXXX").string();
        if (!::mkdtemp(tmpl.data())) return;
        dir_ = tmpl;
        // A: 60000 rows (30 batches of 2000); B: another seed, same d and V (a second shard);
        // V400: another V.
        ready_ = sh("synth --output-dir A --rows 60000 --dim 32 --classes 500 --seed 3 --quiet").status == 0 &&
                 sh("synth --output-dir B --rows 20000 --dim 32 --classes 500 --seed 4 --quiet").status == 0 &&
                 sh("synth --output-dir V400 --rows 4000 --dim 32 --classes 400 --seed 5 --quiet").status == 0;
        std::ofstream(p("c.yaml")) << "# checkpoint every 3 batches\nsave_every: 3\n";
    }
    static void TearDownTestSuite() {
        std::error_code ec;
        if (!dir_.empty()) fs::remove_all(dir_, ec);
        dir_.clear();
    }
    void SetUp() override {
        if (std::string(COLLAPSE_CLI_PATH).empty() || !fs::exists(COLLAPSE_CLI_PATH))
            GTEST_SKIP() << "the collapse binary was not built (COLLAPSE_CLI_PATH = '" << COLLAPSE_CLI_PATH << "')";
        ASSERT_TRUE(ready_) << "collapse synth failed in " << dir_;
    }

    static std::string p(const std::string& name) { return (fs::path(dir_) / name).string(); }

    static CliRun sh(const std::string& args) { return testutil::run_cli(COLLAPSE_CLI_PATH, dir_, args); }
    static CliRun run_ok(const std::string& args) {
        CliRun r = sh(args);
        EXPECT_EQ(r.status, 0) << "collapse " << args << "\nstdout: " << r.out << "\nstderr: " << r.err;
        return r;
    }
    // Non-zero exit, exactly one line "collapse: error: ..." holding every needle.
    static void expect_error(const std::string& args, const std::vector<std::string>& needles) {
        const CliRun r = sh(args);
        EXPECT_NE(r.status, 0) << "collapse " << args << " succeeded";
        EXPECT_NE(r.status, -1) << "collapse " << args << " did not exit normally";
        EXPECT_EQ(r.err.rfind("collapse: error: ", 0), 0u) << "stderr: " << r.err;
        ASSERT_FALSE(r.err.empty());
        EXPECT_EQ(r.err.back(), '\n') << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line expected, got:\n" << r.err;
        for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "stderr lacks '" << n << "': " << r.err;
    }
    static json report(const std::string& name) {
        std::ifstream in(p(name));
        EXPECT_TRUE(in.good()) << "no report " << p(name);
        if (!in.good()) return json();
        json doc = json::parse(in);
        doc["engine"].erase("timings_seconds");
        return doc;
    }

    // fork/exec of `collapse <args>` in the data folder; returns the pid.
    static pid_t spawn(const std::vector<std::string>& args) {
        std::vector<std::string> all = {COLLAPSE_CLI_PATH};
        all.insert(all.end(), args.begin(), args.end());
        std::vector<char*> argv;
        for (auto& a : all) argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        const pid_t pid = ::fork();
        if (pid == 0) {
            if (::chdir(dir_.c_str()) != 0) ::_exit(126);
            const int null = ::open("/dev/null", O_RDWR);
            ::dup2(null, 0), ::dup2(null, 1), ::dup2(null, 2);
            ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
            ::execv(argv[0], argv.data());
            ::_exit(127);
        }
        return pid;
    }
    // Waits for pid; true when SIGKILL ended it, false when it exited (then with status 0).
    static bool reap(pid_t pid) {
        int st = 0;
        EXPECT_EQ(::waitpid(pid, &st, 0), pid);
        if (WIFSIGNALED(st)) {
            EXPECT_EQ(WTERMSIG(st), SIGKILL);
            return true;
        }
        EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "status " << st;
        return false;
    }

    // After a kill: the checkpoint is absent or whole and valid (every CRC checked, meta parses).
    static void expect_absent_or_valid(const std::string& ck) {
        if (!fs::exists(ck)) return;
        try {
            collapse::internal::io::CheckpointReader r(ck);  // verify_all: header, table, layout, every section's CRC
            const auto meta = r.section("meta");
            const json m = json::parse(std::string(static_cast<const char*>(meta.data), meta.bytes));
            EXPECT_EQ(m["format"], "collapse-session-checkpoint");
            EXPECT_EQ(m["input_position"].get<int64_t>() % 2000, 0) << m.dump();
        } catch (const std::exception& e) {
            ADD_FAILURE() << "after SIGKILL, " << ck << " is not a valid checkpoint: " << e.what();
        }
    }
    static void remove_checkpoint_files(const std::string& ck) {
        for (const auto& e : fs::directory_iterator(dir_))
            if (e.path().filename().string().rfind(ck, 0) == 0) fs::remove(e.path());
    }
    // Temp files of checkpoint ck: "<ck>.tmp.<host>-<pid>-XXXXXX" (base/atomic_file.hpp); of one
    // pid, or of any.
    static std::vector<std::string> temp_files(const std::string& ck, pid_t pid = 0) {
        const std::string stem = ck + ".tmp." + collapse::internal::host_name() + "-" + (pid ? std::to_string(pid) + "-" : "");
        std::vector<std::string> out;
        for (const auto& e : fs::directory_iterator(dir_))
            if (e.path().filename().string().rfind(stem, 0) == 0) out.push_back(e.path().filename().string());
        return out;
    }
    static bool temp_exists(const std::string& ck, pid_t pid) { return !temp_files(ck, pid).empty(); }
};

std::string CliCheckpoint::dir_;
bool CliCheckpoint::ready_ = false;

const std::string kInputA = "--features A/features.npy --labels A/labels.npy --classifier A/classifier.npy --batch-rows 2000";
const std::vector<std::string> kArgvA = {"analyze", "--quiet", "--features", "A/features.npy", "--labels", "A/labels.npy",
                                         "--classifier", "A/classifier.npy", "--batch-rows", "2000", "--config", "c.yaml"};

std::vector<std::string> with(std::vector<std::string> v, const std::vector<std::string>& more) {
    v.insert(v.end(), more.begin(), more.end());
    return v;
}

TEST_F(CliCheckpoint, CheckpointingRunEqualsUninterrupted) {
    run_ok("analyze --quiet " + kInputA + " --config c.yaml -o plain.json");
    run_ok("analyze --quiet " + kInputA + " --config c.yaml --checkpoint eq.ckpt -o ck.json");
    const json plain = report("plain.json"), ck = report("ck.json");
    ASSERT_EQ(plain["counts"]["rows_seen"], 60000);
    EXPECT_EQ(plain["engine"]["batches"], 30);
    expect_same(ck, plain, 0.0);
    // The last checkpoint holds the whole first pass; --from-checkpoint gives the same report.
    expect_absent_or_valid(p("eq.ckpt"));
    run_ok("analyze --quiet --from-checkpoint eq.ckpt --classifier A/classifier.npy -o from.json");
    expect_same(report("from.json"), plain, 0.0);
    // Resuming from a complete checkpoint ingests nothing more and gives the same report.
    run_ok("analyze --quiet " + kInputA + " --config c.yaml --checkpoint eq.ckpt --resume -o again.json");
    expect_same(report("again.json"), plain, 0.0);
}

TEST_F(CliCheckpoint, SigkillThenResumeEqualsUninterrupted) {
    run_ok("analyze --quiet " + kInputA + " --config c.yaml -o plain.json");
    const json plain = report("plain.json");
    const std::string ck = "kill.ckpt";
    const auto args = with(kArgvA, {"--checkpoint", ck});

    // The uninterrupted checkpointing run's time (the best of two).
    double T = 1e9;
    for (int i = 0; i < 2; ++i) {
        remove_checkpoint_files(ck);
        const auto t0 = Clock::now();
        EXPECT_FALSE(reap(spawn(with(args, {"-o", "timed.json"}))));
        T = std::min(T, std::chrono::duration<double>(Clock::now() - t0).count());
    }
    expect_same(report("timed.json"), plain, 0.0);

    int resumes = 0;
    auto resume_and_check = [&](const std::string& tag) {
        SCOPED_TRACE(tag);
        expect_absent_or_valid(p(ck));
        const std::string out = "resumed_" + std::to_string(++resumes) + ".json";
        std::string cmd = "analyze --quiet " + kInputA + " --config c.yaml --checkpoint " + ck + " --resume -o " + out;
        run_ok(cmd);
        expect_same(report(out), plain, 0.0);
        expect_absent_or_valid(p(ck));
        ASSERT_TRUE(fs::exists(p(ck)));
        // A killed run's temp file is removed by the next writer of the checkpoint (issue 15).
        EXPECT_EQ(temp_files(ck), std::vector<std::string>{});
    };

    // Kills at fractions of the normal run time.
    int killed = 0;
    for (double f : {0.1, 0.5, 0.9}) {
        remove_checkpoint_files(ck);
        const pid_t pid = spawn(with(args, {"-o", "never.json"}));
        std::this_thread::sleep_for(std::chrono::duration<double>(f * T));
        ::kill(pid, SIGKILL);
        killed += reap(pid) ? 1 : 0;
        resume_and_check("at " + std::to_string((int)(f * 100)) + "% of " + std::to_string(T) + " s");
    }
    RecordProperty("timed_kills_landed", killed);
    EXPECT_GE(killed, 1) << "no timed kill landed before the run ended (T = " << T << " s)";

    // Kills during a checkpoint write: as soon as "<ck>.tmp.<pid>" appears (the first save, so no
    // checkpoint exists yet), and during a later save that replaces an existing checkpoint.
    for (int which : {1, 2}) {
        remove_checkpoint_files(ck);
        const pid_t pid = spawn(with(args, {"-o", "never.json"}));
        const auto t0 = Clock::now();
        bool seen = false;
        std::vector<std::string> seen_temps;  // the write we saw (each write has its own random suffix)
        if (which == 2)
            while (!fs::exists(p(ck)) && std::chrono::duration<double>(Clock::now() - t0).count() < 20) ::usleep(100);
        while (std::chrono::duration<double>(Clock::now() - t0).count() < 20) {
            seen_temps = temp_files(ck, pid);
            if (!seen_temps.empty()) {
                seen = true;
                break;
            }
            int st = 0;
            if (::waitpid(pid, &st, WNOHANG) == pid) {  // ended before we saw a write
                ADD_FAILURE() << "the run ended before a checkpoint write was seen";
                break;
            }
        }
        ::kill(pid, SIGKILL);
        if (seen) {
            EXPECT_TRUE(reap(pid));
            // The temp file is left behind when the kill landed inside the write we saw (before its
            // rename). On a loaded machine the kill can land later, after that write's rename and
            // inside the next write, whose temp file has another name.
            bool mid_write = false;
            for (const std::string& t : temp_files(ck, pid))
                mid_write = mid_write || std::find(seen_temps.begin(), seen_temps.end(), t) != seen_temps.end();
            RecordProperty("kill_during_write_" + std::to_string(which) + "_left_temp", mid_write ? 1 : 0);
            if (which == 1 && mid_write) EXPECT_FALSE(fs::exists(p(ck))) << "a partial first checkpoint appeared under its name";
            if (which == 2) EXPECT_TRUE(fs::exists(p(ck))) << "the previous checkpoint vanished";
        } else {
            ::waitpid(pid, nullptr, 0);
        }
        resume_and_check("during write " + std::to_string(which));
    }
}

// The row store spilling (host_memory_limit far below the 15 MiB of rows): a run killed while it
// spills leaves its spill directory behind; the resumed run reloads the checkpoint's rows (spilling
// them again), removes the dead run's directory and its own, and its report is the in-memory run's.
TEST_F(CliCheckpoint, SigkillWhileSpillingThenResume) {
    std::ofstream(p("spill.yaml")) << "save_every: 3\nhost_memory_limit: 2MiB\nintermediate_save_dir: spill\n";
    run_ok("analyze --quiet " + kInputA + " --config c.yaml -o plain.json");
    auto comparable = [](json j) {
        j.erase("config");
        j["engine"].erase("row_store");
        return j;
    };
    const json plain = comparable(report("plain.json"));
    const CliRun loud = run_ok("analyze " + kInputA + " --config spill.yaml -o spilled.json");
    EXPECT_NE(loud.out.find("spilled to disk in"), std::string::npos) << loud.out;  // the summary says so
    const json spilled = report("spilled.json");
    EXPECT_GT(spilled["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 10 << 20);
    expect_same(comparable(spilled), plain, 1e-12);
    EXPECT_FALSE(fs::exists(p("spill"))) << "the spill directory outlived the run that created it";

    const std::string ck = "spillkill.ckpt";
    const std::vector<std::string> args = {"analyze", "--quiet", "--features", "A/features.npy", "--labels", "A/labels.npy", "--classifier",
                                           "A/classifier.npy", "--batch-rows", "2000", "--config", "spill.yaml", "--checkpoint", ck,
                                           "-o", "never.json"};
    remove_checkpoint_files(ck);
    const pid_t pid = spawn(args);
    // Killed once its spill directory and a checkpoint exist.
    const auto t0 = Clock::now();
    auto spilling = [&] {
        if (!fs::exists(p("spill")) || !fs::exists(p(ck))) return false;
        for (const auto& e : fs::directory_iterator(p("spill")))
            if (e.path().filename().string().find("-" + std::to_string(pid) + "-") != std::string::npos) return true;
        return false;
    };
    while (!spilling() && std::chrono::duration<double>(Clock::now() - t0).count() < 30) ::usleep(200);
    ::kill(pid, SIGKILL);
    ASSERT_TRUE(reap(pid)) << "the run ended before it was killed";
    EXPECT_FALSE(fs::is_empty(p("spill"))) << "the killed run's spill directory should still be there";
    expect_absent_or_valid(p(ck));
    run_ok("analyze --quiet " + kInputA + " --config spill.yaml --checkpoint " + ck + " --resume -o resumed.json");
    expect_same(comparable(report("resumed.json")), plain, 1e-12);
    EXPECT_TRUE(fs::is_empty(p("spill"))) << "a dead run's spill directory was not removed";
    fs::remove_all(p("spill"));
}

TEST_F(CliCheckpoint, MergeThenFromCheckpointEqualsOneRunOverBothShards) {
    // Shards: A (60000 rows) and B (20000 rows), both with A's classifier; the single run reads the
    // two concatenated into U.
    {
        const auto fa = collapse::internal::io::open_npy(p("A/features.npy")), fb = collapse::internal::io::open_npy(p("B/features.npy"));
        const auto la = collapse::internal::io::open_npy(p("A/labels.npy")), lb = collapse::internal::io::open_npy(p("B/labels.npy"));
        ASSERT_EQ(fa.dtype, fb.dtype);
        ASSERT_EQ(la.dtype, lb.dtype);
        fs::create_directories(p("U"));
        const int64_t n = fa.rows() + fb.rows(), d = fa.shape[1];
        collapse::internal::io::NpyWriter f(p("U/features.npy"), fa.dtype, {n, d});
        f.append(fa.data(), fa.rows() * fa.row_bytes());
        f.append(fb.data(), fb.rows() * fb.row_bytes());
        f.close();
        collapse::internal::io::NpyWriter l(p("U/labels.npy"), la.dtype, {n});
        l.append(la.data(), la.rows() * la.row_bytes());
        l.append(lb.data(), lb.rows() * lb.row_bytes());
        l.close();
    }
    const std::string common = " --classifier A/classifier.npy --batch-rows 2000 --config c.yaml";
    run_ok("analyze --quiet --features A/features.npy --labels A/labels.npy" + common + " --checkpoint sa.ckpt -o sa.json");
    run_ok("analyze --quiet --features B/features.npy --labels B/labels.npy" + common + " --checkpoint sb.ckpt -o sb.json");
    const CliRun m = run_ok("merge sa.ckpt sb.ckpt -o merged.ckpt");
    EXPECT_NE(m.out.find("80000"), std::string::npos) << m.out;
    expect_absent_or_valid(p("merged.ckpt"));
    run_ok("analyze --quiet --from-checkpoint merged.ckpt --classifier A/classifier.npy -o merged.json");
    run_ok("analyze --quiet --features U/features.npy --labels U/labels.npy" + common + " -o union.json");
    const json got = report("merged.json"), want = report("union.json");
    ASSERT_EQ(want["counts"]["rows_seen"], 80000);
    expect_same(got["counts"], want["counts"], 0.0, "counts");
    expect_same(got["engine"], want["engine"], 0.0, "engine");
    expect_same(got["config"], want["config"], 0.0, "config");
    expect_same(got, want, 1e-12);
    // A merge of the merged checkpoint with nothing else is the same checkpoint's report again.
    run_ok("merge merged.ckpt -o merged2.ckpt");
    run_ok("analyze --quiet --from-checkpoint merged2.ckpt --classifier A/classifier.npy -o merged2.json");
    expect_same(report("merged2.json"), got, 0.0);
}

TEST_F(CliCheckpoint, ErrorPaths) {
    // --resume without --checkpoint.
    expect_error("analyze --quiet " + kInputA + " --resume -o x.json", {"--resume", "--checkpoint"});
    EXPECT_FALSE(fs::exists(p("x.json")));
    // merge of checkpoints with different V names V.
    run_ok("analyze --quiet " + kInputA + " --checkpoint v500.ckpt -o v500.json");
    run_ok("analyze --quiet --features V400/features.npy --labels V400/labels.npy --batch-rows 2000 --checkpoint v400.ckpt -o v400.json");
    expect_error("merge v500.ckpt v400.ckpt -o bad.ckpt", {"V = 400", "V = 500", "v400.ckpt"});
    EXPECT_FALSE(fs::exists(p("bad.ckpt")));
    // --resume from a checkpoint of another configuration names the key.
    std::ofstream(p("c7.yaml")) << "min_samples_per_token: 7\n";
    expect_error("analyze --quiet " + kInputA + " --config c7.yaml --checkpoint v500.ckpt --resume -o y.json",
                 {"min_samples_per_token"});
    // --resume from a corrupt checkpoint names the failed check, and leaves the file alone.
    std::string bytes = slurp(p("v500.ckpt"));
    ASSERT_GT(bytes.size(), 4096u);
    bytes[bytes.size() - 100] ^= 0x01;
    { std::ofstream(p("corrupt.ckpt"), std::ios::binary) << bytes; }
    expect_error("analyze --quiet " + kInputA + " --checkpoint corrupt.ckpt --resume -o z.json", {"corrupt section", "corrupt.ckpt"});
    EXPECT_EQ(slurp(p("corrupt.ckpt")), bytes);
    expect_error("merge v500.ckpt corrupt.ckpt -o bad.ckpt", {"corrupt section"});
    expect_error("analyze --quiet --from-checkpoint no_such.ckpt -o w.json", {"no_such.ckpt"});
}

// Regression (found by this test): `collapse merge` of shards analysed with different classifiers
// must fail, although the merge session itself has no classifier.
TEST_F(CliCheckpoint, MergeRefusesShardsWithDifferentClassifiers) {
    run_ok("analyze --quiet --features A/features.npy --labels A/labels.npy --classifier A/classifier.npy --batch-rows 2000"
           " --checkpoint ca.ckpt -o ca.json");
    run_ok("analyze --quiet --features B/features.npy --labels B/labels.npy --classifier B/classifier.npy --batch-rows 2000"
           " --checkpoint cb.ckpt -o cb.json");
    expect_error("merge ca.ckpt cb.ckpt -o cab.ckpt", {"classifier"});
    // Even a merge of shards made with the SAME classifier loses the classifier's identity: the
    // merged checkpoint's classifier_hash is null, so --from-checkpoint accepts any classifier.
    run_ok("analyze --quiet --features B/features.npy --labels B/labels.npy --classifier A/classifier.npy --batch-rows 2000"
           " --checkpoint cb_a.ckpt -o cb_a.json");
    run_ok("merge ca.ckpt cb_a.ckpt -o caa.ckpt");
    expect_error("analyze --quiet --from-checkpoint ca.ckpt --classifier B/classifier.npy -o w1.json", {"classifier"});  // refused: fine
    expect_error("analyze --quiet --from-checkpoint caa.ckpt --classifier B/classifier.npy -o w2.json", {"classifier"});  // accepted: bug
}

// Regression (found by this test): counts.batches_failed (continue_on_error) is kept in the
// checkpoint, so a run resumed after the failed batch reports it like the uninterrupted run.
// The kill is emulated deterministically: the checkpoint comes from a run over the first 10000
// rows (5 batches, the failed one among them), exactly the state the full run has after batch 5.
TEST_F(CliCheckpoint, ResumeKeepsFailedBatchCount) {
    const auto fa = collapse::internal::io::open_npy(p("A/features.npy"));
    const auto la = collapse::internal::io::open_npy(p("A/labels.npy"));
    ASSERT_EQ(la.dtype, COLLAPSE_I32);
    const int64_t n = 20000, pre = 10000, d = fa.shape[1];
    std::vector<int32_t> y(static_cast<const int32_t*>(la.data()), static_cast<const int32_t*>(la.data()) + n);
    y[2500] = 600;  // out of range for V = 500: batch 1 (rows 2000..3999) is refused and skipped
    for (const auto& [sub, rows] : {std::pair<std::string, int64_t>{"bad", n}, {"badpre", pre}}) {
        fs::create_directories(p(sub));
        collapse::internal::io::NpyWriter f(p(sub + "/features.npy"), fa.dtype, {rows, d});
        f.append(fa.data(), rows * fa.row_bytes());
        f.close();
        collapse::internal::io::NpyWriter l(p(sub + "/labels.npy"), COLLAPSE_I32, {rows});
        l.append(y.data(), rows * sizeof(int32_t));
        l.close();
    }
    std::ofstream(p("cerr.yaml")) << "save_every: 1\ncontinue_on_error: true\nlog_level: error\n";
    const std::string common = " --num-classes 500 --batch-rows 2000 --config cerr.yaml";
    // Skipped rows: the report is written and the exit status is 3 (README, exit status).
    auto run_skipping = [&](const std::string& args) {
        const CliRun r = sh(args);
        EXPECT_EQ(r.status, 3) << args << "\n" << r.err;
    };
    run_skipping("analyze --quiet --features bad/features.npy --labels bad/labels.npy" + common + " -o full.json");
    const json full = report("full.json");
    ASSERT_EQ(full["counts"]["batches_failed"], 1);
    // A checkpointing run agrees, and a resume from its checkpoint keeps the count at 1.
    run_skipping("analyze --quiet --features bad/features.npy --labels bad/labels.npy" + common + " --checkpoint e.ckpt -o ck.json");
    expect_same(report("ck.json"), full, 0.0);
    run_skipping("analyze --quiet --features bad/features.npy --labels bad/labels.npy" + common + " --checkpoint e.ckpt --resume -o res.json");
    expect_same(report("res.json"), full, 0.0);
    // A checkpoint of the first 10,000 rows (another file) does not resume on the whole file.
    run_skipping("analyze --quiet --features badpre/features.npy --labels badpre/labels.npy" + common + " --checkpoint p.ckpt -o pre.json");
    const CliRun r =
        sh("analyze --quiet --features bad/features.npy --labels bad/labels.npy" + common + " --checkpoint p.ckpt --resume -o mixed.json");
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("another input"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace test_cli_checkpoint
