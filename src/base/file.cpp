// Opening input files: only regular files, never blocking on a FIFO.
#include "base/file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/bytes.hpp"
#include "base/error.hpp"

namespace collapse::internal {

UniqueFd::~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
}

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = o.release();
    }
    return *this;
}

namespace {

const char* file_kind(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO (named pipe)";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "not a regular file";
}

}  // namespace

UniqueFd open_regular_file(const std::string& path, const std::string& what, struct ::stat* st_out) {
    // O_NONBLOCK: opening a FIFO blocks until a writer appears; this way it is refused at once.
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
    if (fd.get() < 0) fail(COLLAPSE_ERR_IO, "cannot open ", what, " ", path, ": ", std::strerror(errno));
    struct ::stat st;
    if (::fstat(fd.get(), &st) != 0) fail(COLLAPSE_ERR_IO, "cannot stat ", what, " ", path, ": ", std::strerror(errno));
    if (!S_ISREG(st.st_mode))
        fail(COLLAPSE_ERR_IO, "cannot read ", what, " ", path, ": it is ", file_kind(st.st_mode),
             ", not a regular file (its size is not known, or reading it may never end)");
    const int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags >= 0) (void)::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
    if (st_out) *st_out = st;
    return fd;
}

std::string read_regular_file(const std::string& path, const std::string& what, size_t max_bytes) {
    struct ::stat st;
    const UniqueFd fd = open_regular_file(path, what, &st);
    if ((uint64_t)st.st_size > max_bytes)
        fail(COLLAPSE_ERR_IO, "cannot read ", what, " ", path, ": it has ", (int64_t)st.st_size, " bytes, more than the limit of ",
             max_bytes, " (", format_bytes((int64_t)max_bytes), ")");
    std::string text;
    char buf[65536];
    while (true) {
        const ssize_t n = ::read(fd.get(), buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail(COLLAPSE_ERR_IO, "cannot read ", what, " ", path, ": ", std::strerror(errno));
        if (n == 0) break;
        text.append(buf, (size_t)n);
        // The file may grow after the size check; the bound holds regardless.
        if (text.size() > max_bytes)
            fail(COLLAPSE_ERR_IO, "cannot read ", what, " ", path, ": it grew past the limit of ", max_bytes, " bytes (",
                 format_bytes((int64_t)max_bytes), ") while it was read");
    }
    return text;
}

}  // namespace collapse::internal
