#include "io/output_file.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "base/error.hpp"

namespace collapse::internal::io {

namespace {

// What identifies a file: (device, inode) when it exists, else its canonical path.
struct Identity {
    bool exists = false, shareable = false;
    dev_t dev = 0;
    ino_t ino = 0;
    std::string canonical;

    bool same(const Identity& o) const {
        if (exists != o.exists) return false;
        return exists ? dev == o.dev && ino == o.ino : canonical == o.canonical;
    }
};

Identity identify(const std::string& path) {
    Identity id;
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) {
        id.exists = true;
        id.dev = st.st_dev;
        id.ino = st.st_ino;
        id.shareable = S_ISCHR(st.st_mode);
        return id;
    }
    std::error_code ec;
    const auto c = std::filesystem::weakly_canonical(std::filesystem::absolute(path, ec), ec);
    id.canonical = ec ? path : c.lexically_normal().string();
    return id;
}

std::string named(const FileArg& f) { return f.what.empty() ? f.path : f.what + " " + f.path; }

}  // namespace

void check_outputs_distinct(const std::vector<FileArg>& inputs, const std::vector<FileArg>& outputs) {
    std::vector<Identity> in, out;
    for (const FileArg& f : inputs) in.push_back(identify(f.path));
    for (const FileArg& f : outputs) out.push_back(identify(f.path));
    for (size_t o = 0; o < outputs.size(); ++o) {
        if (out[o].shareable) continue;
        for (size_t i = 0; i < inputs.size(); ++i)
            if (in[i].exists && out[o].same(in[i]))
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "output ", named(outputs[o]), " is the same file as input ", named(inputs[i]),
                     ": writing it would destroy the input");
        for (size_t p = 0; p < o; ++p)
            if (out[o].same(out[p]))
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "output ", named(outputs[o]), " is the same file as output ", named(outputs[p]),
                     ": one would overwrite the other");
    }
}

void probe_writable_dir(const std::string& dir, const std::string& what) {
    // A probe file: access() says yes to root even on a read-only mount.
    const std::string in = dir.empty() ? "." : dir;  // a bare file name's directory
    std::string probe = in + "/.collapse-probe-XXXXXX";
    const int fd = ::mkstemp(probe.data());
    if (fd < 0) fail(COLLAPSE_ERR_IO, "cannot write ", what, ": cannot create a file in its directory ", in, ": ", std::strerror(errno));
    ::close(fd);
    ::unlink(probe.c_str());
}

void check_output_writable(const FileArg& output) {
    std::error_code ec;
    std::string target = output.path;
    if (std::filesystem::is_symlink(target, ec)) {  // AtomicFile replaces the link's target
        const auto c = std::filesystem::weakly_canonical(target, ec);
        if (!ec) target = c.string();
    }
    struct stat st;
    if (::stat(target.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode)) fail(COLLAPSE_ERR_IO, "cannot write ", named(output), ": it is a directory");
        if (!S_ISREG(st.st_mode)) return;
    }
    probe_writable_dir(std::filesystem::path(target).parent_path().string(), named(output));
}

void check_inputs_distinct(const std::vector<FileArg>& inputs, const std::string& why) {
    std::vector<Identity> in;
    for (const FileArg& f : inputs) in.push_back(identify(f.path));
    for (size_t i = 0; i < inputs.size(); ++i)
        for (size_t j = 0; j < i; ++j)
            if (in[i].exists && in[i].same(in[j]))
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "input ", named(inputs[i]), " is the same file as input ", named(inputs[j]), ": ", why);
}

}  // namespace collapse::internal::io
