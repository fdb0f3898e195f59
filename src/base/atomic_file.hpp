// Writing an output file so that a crash never leaves half of it under its name, and so that no
// other file is harmed on the way. Every file the engine writes goes through here (checkpoints,
// src/io/checkpoint_file.cpp; the JSON report, src/report/report.cpp).
//
// A regular file or a new path: the bytes go to a unique temporary file beside it,
// "<name>.tmp.<host>-<pid>-XXXXXX" (created O_EXCL, so it never clobbers an existing file, with
// the mode of the file it replaces), which is fsync'ed and renamed over the path; the directory is
// fsync'ed after. A symbolic link is followed: its target is replaced, the link stays.
// An existing path that is not a regular file (/dev/null, a terminal, a FIFO, /dev/stdout on a
// pipe) is written straight through: renaming over it would replace the device node. A FIFO
// that no process reads is refused (opening it would wait for a reader forever).
//
// The temporary file is locked (flock) while it is written. Temporary files of processes killed
// before they could remove theirs are removed by the next writer of the same path: the name is
// exactly that pattern for this host, the pid no longer runs here, and the file is not locked
// (remove_stale_temporaries; the row store's spill directories follow the same rules).
#pragma once
#include <string>

namespace collapse::internal {

class AtomicFile {
public:
    // `what` names the file in messages ("checkpoint", "report"). Errors: Error(COLLAPSE_ERR_IO)
    // "cannot create <what> <path> (temp file T): <system error>".
    AtomicFile(const std::string& path, const std::string& what);
    // Without commit(): the temporary file is removed and the path is untouched.
    ~AtomicFile();
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;

    int fd() const { return fd_; }
    const std::string& path() const { return path_; }
    // "" when writing straight through.
    const std::string& temp_path() const { return tmp_; }
    bool direct() const { return tmp_.empty(); }

    // fsync, close, rename over the path, fsync the directory (straight through: close). A second
    // call does nothing. Errors: COLLAPSE_ERR_IO naming the step, the path and the temp file, which
    // is removed.
    void commit();
    // Closes and removes the temporary file now (after a write error); the object is then spent.
    void abandon();

private:
    [[noreturn]] void fail_step(const char* step, int err);

    std::string path_;  // where the file appears (a symbolic link's target)
    std::string what_;
    std::string tmp_;
    int fd_ = -1;
    bool done_ = false;
};

// bytes -> path through an AtomicFile, written in full (retrying short writes and EINTR).
void write_file_atomically(const std::string& path, const std::string& bytes, const std::string& what);

// Removes entries "<dir>/<prefix><pid>-XXXXXX" (files or directories) whose process no longer runs
// on this host and which nobody holds a lock on. `prefix` must name this host (see host_name).
void remove_stale_temporaries(const std::string& dir, const std::string& prefix);

// gethostname(), or "host" when it fails.
std::string host_name();

}  // namespace collapse::internal
