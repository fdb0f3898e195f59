// Output files (issue 15): base/atomic_file.hpp (unique temp file, rename; straight through what is
// not a regular file; stale temp files of dead processes removed), the JSON report written through
// it, and io::check_outputs_distinct.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/atomic_file.hpp"
#include "base/error.hpp"
#include "common/file_helpers.hpp"
#include "io/output_file.hpp"
#include "report/report.hpp"

namespace test_output_file {
namespace {

namespace fs = std::filesystem;
using namespace collapse::internal;
using testutil::exists;
using testutil::expect_error;
using testutil::read_file;
using testutil::write_file;

class OutputFileTest : public testutil::TempDirTest {
protected:
    std::vector<std::string> entries() const {
        std::vector<std::string> out;
        for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename().string());
        std::sort(out.begin(), out.end());
        return out;
    }
    // The pid of a process that has exited (and been reaped): no process runs under it.
    static pid_t dead_pid() {
        const pid_t pid = ::fork();
        if (pid == 0) ::_exit(0);
        ::waitpid(pid, nullptr, 0);
        return pid;
    }
};

TEST_F(OutputFileTest, ReplacesAFileAtomicallyKeepingItsMode) {
    const std::string p = path("out.json");
    write_file_atomically(p, "first\n", "report");
    EXPECT_EQ(read_file(p), "first\n");
    ASSERT_EQ(::chmod(p.c_str(), 0640), 0);
    {
        AtomicFile f(p, "report");
        ASSERT_FALSE(f.direct());
        ASSERT_EQ(::write(f.fd(), "second\n", 7), 7);
        EXPECT_EQ(read_file(p), "first\n");  // untouched until commit
        f.commit();
    }
    EXPECT_EQ(read_file(p), "second\n");
    struct stat st;
    ASSERT_EQ(::stat(p.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0640u);
    EXPECT_EQ(entries(), std::vector<std::string>{"out.json"});
    // Abandoned: the old file stays, no temp file is left.
    {
        AtomicFile f(p, "report");
        ASSERT_EQ(::write(f.fd(), "x", 1), 1);
    }
    EXPECT_EQ(read_file(p), "second\n");
    EXPECT_EQ(entries(), std::vector<std::string>{"out.json"});
}

// The old report writer used "<path>.tmp": an existing file of that name was overwritten, then
// deleted.
TEST_F(OutputFileTest, ReportNeverTouchesAnotherFile) {
    const std::string p = path("r.json");
    write_file(p + ".tmp", "precious");
    write_report_file(nlohmann::json{{"a", 1}}, p);
    EXPECT_EQ(nlohmann::json::parse(read_file(p)), (nlohmann::json{{"a", 1}}));
    EXPECT_EQ(read_file(p + ".tmp"), "precious");
    EXPECT_EQ(entries(), (std::vector<std::string>{"r.json", "r.json.tmp"}));
}

// As root, `-o /dev/null` replaced the device node with a regular file.
TEST_F(OutputFileTest, DevicesAndFifosAreWrittenStraightThrough) {
    write_report_file(nlohmann::json{{"a", 1}}, "/dev/null");
    struct stat st;
    ASSERT_EQ(::stat("/dev/null", &st), 0);
    EXPECT_TRUE(S_ISCHR(st.st_mode));

    const std::string fifo = path("fifo");
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    // Nobody reads it: refused at once (open() would wait for a reader forever, signals or not).
    expect_error([&] { write_file_atomically(fifo, "x", "report"); }, {"report", fifo, "FIFO that no process reads"});
    // A reader is there (opened first, so the writer finds it).
    const int rfd = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    ASSERT_GE(rfd, 0);
    write_file_atomically(fifo, "through the pipe\n", "report");
    char buf[64] = {};
    const ssize_t n = ::read(rfd, buf, sizeof buf - 1);
    ::close(rfd);
    EXPECT_EQ(std::string(buf, n > 0 ? (size_t)n : 0), "through the pipe\n");
    ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
    EXPECT_TRUE(S_ISFIFO(st.st_mode));
    EXPECT_EQ(entries(), std::vector<std::string>{"fifo"});
}

TEST_F(OutputFileTest, ASymbolicLinkIsFollowedAndKept) {
    fs::create_directory(path("real"));
    write_file(path("real/r.json"), "old");
    fs::create_symlink(path("real/r.json"), path("link.json"));
    write_file_atomically(path("link.json"), "new", "report");
    EXPECT_TRUE(fs::is_symlink(path("link.json")));
    EXPECT_EQ(read_file(path("real/r.json")), "new");
    EXPECT_EQ(entries(), (std::vector<std::string>{"link.json", "real"}));
}

TEST_F(OutputFileTest, ErrorsNameThePath) {
    write_file(path("plain"), "x");
    expect_error([&] { write_file_atomically(path("plain/r.json"), "x", "report"); }, {"report", path("plain/r.json"), std::strerror(ENOTDIR)});
    fs::create_directory(path("dir"));
    expect_error([&] { write_file_atomically(path("dir"), "x", "report"); }, {"report", path("dir"), std::strerror(EISDIR)});
    EXPECT_EQ(entries(), (std::vector<std::string>{"dir", "plain"}));
}

// A kill -9 leaves the temp file behind; the next writer of the same path removes it when its
// name is exactly the pattern for this host, its pid no longer runs and nobody locks it.
TEST_F(OutputFileTest, StaleTempFilesOfDeadProcessesAreRemoved) {
    const std::string p = path("run.ckpt");
    const std::string stem = "run.ckpt.tmp." + host_name() + "-";
    const pid_t dead = dead_pid();
    const std::string stale = stem + std::to_string(dead) + "-Ab3xYz";
    const std::vector<std::string> kept = {
        stem + std::to_string(::getpid()) + "-Ab3xYz",   // a live process
        stem + std::to_string(dead) + "-Ab3xY",          // not the exact pattern
        stem + std::to_string(dead) + "-Ab3xYz.old",     // not the exact pattern
        "run.ckpt.tmp.otherhost-" + std::to_string(dead) + "-Ab3xYz",  // another host
        "other.ckpt.tmp." + host_name() + "-" + std::to_string(dead) + "-Ab3xYz",  // another output
        "run.ckpt.tmp." + std::to_string(dead),          // the old naming: the host is unknown
        stem + std::to_string(dead) + "-LOCKED",         // dead pid, but locked (another pid namespace)
    };
    write_file(path(stale), "stale");
    for (const auto& k : kept) write_file(path(k), "keep");
    const int lock = ::open(path(kept.back()).c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(lock, 0);
    ASSERT_EQ(::flock(lock, LOCK_EX | LOCK_NB), 0);
    write_file_atomically(p, "new", "checkpoint");
    ::close(lock);
    EXPECT_FALSE(exists(path(stale)));
    for (const auto& k : kept) EXPECT_TRUE(exists(path(k))) << k;
    EXPECT_EQ(read_file(p), "new");
}

// Two writers of one path get different temp files; the last commit wins, whole.
TEST_F(OutputFileTest, TempNamesAreUnique) {
    const std::string p = path("o");
    AtomicFile a(p, "report"), b(p, "report");
    EXPECT_NE(a.temp_path(), b.temp_path());
    ASSERT_EQ(::write(a.fd(), "a", 1), 1);
    ASSERT_EQ(::write(b.fd(), "b", 1), 1);
    a.commit();
    b.commit();
    EXPECT_EQ(read_file(p), "b");
    EXPECT_EQ(entries(), std::vector<std::string>{"o"});
}

// ------------------------------------------------------------------------ check_outputs_distinct

TEST_F(OutputFileTest, AnOutputThatIsAnInputIsRefusedNamingBoth) {
    write_file(path("f.npy"), "x");
    write_file(path("l.npy"), "y");
    const std::vector<io::FileArg> in = {{"--features", path("f.npy")}, {"--labels", path("l.npy")}};
    const auto inval = COLLAPSE_ERR_INVALID_ARGUMENT;
    // The same spelling, another spelling, a hard link, a symbolic link.
    fs::create_hard_link(path("l.npy"), path("hard.npy"));
    fs::create_symlink(path("f.npy"), path("soft.npy"));
    for (const std::string& out : {path("f.npy"), dir_ + "/./f.npy", path("soft.npy")})
        expect_error([&] { io::check_outputs_distinct(in, {{"--output", out}}); }, {"--output " + out, "--features " + path("f.npy")}, inval);
    expect_error([&] { io::check_outputs_distinct(in, {{"--checkpoint", path("hard.npy")}}); }, {"--checkpoint", "--labels"}, inval);
    // Distinct files, and an input that does not exist (its reader will say so), are fine.
    io::check_outputs_distinct(in, {{"--output", path("r.json")}, {"--checkpoint", path("f.npy.ckpt")}});
    io::check_outputs_distinct({{"--features", path("missing.npy")}}, {{"--output", path("r.json")}});
    EXPECT_FALSE(exists(path("r.json")));  // nothing is created
}

TEST_F(OutputFileTest, TwoOutputsThatAreOneFileAreRefused) {
    const auto inval = COLLAPSE_ERR_INVALID_ARGUMENT;
    // Not yet existing: compared by canonical path.
    fs::create_directory(path("d"));
    expect_error([&] { io::check_outputs_distinct({}, {{"--output", path("d/r.json")}, {"--checkpoint", path("d/../d/r.json")}}); },
                 {"--checkpoint " + path("d/../d/r.json"), "--output " + path("d/r.json")}, inval);
    // Existing: by inode.
    write_file(path("a"), "x");
    fs::create_symlink(path("a"), path("b"));
    expect_error([&] { io::check_outputs_distinct({}, {{"-o", path("a")}, {"--checkpoint", path("b")}}); }, {"-o", "--checkpoint"}, inval);
    // /dev/null may take several outputs.
    io::check_outputs_distinct({}, {{"-o", "/dev/null"}, {"--checkpoint", "/dev/null"}});
}

}  // namespace
}  // namespace test_output_file
