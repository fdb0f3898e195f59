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

}  // namespace collapse::internal::io
