// .npy / .safetensors readers and writers: round trips, hand-built headers, and every refusal.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "common/file_helpers.hpp"
#include "io/tensor_file.hpp"

#ifndef COLLAPSE_SHARED_DIR
#define COLLAPSE_SHARED_DIR "../shared"
#endif

namespace test_tensor_file {
namespace {

using collapse::internal::Error;
using namespace collapse::internal::io;
using testutil::exists;
using testutil::random_bytes;
using testutil::read_file;
using testutil::write_file;

const collapse_dtype kAllDtypes[] = {COLLAPSE_F32, COLLAPSE_F16, COLLAPSE_BF16, COLLAPSE_F64,
                                     COLLAPSE_I32, COLLAPSE_I64, COLLAPSE_U8,   COLLAPSE_BOOL};

std::string le(uint64_t v, int bytes) {
    std::string s;
    for (int i = 0; i < bytes; ++i) s += (char)((v >> (8 * i)) & 0xff);
    return s;
}

// A .npy file by hand: magic, version, little-endian header length, the dict text as given.
std::string npy_bytes(int major, const std::string& dict, const std::string& data, int minor = 0) {
    std::string s = "\x93NUMPY";
    s += (char)major;
    s += (char)minor;
    s += le(dict.size(), major == 1 ? 2 : 4);
    return s + dict + data;
}

std::string st_bytes(const std::string& json, const std::string& data) { return le(json.size(), 8) + json + data; }

// Runs fn, which must throw Error(COLLAPSE_ERR_IO) whose message contains every piece.
void expect_io_error(const std::function<void()>& fn, const std::vector<std::string>& pieces) {
    testutil::expect_error(fn, pieces, COLLAPSE_ERR_IO);
}

class TensorFileTest : public testutil::TempDirTest {
protected:
    // Writes the bytes to a fresh file and expects open_npy to refuse it with the given reason.
    void expect_npy_refused(const std::string& name, const std::string& bytes, const std::string& reason) {
        const std::string p = path(name);
        write_file(p, bytes);
        expect_io_error([&] { open_npy(p); }, {p, reason});
    }
    void expect_st_refused(const std::string& name, const std::string& bytes, const std::vector<std::string>& reason) {
        const std::string p = path(name);
        write_file(p, bytes);
        std::vector<std::string> pieces = reason;
        pieces.push_back(p);
        expect_io_error([&] { SafetensorsFile f(p); }, pieces);
    }
    // The writers' temporary files here ("<name>.tmp.<host>-<pid>-XXXXXX", base/atomic_file.hpp).
    size_t temp_files() const {
        size_t n = 0;
        for (const auto& e : std::filesystem::directory_iterator(dir_)) n += e.path().filename().string().find(".tmp.") != std::string::npos;
        return n;
    }
};

size_t nbytes(collapse_dtype t, const std::vector<int64_t>& shape) {
    size_t n = collapse::internal::dtype_size(t);
    for (int64_t d : shape) n *= (size_t)d;
    return n;
}

void expect_data(const Tensor& t, const std::string& expected) {
    ASSERT_EQ((size_t)t.numel() * collapse::internal::dtype_size(t.dtype), expected.size());
    if (!expected.empty()) {
        EXPECT_EQ(std::memcmp(t.data(), expected.data(), expected.size()), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// MappedFile

TEST_F(TensorFileTest, MappedFileMissingNamesPathAndReason) {
    const std::string p = path("nope.npy");
    expect_io_error([&] { MappedFile f(p); }, {p, "No such file or directory"});
}

TEST_F(TensorFileTest, MappedFileEmptyFile) {
    write_file(path("empty"), "");
    MappedFile f(path("empty"));
    EXPECT_EQ(f.size(), 0u);
    EXPECT_EQ(f.data(), nullptr);
    f.release(0, 100);  // no-op, must not crash
}

TEST_F(TensorFileTest, MappedFileRefusesDirectory) {
    expect_io_error([&] { MappedFile f(dir_); }, {dir_});
}

TEST_F(TensorFileTest, MappedFileReleaseKeepsContentsReadable) {
    const std::string bytes = random_bytes(5 * 4096 + 123, 7);
    write_file(path("f"), bytes);
    MappedFile f(path("f"));
    ASSERT_EQ(f.size(), bytes.size());
    f.release(0, f.size());
    f.release(100, 4096 * 3);        // rounds inward
    f.release(f.size() - 1, 1000);   // clipped to the file
    f.release(f.size() + 10, 1000);  // past the end
    EXPECT_EQ(std::memcmp(f.data(), bytes.data(), bytes.size()), 0);
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_F(TensorFileTest, NpyRoundTripEveryDtypeAndRank) {
    const std::vector<std::vector<int64_t>> shapes = {{}, {0}, {5}, {3, 4}, {2, 3, 4}, {7, 0, 3}};
    uint32_t seed = 1;
    for (collapse_dtype t : kAllDtypes) {
        if (t == COLLAPSE_BF16) continue;  // refused, tested below
        for (const auto& shape : shapes) {
            SCOPED_TRACE(std::string(collapse::internal::dtype_name(t)) + " rank " + std::to_string(shape.size()));
            const std::string p = path("rt.npy");
            const std::string data = random_bytes(nbytes(t, shape), seed++);
            NpyWriter w(p, t, shape);
            // Uneven chunks: append is a byte stream, not element-aligned.
            for (size_t i = 0; i < data.size(); i += 5) w.append(data.data() + i, std::min<size_t>(5, data.size() - i));
            w.close();
            EXPECT_EQ(temp_files(), 0u);

            const Tensor tensor = open_npy(p);
            EXPECT_EQ(tensor.dtype, t);
            EXPECT_EQ(tensor.shape, shape);
            EXPECT_EQ(tensor.name, p);
            EXPECT_EQ(tensor.offset % 64, 0u);  // numpy's alignment
            const std::string raw = read_file(p);
            EXPECT_EQ(raw[6], '\x01');
            EXPECT_EQ(raw[tensor.offset - 1], '\n');
            expect_data(tensor, data);
        }
    }
}

TEST_F(TensorFileTest, NpyWriterHeaderMatchesNumpy) {
    write_npy(path("a.npy"), COLLAPSE_F32, {5}, std::vector<float>(5).data());
    const std::string raw = read_file(path("a.npy"));
    const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }";
    ASSERT_GE(raw.size(), 128u);
    EXPECT_EQ(raw.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
    EXPECT_EQ(raw.substr(10, dict.size()), dict);
    EXPECT_EQ((uint8_t)raw[8] | ((uint8_t)raw[9] << 8), 128 - 10);  // 10 + 57 + 1 padded to 128

    write_npy(path("b.npy"), COLLAPSE_BOOL, {2, 3}, std::string(6, '\1').data());
    EXPECT_NE(read_file(path("b.npy")).find("{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }"),
              std::string::npos);
    write_npy(path("c.npy"), COLLAPSE_I64, {}, std::vector<int64_t>(1, 42).data());
    EXPECT_NE(read_file(path("c.npy")).find("'shape': (), }"), std::string::npos);
    const Tensor c = open_npy(path("c.npy"));
    EXPECT_EQ(*static_cast<const int64_t*>(c.data()), 42);
    EXPECT_EQ(c.numel(), 1);
}

TEST_F(TensorFileTest, NpyWriterUsesVersion2ForHugeHeaders) {
    const std::vector<int64_t> shape(25000, 1);  // ~75 KB of "1, " in the header
    const std::string p = path("v2.npy");
    write_npy(p, COLLAPSE_F64, shape, std::vector<double>(1, 3.5).data());
    const std::string raw = read_file(p);
    EXPECT_EQ(raw[6], '\x02');
    const Tensor t = open_npy(p);
    EXPECT_EQ(t.shape, shape);
    EXPECT_EQ(t.offset % 64, 0u);
    EXPECT_EQ(*static_cast<const double*>(t.data()), 3.5);
}

TEST_F(TensorFileTest, SafetensorsRoundTripEveryDtype) {
    std::vector<TensorSpec> specs;
    const std::vector<std::vector<int64_t>> shapes = {{3}, {2, 3}, {2, 1, 3}, {}, {0, 4}, {5}, {1, 7}, {3, 3}};
    for (size_t i = 0; i < 8; ++i)
        specs.push_back({"t" + std::to_string(7 - i), kAllDtypes[i], shapes[i]});  // names not in sorted order
    std::string data;
    for (const TensorSpec& s : specs) data += random_bytes(nbytes(s.dtype, s.shape), (uint32_t)data.size() + 11);

    const std::string p = path("rt.safetensors");
    SafetensorsWriter w(p, specs);
    for (size_t i = 0; i < data.size(); i += 7)  // chunks cross tensor boundaries
        w.append(data.data() + i, std::min<size_t>(7, data.size() - i));
    w.close();
    EXPECT_EQ(temp_files(), 0u);

    const std::string raw = read_file(p);
    uint64_t header_len = 0;
    std::memcpy(&header_len, raw.data(), 8);
    EXPECT_EQ(header_len % 8, 0u);

    SafetensorsFile f(p);
    std::vector<std::string> expected_names;
    for (const TensorSpec& s : specs) expected_names.push_back(s.name);
    EXPECT_EQ(f.names(), expected_names);  // file order = the order given to the writer
    EXPECT_EQ(f.path(), p);
    size_t at = 0;
    for (const TensorSpec& s : specs) {
        SCOPED_TRACE(s.name);
        ASSERT_TRUE(f.has(s.name));
        const Tensor t = f.tensor(s.name);
        EXPECT_EQ(t.name, s.name);
        EXPECT_EQ(t.dtype, s.dtype);
        EXPECT_EQ(t.shape, s.shape);
        EXPECT_EQ(t.offset, 8 + header_len + at);
        const size_t n = nbytes(s.dtype, s.shape);
        expect_data(t, data.substr(at, n));
        at += n;
    }
    EXPECT_FALSE(f.has("t8"));
}

TEST_F(TensorFileTest, SafetensorsHeaderJson) {
    const std::string p = path("h.safetensors");
    SafetensorsWriter w(p, {{"b", COLLAPSE_F32, {2}}, {"a", COLLAPSE_U8, {3}}});
    w.append("\0\0\x80?\0\0\0@abc", 11);
    w.close();
    const std::string raw = read_file(p);
    const std::string json =
        "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[8,11]}}";
    EXPECT_EQ(raw.substr(8, json.size()), json);
    SafetensorsFile f(p);
    EXPECT_EQ(static_cast<const float*>(f.tensor("b").data())[1], 2.0f);
}

TEST_F(TensorFileTest, SafetensorsReaderIgnoresMetadataAndSortsByOffset) {
    const std::string json =
        "{\"__metadata__\": {\"format\": \"pt\"}, \"z\": {\"dtype\": \"I32\", \"shape\": [1], \"data_offsets\": [0, "
        "4]},"
        " \"a\": {\"dtype\": \"BF16\", \"shape\": [2], \"data_offsets\": [4, 8]}}   ";
    write_file(path("m.safetensors"), st_bytes(json, std::string("\x01\0\0\0\x80\x3f\0\x40", 8)));
    SafetensorsFile f(path("m.safetensors"));
    EXPECT_EQ(f.names(), (std::vector<std::string>{"z", "a"}));
    EXPECT_FALSE(f.has("__metadata__"));
    const Tensor a = f.tensor("a");
    EXPECT_EQ(collapse::internal::bf16_to_float(static_cast<const uint16_t*>(a.data())[0]), 1.0f);
    EXPECT_EQ(collapse::internal::bf16_to_float(static_cast<const uint16_t*>(a.data())[1]), 2.0f);
}

// ---------------------------------------------------------------------------------------------
// Tensor helpers

TEST_F(TensorFileTest, TensorRowHelpers) {
    std::vector<float> v(4 * 1024 * 3);
    for (size_t i = 0; i < v.size(); ++i) v[i] = (float)i;
    write_npy(path("r.npy"), COLLAPSE_F32, {4, 1024, 3}, v.data());
    const Tensor t = open_npy(path("r.npy"));
    EXPECT_EQ(t.rows(), 4);
    EXPECT_EQ(t.row_elements(), 3072);
    EXPECT_EQ(t.numel(), 4 * 3072);
    EXPECT_EQ(t.row_bytes(), 3072u * 4);
    for (int64_t r = 0; r < 4; ++r) EXPECT_EQ(static_cast<const float*>(t.row(r))[0], (float)(r * 3072));
    EXPECT_EQ(std::memcmp(t.data(), v.data(), v.size() * 4), 0);

    write_npy(path("one.npy"), COLLAPSE_I32, {6}, std::vector<int32_t>{0, 1, 2, 3, 4, 5}.data());
    const Tensor one = open_npy(path("one.npy"));
    EXPECT_EQ(one.rows(), 6);
    EXPECT_EQ(one.row_elements(), 1);
    EXPECT_EQ(one.row_bytes(), 4u);
    EXPECT_EQ(*static_cast<const int32_t*>(one.row(5)), 5);

    write_npy(path("scalar.npy"), COLLAPSE_F32, {}, std::vector<float>{2.5f}.data());
    const Tensor scalar = open_npy(path("scalar.npy"));
    EXPECT_EQ(scalar.rows(), 1);
    EXPECT_EQ(scalar.row_elements(), 1);
    EXPECT_EQ(scalar.numel(), 1);
}

// ---------------------------------------------------------------------------------------------
// Hand-written .npy headers

TEST_F(TensorFileTest, NpyHandWrittenVersions123) {
    const std::string data = random_bytes(2 * 3 * 4 * 4, 3);
    for (int major : {1, 2, 3}) {
        SCOPED_TRACE(major);
        const std::string p = path("v" + std::to_string(major) + ".npy");
        const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }\n";
        write_file(p, npy_bytes(major, dict, data));
        const Tensor t = open_npy(p);
        EXPECT_EQ(t.dtype, COLLAPSE_F32);
        EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 3, 4}));
        EXPECT_EQ(t.offset, (major == 1 ? 10u : 12u) + dict.size());  // unpadded, unaligned data is fine
        expect_data(t, data);
    }
}

TEST_F(TensorFileTest, NpyHeaderParsingIsRobust) {
    struct Case {
        std::string dict;
        collapse_dtype dtype;
        std::vector<int64_t> shape;
    };
    const Case cases[] = {
        {"{'shape': (3, 4), 'fortran_order': False, 'descr': '<f8'}", COLLAPSE_F64, {3, 4}},
        {"{ 'fortran_order' : False , 'descr' : '<i4' , 'shape' : ( 5 , ) , }  \n", COLLAPSE_I32, {5}},
        {"{\"descr\": \"<i8\", \"fortran_order\": False, \"shape\": (2,3,4)}", COLLAPSE_I64, {2, 3, 4}},
        {"{'descr': '=f2', 'fortran_order': False, 'shape': (), }", COLLAPSE_F16, {}},
        {"{'descr': '|u1', 'fortran_order': False, 'shape': (7,), }", COLLAPSE_U8, {7}},
        {"{'descr': '<u1', 'fortran_order': False, 'shape': (7,), }", COLLAPSE_U8, {7}},
        {"{'descr': '|b1', 'fortran_order': False, 'shape': (1, 1), }", COLLAPSE_BOOL, {1, 1}},
        {"{'descr': '=f4', 'fortran_order': False, 'shape': (3L, 4L), }", COLLAPSE_F32, {3, 4}},  // Python 2
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }", COLLAPSE_F32, {0, 4}},
    };
    int i = 0;
    for (const Case& c : cases) {
        SCOPED_TRACE(c.dict);
        const std::string p = path("h" + std::to_string(i++) + ".npy");
        size_t n = collapse::internal::dtype_size(c.dtype);
        for (int64_t d : c.shape) n *= (size_t)d;
        const std::string data = random_bytes(n, (uint32_t)i);
        write_file(p, npy_bytes(1, c.dict, data + "trailing bytes are allowed"));
        const Tensor t = open_npy(p);
        EXPECT_EQ(t.dtype, c.dtype);
        EXPECT_EQ(t.shape, c.shape);
        expect_data(t, data);
    }
}

// ---------------------------------------------------------------------------------------------
// .npy refusals

TEST_F(TensorFileTest, NpyRefusesFortranOrder) {
    expect_npy_refused(
        "f.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", std::string(16, '\0')),
        "Fortran-order arrays are not supported; save with np.ascontiguousarray");
}

TEST_F(TensorFileTest, NpyRefusesBigEndian) {
    expect_npy_refused("be.npy",
                       npy_bytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", std::string(8, '\0')),
                       "big-endian");
    expect_npy_refused("be2.npy",
                       npy_bytes(1, "{'descr': '>i8', 'fortran_order': False, 'shape': (2,), }", std::string(16, '\0')),
                       "arr.astype('<i8')");
}

TEST_F(TensorFileTest, NpyRefusesOtherDtypesListingSupported) {
    for (const std::string descr : {"<i2", "|i1", "<u4", "<c8", "<U10", "|O", "|S5", "<m8[s]"}) {
        SCOPED_TRACE(descr);
        const std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (1,), }";
        expect_npy_refused("d.npy", npy_bytes(1, dict, std::string(64, '\0')), "unsupported dtype '" + descr + "'");
        expect_io_error([&] { open_npy(path("d.npy")); }, {"<f2 <f4 <f8 <i4 <i8 |u1 |b1"});
    }
    expect_npy_refused("s.npy",
                       npy_bytes(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", "    "),
                       "structured");
    expect_npy_refused("p.npy", npy_bytes(1, "{'descr': '|f4', 'fortran_order': False, 'shape': (1,), }", "    "),
                       "no byte order");
}

TEST_F(TensorFileTest, NpyRefusesBadMagic) {
    expect_npy_refused("m.npy", std::string("\x93NUMPX\x01\x00\x10\x00{}              ", 24), "bad magic");
    expect_npy_refused("m2.npy", "PK\x03\x04 this is a zip file, not npy", "bad magic");
}

TEST_F(TensorFileTest, NpyRefusesUnsupportedVersion) {
    const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }";
    expect_npy_refused("v4.npy", npy_bytes(4, dict, "aaaa"), "unsupported .npy version 4.0");
    expect_npy_refused("v11.npy", npy_bytes(1, dict, "aaaa", 1), "unsupported .npy version 1.1");
    expect_npy_refused("v0.npy", npy_bytes(0, dict, "aaaa"), "unsupported .npy version 0.0");
}

TEST_F(TensorFileTest, NpyRefusesHeaderPastEnd) {
    std::string bytes = npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", "");
    bytes[8] = '\xff';  // header length 0x..ff, longer than the file
    expect_npy_refused("h.npy", bytes, "header runs past the end of the file");
    std::string v2 = npy_bytes(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", "abcd");
    v2[11] = '\x7f';  // ~2 GB header length
    expect_npy_refused("h2.npy", v2, "header runs past the end of the file");
}

TEST_F(TensorFileTest, NpyRefusesTruncatedData) {
    const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
    expect_npy_refused("t.npy", npy_bytes(1, dict, std::string(47, '\0')),
                       "expected 48 bytes of data after the header, file has 47");
    expect_npy_refused("t0.npy", npy_bytes(1, dict, ""), "expected 48 bytes of data after the header, file has 0");
}

TEST_F(TensorFileTest, NpyRefusesShapeOverflow) {
    expect_npy_refused(
        "o.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }", ""),
        "overflows");
    expect_npy_refused(
        "o2.npy", npy_bytes(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", ""),
        "overflows");
    expect_npy_refused("o3.npy",
                       npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", ""),
                       "overflows");
}

TEST_F(TensorFileTest, NpyRefusesMalformedHeaders) {
    const char* dicts[] = {
        "{'descr': '<f4', 'shape': (1,), }",                                // missing key
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",  // unknown key
        "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,), }",        // not a bool
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",       // negative dim
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,",            // cut off
        "{'descr': '<f4 , 'fortran_order': False, 'shape': (1,), }",        // unterminated string
        "'descr': '<f4', 'fortran_order': False, 'shape': (1,)",            // not a dict
        "{'descr': '<f4' 'fortran_order': False, 'shape': (1,)}",           // missing comma
    };
    for (const char* d : dicts) {
        SCOPED_TRACE(d);
        expect_npy_refused("bad.npy", npy_bytes(1, d, std::string(8, '\0')), "bad header");
    }
}

// Hostile-input audit (2026-12-02): bytes after the dict were ignored (numpy's literal_eval refuses
// them), a key given twice took its last value silently, and raw header bytes (a newline, a NUL,
// bytes that are no UTF-8) went into the one-line message as they were.
TEST_F(TensorFileTest, NpyRefusesTrailingBytesTwiceGivenKeysAndQuotesRawBytes) {
    const std::string tail = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } ";
    expect_npy_refused("t1.npy", npy_bytes(1, tail + "x\n", std::string(8, '\0')), "unexpected 'x\\x0A' after the header dict at header offset");
    expect_npy_refused("t2.npy", npy_bytes(1, tail + "{'descr': '<f8'}\n", std::string(8, '\0')), "after the header dict");
    expect_npy_refused("t3.npy", npy_bytes(1, tail + std::string(1, '\0') + "\n", std::string(8, '\0')), "'\\x00\\x0A' after the header dict");
    expect_npy_refused("d1.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (1,)}", std::string(8, '\0')),
                       "key 'shape' appears twice in the header dict (offset 56)");
    expect_npy_refused("d2.npy", npy_bytes(1, "{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, 'shape': (1,)}", std::string(8, '\0')),
                       "key 'descr' appears twice");
    // Control characters and invalid UTF-8 are escaped; valid UTF-8 is kept; long text is cut.
    expect_npy_refused("k.npy", npy_bytes(1, "{'a\nb\x01\xff\xc3\xa9': 1}", ""), "unexpected key 'a\\x0Ab\\x01\\xFF\xc3\xa9' in the header dict");
    expect_npy_refused("u.npy", npy_bytes(1, "{'descr': '<f4\r', 'fortran_order': False, 'shape': (1,)}", std::string(4, '\0')),
                       "unsupported dtype '<f4\\x0D'");
    // No UTF-8 lead byte past 0xF4; overlong forms and surrogates are no UTF-8 either.
    expect_npy_refused("v.npy", npy_bytes(1, "{'descr': '\xF5\x80\x80 \xC0\xAF \xED\xA0\x80 \xF0\x9F\x98\x80', 'fortran_order': False, 'shape': (1,)}", ""),
                       "unsupported dtype '\\xF5\\x80\\x80 \\xC0\\xAF \\xED\\xA0\\x80 \xF0\x9F\x98\x80'");
    const std::string long_key(5000, 'k');
    const std::string p = path("long.npy");
    write_file(p, npy_bytes(1, "{'" + long_key + "': 1}", ""));
    try {
        open_npy(p);
        ADD_FAILURE() << "a 5000-byte key was accepted";
    } catch (const collapse::internal::Error& e) {
        EXPECT_LT(std::string(e.what()).size(), 400u) << e.what();
        EXPECT_NE(std::string(e.what()).find("... (5000 bytes)"), std::string::npos) << e.what();
    }
    // numpy's own padding (spaces, then a newline) is still a header.
    write_file(path("ok.npy"), npy_bytes(1, tail + "        \n", std::string(8, '\0')));
    EXPECT_EQ(open_npy(path("ok.npy")).shape, (std::vector<int64_t>{2}));
}

TEST_F(TensorFileTest, SafetensorsNamesInMessagesAreOneLine) {
    const std::string bad = "{\"a\\nb\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}";
    expect_st_refused("n.safetensors", st_bytes(bad, std::string(8, '\0')), {"tensor 'a\\x0Ab'", "data_offsets span 8 bytes"});
}

TEST_F(TensorFileTest, NpyRefusesEveryTruncation) {
    const std::string p = path("full.npy");
    write_npy(p, COLLAPSE_I32, {3, 5}, std::vector<int32_t>(15, 9).data());
    const std::string full = read_file(p);
    ASSERT_EQ(full.size(), 128u + 60u);
    for (size_t cut = 0; cut < full.size(); ++cut) {
        SCOPED_TRACE(cut);
        const std::string reason = cut < 128 ? "truncated" : "expected 60 bytes of data after the header";
        const std::string cp = path("cut.npy");
        write_file(cp, full.substr(0, cut));
        if (cut >= 10 && cut < 128) {
            expect_io_error([&] { open_npy(cp); }, {cp, "header runs past the end of the file"});
        } else {
            expect_io_error([&] { open_npy(cp); }, {cp, reason});
        }
    }
    EXPECT_EQ(open_npy(p).numel(), 15);
}

// ---------------------------------------------------------------------------------------------
// .safetensors refusals

TEST_F(TensorFileTest, SafetensorsRefusesShortFile) {
    expect_st_refused("s.safetensors", "", {"truncated", "8-byte header length"});
    expect_st_refused("s.safetensors", std::string("\x10\0\0", 3), {"truncated", "8-byte header length"});
}

TEST_F(TensorFileTest, SafetensorsRefusesHeaderPastEnd) {
    expect_st_refused("h.safetensors", le(1000, 8) + "{}", {"header length 1000 runs past the end of the file"});
    expect_st_refused("h.safetensors", le(~0ull, 8) + "{}", {"runs past the end of the file"});
}

TEST_F(TensorFileTest, SafetensorsRefusesCorruptJson) {
    expect_st_refused("j.safetensors", st_bytes("{\"a\": {\"dtype\": \"F32\",", ""), {"corrupt header JSON", "parse"});
    expect_st_refused("j.safetensors", st_bytes("[1, 2]", ""), {"corrupt header JSON", "not a JSON object"});
    expect_st_refused("j.safetensors", st_bytes("", ""), {"corrupt header JSON"});
}

TEST_F(TensorFileTest, SafetensorsRefusesUnsupportedDtype) {
    expect_st_refused("d.safetensors",
                      st_bytes("{\"w\": {\"dtype\": \"I16\", \"shape\": [2], \"data_offsets\": [0, 4]}}", "abcd"),
                      {"tensor 'w'", "unsupported dtype I16", "F16 BF16 F32 F64 I32 I64 U8 BOOL"});
    expect_st_refused("d.safetensors",
                      st_bytes("{\"w\": {\"dtype\": \"F8_E4M3\", \"shape\": [2], \"data_offsets\": [0, 2]}}", "ab"),
                      {"tensor 'w'", "F8_E4M3"});
}

TEST_F(TensorFileTest, SafetensorsRefusesBadOffsets) {
    const std::string data(16, '\0');
    auto entry = [](const std::string& shape, const std::string& offsets) {
        return "{\"w\": {\"dtype\": \"F32\", \"shape\": " + shape + ", \"data_offsets\": " + offsets + "}}";
    };
    expect_st_refused("o.safetensors", st_bytes(entry("[2]", "[8, 0]"), data), {"tensor 'w'", "begin 8 > end 0"});
    expect_st_refused("o.safetensors", st_bytes(entry("[2]", "[12, 20]"), data),
                      {"tensor 'w'", "end 20 is past the end of the data section (16 bytes)"});
    expect_st_refused("o.safetensors", st_bytes(entry("[2]", "[0, 12]"), data),
                      {"tensor 'w'", "span 12 bytes", "needs 8"});
    expect_st_refused("o.safetensors", st_bytes(entry("[2]", "[0]"), data), {"tensor 'w'", "data_offsets"});
    expect_st_refused("o.safetensors", st_bytes(entry("[2]", "[-4, 4]"), data), {"tensor 'w'", "data_offsets"});
    expect_st_refused("o.safetensors", st_bytes(entry("[-2]", "[0, 8]"), data), {"tensor 'w'", "shape"});
    expect_st_refused("o.safetensors", st_bytes(entry("[4611686018427387904, 8]", "[0, 8]"), data),
                      {"tensor 'w'", "overflows"});
    expect_st_refused("o.safetensors", st_bytes("{\"w\": [1, 2]}", data), {"tensor 'w'", "not a JSON object"});
    expect_st_refused("o.safetensors", st_bytes("{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", data),
                      {"tensor 'w'", "dtype"});
}

// Tensors sharing bytes, a hole, trailing bytes and a name given twice were accepted (labels over
// the features' last bytes then read as a V of 1e9); the format forbids all four.
TEST_F(TensorFileTest, SafetensorsRefusesABadLayout) {
    const std::string data(16, '\0');
    auto two = [](const std::string& a, const std::string& b) {
        return "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": " + a + "}, \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": " + b + "}}";
    };
    expect_st_refused("l.safetensors", st_bytes(two("[0, 8]", "[4, 12]"), data.substr(0, 12)), {"overlap", "[4, 12)"});
    expect_st_refused("l.safetensors", st_bytes(two("[0, 8]", "[0, 8]"), data.substr(0, 8)), {"overlap"});
    expect_st_refused("l.safetensors", st_bytes(two("[0, 8]", "[12, 20]"), data + "1234"), {"hole", "[8, 12)"});
    expect_st_refused("l.safetensors", st_bytes(two("[0, 8]", "[8, 16]"), data + "junk"), {"4 bytes after the last tensor"});
    expect_st_refused("l.safetensors",
                      st_bytes("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]}}", data),
                      {"tensor 'a'", "named twice"});
    // The same layout, tiled: accepted, and an empty tensor anywhere holds no bytes.
    write_file(path("ok.safetensors"), st_bytes(two("[8, 16]", "[0, 8]"), data));
    EXPECT_EQ(SafetensorsFile(path("ok.safetensors")).names(), (std::vector<std::string>{"b", "a"}));
}

TEST_F(TensorFileTest, SafetensorsRefusesEveryTruncation) {
    const std::string p = path("full.safetensors");
    SafetensorsWriter w(p, {{"a", COLLAPSE_F16, {4}}, {"b", COLLAPSE_I64, {2}}});
    w.append(std::string(24, '\x5a').data(), 24);
    w.close();
    const std::string full = read_file(p);
    uint64_t header_len = 0;
    std::memcpy(&header_len, full.data(), 8);
    for (size_t cut = 0; cut < full.size(); ++cut) {
        SCOPED_TRACE(cut);
        const std::string cp = path("cut.safetensors");
        write_file(cp, full.substr(0, cut));
        std::string reason = "past the end of the data section";
        if (cut < 8)
            reason = "8-byte header length";
        else if (cut < 8 + header_len)
            reason = "runs past the end of the file";
        expect_io_error([&] { SafetensorsFile f(cp); }, {cp, reason});
    }
}

TEST_F(TensorFileTest, SafetensorsMissingTensorListsNames) {
    const std::string p = path("n.safetensors");
    SafetensorsWriter w(p, {{"hidden", COLLAPSE_F32, {1}}, {"labels", COLLAPSE_I32, {1}}});
    w.append("12345678", 8);
    w.close();
    SafetensorsFile f(p);
    expect_io_error([&] { f.tensor("features"); }, {"features", p, "available: hidden, labels"});

    write_file(path("empty.safetensors"), st_bytes("{}", ""));
    SafetensorsFile empty(path("empty.safetensors"));
    EXPECT_TRUE(empty.names().empty());
    expect_io_error([&] { empty.tensor("x"); }, {"x", path("empty.safetensors"), "(none)"});
}

// ---------------------------------------------------------------------------------------------
// Writer discipline

TEST_F(TensorFileTest, NpyWriterRefusesBf16) {
    const std::string p = path("bf.npy");
    expect_io_error([&] { NpyWriter w(p, COLLAPSE_BF16, {4}); }, {p, "bfloat16", "safetensors"});
    EXPECT_FALSE(exists(p));
    EXPECT_EQ(temp_files(), 0u);
}

TEST_F(TensorFileTest, WriterByteCountMismatch) {
    const std::string p = path("short.npy");
    {
        NpyWriter w(p, COLLAPSE_F32, {2, 3});
        w.append(std::string(20, 'x').data(), 20);
        expect_io_error([&] { w.close(); }, {p, "20 bytes", "declares 24"});
        expect_io_error(
            [&] {
                w.append("abcd", 4);
                w.append("abcd", 4);
            },
            {p, "24 + 4", "24 bytes"});
    }
    EXPECT_FALSE(exists(p));
    EXPECT_EQ(temp_files(), 0u);

    const std::string q = path("long.safetensors");
    {
        SafetensorsWriter w(q, {{"a", COLLAPSE_U8, {3}}, {"b", COLLAPSE_U8, {2}}});
        expect_io_error([&] { w.append("abcdef", 6); }, {q, "0 + 6", "declared size of 5"});
        w.append("abc", 3);
        expect_io_error([&] { w.close(); }, {q, "3 bytes", "declares 5"});
    }
    EXPECT_FALSE(exists(q));
    EXPECT_EQ(temp_files(), 0u);
}

TEST_F(TensorFileTest, WriterIntoMissingDirectory) {
    const std::string p = path("no/such/dir/x.npy");
    expect_io_error([&] { NpyWriter w(p, COLLAPSE_F32, {1}); }, {p, "No such file or directory"});
    const std::string q = path("no/such/dir/x.safetensors");
    expect_io_error([&] { SafetensorsWriter w(q, {{"a", COLLAPSE_F32, {1}}}); }, {q, "No such file or directory"});
    expect_io_error([&] { write_npy(p, COLLAPSE_U8, {1}, "a"); }, {p, "No such file or directory"});
}

// A file-size limit makes write() fail with EFBIG: a stand-in for ENOSPC that needs no full disk.
TEST_F(TensorFileTest, WriterReportsWriteErrors) {
    if (!testutil::FileSizeLimit::usable()) GTEST_SKIP() << "file size already limited";
    const std::string p = path("big.npy");
    const std::string chunk(4u << 20, 'x');  // larger than the writer's buffer: written at once
    {
        testutil::FileSizeLimit limit(64 * 1024);
        NpyWriter w(p, COLLAPSE_U8, {(int64_t)chunk.size() * 2});
        expect_io_error([&] { w.append(chunk.data(), chunk.size()); }, {p, std::strerror(EFBIG)});
        expect_io_error([&] { w.append(chunk.data(), chunk.size()); }, {p, "earlier error"});
        expect_io_error([&] { w.close(); }, {p});
    }
    EXPECT_FALSE(exists(p));
    EXPECT_EQ(temp_files(), 0u);
}

// The writers used "<path>.tmp": a link planted there made `collapse synth` overwrite the file it
// named, and an unrelated file of that name was lost.
TEST_F(TensorFileTest, WritersNeverTouchAnotherFile) {
    write_file(path("victim"), "precious");
    std::filesystem::create_symlink(path("victim"), path("x.npy.tmp"));
    write_file(path("x.safetensors.tmp"), "mine");
    write_npy(path("x.npy"), COLLAPSE_U8, {3}, "abc");
    SafetensorsWriter w(path("x.safetensors"), {{"a", COLLAPSE_U8, {2}}});
    w.append("de", 2);
    w.close();
    EXPECT_EQ(read_file(path("victim")), "precious");
    EXPECT_TRUE(std::filesystem::is_symlink(path("x.npy.tmp")));
    EXPECT_EQ(read_file(path("x.safetensors.tmp")), "mine");
    EXPECT_FALSE(std::filesystem::is_symlink(path("x.npy")));
    EXPECT_EQ(open_npy(path("x.npy")).shape, std::vector<int64_t>{3});
    EXPECT_EQ(temp_files(), 0u);
}

TEST_F(TensorFileTest, WriterWithoutCloseLeavesNothing) {
    const std::string p = path("abandoned.npy");
    const std::string q = path("abandoned.safetensors");
    {
        NpyWriter w(p, COLLAPSE_F32, {4});
        w.append("abcdefgh", 8);
        SafetensorsWriter s(q, {{"a", COLLAPSE_F32, {1}}});
        EXPECT_EQ(temp_files(), 2u);
    }
    EXPECT_EQ(temp_files(), 0u);
    EXPECT_FALSE(exists(p));
    EXPECT_EQ(temp_files(), 0u);
    EXPECT_FALSE(exists(q));
}

TEST_F(TensorFileTest, WriterReplacesExistingFileOnlyOnClose) {
    const std::string p = path("x.npy");
    write_npy(p, COLLAPSE_I32, {1}, std::vector<int32_t>{1}.data());
    {
        NpyWriter w(p, COLLAPSE_I32, {1});
        w.append(std::vector<int32_t>{2}.data(), 4);
        EXPECT_EQ(*static_cast<const int32_t*>(open_npy(p).data()), 1);  // old file untouched until close
        w.close();
        w.close();  // second close is a no-op
        expect_io_error([&] { w.append("a", 1); }, {p, "closed"});
    }
    EXPECT_EQ(*static_cast<const int32_t*>(open_npy(p).data()), 2);
}

TEST_F(TensorFileTest, WriterRefusesBadSpecs) {
    const std::string p = path("bad.safetensors");
    EXPECT_THROW(SafetensorsWriter(p, {{"a", COLLAPSE_F32, {1}}, {"a", COLLAPSE_F32, {1}}}), Error);
    EXPECT_THROW(SafetensorsWriter(p, {{"__metadata__", COLLAPSE_F32, {1}}}), Error);
    EXPECT_THROW(SafetensorsWriter(p, {{"a", COLLAPSE_F32, {-1}}}), Error);
    EXPECT_THROW(NpyWriter(path("n.npy"), COLLAPSE_F32, {2, -3}), Error);
    EXPECT_THROW(NpyWriter(path("n.npy"), (collapse_dtype)42, {1}), Error);
    EXPECT_EQ(temp_files(), 0u);
    EXPECT_FALSE(exists(path("n.npy.tmp")));
}

// ---------------------------------------------------------------------------------------------
// The real data set, when present

// ---------------------------------------------------------------------------------------------
// Hostile inputs: non-regular files, files that change under a run, shapes that only look right

TEST_F(TensorFileTest, OpenRegularFileRefusesFifoWithoutBlocking) {
    // Before the fix open() waited for a writer forever.
    const std::string p = path("pipe.npy");
    ASSERT_EQ(::mkfifo(p.c_str(), 0600), 0);
    expect_io_error([&] { open_npy(p); }, {p, "FIFO", "not a regular file"});
    expect_io_error([&] { SafetensorsFile f(p); }, {p, "FIFO"});
    expect_io_error([&] { open_regular_file(p, "checkpoint"); }, {"checkpoint", p, "FIFO"});
}

TEST_F(TensorFileTest, OpenRegularFileRefusesDevicesAndDirectories) {
    expect_io_error([&] { open_npy("/dev/zero"); }, {"/dev/zero", "character device"});
    expect_io_error([&] { open_regular_file(dir_, "config file"); }, {"config file", dir_, "directory"});
    expect_io_error([&] { open_regular_file(path("missing"), "config file"); },
                    {"config file", path("missing"), "No such file or directory"});
    write_file(path("ok"), "abc");
    struct stat st;
    const UniqueFd fd = open_regular_file(path("ok"), "input", &st);
    EXPECT_GE(fd.get(), 0);
    EXPECT_EQ(st.st_size, 3);
}

TEST_F(TensorFileTest, ReadRowsCopiesTheSameBytesAsRow) {
    std::vector<float> v(5 * 7);
    for (size_t i = 0; i < v.size(); ++i) v[i] = (float)i * 0.5f;
    write_npy(path("r.npy"), COLLAPSE_F32, {5, 7}, v.data());
    const Tensor t = open_npy(path("r.npy"));
    std::vector<uint8_t> buf;
    const void* p = t.read_rows(1, 3, buf);
    ASSERT_EQ(buf.size(), 3u * 7 * 4);
    EXPECT_EQ(std::memcmp(p, t.row(1), buf.size()), 0);
    EXPECT_EQ(t.read_rows(5, 0, buf), buf.data());  // an empty range at the end is fine
    EXPECT_TRUE(buf.empty());
    for (auto [r0, n] : {std::pair<int64_t, int64_t>{4, 2}, {-1, 1}, {0, -1}, {6, 0}, {2, INT64_MAX}})
        testutil::expect_error([&] { t.read_rows(r0, n, buf); }, {"r.npy", "outside its 5 rows"},
                               COLLAPSE_ERR_INVALID_ARGUMENT);
}

TEST_F(TensorFileTest, ReadRowsOfAFileThatShrankIsAnErrorNotSigbus) {
    // Touching the mapping here (t.row(3)) would kill the process with SIGBUS.
    const std::vector<float> v(64 * 1024, 1.0f);
    for (const char* fmt : {"npy", "safetensors"}) {
        SCOPED_TRACE(fmt);
        const std::string p = path(std::string("s.") + fmt);
        Tensor t;
        if (std::string(fmt) == "npy") {
            write_npy(p, COLLAPSE_F32, {64, 1024}, v.data());
            t = open_npy(p);
        } else {
            SafetensorsWriter w(p, {{"x", COLLAPSE_F32, {64, 1024}}});
            w.append(v.data(), v.size() * 4);
            w.close();
            t = SafetensorsFile(p).tensor("x");
        }
        std::vector<uint8_t> buf;
        t.read_rows(0, 2, buf);
        ASSERT_EQ(::truncate(p.c_str(), 4096), 0);
        expect_io_error([&] { t.read_rows(32, 8, buf); }, {p, "changed while it was read", "4096"});
        expect_io_error([&] { t.read_rows(0, 1, buf); }, {p, "changed while it was read"});  // even bytes still there
    }
}

TEST_F(TensorFileTest, ReadRowsOfAFileRewrittenInPlaceIsAnError) {
    const std::vector<int32_t> v(100, 7);
    write_npy(path("l.npy"), COLLAPSE_I32, {100}, v.data());
    const Tensor t = open_npy(path("l.npy"));
    std::vector<uint8_t> buf;
    t.read_rows(0, 100, buf);
    {  // same size, new contents, and a modification time that surely differs
        std::fstream f(path("l.npy"), std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(200);
        f.write("\x01\x02\x03\x04", 4);
    }
    const struct timespec times[2] = {{0, UTIME_OMIT}, {12345, 678}};
    ASSERT_EQ(::utimensat(AT_FDCWD, path("l.npy").c_str(), times, 0), 0);
    expect_io_error([&] { t.read_rows(0, 100, buf); }, {path("l.npy"), "changed while it was read", "modified"});
}

TEST_F(TensorFileTest, HeaderLengthsAreBounded) {
    // A bogus header length within a large (sparse) file must not allocate gigabytes.
    const std::string np = path("h.npy");
    {
        std::string b = "\x93NUMPY";
        b += (char)2;
        b += (char)0;
        b += le(uint64_t(3) << 20, 4);
        write_file(np, b);
    }
    ASSERT_EQ(::truncate(np.c_str(), (off_t)(4u << 20)), 0);
    expect_io_error([&] { open_npy(np); }, {np, "header length 3145728", "limit"});
    const std::string sp = path("h.safetensors");
    write_file(sp, le(200000000, 8));
    ASSERT_EQ(::truncate(sp.c_str(), 200000100), 0);
    expect_io_error([&] { SafetensorsFile f(sp); }, {sp, "header length 200000000", "limit of 100000000"});
}

TEST_F(TensorFileTest, EmptyTensorWithOverflowingRowIsRefused) {
    // Zero rows, but a row of 2^62 * 4 elements: row_elements() and row_bytes() would overflow.
    const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4611686018427387904, 4), }";
    expect_npy_refused("zero.npy", npy_bytes(1, dict, ""), "overflows");
    expect_st_refused("zero.safetensors",
                      st_bytes(R"({"x":{"dtype":"F32","shape":[0,4611686018427387904,4],"data_offsets":[0,0]}})", ""),
                      {"overflows"});
    const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1024, 4), }";
    write_file(path("ok.npy"), npy_bytes(1, ok, ""));
    EXPECT_EQ(open_npy(path("ok.npy")).row_bytes(), 1024u * 16);
}

TEST_F(TensorFileTest, RequireLabelShapeAcceptsOnlyNAndNBy1) {
    auto tensor = [](std::vector<int64_t> shape) {
        Tensor t;
        t.name = "labels.npy";
        t.dtype = COLLAPSE_I32;
        t.shape = std::move(shape);
        return t;
    };
    require_label_shape(tensor({64}), 64, "labels");
    require_label_shape(tensor({64, 1}), 64, "labels");
    require_label_shape(tensor({0}), 0, "labels");
    // [32, 2] has 64 elements but a row stride of 2; [1, 64] has one row: both used to be read.
    const std::vector<std::vector<int64_t>> bad = {{32, 2}, {1, 64}, {63}, {64, 1, 1}, {}, {64, 2}, {2, 32}};
    for (const auto& shape : bad) {
        SCOPED_TRACE(::testing::PrintToString(shape));
        testutil::expect_error([&] { require_label_shape(tensor(shape), 64, "labels"); },
                               {"labels 'labels.npy'", "expected [64] or [64, 1]"}, COLLAPSE_ERR_SHAPE);
    }
    testutil::expect_error([&] { require_label_shape(tensor({32, 2}), 64, "labels"); }, {"shape [32, 2]"},
                           COLLAPSE_ERR_SHAPE);
    require_shape(tensor({4, 9}), {4, 9}, "input_ids");
    for (const auto& shape : std::vector<std::vector<int64_t>>{{9, 4}, {36}, {4, 9, 1}, {1, 36}})
        testutil::expect_error([&] { require_shape(tensor(shape), {4, 9}, "input_ids"); },
                               {"input_ids 'labels.npy'", "expected [4, 9]"}, COLLAPSE_ERR_SHAPE);
}

TEST(TensorFileRealData, Stories260k) {
    const std::string dir = std::string(COLLAPSE_SHARED_DIR) + "/data/stories260k/";
    if (!exists(dir + "features.npy")) GTEST_SKIP() << "no " << dir << "features.npy; skipping the real-data check";
    const Tensor features = open_npy(dir + "features.npy");
    EXPECT_EQ(features.dtype, COLLAPSE_F16);
    EXPECT_EQ(features.shape, (std::vector<int64_t>{200054, 64}));
    EXPECT_EQ(features.row_bytes(), 128u);
    // Rows are normalized hidden states: finite, and not all zero.
    double sq = 0;
    for (int64_t j = 0; j < 64; ++j) {
        const double x = collapse::internal::load_as_double(features.row(200053), COLLAPSE_F16, j);
        sq += x * x;
    }
    EXPECT_GT(sq, 0.0);
    EXPECT_TRUE(std::isfinite(sq));

    if (!exists(dir + "labels.npy")) GTEST_SKIP() << "no " << dir << "labels.npy";
    const Tensor labels = open_npy(dir + "labels.npy");
    EXPECT_EQ(labels.dtype, COLLAPSE_I32);
    EXPECT_EQ(labels.shape, (std::vector<int64_t>{200054}));
    for (int64_t i = 0; i < labels.numel(); i += 997) {
        const int64_t id = collapse::internal::load_as_int(labels.data(), COLLAPSE_I32, i);
        EXPECT_GE(id, 0);
        EXPECT_LT(id, 512);
    }
}

}  // namespace
}  // namespace test_tensor_file
