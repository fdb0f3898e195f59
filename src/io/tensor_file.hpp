// Memory-mapped tensor files (.npy, .safetensors): the readers the CLI streams from, and the
// writers `collapse synth` uses. A reader never copies the whole tensor: it maps the file and hands
// out row ranges; release_rows() tells the kernel a range is done so resident memory stays bounded.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "collapse/collapse.h"

namespace collapse::internal::io {

// A read-only mapping of a whole file.
class MappedFile {
public:
    explicit MappedFile(const std::string& path);  // throws Error(COLLAPSE_ERR_IO) naming the path
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& path() const { return path_; }
    // Drop the pages of [offset, offset+bytes) from this process's resident set (madvise).
    void release(size_t offset, size_t bytes) const;

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
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
    // Tell the OS rows [r0, r1) are no longer needed.
    void release_rows(int64_t r0, int64_t r1) const;
};

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
// exactly the declared number of bytes was written. Files are written to "<path>.tmp" and renamed
// on close(), so a failed write never leaves a half file under the final name.
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

}  // namespace collapse::internal::io
