// Checkpoint container: CRC32C vectors, round trips, every refusal of a damaged file, and the
// writer's behaviour on write errors, abandonment and crashes.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "base/atomic_file.hpp"
#include "base/error.hpp"
#include "common/file_helpers.hpp"
#include "io/checkpoint_file.hpp"

namespace test_checkpoint_file {
namespace {

using collapse::internal::Error;
using namespace collapse::internal;
using namespace collapse::internal::io;
using testutil::exists;
using testutil::expect_error;
using testutil::random_bytes;
using testutil::read_file;
using testutil::write_file;

uint32_t rd32(const std::string& s, size_t off) {
    uint32_t v;
    std::memcpy(&v, s.data() + off, 4);
    return v;
}
uint64_t rd64(const std::string& s, size_t off) {
    uint64_t v;
    std::memcpy(&v, s.data() + off, 8);
    return v;
}
void wr32(std::string& s, size_t off, uint32_t v) { std::memcpy(&s[off], &v, 4); }

// A write function that fails with `err` once `limit` bytes have been written in total (a short
// write up to the limit first, as a real full disk does). Counts bytes in *written.
CheckpointWriter::WriteFn failing_write(size_t limit, int err, size_t* written) {
    return [=](int fd, const void* data, size_t n, off_t off) -> ssize_t {
        if (*written >= limit) {
            errno = err;
            return -1;
        }
        const size_t allowed = std::min(n, limit - *written);
        const ssize_t r = ::pwrite(fd, data, allowed, off);
        if (r > 0) *written += (size_t)r;
        return r;
    };
}

class CheckpointTest : public testutil::TempDirTest {
protected:
    size_t dir_entries() const {
        size_t n = 0;
        for (auto it = std::filesystem::directory_iterator(dir_); it != std::filesystem::directory_iterator(); ++it)
            ++n;
        return n;
    }
};

// A small checkpoint with several sections of different types, sizes that leave padding.
struct Sample {
    std::vector<int64_t> counts = {3, -1, 7, 0, 1LL << 40, 5};
    std::vector<double> sums = {1.5, -2.25, 1e300, 0.0, -0.0};
    std::vector<float> gram = {1, 2, 3, 4, 5, 6, 7, 8};
    std::string config = "seed: 7\nbatch_rows: 65536\n";
    int32_t position = 12345;

    void write(CheckpointWriter& w) const {
        w.add("counts", COLLAPSE_I64, {3, 2}, counts.data(), counts.size() * 8);
        w.add("sums", COLLAPSE_F64, {5}, sums.data(), sums.size() * 8);
        w.add("gram", COLLAPSE_F32, {2, 2, 2}, gram.data(), gram.size() * 4);
        w.add("empty", COLLAPSE_F64, {0, 16}, nullptr, 0);
        w.add("config", COLLAPSE_U8, {(int64_t)config.size()}, config.data(), config.size());
        w.add("position", COLLAPSE_I32, {}, &position, 4);
    }
    void write(const std::string& p, CheckpointWriter::Options o = {}) const {
        CheckpointWriter w(p, o);
        write(w);
        w.commit();
    }
    static std::vector<std::string> names() { return {"counts", "sums", "gram", "empty", "config", "position"}; }
};

template <class T>
void expect_section(const CheckpointReader& r, const std::string& name, uint32_t dtype,
                    const std::vector<int64_t>& shape, const std::vector<T>& values) {
    SCOPED_TRACE(name);
    const CheckpointSection s = r.section(name);
    EXPECT_EQ(s.name, name);
    EXPECT_EQ(s.dtype_code, dtype);
    EXPECT_EQ(s.shape, shape);
    ASSERT_EQ(s.bytes, values.size() * sizeof(T));
    if (s.bytes) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(s.data) % 64, 0u);
        EXPECT_EQ(std::memcmp(s.data, values.data(), s.bytes), 0);
    } else {
        EXPECT_EQ(s.data, nullptr);
    }
}

void expect_sample(const CheckpointReader& r, const Sample& s) {
    EXPECT_EQ(r.names(), Sample::names());
    EXPECT_EQ(r.version(), 1u);
    for (const std::string& n : Sample::names()) EXPECT_TRUE(r.has(n)) << n;
    EXPECT_FALSE(r.has("count"));
    expect_section(r, "counts", COLLAPSE_I64, {3, 2}, s.counts);
    expect_section(r, "sums", COLLAPSE_F64, {5}, s.sums);
    expect_section(r, "gram", COLLAPSE_F32, {2, 2, 2}, s.gram);
    expect_section(r, "empty", COLLAPSE_F64, {0, 16}, std::vector<double>{});
    expect_section(r, "config", COLLAPSE_U8, {(int64_t)s.config.size()},
                   std::vector<char>(s.config.begin(), s.config.end()));
    expect_section(r, "position", COLLAPSE_I32, {}, std::vector<int32_t>{s.position});
}

// ---------------------------------------------------------------------------------------------
// CRC32C

TEST(Crc32c, KnownVectors) {
    const std::string digits = "123456789";
    const std::string zeros(32, '\0'), ones(32, '\xff');
    std::string up(32, '\0'), down(32, '\0');
    for (int i = 0; i < 32; ++i) {
        up[i] = (char)i;
        down[i] = (char)(31 - i);
    }
    for (auto* fn : {&crc32c, &crc32c_software}) {
        EXPECT_EQ(fn(digits.data(), digits.size(), 0), 0xE3069283u);
        EXPECT_EQ(fn(zeros.data(), zeros.size(), 0), 0x8A9136AAu);
        // RFC 3720 (iSCSI) B.4.
        EXPECT_EQ(fn(ones.data(), ones.size(), 0), 0x62A8AB43u);
        EXPECT_EQ(fn(up.data(), up.size(), 0), 0x46DD794Eu);
        EXPECT_EQ(fn(down.data(), down.size(), 0), 0x113FDB5Cu);
        EXPECT_EQ(fn(nullptr, 0, 0), 0u);
    }
}

TEST(Crc32c, IncrementalUnalignedAndBothPathsAgree) {
    const std::string data = random_bytes(4099, 11);
    for (size_t start : {0, 1, 3, 7, 8, 13}) {
        for (size_t len : {0, 1, 5, 8, 9, 63, 64, 1000, 4000}) {
            const char* p = data.data() + start;
            const uint32_t whole = crc32c_software(p, len);
            EXPECT_EQ(crc32c(p, len), whole) << start << " " << len;
            for (size_t split : {size_t(0), len / 3, len / 2, len}) {
                EXPECT_EQ(crc32c(p + split, len - split, crc32c(p, split)), whole);
                EXPECT_EQ(crc32c_software(p + split, len - split, crc32c_software(p, split)), whole);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_F(CheckpointTest, RoundTripSeveralSections) {
    const Sample s;
    const std::string p = path("a.ckpt");
    s.write(p);
    EXPECT_EQ(dir_entries(), 1u);  // no temp file left
    {
        CheckpointReader r(p);
        expect_sample(r, s);
    }
    {
        CheckpointReader r(p, {/*verify_all=*/false});
        expect_sample(r, s);
        r.verify_all_sections();
    }
    // The layout: header, table of 64 reserved slots, payloads on 64-byte boundaries.
    const std::string raw = read_file(p);
    EXPECT_EQ(raw.substr(0, 8), "CLPSCKPT");
    EXPECT_EQ(rd32(raw, 8), 1u);
    EXPECT_EQ(rd32(raw, 16), 6u);
    EXPECT_EQ(rd32(raw, 20), 96u);
    EXPECT_EQ(rd64(raw, 24), 6208u);  // 64 + 64 * 96 rounded up to 64
    EXPECT_EQ(rd64(raw, 32), raw.size());
    EXPECT_EQ(rd32(raw, 60), crc32c(raw.data(), 60));
    EXPECT_EQ(std::string(raw.data() + 64, 6), "counts");
    EXPECT_EQ(rd64(raw, 64 + 72), 6208u);  // first payload at data_offset
}

TEST_F(CheckpointTest, EmptyCheckpointAndLongestName) {
    const std::string p = path("e.ckpt");
    {
        CheckpointWriter w(p, {/*max_sections=*/0, nullptr});
        w.commit();
        w.commit();  // second commit is a no-op
    }
    {
        CheckpointReader r(p);
        EXPECT_TRUE(r.names().empty());
        EXPECT_EQ(read_file(p).size(), 64u);
    }
    const std::string name32(32, 'n');
    const std::vector<uint8_t> one = {42};
    {
        CheckpointWriter w(p, {/*max_sections=*/1, nullptr});
        w.add(name32, COLLAPSE_BOOL, {1, 1, 1, 1}, one.data(), 1);
        w.commit();
    }
    CheckpointReader r(p);
    expect_section(r, name32, COLLAPSE_BOOL, {1, 1, 1, 1}, one);
}

TEST_F(CheckpointTest, LargeSectionStreamedInChunks) {
    const std::string p = path("big.ckpt");
    const size_t chunk = size_t(1) << 20, chunks = 64;  // 64 MiB
    auto fill = [](std::vector<uint64_t>& buf, size_t c) {
        for (size_t i = 0; i < buf.size(); ++i) buf[i] = (c * buf.size() + i) * 0x9E3779B97F4A7C15ull;
    };
    std::vector<uint64_t> buf(chunk / 8);
    {
        CheckpointWriter w(p);
        w.add("before", COLLAPSE_I32, {1}, &chunks, 4);
        w.begin_section("gram", COLLAPSE_F64, {(int64_t)(chunks * chunk / 8)}, chunks * chunk);
        for (size_t c = 0; c < chunks; ++c) {
            fill(buf, c);
            w.append(buf.data(), chunk);
        }
        w.end_section();
        w.add("after", COLLAPSE_U8, {3}, "xyz", 3);
        w.commit();
    }
    CheckpointReader r(p);
    EXPECT_EQ(r.names(), (std::vector<std::string>{"before", "gram", "after"}));
    const CheckpointSection s = r.section("gram");
    ASSERT_EQ(s.bytes, chunks * chunk);
    EXPECT_EQ(s.shape, (std::vector<int64_t>{(int64_t)(chunks * chunk / 8)}));
    for (size_t c = 0; c < chunks; ++c) {
        fill(buf, c);
        ASSERT_EQ(std::memcmp(static_cast<const uint8_t*>(s.data) + c * chunk, buf.data(), chunk), 0) << c;
    }
    EXPECT_EQ(std::memcmp(r.section("after").data, "xyz", 3), 0);
}

TEST_F(CheckpointTest, CommitReplacesOldCheckpointAtomically) {
    const std::string p = path("c.ckpt");
    const int64_t one = 1, two = 2;
    {
        CheckpointWriter w(p);
        w.add("v", COLLAPSE_I64, {1}, &one, 8);
        w.commit();
    }
    CheckpointReader old_reader(p);
    {
        CheckpointWriter w(p);
        w.add("v", COLLAPSE_I64, {1}, &two, 8);
        EXPECT_EQ(*static_cast<const int64_t*>(CheckpointReader(p).section("v").data), 1);  // untouched so far
        EXPECT_TRUE(exists(w.temp_path()));
        // Unique beside it: "<path>.tmp.<host>-<pid>-XXXXXX" (base/atomic_file.hpp).
        const std::string stem = p + ".tmp." + host_name() + "-" + std::to_string(::getpid()) + "-";
        EXPECT_EQ(w.temp_path().substr(0, stem.size()), stem);
        EXPECT_EQ(w.temp_path().size(), stem.size() + 6);
        w.commit();
        EXPECT_FALSE(exists(w.temp_path()));
    }
    EXPECT_EQ(*static_cast<const int64_t*>(CheckpointReader(p).section("v").data), 2);
    // A reader opened before the rename keeps seeing the old file, whole.
    EXPECT_EQ(*static_cast<const int64_t*>(old_reader.section("v").data), 1);
}

// ---------------------------------------------------------------------------------------------
// Refusals of damaged files

// Flips every byte of a small checkpoint, one at a time: each flip is refused, naming the region.
TEST_F(CheckpointTest, FlipEveryByteIsRefusedNamingTheRegion) {
    const Sample s;
    const std::string good_path = path("good.ckpt");
    s.write(good_path, {/*max_sections=*/8, nullptr});
    const std::string good = read_file(good_path);
    const size_t count = rd32(good, 16), data_offset = rd64(good, 24);
    ASSERT_EQ(data_offset, 832u);  // 64 + 8 * 96
    const size_t table_end = 64 + count * 96;

    // What a flip at each offset must say.
    std::vector<std::string> expected(good.size());
    for (size_t i = 0; i < good.size(); ++i) {
        if (i < 8)
            expected[i] = "not a collapse checkpoint";
        else if (i < 64)
            expected[i] = "corrupt header";
        else if (i < data_offset)
            expected[i] = "corrupt section table";
    }
    for (size_t k = 0; k < count; ++k) {
        const std::string name(good.data() + 64 + 96 * k);
        const size_t off = rd64(good, 64 + 96 * k + 72), bytes = rd64(good, 64 + 96 * k + 80);
        for (size_t i = off; i < off + bytes; ++i) expected[i] = "corrupt section " + name + " (checksum mismatch";
        const size_t next = k + 1 < count ? rd64(good, 64 + 96 * (k + 1) + 72) : good.size();
        for (size_t i = off + bytes; i < next; ++i) expected[i] = "corrupt padding after section " + name;
    }
    const std::string p = path("bad.ckpt");
    size_t payload_flips = 0;
    for (size_t i = 0; i < good.size(); ++i) {
        ASSERT_FALSE(expected[i].empty()) << "offset " << i << " belongs to no region";
        SCOPED_TRACE("flipped byte " + std::to_string(i));
        std::string bad = good;
        bad[i] ^= 0x20;
        write_file(p, bad);
        expect_error([&] { CheckpointReader r(p); }, {p, expected[i]});
        if (expected[i].find("checksum mismatch") != std::string::npos && i >= table_end) ++payload_flips;
    }
    EXPECT_GT(payload_flips, 0u);
}

TEST_F(CheckpointTest, LazyVerificationRefusesOnlyTheCorruptSection) {
    const Sample s;
    const std::string p = path("lazy.ckpt");
    s.write(p);
    std::string raw = read_file(p);
    const size_t sums_off = rd64(raw, 64 + 96 * 1 + 72);
    raw[sums_off + 3] ^= 1;
    write_file(p, raw);
    CheckpointReader r(p, {/*verify_all=*/false});  // opens: the header and table are fine
    expect_section(r, "counts", COLLAPSE_I64, {3, 2}, s.counts);
    const std::string msg = expect_error([&] { r.section("sums"); }, {p, "corrupt section sums", "expected 0x"});
    EXPECT_NE(msg.find("found 0x"), std::string::npos) << msg;
    expect_error([&] { r.verify_all_sections(); }, {"corrupt section sums"});
    expect_error([&] { CheckpointReader eager(p); }, {"corrupt section sums"});
}

// Every 7th prefix of a small checkpoint: refused as truncated, naming where, never a crash.
TEST_F(CheckpointTest, TruncatedAtEveryOffsetIsRefused) {
    const Sample s;
    const std::string good_path = path("good.ckpt");
    s.write(good_path, {/*max_sections=*/6, nullptr});
    const std::string good = read_file(good_path);
    const size_t count = rd32(good, 16), data_offset = rd64(good, 24);
    const std::string p = path("cut.ckpt");
    std::vector<size_t> lengths;
    for (size_t n = 0; n < good.size(); n += 7) lengths.push_back(n);
    lengths.push_back(good.size() - 1);
    for (size_t n : lengths) {
        SCOPED_TRACE("length " + std::to_string(n));
        std::string where;
        if (n < 64)
            where = "truncated at header";
        else if (n < data_offset)
            where = "truncated at section table";
        else
            for (size_t k = 0; k < count && where.empty(); ++k)
                if (rd64(good, 64 + 96 * k + 72) + rd64(good, 64 + 96 * k + 80) > n)
                    where = "truncated at section " + std::string(good.data() + 64 + 96 * k);
        ASSERT_FALSE(where.empty());
        write_file(p, good.substr(0, n));
        expect_error([&] { CheckpointReader r(p); }, {p, where});
    }
    write_file(p, good + std::string(1, '\0'));
    expect_error([&] { CheckpointReader r(p); }, {p, "trailing bytes"});
}

TEST_F(CheckpointTest, WrongMagicIsNotACheckpoint) {
    const std::string p = path("x.ckpt");
    write_file(p, std::string("\x93NUMPY\x01\x00", 8) + std::string(200, ' '));
    expect_error([&] { CheckpointReader r(p); }, {p, "not a collapse checkpoint"});
    write_file(p, "CLPS");  // a prefix of the magic: truncated rather than foreign
    expect_error([&] { CheckpointReader r(p); }, {p, "truncated at header"});
    write_file(p, "hi");
    expect_error([&] { CheckpointReader r(p); }, {p, "not a collapse checkpoint"});
    expect_error([&] { CheckpointReader r(path("absent.ckpt")); }, {path("absent.ckpt"), "No such file"});
    expect_error([&] { CheckpointReader r(dir_); }, {dir_});
}

TEST_F(CheckpointTest, NewerOrZeroVersionIsRefused) {
    const std::string p = path("v.ckpt");
    Sample().write(p);
    std::string raw = read_file(p);
    wr32(raw, 8, 3);
    wr32(raw, 60, crc32c(raw.data(), 60));  // a real v3 header: its checksum is valid
    write_file(p, raw);
    expect_error([&] { CheckpointReader r(p); },
                 {p, "written by a newer collapse (format v3, this build reads v1)"});
    wr32(raw, 8, 0);
    wr32(raw, 60, crc32c(raw.data(), 60));
    write_file(p, raw);
    expect_error([&] { CheckpointReader r(p); }, {p, "unsupported format version 0"});
    wr32(raw, 8, 1);
    wr32(raw, 12, 4);  // an unknown flag
    wr32(raw, 60, crc32c(raw.data(), 60));
    write_file(p, raw);
    expect_error([&] { CheckpointReader r(p); }, {p, "unsupported flags"});
}

TEST_F(CheckpointTest, MissingSectionIsNamed) {
    const std::string p = path("m.ckpt");
    Sample().write(p);
    CheckpointReader r(p);
    expect_error([&] { r.section("class_sums"); }, {p, "missing section class_sums", "counts, sums"});
}

// A table that passes its checksum but describes an impossible layout (a buggy or hostile writer).
TEST_F(CheckpointTest, InconsistentTableWithValidChecksumIsRefused) {
    const std::string p = path("t.ckpt");
    Sample().write(p, {/*max_sections=*/6, nullptr});
    const std::string good = read_file(p);
    auto patched = [&](size_t off, uint64_t v, int width) {
        std::string raw = good;
        std::memcpy(&raw[off], &v, width);
        const size_t table_bytes = 96 * rd32(raw, 16);
        wr32(raw, 40, crc32c(raw.data() + 64, table_bytes));
        wr32(raw, 60, crc32c(raw.data(), 60));
        write_file(p, raw);
    };
    const size_t e1 = 64 + 96;  // entry of "sums"
    patched(e1 + 72, rd64(good, e1 + 72) + 64, 8);
    expect_error([&] { CheckpointReader r(p); }, {"corrupt section table", "sums", "offset"});
    patched(e1 + 80, 1ull << 62, 8);
    expect_error([&] { CheckpointReader r(p); }, {"corrupt section table", "sums"});
    patched(e1 + 32, 99, 4);
    expect_error([&] { CheckpointReader r(p); }, {"corrupt section table", "sums", "element type code 99"});
    patched(e1 + 36, 5, 4);
    expect_error([&] { CheckpointReader r(p); }, {"corrupt section table", "sums", "5 dims"});
    patched(e1, 0, 1);
    expect_error([&] { CheckpointReader r(p); }, {"corrupt section table", "empty name"});
    patched(e1, 'c' | ('o' << 8) | ('u' << 16) | ('n' << 24), 4);  // "counsums": valid, unique
    EXPECT_NO_THROW(CheckpointReader r(p));
    {
        std::string raw = good;
        std::memcpy(&raw[64], "sums\0\0", 6);
        wr32(raw, 40, crc32c(raw.data() + 64, 96 * 6));
        wr32(raw, 60, crc32c(raw.data(), 60));
        write_file(p, raw);
        expect_error([&] { CheckpointReader r(p); }, {"corrupt section table", "duplicate name"});
    }
    patched(32, rd64(good, 32) + 64, 8);  // file_bytes in the header
    expect_error([&] { CheckpointReader r(p); }, {"corrupt header", "sections end at"});
    patched(24, 100, 8);  // data offset not aligned
    expect_error([&] { CheckpointReader r(p); }, {"corrupt header"});
}

// ---------------------------------------------------------------------------------------------
// Writer failures

TEST_F(CheckpointTest, WriterDestroyedWithoutCommitLeavesNothing) {
    const std::string p = path("abandoned.ckpt");
    std::string tmp;
    {
        CheckpointWriter w(p);
        Sample().write(w);
        tmp = w.temp_path();
        EXPECT_TRUE(exists(tmp));
        EXPECT_FALSE(exists(p));
    }
    EXPECT_FALSE(exists(tmp));
    EXPECT_FALSE(exists(p));
    EXPECT_EQ(dir_entries(), 0u);
    // Also when an exception unwinds through a half-written section.
    try {
        CheckpointWriter w(p);
        w.begin_section("x", COLLAPSE_U8, {10}, 10);
        w.append("abc", 3);
        throw std::runtime_error("caller failed");
    } catch (const std::runtime_error&) {
    }
    EXPECT_EQ(dir_entries(), 0u);
}

// A write failure at many byte positions (inside payloads, padding, the table, the header):
// COLLAPSE_ERR_IO naming the path and the errno text, no file, no temp, the writer refuses more.
TEST_F(CheckpointTest, InjectedWriteFailureAtManyPositions) {
    const Sample s;
    const std::string p = path("f.ckpt");
    size_t total = 0;
    s.write(p, {8, failing_write(SIZE_MAX, 0, &total)});
    const size_t file_size = read_file(p).size();
    EXPECT_EQ(total, file_size);  // every byte is written once, the reserved slots and padding included
    ASSERT_EQ(::unlink(p.c_str()), 0);

    for (size_t limit : {size_t(0), size_t(1), size_t(47), size_t(48), size_t(100), total / 2, total - 200,
                         total - 64, total - 1}) {
        SCOPED_TRACE("fail at byte " + std::to_string(limit));
        for (int err : {ENOSPC, EIO}) {
            size_t written = 0;
            {
                CheckpointWriter w(p, {8, failing_write(limit, err, &written)});
                try {
                    s.write(w);
                    w.commit();
                    ADD_FAILURE() << "no error";
                } catch (const Error& e) {
                    EXPECT_EQ(e.status(), COLLAPSE_ERR_IO);
                    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
                    EXPECT_NE(std::string(e.what()).find(std::strerror(err)), std::string::npos) << e.what();
                }
                EXPECT_FALSE(exists(w.temp_path()));  // removed at once, not only by the destructor
                expect_error([&] { w.add("more", COLLAPSE_U8, {1}, "x", 1); }, {p, "earlier error"});
                expect_error([&] { w.commit(); }, {p, "earlier error"});
            }
            EXPECT_FALSE(exists(p));
            EXPECT_EQ(dir_entries(), 0u);
        }
    }
}

TEST_F(CheckpointTest, ShortWritesAndEintrAreRetried) {
    const Sample s;
    const std::string p = path("short.ckpt");
    int calls = 0;
    auto stutter = [&](int fd, const void* data, size_t n, off_t off) -> ssize_t {
        if (++calls % 3 == 0) {
            errno = EINTR;
            return -1;
        }
        return ::pwrite(fd, data, std::min<size_t>(n, 5), off);
    };
    s.write(p, {8, stutter});
    CheckpointReader r(p);
    expect_sample(r, s);
}

TEST_F(CheckpointTest, OldCheckpointSurvivesFailedWrite) {
    const Sample s;
    const std::string p = path("keep.ckpt");
    s.write(p);
    const std::string before = read_file(p);
    const std::vector<double> big(100000, 3.0);
    size_t written = 0;
    {
        CheckpointWriter w(p, {64, failing_write(1200000, ENOSPC, &written)});
        w.add("a", COLLAPSE_F64, {(int64_t)big.size()}, big.data(), big.size() * 8);
        expect_error([&] { w.add("b", COLLAPSE_F64, {(int64_t)big.size()}, big.data(), big.size() * 8); },
                     {p, std::strerror(ENOSPC)});
    }
    EXPECT_TRUE(read_file(p) == before);
    EXPECT_EQ(dir_entries(), 1u);
    CheckpointReader r(p);
    expect_sample(r, s);
}

// A crash (the process dies) at many points of a write: the old checkpoint or the new one is
// under the name, whole; never a mix. The child dies inside the write function at byte N,
// without running any destructor; only a completed commit() may show the new checkpoint.
TEST_F(CheckpointTest, CrashAtAnyPointLeavesOldOrNewWhole) {
    const Sample old_s;
    Sample new_s;
    new_s.position = 999;
    new_s.config = "a different config\n";
    const std::string p = path("crash.ckpt");
    size_t total = 0;  // bytes the new checkpoint's writer writes
    new_s.write(path("probe.ckpt"), {64, failing_write(SIZE_MAX, 0, &total)});
    ::unlink(path("probe.ckpt").c_str());
    std::vector<size_t> points;
    for (size_t k = 0; k <= 16; ++k) points.push_back(total * k / 17);
    points.push_back(total - 64);  // the header is written last
    points.push_back(total - 1);
    points.push_back(SIZE_MAX);  // no crash: commit completes
    for (size_t crash_at : points) {
        SCOPED_TRACE("crash at byte " + std::to_string(crash_at));
        old_s.write(p);
        const std::string old_bytes = read_file(p);
        const pid_t pid = ::fork();
        ASSERT_GE(pid, 0);
        if (pid == 0) {
            size_t written = 0;
            auto dying = [&](int fd, const void* data, size_t n, off_t off) -> ssize_t {
                if (written + n > crash_at) {
                    (void)!::pwrite(fd, data, crash_at - written, off);
                    ::_exit(3);  // no destructors, no cleanup: a crash
                }
                written += n;
                return ::pwrite(fd, data, n, off);
            };
            CheckpointWriter w(p, {64, dying});
            new_s.write(w);
            w.commit();
            ::_exit(0);
        }
        int status = 0;
        ASSERT_EQ(::waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status));
        CheckpointReader r(p);
        if (crash_at != SIZE_MAX) {
            EXPECT_EQ(WEXITSTATUS(status), 3);
            EXPECT_TRUE(read_file(p) == old_bytes);
            expect_sample(r, old_s);
            // A crashed writer's temp file stays (it is never read) until the next writer of the
            // path, which removes it: its process is gone and it holds no lock.
            const std::string stale = p + ".tmp." + host_name() + "-" + std::to_string(pid) + "-";
            auto stale_left = [&] {
                for (const auto& e : std::filesystem::directory_iterator(dir_))
                    if (e.path().string().rfind(stale, 0) == 0) return true;
                return false;
            };
            EXPECT_TRUE(stale_left());
            old_s.write(p);
            EXPECT_FALSE(stale_left());
        } else {
            EXPECT_EQ(WEXITSTATUS(status), 0);
            expect_sample(r, new_s);
        }
        EXPECT_EQ(dir_entries(), 1u);
    }
}

// RLIMIT_FSIZE makes write() fail with EFBIG: a real kernel error without a full disk.
TEST_F(CheckpointTest, FileSizeLimitIsAnIoError) {
    struct rlimit old;
    ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
    if (old.rlim_cur != RLIM_INFINITY && old.rlim_cur < (8u << 20)) GTEST_SKIP() << "file size already limited";
    const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old;
    small.rlim_cur = 64 * 1024;
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);

    const std::string p = path("limited.ckpt");
    const std::string chunk(1u << 20, 'x');
    {
        CheckpointWriter w(p);
        expect_error([&] { w.add("big", COLLAPSE_U8, {(int64_t)chunk.size()}, chunk.data(), chunk.size()); },
                     {p, std::strerror(EFBIG)});
        expect_error([&] { w.commit(); }, {p, "earlier error"});
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    ::signal(SIGXFSZ, old_handler);
    EXPECT_FALSE(exists(p));
    EXPECT_EQ(dir_entries(), 0u);
}

// Tests run as root, so permissions do not stop writes: a path under a regular file does.
TEST_F(CheckpointTest, UnwritableDirectoryIsAnIoError) {
    write_file(path("plain"), "not a directory");
    const std::string p = path("plain/sub.ckpt");
    expect_error([&] { CheckpointWriter w(p); }, {p, std::strerror(ENOTDIR)});
    expect_error([&] { CheckpointWriter w(path("no/such/dir/x.ckpt")); }, {"no/such/dir/x.ckpt", std::strerror(ENOENT)});
    // The final name is a directory: refused before anything is written.
    ASSERT_EQ(::mkdir(path("taken").c_str(), 0755), 0);
    expect_error([&] { CheckpointWriter w(path("taken")); }, {path("taken"), std::strerror(EISDIR)});
    // The temp file removed under the writer (a read-only directory does not stop root): the
    // rename fails, naming the path and the system error.
    ASSERT_EQ(::mkdir(path("gone").c_str(), 0755), 0);
    {
        CheckpointWriter w(path("gone/c.ckpt"));
        Sample().write(w);
        const std::string tmp = w.temp_path();
        ASSERT_EQ(::unlink(tmp.c_str()), 0);
        expect_error([&] { w.commit(); }, {path("gone/c.ckpt"), "rename", std::strerror(ENOENT)});
        EXPECT_FALSE(exists(tmp));
    }
    EXPECT_EQ(dir_entries(), 3u);  // "plain", "taken" and "gone" only
    EXPECT_TRUE(std::filesystem::is_empty(path("gone")));
}

TEST_F(CheckpointTest, BadArgumentsLeaveTheWriterUsable) {
    const std::string p = path("args.ckpt");
    const int64_t v[4] = {1, 2, 3, 4};
    CheckpointWriter w(p, {3, nullptr});
    const auto inval = COLLAPSE_ERR_INVALID_ARGUMENT;
    expect_error([&] { w.add("", COLLAPSE_I64, {1}, v, 8); }, {"section name"}, inval);
    expect_error([&] { w.add(std::string(33, 'x'), COLLAPSE_I64, {1}, v, 8); }, {"1 to 32 bytes"}, inval);
    expect_error([&] { w.add(std::string("a\0b", 3), COLLAPSE_I64, {1}, v, 8); }, {"\"a\\x00b\"", "without NUL"}, inval);
    expect_error([&] { w.add("v", COLLAPSE_I64, {3}, v, 8); }, {"section v", "declares 8 bytes", "needs 24"}, inval);
    expect_error([&] { w.add("v", COLLAPSE_I64, {1, 1, 1, 1, 1}, v, 8); }, {"5 dims"}, inval);
    expect_error([&] { w.add("v", 77, {1}, v, 8); }, {"element type code 77"}, inval);
    expect_error([&] { w.add("v", COLLAPSE_I64, {-1}, v, 8); }, {"shape [-1]"}, inval);
    expect_error([&] { w.add("v", COLLAPSE_I64, {1}, nullptr, 8); }, {"null data"}, inval);
    w.add("v", COLLAPSE_I64, {4}, v, 32);
    expect_error([&] { w.add("v", COLLAPSE_I64, {1}, v, 8); }, {"duplicate section v"}, inval);
    w.begin_section("w", COLLAPSE_I64, {2}, 16);
    expect_error([&] { w.append(v, 24); }, {"exceeds the declared 16"}, inval);
    w.append(v, 8);
    expect_error([&] { w.end_section(); }, {"8 bytes appended, 16 declared"}, inval);
    expect_error([&] { w.commit(); }, {"section w has not ended"}, COLLAPSE_ERR_STATE);
    expect_error([&] { w.begin_section("z", COLLAPSE_U8, {0}, 0); }, {"before section w has ended"},
                 COLLAPSE_ERR_STATE);
    w.append(v + 1, 8);
    w.end_section();
    expect_error([&] { w.append(v, 8); }, {"outside a section"}, COLLAPSE_ERR_STATE);
    w.add("x", COLLAPSE_U8, {0}, nullptr, 0);
    expect_error([&] { w.add("y", COLLAPSE_U8, {0}, nullptr, 0); }, {"max_sections = 3"}, inval);
    // Two writers of one path at once in this process are a mistake (the last commit would win).
    expect_error([&] { CheckpointWriter other(p); }, {p, "another CheckpointWriter"}, COLLAPSE_ERR_STATE);
    w.commit();
    expect_error([&] { w.add("late", COLLAPSE_U8, {0}, nullptr, 0); }, {"already committed"}, COLLAPSE_ERR_STATE);

    CheckpointReader r(p);
    EXPECT_EQ(r.names(), (std::vector<std::string>{"v", "w", "x"}));
    expect_section(r, "v", COLLAPSE_I64, {4}, std::vector<int64_t>(v, v + 4));
    expect_section(r, "w", COLLAPSE_I64, {2}, std::vector<int64_t>(v, v + 2));
    CheckpointWriter again(p);  // the first one is done: a new writer for the path is fine
}


// Issue 15: the temp name is unique and created exclusively, so files that merely look like temp
// files (an old "<path>.tmp", one of a live process) are never touched.
TEST_F(CheckpointTest, TempFilesOfOthersAreNeverClobbered) {
    const std::string p = path("c.ckpt");
    const std::string live = p + ".tmp." + host_name() + "-" + std::to_string(::getpid()) + "-ABCDEF";
    write_file(p + ".tmp", "someone's file");
    write_file(live, "a live writer's temp file");
    Sample().write(p);
    expect_sample(CheckpointReader(p), Sample());
    EXPECT_EQ(read_file(p + ".tmp"), "someone's file");
    EXPECT_EQ(read_file(live), "a live writer's temp file");
    EXPECT_EQ(dir_entries(), 3u);
}

// A path that exists and is not a regular file is written straight through, never replaced:
// /dev/null stays the device; a FIFO cannot take a checkpoint (it is written out of order).
TEST_F(CheckpointTest, DevNullIsWrittenThroughAndAFifoIsRefused) {
    {
        CheckpointWriter w("/dev/null");
        EXPECT_EQ(w.temp_path(), "");
        Sample().write(w);
        w.commit();
    }
    struct stat st;
    ASSERT_EQ(::stat("/dev/null", &st), 0);
    EXPECT_TRUE(S_ISCHR(st.st_mode));
    const std::string fifo = path("fifo");
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK);  // so that opening it for writing does not block
    ASSERT_GE(reader, 0);
    expect_error([&] { CheckpointWriter w(fifo); }, {fifo, "pipe"});
    ::close(reader);
    ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
    EXPECT_TRUE(S_ISFIFO(st.st_mode));
    EXPECT_EQ(dir_entries(), 1u);
}

}  // namespace
}  // namespace test_checkpoint_file
