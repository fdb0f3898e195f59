#include "base/atomic_file.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>

#include "base/error.hpp"

namespace collapse::internal {

namespace {

std::string dir_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

std::string base_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Six characters of [A-Za-z0-9], as mkstemp uses.
std::string random_suffix() {
    static const char kChars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    thread_local std::mt19937_64 rng(std::random_device{}() ^ (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count() ^
                                     ((uint64_t)::getpid() << 32));
    std::string s(6, 'A');
    for (char& c : s) c = kChars[rng() % (sizeof kChars - 1)];
    return s;
}

}  // namespace

std::string host_name() {
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') return "host";
    return host;
}

void remove_stale_temporaries(const std::string& dir, const std::string& prefix) {
    std::error_code ec;
    for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
        size_t i = prefix.size(), digits = 0;
        while (i < name.size() && std::isdigit((unsigned char)name[i])) ++i, ++digits;
        if (digits == 0 || digits > 9 || i + 7 != name.size() || name[i] != '-') continue;
        const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
        if (::kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
        // A live writer holds an flock, which the kernel drops with its process (this also covers
        // another pid namespace with the same host name). O_NOFOLLOW: a link is never followed.
        const int fd = ::open(it->path().c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
        if (fd < 0) continue;
        const bool unlocked = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
        ::close(fd);
        std::error_code rm;
        if (unlocked) std::filesystem::remove_all(it->path(), rm);
    }
}

AtomicFile::AtomicFile(const std::string& path, const std::string& what) : path_(path), what_(what) {
    if (path.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, " path is empty");
    struct stat st;
    // A link is followed: the file it names is replaced, the link stays.
    if (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {
        std::error_code ec;
        const auto target = std::filesystem::canonical(path, ec);
        if (!ec) path_ = target.string();
    }
    const bool exists = ::stat(path_.c_str(), &st) == 0;
    if (exists && !S_ISREG(st.st_mode)) {
        // A FIFO that no process reads would block open() for good: refused (ENXIO) instead.
        const bool fifo = S_ISFIFO(st.st_mode);
        fd_ = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC | (fifo ? O_NONBLOCK : 0));
        if (fd_ < 0 && fifo && errno == ENXIO)
            fail(COLLAPSE_ERR_IO, "cannot open ", what_, " ", path_, " for writing: it is a FIFO that no process reads");
        if (fd_ < 0) fail(COLLAPSE_ERR_IO, "cannot open ", what_, " ", path_, " for writing: ", std::strerror(errno));
        if (fifo) (void)::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);  // a reader is there: block on it as on a pipe
        return;
    }
    const std::string dir = dir_of(path_);
    const std::string prefix = base_of(path_) + ".tmp." + host_name() + "-";
    remove_stale_temporaries(dir, prefix);
    const std::string in_dir = path_.find('/') == std::string::npos ? "" : (dir == "/" ? dir : dir + "/");
    const std::string stem = in_dir + prefix + std::to_string((long long)::getpid()) + "-";
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
        tmp_ = stem + random_suffix();
        fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // the umask applies
        if (fd_ < 0 && errno != EEXIST) break;
    }
    if (fd_ < 0) {
        const int err = errno;
        const std::string tmp = tmp_;
        tmp_.clear();
        done_ = true;
        fail(COLLAPSE_ERR_IO, "cannot create ", what_, " ", path_, " (temp file ", tmp, "): ", std::strerror(err));
    }
    // Held until the file is closed: tells remove_stale_temporaries() of others that it is alive.
    (void)::flock(fd_, LOCK_EX | LOCK_NB);
    if (exists) (void)::fchmod(fd_, st.st_mode & 07777);  // the replaced file's permissions
}

AtomicFile::~AtomicFile() {
    if (!done_) abandon();
}

void AtomicFile::abandon() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!tmp_.empty() && !done_) ::unlink(tmp_.c_str());
    done_ = true;
}

void AtomicFile::fail_step(const char* step, int err) {
    abandon();
    if (tmp_.empty()) fail(COLLAPSE_ERR_IO, step, " ", what_, " ", path_, ": ", std::strerror(err));
    fail(COLLAPSE_ERR_IO, step, " ", what_, " ", path_, " (temp file ", tmp_, "): ", std::strerror(err));
}

void AtomicFile::commit() {
    if (done_) return;
    if (direct()) {
        const int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) fail_step("cannot close", errno);
        done_ = true;
        return;
    }
    if (::fsync(fd_) != 0) fail_step("cannot fsync", errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail_step("cannot close", errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail_step("cannot rename the temp file over", errno);
    done_ = true;
    // fsync of the directory makes the rename durable.
    const std::string dir = dir_of(path_);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return;  // nothing to sync through; the rename itself has happened
    const int rc = ::fsync(dfd);
    const int err = errno;
    ::close(dfd);
    // Some file systems do not sync directories (EINVAL); anything else is a real I/O error.
    if (rc != 0 && err != EINVAL && err != EROFS)
        fail(COLLAPSE_ERR_IO, what_, " ", path_, " was renamed into place but its directory ", dir,
             " could not be synced, so it may not survive a crash: ", std::strerror(err));
}

void write_file_atomically(const std::string& path, const std::string& bytes, const std::string& what) {
    AtomicFile f(path, what);
    const char* p = bytes.data();
    size_t left = bytes.size();
    while (left > 0) {
        const ssize_t n = ::write(f.fd(), p, left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            const int err = n < 0 ? errno : EIO;
            const std::string tmp = f.temp_path();
            f.abandon();
            fail(COLLAPSE_ERR_IO, "cannot write ", what, " ", f.path(), tmp.empty() ? "" : " (temp file " + tmp + ")", ": ",
                 std::strerror(err));
        }
        p += n;
        left -= (size_t)n;
    }
    f.commit();
}

}  // namespace collapse::internal
