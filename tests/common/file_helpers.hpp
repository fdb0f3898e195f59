// Small file and error helpers shared by the file-format tests.
#pragma once
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "core/error.hpp"

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

// Runs fn, which must throw collapse::Error(status) whose message contains every piece; returns the message.
inline std::string expect_error(const std::function<void()>& fn, const std::vector<std::string>& pieces,
                                collapse_status status = COLLAPSE_ERR_IO) {
    try {
        fn();
    } catch (const collapse::Error& e) {
        EXPECT_EQ(e.status(), status) << e.what();
        for (const std::string& p : pieces)
            EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "message \"" << e.what() << "\" lacks \"" << p << "\"";
        return e.what();
    }
    ADD_FAILURE() << "expected an Error(" << status << ") mentioning \"" << (pieces.empty() ? "" : pieces[0]) << "\"";
    return "";
}

}  // namespace testutil
