// The accumulated state as named, typed arrays, seen through two small interfaces so that core
// and the backends know no file format: io::CheckpointWriter / io::CheckpointReader implement them
// (src/io/checkpoint_file.hpp), and a reduction over ranks (MPI) can implement the same ones.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace collapse::internal {

// One array: a collapse_dtype code, a shape of at most 4 dims, and bytes = product(shape) * size
// of the dtype. `data` is valid while the reader lives, nullptr when bytes == 0.
struct StateSection {
    std::string name;
    uint32_t dtype_code = 0;
    std::vector<int64_t> shape;
    const void* data = nullptr;
    size_t bytes = 0;
};

class StateWriter {
public:
    virtual ~StateWriter() = default;
    // A whole array at once.
    virtual void add(const std::string& name, uint32_t dtype_code, const std::vector<int64_t>& shape, const void* data,
                     size_t bytes) = 0;
    // An array in pieces, in order: begin_section declares it, append() gives the next piece,
    // end_section() checks that exactly `bytes` bytes came.
    virtual void begin_section(const std::string& name, uint32_t dtype_code, const std::vector<int64_t>& shape,
                               size_t bytes) = 0;
    virtual void append(const void* data, size_t bytes) = 0;
    virtual void end_section() = 0;
};

class StateReader {
public:
    virtual ~StateReader() = default;
    // What the state comes from, for messages ("checkpoint /path/run.ckpt").
    virtual std::string description() const = 0;
    virtual bool has(const std::string& name) const = 0;
    // The array (its integrity checked by the implementation); an error naming it if absent.
    virtual StateSection section(const std::string& name) const = 0;
    // [offset, offset + bytes) of a section has been taken in: its memory may be given back.
    virtual void release(const StateSection& s, size_t offset, size_t bytes) const {}
};

}  // namespace collapse::internal
