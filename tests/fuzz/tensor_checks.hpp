// What the tensor-file fuzz targets check on a tensor the reader accepted: it lies inside the
// file, read_rows() and the mapping agree byte for byte, and the shape checks do not crash.
#pragma once
#include <cstdlib>
#include <cstring>
#include <vector>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "io/tensor_file.hpp"

namespace fuzz {

inline void check_tensor(const collapse::internal::io::Tensor& t) {
    using namespace collapse::internal;
    const size_t bytes = (size_t)t.numel() * dtype_size(t.dtype);
    if (t.offset > t.file->size() || bytes > t.file->size() - t.offset) std::abort();  // accepted past the end
    if ((size_t)t.rows() * t.row_bytes() != bytes) std::abort();
    std::vector<uint8_t> buf;
    const int64_t chunk = 3;
    for (int64_t r0 = 0; r0 < t.rows(); r0 += chunk) {
        const int64_t n = std::min<int64_t>(chunk, t.rows() - r0);
        const void* p = t.read_rows(r0, n, buf);
        if (buf.size() && std::memcmp(p, t.row(r0), buf.size()) != 0) std::abort();
    }
    try {
        io::require_label_shape(t, t.rows(), "labels");
    } catch (const Error&) {
    }
    try {
        io::require_shape(t, {t.rows(), t.row_elements()}, "input_ids");
    } catch (const Error&) {
    }
}

}  // namespace fuzz
