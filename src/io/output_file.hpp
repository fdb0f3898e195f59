// The files the engine writes. Writing: base/atomic_file.hpp (a unique temp file beside the output,
// fsync, rename; straight through /dev/null, a terminal or a FIFO), shared with src/report/.
// Here: the check that no output of a run is one of its inputs or another of its outputs.
#pragma once
#include <string>
#include <vector>

#include "base/atomic_file.hpp"

namespace collapse::internal::io {

// A file of a run, with what it is for messages ("--features", "--output", "--checkpoint").
struct FileArg {
    std::string what;
    std::string path;
};

// Refuses (COLLAPSE_ERR_INVALID_ARGUMENT, naming both) an output that is the same file as an input
// or as another output: for existing files by (st_dev, st_ino), so that links and other spellings
// are caught; for outputs that do not exist yet by their canonical path. Character devices
// (/dev/null, a terminal) may be given more than once. Inputs that do not exist are left to their
// reader's error.
void check_outputs_distinct(const std::vector<FileArg>& inputs, const std::vector<FileArg>& outputs);

// Refuses (COLLAPSE_ERR_IO, naming the option, the path and the reason) an output whose directory
// does not exist or cannot be written, or that is a directory, before any work: a typo in -o cost
// the whole run. A device or FIFO (written straight through) is left to its writer.
void check_output_writable(const FileArg& output);

// Refuses (COLLAPSE_ERR_IO, "cannot write <what>: ...") a directory in which no file can be created,
// by creating and removing a probe file there.
void probe_writable_dir(const std::string& dir, const std::string& what);

// Refuses (COLLAPSE_ERR_INVALID_ARGUMENT, naming both and `why`) two inputs that are the same
// existing file, by (st_dev, st_ino): `collapse merge a.ckpt a.ckpt` counted every row twice.
void check_inputs_distinct(const std::vector<FileArg>& inputs, const std::string& why);

}  // namespace collapse::internal::io
