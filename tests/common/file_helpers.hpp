// Small file and error helpers shared by the file-format tests.
#pragma once
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace testutil {

inline std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), (std::streamsize)bytes.size());
    ASSERT_TRUE(out.good()) << path;
}

inline bool exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

// Deterministic bytes: bit-identical round trips do not care what the bit patterns mean.
inline std::string random_bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::string s(n, '\0');
    for (char& c : s) c = (char)(rng() & 0xff);
    return s;
}

// Runs fn, which must throw collapse::internal::Error(status) whose message contains every piece; returns the message.
inline std::string expect_error(const std::function<void()>& fn, const std::vector<std::string>& pieces,
                                collapse_status status = COLLAPSE_ERR_IO) {
    try {
        fn();
    } catch (const collapse::internal::Error& e) {
        EXPECT_EQ(e.status(), status) << e.what();
        for (const std::string& p : pieces)
            EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "message \"" << e.what() << "\" lacks \"" << p << "\"";
        return e.what();
    }
    ADD_FAILURE() << "expected an Error(" << status << ") mentioning \"" << (pieces.empty() ? "" : pieces[0]) << "\"";
    return "";
}

// A fresh directory per test under the test temp dir, removed afterwards (permissions restored
// first, for tests that make it read-only); path(name) names a file in it.
class TempDirTest : public ::testing::Test {
protected:
    void SetUp() override {
        std::string tmpl = ::testing::TempDir() + "/collapse_test_XXXXXX";
        ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        if (dir_.empty()) return;
        ::chmod(dir_.c_str(), 0700);
        std::error_code ec;
        std::filesystem::remove_all(dir_, ec);
    }
    std::string path(const std::string& name) const { return dir_ + "/" + name; }
    std::string dir_;
};

// A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) for the object's lifetime: writes past it
// fail with EFBIG, a real kernel error standing in for a full disk. `usable()` is false when the
// process already runs under a limit below 64 MiB (the test should then skip).
class FileSizeLimit {
public:
    explicit FileSizeLimit(rlim_t bytes) {
        ::getrlimit(RLIMIT_FSIZE, &old_);
        handler_ = ::signal(SIGXFSZ, SIG_IGN);
        struct rlimit small = old_;
        small.rlim_cur = bytes;
        EXPECT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
    }
    ~FileSizeLimit() {
        ::setrlimit(RLIMIT_FSIZE, &old_);
        ::signal(SIGXFSZ, handler_);
    }
    FileSizeLimit(const FileSizeLimit&) = delete;
    FileSizeLimit& operator=(const FileSizeLimit&) = delete;
    static bool usable() {
        struct rlimit cur;
        return ::getrlimit(RLIMIT_FSIZE, &cur) == 0 && (cur.rlim_cur == RLIM_INFINITY || cur.rlim_cur >= (rlim_t(64) << 20));
    }

private:
    struct rlimit old_ {};
    void (*handler_)(int) = nullptr;
};

}  // namespace testutil
