// Input files: an owned descriptor, and an open that accepts only regular files (tensor files,
// checkpoints, configs), so that a FIFO or a device never blocks or feeds a reader forever.
#pragma once
#include <sys/stat.h>

#include <cstddef>
#include <string>

namespace collapse::internal {

// An owned file descriptor, closed on destruction.
class UniqueFd {
public:
    UniqueFd() = default;
    explicit UniqueFd(int fd) : fd_(fd) {}
    ~UniqueFd();
    UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
    UniqueFd& operator=(UniqueFd&& o) noexcept;
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    int get() const { return fd_; }
    int release() { const int fd = fd_; fd_ = -1; return fd; }

private:
    int fd_ = -1;
};

// Opens path read-only and refuses anything that is not a regular file (a FIFO, a device such as
// /dev/zero, a directory, a socket) with Error(COLLAPSE_ERR_IO) "cannot read <what> <path>: ...".
// The open itself never blocks: a FIFO without a writer is refused, not waited on. Fills *st with
// the file's fstat when given. For every reader of input files (tensors, checkpoints, configs).
UniqueFd open_regular_file(const std::string& path, const std::string& what, struct ::stat* st = nullptr);

// The whole content of a regular file (open_regular_file) of at most max_bytes: a larger file (or
// one that grows past it while read) is refused with Error(COLLAPSE_ERR_IO) "cannot read <what>
// <path>: it has N bytes, more than the limit of ...". For small text inputs (configs, reports).
std::string read_regular_file(const std::string& path, const std::string& what, size_t max_bytes);

}  // namespace collapse::internal
