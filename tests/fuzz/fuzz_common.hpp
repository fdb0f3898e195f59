// Shared by the libFuzzer targets: a scratch file the readers open, and a reader of fuzzed bytes.
#pragma once
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace fuzz {

// One scratch file per process (under $TMPDIR, removed at exit); write() replaces its contents.
class ScratchFile {
public:
    explicit ScratchFile(const char* suffix) {
        const char* tmp = std::getenv("TMPDIR");
        path_ = std::string(tmp && *tmp ? tmp : "/tmp") + "/collapse_fuzz_XXXXXX" + suffix;
        const int fd = ::mkstemps(path_.data(), (int)std::strlen(suffix));
        if (fd < 0) std::abort();
        ::close(fd);
    }
    ~ScratchFile() { ::unlink(path_.c_str()); }
    void write(const uint8_t* data, size_t size) const {
        const int fd = ::open(path_.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
        if (fd < 0) std::abort();
        size_t done = 0;
        while (done < size) {
            const ssize_t n = ::write(fd, data + done, size - done);
            if (n <= 0) std::abort();
            done += (size_t)n;
        }
        ::close(fd);
    }
    const std::string& path() const { return path_; }

private:
    std::string path_;
};

// Consumes the input front to back; past the end every value is 0.
class Bytes {
public:
    Bytes(const uint8_t* data, size_t size) : p_(data), n_(size) {}
    uint8_t u8() { return i_ < n_ ? p_[i_++] : 0; }
    uint64_t u64() {
        uint64_t v = 0;
        for (int k = 0; k < 8; ++k) v = (v << 8) | u8();
        return v;
    }
    bool bit() { return (u8() & 1) != 0; }
    bool empty() const { return i_ >= n_; }
    // A size: mostly small, sometimes a value on an edge of int64.
    int64_t size() {
        static const int64_t edges[] = {0, 1, 2, 3, 4, 7, 8, 16, 63, 64, -1, -2, int64_t(1) << 31,
                                        int64_t(1) << 32, int64_t(1) << 62, INT64_MAX, INT64_MIN, (int64_t(1) << 61) + 1};
        const uint8_t b = u8();
        if (b < 200) return b % 24;
        return edges[b % (sizeof edges / sizeof edges[0])];
    }
    const uint8_t* rest(size_t* len) const {
        *len = i_ < n_ ? n_ - i_ : 0;
        return p_ + (i_ < n_ ? i_ : n_);
    }

private:
    const uint8_t* p_;
    size_t n_, i_ = 0;
};

}  // namespace fuzz
