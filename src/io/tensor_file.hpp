// Tensor files (.npy, .safetensors): the readers the CLI streams from, and the writers `collapse
// synth` uses. A reader never copies the whole tensor: it hands out row ranges, either as pointers
// into a mapping (row()) or copied with pread (read_rows(), which turns a file that
// changes during the run into an error instead of a SIGBUS).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "base/file.hpp"
#include "collapse/collapse.h"

namespace collapse::internal::io {

using internal::UniqueFd;           // base/file.hpp
using internal::open_regular_file;  // base/file.hpp

// A read-only view of a whole regular file: a memory mapping for callers that want pointers, and
// checked pread() for callers that must survive the file changing under them. Touching the mapping
// after the file shrank kills the process with SIGBUS; read() instead reports the change as an error.
class MappedFile {
public:
    // Throws Error(COLLAPSE_ERR_IO) naming the path; `what` names the file's role in messages.
    explicit MappedFile(const std::string& path, const std::string& what = "input file");
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& path() const { return path_; }
    // Drop the pages of [offset, offset+bytes) from this process's resident set (madvise).
    void release(size_t offset, size_t bytes) const;
    // Copies [offset, offset+bytes) into dst with pread. Throws Error(COLLAPSE_ERR_IO) if the range
    // is outside the file as opened, or if the file is shorter now or its size or modification
    // time differ from when it was opened ("changed while it was read").
    void read(size_t offset, size_t bytes, void* dst) const;
    // Throws the same "changed while it was read" error if the file's size or mtime moved.
    void check_unchanged() const;

private:
    std::string path_, what_;
    UniqueFd fd_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
    int64_t mtime_sec_ = 0, mtime_nsec_ = 0;
};

// A tensor inside a mapped file: C-order, little-endian.
struct Tensor {
    std::shared_ptr<MappedFile> file;
    std::string name;  // file path for .npy, tensor name for .safetensors
    collapse_dtype dtype = COLLAPSE_F32;
    std::vector<int64_t> shape;
    size_t offset = 0;  // byte offset of element 0 in the file

    const void* data() const { return file->data() + offset; }
    int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
    // Elements per row (product of shape[1:]), 1 for a 1-D tensor.
    int64_t row_elements() const;
    int64_t numel() const;
    size_t row_bytes() const;
    // Pointer to row r.
    const void* row(int64_t r) const;
    // Rows [r0, r0+n) copied into buf (resized to fit) with pread; returns buf.data(). Unlike
    // row(), a file that shrinks or is rewritten during the run is an Error(COLLAPSE_ERR_IO) that
    // says so, never a SIGBUS. The copy costs about what faulting the mapped pages in costs.
    const void* read_rows(int64_t r0, int64_t n, std::vector<uint8_t>& buf) const;
};

// Shape checks for the command line's inputs: Error(COLLAPSE_ERR_SHAPE) naming `what`, the tensor,
// its shape and the expected one. Labels (and per-row masks) are [rows] or [rows, 1], nothing else:
// [rows/2, 2] has the right element count but the wrong row stride, [1, rows] has a single row.
void require_label_shape(const Tensor& t, int64_t rows, const std::string& what);
// Exactly this shape, e.g. input_ids and attention_mask [B, T].
void require_shape(const Tensor& t, const std::vector<int64_t>& expected, const std::string& what);

// .npy versions 1, 2, 3. Accepts <f2 <f4 <f8 <i4 <i8 |u1 |b1 (and '=' / '|' byte orders where
// unambiguous). Refuses Fortran order, big-endian, other dtypes, and truncated files with a message
// naming the file and the problem.
Tensor open_npy(const std::string& path);

// .safetensors: dtypes F16, BF16, F32, F64, I32, I64, U8, BOOL. Validates the header JSON, the
// offsets and sizes of every tensor against the file.
class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);
    std::vector<std::string> names() const;
    bool has(const std::string& name) const;
    Tensor tensor(const std::string& name) const;  // Error(COLLAPSE_ERR_IO) listing available names
    const std::string& path() const { return file_->path(); }

private:
    std::shared_ptr<MappedFile> file_;
    std::vector<Tensor> tensors_;
};

// Streaming writers: the shape is fixed up front, data is appended in order, close() checks that
// exactly the declared number of bytes was written. Files are written to a unique temporary file
// beside the path and renamed on close() (base/atomic_file.hpp), so a failed write never leaves a
// half file under the final name, and no other file is touched on the way.
class NpyWriter {
public:
    NpyWriter(const std::string& path, collapse_dtype dtype, std::vector<int64_t> shape);
    ~NpyWriter();  // removes the temporary file if close() was not reached
    void append(const void* data, size_t bytes);
    void close();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

struct TensorSpec {
    std::string name;
    collapse_dtype dtype;
    std::vector<int64_t> shape;
};

class SafetensorsWriter {
public:
    // Tensors are laid out in the given order; append() fills them in that order.
    SafetensorsWriter(const std::string& path, std::vector<TensorSpec> tensors);
    ~SafetensorsWriter();
    void append(const void* data, size_t bytes);
    void close();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Convenience: whole tensors at once.
void write_npy(const std::string& path, collapse_dtype dtype, const std::vector<int64_t>& shape, const void* data);
// A whole .npy file in memory (header and data), for writers that go through base/atomic_file.hpp.
std::string npy_bytes(collapse_dtype dtype, const std::vector<int64_t>& shape, const void* data);

}  // namespace collapse::internal::io
