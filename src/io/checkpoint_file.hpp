// Checkpoint container: a crash-safe, checksummed, versioned file of named binary sections.
// This file defines only the container; what a session stores in it is decided elsewhere.
//
// ------------------------------------------------------------------------------------------------
// Format, version 1. All integers little-endian. Offsets are from the start of the file.
//
//   [0, 64)                 header (fixed size, 64 bytes)
//   [64, 64 + 96*count)     section table: `count` entries of 96 bytes, in payload order
//   [.., data_offset)       reserved table slots: zero bytes (the writer reserves room up front)
//   [data_offset, file_bytes)  payloads, each starting on a 64-byte boundary, zero bytes between
//
// Header (64 bytes):
//   off size  field
//    0   8    magic "CLPSCKPT"
//    8   4    format version (uint32) = 1
//   12   4    flags (uint32); none are defined in v1: writers write 0, v1 readers refuse others
//   16   4    section count (uint32)
//   20   4    table entry size in bytes (uint32) = 96
//   24   8    data_offset (uint64): offset of the first payload; 64-aligned, >= 64 + 96*count
//   32   8    file_bytes (uint64): the exact size of the file
//   40   4    table CRC32C: over the 96*count table bytes
//   44  16    reserved, zero
//   60   4    header CRC32C: over bytes [0, 60)
// The magic, the version field and the header CRC (over [0, 60) of the first 64 bytes) stay where
// they are in every future version, so a reader can tell "corrupt" from "newer" before it parses
// the rest: the header CRC is checked before the version.
//
// Table entry (96 bytes):
//   off size  field
//    0  32    name: 1..32 bytes, no NUL inside, NUL-padded to 32
//   32   4    element type code (uint32): a collapse_dtype value (U8 holds opaque bytes, e.g. text)
//   36   4    ndim (uint32), 0..4 (0 = a scalar, one element)
//   40  32    shape: 4 x int64, dims >= 0; unused dims are 0
//   72   8    payload offset (uint64)
//   80   8    payload length in bytes (uint64) = product(shape) * element size
//   88   4    payload CRC32C
//   92   4    reserved, zero
//
// The layout is canonical, so every byte of a file is checked by something: the first payload is
// at data_offset, each next one at the previous payload's end rounded up to 64, file_bytes is the
// last payload's end (data_offset when there are none), and every gap byte is zero. Names are
// unique. CRC32C is Castagnoli (reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF).
//
// Crash safety: the writer streams payloads into a unique temp file beside <path>
// ("<path>.tmp.<host>-<pid>-XXXXXX", base/atomic_file.hpp), writes the table and header last,
// fsyncs the file, renames it over <path> and fsyncs the directory. A crash at any instant leaves
// the old checkpoint or the new one, whole, under <path> (and perhaps the dead writer's temp file,
// which is never read and which the next writer of <path> removes). A write error throws
// COLLAPSE_ERR_IO and removes the temp file. A <path> that exists and is not a regular file
// (/dev/null) is written straight through; one that cannot seek (a FIFO) is refused.
// ------------------------------------------------------------------------------------------------
#pragma once
#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/crc32c.hpp"
#include "collapse/collapse.h"
#include "core/state_io.hpp"

namespace collapse::internal::io {

class MappedFile;

constexpr uint32_t kCheckpointVersion = 1;
constexpr size_t kCheckpointHeaderBytes = 64;
constexpr size_t kCheckpointEntryBytes = 96;
constexpr size_t kCheckpointAlign = 64;
constexpr size_t kCheckpointMaxName = 32;
constexpr size_t kCheckpointMaxDims = 4;


// One section of an open checkpoint (core's StateSection: the reader is a StateReader). `data`
// points into the reader's mapping: valid while the reader lives, 64-byte aligned, nullptr when
// bytes == 0.
using CheckpointSection = StateSection;

// Writes one checkpoint. Sections are written to the temp file as they are added (never held in
// memory); commit() makes the file appear under its final name. Without commit() (an exception,
// an early return) the destructor removes the temp file and <path> is untouched.
//
// Errors: file-system failures (ENOSPC, EIO, EFBIG, an unwritable directory) throw
// Error(COLLAPSE_ERR_IO) naming the path and strerror; after one the writer refuses every further
// call. Bad arguments (name, shape, size, duplicate) throw COLLAPSE_ERR_INVALID_ARGUMENT and leave
// the writer usable; calls out of order (add after commit, commit inside a section) throw
// COLLAPSE_ERR_STATE.
class CheckpointWriter final : public StateWriter {
public:
    // Writes `bytes` bytes at `offset` of `fd`; returns what it wrote or -1 with errno set
    // (pwrite semantics; short writes are retried). Tests inject failures through it.
    using WriteFn = std::function<ssize_t(int fd, const void* data, size_t bytes, off_t offset)>;

    struct Options {
        // Table slots reserved up front (96 bytes each). add() past this many throws.
        size_t max_sections = 64;
        // Defaults to ::pwrite.
        WriteFn write_fn;
    };

    explicit CheckpointWriter(const std::string& path);
    CheckpointWriter(const std::string& path, Options options);
    ~CheckpointWriter() override;
    CheckpointWriter(const CheckpointWriter&) = delete;
    CheckpointWriter& operator=(const CheckpointWriter&) = delete;

    // A whole section at once: written straight from `data` to the file (no copy).
    // bytes must equal product(shape) * dtype_size(dtype_code); shape has at most 4 dims.
    void add(const std::string& name, uint32_t dtype_code, const std::vector<int64_t>& shape, const void* data,
             size_t bytes) override;

    // A section in pieces: begin_section declares it, append() writes the next piece (in order),
    // end_section() checks that exactly `bytes` bytes were appended.
    void begin_section(const std::string& name, uint32_t dtype_code, const std::vector<int64_t>& shape,
                       size_t bytes) override;
    void append(const void* data, size_t bytes) override;
    void end_section() override;

    // Writes table and header, fsyncs, renames over the path, fsyncs the directory.
    // A second commit() is a no-op.
    void commit();

    const std::string& path() const;
    // "<path>.tmp.<host>-<pid>-XXXXXX" (base/atomic_file.hpp); "" when <path> is not a regular
    // file (/dev/null) and is written straight through.
    const std::string& temp_path() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Reads one checkpoint. The constructor validates the header, the table and the layout, and,
// with verify_all (the default), every section's CRC; otherwise a section's CRC is checked the
// first time section() returns it (or by verify_all_sections()). Every refusal is
// Error(COLLAPSE_ERR_IO) naming the path and the failed check: "not a collapse checkpoint",
// "written by a newer collapse (format vN, this build reads v1)", "truncated at header",
// "truncated at section table", "truncated at section NAME", "corrupt header", "corrupt section
// table", "corrupt section NAME (checksum mismatch: expected 0x.., found 0x..)", "missing section
// NAME".
class CheckpointReader final : public StateReader {
public:
    struct Options {
        bool verify_all = true;
    };

    explicit CheckpointReader(const std::string& path);
    CheckpointReader(const std::string& path, Options options);
    ~CheckpointReader() override;
    CheckpointReader(const CheckpointReader&) = delete;
    CheckpointReader& operator=(const CheckpointReader&) = delete;

    const std::string& path() const { return path_; }
    std::string description() const override { return "checkpoint " + path_; }
    uint32_t version() const { return version_; }
    std::vector<std::string> names() const;  // in file order
    bool has(const std::string& name) const override;
    // The section, its CRC checked (once); "missing section NAME" if there is none.
    CheckpointSection section(const std::string& name) const override;
    void verify_all_sections() const;
    // Drops [offset, offset + bytes) of a section's pages from the resident set (after use).
    void release(const CheckpointSection& s, size_t offset, size_t bytes) const override;

private:
    struct Entry {
        CheckpointSection view;
        uint64_t offset = 0;
        uint32_t crc = 0;
    };
    const Entry& find(const std::string& name) const;
    void verify(size_t index) const;

    std::string path_;
    std::shared_ptr<MappedFile> file_;
    uint32_t version_ = 0;
    std::vector<Entry> entries_;
    std::unique_ptr<std::atomic<bool>[]> verified_;
};

}  // namespace collapse::internal::io
