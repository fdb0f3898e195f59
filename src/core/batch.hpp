// A batch as the session sees it: non-owning views of the caller's buffers, and the host-side
// validation that turns it into the list of rows to accumulate. Nothing here mutates state.
#pragma once
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "core/config.hpp"
#include "base/dtype.hpp"

namespace collapse::internal {

// Rows of a 2-D buffer.
struct MatrixView {
    const void* data = nullptr;
    collapse_dtype dtype = COLLAPSE_F32;
    collapse_memory memory = COLLAPSE_MEMORY_HOST;
    int64_t rows = 0, cols = 0, stride = 0;  // stride in elements
    const void* row(int64_t r) const {
        return static_cast<const uint8_t*>(data) + (size_t)(r * stride) * dtype_size(dtype);
    }
};

// One batch in either layout. Row r of the batch is feature row feature_row(r) with the label
// and mask at element label_index(r) of the (flattened) label and mask buffers.
struct BatchDesc {
    MatrixView features;
    MatrixView labels;  // cols = 1 for rows; [B, T] for sequences
    MatrixView valid;   // data == nullptr: all rows valid
    bool sequences = false;
    int64_t batch = 0, seq_len = 0;  // sequence layout
    int64_t row_offset = 0;          // input row (sequence) of this batch's first row, for messages
    int64_t num_rows() const { return sequences ? batch * (seq_len > 0 ? seq_len - 1 : 0) : features.rows; }
    int64_t feature_row(int64_t r) const;
    int64_t label_value(int64_t r) const;
    bool is_valid(int64_t r) const;
};

// The value a C caller stored in an enum field, read as int: reading an out-of-range value (a
// dtype of 9) through the enum type is undefined behaviour in C++, so validation reads it this way.
template <class E>
int raw_enum(const E& e) {
    static_assert(sizeof(E) == sizeof(int), "C enums are int-sized here");
    int v = 0;
    std::memcpy(&v, &e, sizeof v);
    return v;
}

// Refuses (COLLAPSE_ERR_SHAPE, naming `what` and the numbers) a buffer whose byte extent,
// ((rows - 1) * stride + cols) * itemsize, overflows int64 or runs past the end of the address space.
// Call it after the dtype, rows >= 0, cols >= 1 and row_stride (0 or >= cols) were checked.
void check_extent(const collapse_buffer* b, const char* what);

// Builds a BatchDesc from C API buffers, checking every argument on its own (pointers, dtypes,
// shapes, strides, memory kind). d is the session's width (0 = not known yet).
BatchDesc describe_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid,
                        int64_t d);
BatchDesc describe_sequences(const collapse_buffer* hidden, const collapse_buffer* input_ids,
                             const collapse_buffer* mask, int64_t batch, int64_t seq_len, int64_t d);

// The rows of a batch that reach the accumulators.
struct AcceptedRows {
    std::vector<int64_t> feature_row;  // row index into BatchDesc::features
    std::vector<int32_t> label;
    // rows_seen = rows_masked + rows_ignored + rows_excluded + rows_nonfinite + label.size()
    int64_t rows_seen = 0, rows_masked = 0, rows_ignored = 0, rows_excluded = 0, rows_nonfinite = 0;
};

// Host validation, in this order: masked rows dropped; a label equal to ignore_index (when set)
// dropped and counted in rows_ignored; other labels must lie in [0, V) (the error names the batch
// row and the value); excluded labels dropped; non-finite rows an error or skipped per policy.
// Throws before anything is returned; the caller mutates nothing until this succeeds.
AcceptedRows accept_rows(const BatchDesc& b, int64_t num_classes, const std::vector<uint8_t>& excluded,
                         std::optional<int64_t> ignore_index, collapse_nonfinite_policy policy, bool check_finite);

// What to add to the message of a label outside [0, V): a negative label is usually a "no target"
// marker, so say which ignore_index would drop it ("" for a label >= 0). Both backends use it.
std::string ignore_hint(std::optional<int64_t> ignore_index, int64_t label);

// Index of the first element of a feature row that is not finite or, for float64, lies outside
// the float32 range (rows are kept as float32 and squared in float64), or -1.
int64_t first_nonfinite(const void* row, collapse_dtype t, int64_t d);

}  // namespace collapse::internal
