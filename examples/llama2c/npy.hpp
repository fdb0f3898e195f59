// Minimal .npy (v1-v3, little-endian, C order) reading and writing for collapse_llama2c. The example
// links only the public C API, so it carries its own small reader rather than the engine's.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace llama2c {

struct NpyArray {
    std::string descr;            // e.g. "<i4"
    std::vector<int64_t> shape;
    std::vector<char> bytes;      // raw little-endian data
    int64_t count() const;
};

// Throws std::runtime_error naming the file when it cannot be read or is not a valid .npy.
NpyArray read_npy(const std::string& path);
// A 1-D array of integers ("<i4" or "<i8"), widened to int64; anything else is an error naming
// the file and its dtype.
std::vector<int64_t> read_npy_ints(const std::string& path);
// Writes float32 data of the given shape (to path.tmp, then renamed).
void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data);

}  // namespace llama2c
