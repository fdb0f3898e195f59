// RowStore (src/core/row_store.hpp): rows spilled to disk come back whole, in the order they were
// added, for every memory budget and load budget; disk failures (injected, a real file-size limit,
// an unwritable directory, a corrupted file) are clear errors that lose nothing; scratch files go.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/file_helpers.hpp"
#include "base/error.hpp"
#include "core/row_store.hpp"

namespace test_row_store {
namespace {

namespace fs = std::filesystem;
using collapse::internal::RowStore;

constexpr int64_t kV = 150, kD = 5;

class RowStoreTest : public testutil::TempDirTest {};

// What the store must give back: every row of every class, in order added.
using Model = std::map<int32_t, std::vector<double>>;

// Adds `batches` batches of random rows (skewed class sizes) through make_room + append, as the
// backends do; returns the rows added.
Model fill(RowStore& st, int batches, uint32_t seed) {
    Model m;
    std::mt19937 rng(seed);
    std::geometric_distribution<int32_t> cls(0.03);
    std::normal_distribution<double> nd;
    for (int b = 0; b < batches; ++b) {
        std::map<int32_t, int64_t> runs;
        for (int i = 0; i < 40; ++i) ++runs[std::min<int32_t>(cls(rng), (int32_t)kV - 1)];
        st.make_room([&] {
            int64_t add = 0;
            for (const auto& r : runs) add += st.growth(r.first, r.second);
            return add;
        });
        for (const auto& r : runs) {
            double* dst = st.append(r.first, r.second);
            for (int64_t k = 0; k < r.second * kD; ++k) {
                dst[k] = nd(rng);
                m[r.first].push_back(dst[k]);
            }
        }
    }
    return m;
}

// Everything the store gives back for `ids`, pieces joined.
Model read_all(const RowStore& st, const std::vector<int32_t>& ids, int64_t load_budget) {
    Model got;
    std::map<int32_t, int64_t> next;
    st.for_each_class(ids, load_budget, [&](int32_t c, const double* x, int64_t n, int64_t first, bool last) {
        EXPECT_EQ(first, next[c]) << "class " << c;
        // Pieces respect the load budget (a class held only in memory comes whole: nothing is loaded).
        if (first > 0 || !last) EXPECT_LE(n * kD * 8, std::max<int64_t>(load_budget, kD * 8)) << "a piece larger than the load budget";
        next[c] = first + n;
        auto& v = got[c];
        v.insert(v.end(), x, x + n * kD);
        if (last) next[c] = -1;  // no further piece may come
    });
    for (const auto& kv : next) EXPECT_EQ(kv.second, -1) << "class " << kv.first << " never got its last piece";
    return got;
}

std::vector<int32_t> all_ids() {
    std::vector<int32_t> ids;
    for (int32_t c = (int32_t)kV - 1; c >= 0; --c) ids.push_back(c);  // any order in, ascending out
    return ids;
}

void expect_same(const Model& want, const Model& got) {
    for (int32_t c = 0; c < (int32_t)kV; ++c) {
        const auto w = want.find(c);
        const auto g = got.find(c);
        const std::vector<double> empty;
        const auto& wv = w == want.end() ? empty : w->second;
        const auto& gv = g == got.end() ? empty : g->second;
        ASSERT_EQ(wv, gv) << "class " << c;
    }
}

TEST_F(RowStoreTest, SpilledRowsComeBackInOrderForEveryBudget) {
    for (int64_t budget : {int64_t(-1), int64_t(0), int64_t(2000), int64_t(20000), int64_t(1) << 30}) {
        RowStore st(kV, kD, budget, dir_ + "/spill");
        const Model m = fill(st, 60, 7);
        if (budget >= 0 && budget < 100000) {
            EXPECT_GT(st.flushes(), 5) << budget;
            EXPECT_GT(st.disk_bytes(), 0);
            EXPECT_TRUE(fs::is_directory(st.spill_dir()));
            EXPECT_EQ(st.spill_dir().rfind(dir_ + "/spill/collapse-spill-", 0), 0u) << st.spill_dir();
        } else {
            EXPECT_EQ(st.flushes(), 0) << budget;
        }
        int64_t total = 0;
        for (const auto& kv : m) {
            total += (int64_t)kv.second.size() / kD;
            EXPECT_EQ(st.rows(kv.first), (int64_t)kv.second.size() / kD);
        }
        EXPECT_EQ(st.total_rows(), total);
        // Whole classes, small groups, and pieces smaller than most classes.
        for (int64_t load : {int64_t(1) << 30, int64_t(4000), int64_t(200), int64_t(1)}) expect_same(m, read_all(st, all_ids(), load));
        // A subset only.
        const Model sub = read_all(st, {3, 0, 77}, 300);
        EXPECT_EQ(sub.size(), 3u);
        EXPECT_EQ(sub.at(0), m.count(0) ? m.at(0) : std::vector<double>());
        EXPECT_EQ(sub.at(77), m.count(77) ? m.at(77) : std::vector<double>());
    }
    // The directory the store created is gone with it.
    EXPECT_FALSE(fs::exists(dir_ + "/spill"));
}

TEST_F(RowStoreTest, MemoryStaysWithinBudgetPlusOneBatch) {
    const int64_t budget = 6000;
    RowStore st(kV, kD, budget, dir_);
    std::mt19937 rng(3);
    for (int b = 0; b < 200; ++b) {
        const int32_t c = (int32_t)(rng() % kV);
        const int64_t n = 1 + rng() % 20;
        st.make_room([&] { return st.growth(c, n); });
        const int64_t g = st.growth(c, n);
        st.append(c, n);
        EXPECT_LE(st.memory_bytes(), std::max(budget, g)) << "batch " << b;
    }
    EXPECT_GT(st.flushes(), 10);
}

TEST_F(RowStoreTest, FailedWriteLosesNothingAndCanBeRetried) {
    bool broken = false;
    int calls = 0;
    RowStore::WriteFn fn = [&](int fd, const void* p, size_t n, off_t off) -> ssize_t {
        if (broken && ++calls > 3) {
            errno = ENOSPC;
            return -1;
        }
        return ::pwrite(fd, p, n, off);
    };
    RowStore st(kV, kD, 3000, dir_, fn);
    Model m = fill(st, 20, 11);
    ASSERT_GT(st.flushes(), 0);
    const int64_t flushes = st.flushes(), disk = st.disk_bytes();
    broken = true;
    const std::string msg = testutil::expect_error([&] { st.flush(); }, {"spilling the exact row store", st.spill_dir(), std::strerror(ENOSPC), "nothing was lost"});
    EXPECT_EQ(st.flushes(), flushes);
    EXPECT_EQ(st.disk_bytes(), disk);
    expect_same(m, read_all(st, all_ids(), 500));
    // Partition files were cut back: their sizes add up to what the manifest holds.
    int64_t on_disk = 0;
    for (const auto& e : fs::directory_iterator(st.spill_dir())) on_disk += (int64_t)fs::file_size(e.path());
    EXPECT_EQ(on_disk, disk);
    // Space is back: the same rows flush, and more can come.
    broken = false;
    st.flush();
    const Model more = fill(st, 10, 12);
    for (const auto& kv : more) m[kv.first].insert(m[kv.first].end(), kv.second.begin(), kv.second.end());
    expect_same(m, read_all(st, all_ids(), 1 << 20));
}

// A real write error from the kernel: a file-size limit makes pwrite fail with EFBIG.
TEST_F(RowStoreTest, FileSizeLimitIsAnIoError) {
    if (!testutil::FileSizeLimit::usable()) GTEST_SKIP() << "file size already limited";
    RowStore st(kV, kD, 1 << 20, dir_);
    const Model m = fill(st, 30, 5);
    {
        testutil::FileSizeLimit limit(1024);
        testutil::expect_error([&] { st.flush(); }, {"spilling the exact row store", std::strerror(EFBIG)});
    }
    EXPECT_EQ(st.flushes(), 0);
    expect_same(m, read_all(st, all_ids(), 1 << 20));
    st.flush();
    expect_same(m, read_all(st, all_ids(), 1 << 20));
}

TEST_F(RowStoreTest, UnwritableDirectoryIsNamed) {
    testutil::write_file(dir_ + "/plain", "not a directory");
    const std::string parent = dir_ + "/plain/spill";
    RowStore st(kV, kD, 0, parent);
    const Model m = fill(st, 1, 1);  // the first batch goes to memory; the second must spill
    std::string msg;
    for (int i = 0; i < 3 && msg.empty(); ++i) {
        try {
            fill(st, 1, 2);
        } catch (const collapse::internal::Error& e) {
            msg = e.what();
            EXPECT_EQ(e.status(), COLLAPSE_ERR_IO);
        }
    }
    EXPECT_NE(msg.find("cannot create a spill directory"), std::string::npos) << msg;
    EXPECT_NE(msg.find(parent), std::string::npos) << msg;
    EXPECT_NE(msg.find("intermediate_save_dir"), std::string::npos) << msg;
    expect_same(m, read_all(st, all_ids(), 1 << 20));
}

TEST_F(RowStoreTest, CorruptSpillFileIsRefused) {
    RowStore st(kV, kD, 500, dir_);
    fill(st, 20, 9);
    ASSERT_GT(st.flushes(), 0);
    const std::string part = st.spill_dir() + "/part-000.seg";
    ASSERT_TRUE(fs::exists(part));
    {
        std::fstream f(part, std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(13);
        f.put('\x5a');
    }
    testutil::expect_error([&] { read_all(st, all_ids(), 1 << 20); }, {"spill file", part, "is corrupt", "class 0"});
    fs::resize_file(part, 8);
    testutil::expect_error([&] { read_all(st, all_ids(), 1 << 20); }, {part, "shorter than its manifest"});
}

TEST_F(RowStoreTest, RollbackDropsOnlyRowsAfterTheMark) {
    for (int64_t budget : {int64_t(-1), int64_t(400), int64_t(1) << 20}) {
        RowStore st(kV, kD, budget, dir_);
        const Model m = fill(st, 15, 21);
        const RowStore::Mark mk = st.mark([] { return int64_t(1) << 16; });  // room for what comes: flushes if it could not fit
        fill(st, 15, 22);
        st.rollback(mk);
        expect_same(m, read_all(st, all_ids(), 1 << 20));
        int64_t total = 0;
        for (const auto& kv : m) total += (int64_t)kv.second.size() / kD;
        EXPECT_EQ(st.total_rows(), total) << budget;
    }
}

TEST_F(RowStoreTest, StaleDirectoriesOfDeadProcessesAreRemoved) {
    char host[256] = "host";
    ::gethostname(host, sizeof host - 1);
    // A pid that cannot be alive (above pid_max), and this process's own pid (alive: kept).
    const std::string dead = dir_ + "/collapse-spill-" + host + "-999999999-abcdef";
    const std::string alive = dir_ + "/collapse-spill-" + host + "-" + std::to_string(::getpid()) + "-abcdef";
    const std::string other_host = dir_ + "/collapse-spill-elsewhere.example-999999999-abcdef";
    for (const auto& d : {dead, alive, other_host}) {
        fs::create_directories(d);
        testutil::write_file(d + "/part-000.seg", "x");
    }
    {
        RowStore st(kV, kD, 0, dir_);
        fill(st, 3, 4);
        EXPECT_FALSE(fs::exists(dead));
        EXPECT_TRUE(fs::exists(alive));
        EXPECT_TRUE(fs::exists(other_host));
    }
    EXPECT_TRUE(fs::exists(dir_)) << "a parent the store did not create is left alone";
}

// A failed flush must not leave its staged bytes for the next one (which may start in another
// partition, whose file is not even open yet).
TEST_F(RowStoreTest, FailedFlushLeavesNothingStaged) {
    bool broken = true;
    RowStore::WriteFn fn = [&](int fd, const void* p, size_t n, off_t off) -> ssize_t {
        if (broken) {
            errno = ENOSPC;
            return -1;
        }
        return ::pwrite(fd, p, n, off);
    };
    RowStore st(kV, kD, -1, dir_, fn);
    Model m;
    auto add = [&](int32_t c, int64_t n, double v) {
        double* x = st.append(c, n);
        for (int64_t k = 0; k < n * kD; ++k) m[c].push_back(x[k] = v + (double)k);
    };
    add(100, 7, 1.0);  // partition 42
    testutil::expect_error([&] { st.flush(); }, {std::strerror(ENOSPC)});
    broken = false;
    add(120, 3, 2.0);  // partition 51
    st.flush();
    int64_t on_disk = 0;
    for (const auto& e : fs::directory_iterator(st.spill_dir())) on_disk += (int64_t)fs::file_size(e.path());
    EXPECT_EQ(on_disk, st.disk_bytes());
    expect_same(m, read_all(st, all_ids(), 1 << 20));
}

// One dominant class: flushed as extents of bounded size, read back in pieces no larger than a
// load budget smaller than one extent (streamed, the checksum still checked).
TEST_F(RowStoreTest, DominantClassComesBackInBoundedPieces) {
    RowStore st(kV, kD, -1, dir_);
    Model m;
    const int64_t n = 400000;  // 16 MB of rows: several 4 MiB extents
    double* x = st.append(7, n);
    for (int64_t k = 0; k < n * kD; ++k) m[7].push_back(x[k] = (double)(k % 9973) * 0.5);
    st.flush();
    for (int64_t load : {int64_t(1) << 30, int64_t(3) << 20, int64_t(1000)}) expect_same(m, read_all(st, {7}, load));
    // A flipped byte inside the second extent is found by the streamed read too.
    const std::string part = st.spill_dir() + "/part-" + std::string(7 * 64 / kV < 10 ? "00" : "0") + std::to_string(7 * 64 / kV) + ".seg";
    ASSERT_TRUE(fs::exists(part)) << part;
    {
        std::fstream f(part, std::ios::in | std::ios::out | std::ios::binary);
        f.seekp((5 << 20) + 3);
        f.put('\x77');
    }
    testutil::expect_error([&] { read_all(st, {7}, 1000); }, {"is corrupt", "class 7"});
}

// A directory whose owner holds its lock is left alone even when its pid is not running here (the
// owner may live in another pid namespace under the same host name).
TEST_F(RowStoreTest, LockedDirectoriesAreNotRemoved) {
    char host[256] = "host";
    ::gethostname(host, sizeof host - 1);
    const std::string locked = dir_ + "/collapse-spill-" + host + "-999999998-abcdef";
    const std::string odd = dir_ + "/collapse-spill-" + host + "-12-4242-abcdef";  // host "<host>-12", pid 4242: not ours to judge
    fs::create_directories(locked);
    fs::create_directories(odd);
    const int fd = ::open(locked.c_str(), O_RDONLY | O_DIRECTORY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
    {
        RowStore st(kV, kD, 0, dir_);
        fill(st, 3, 4);
    }
    EXPECT_TRUE(fs::exists(locked));
    EXPECT_TRUE(fs::exists(odd));
    ::close(fd);
    {
        RowStore st(kV, kD, 0, dir_);
        fill(st, 3, 4);
    }
    EXPECT_FALSE(fs::exists(locked)) << "unlocked and its pid dead: stale";
}

}  // namespace
}  // namespace test_row_store
