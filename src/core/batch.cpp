#include "core/batch.hpp"

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <string>

#include "base/dtype.hpp"
#include "base/error.hpp"

namespace collapse::internal {

int64_t BatchDesc::feature_row(int64_t r) const {
    if (!sequences) return r;
    const int64_t b = r / (seq_len - 1), t = r % (seq_len - 1);
    return b * seq_len + t;
}

// Flattened element index of the label (and mask) of batch row r: y = I[:, 1:].
static inline int64_t label_element(const BatchDesc& d, int64_t r, const MatrixView& m) {
    if (!d.sequences) return r * m.stride;
    const int64_t b = r / (d.seq_len - 1), t = r % (d.seq_len - 1);
    return b * m.stride + t + 1;
}

int64_t BatchDesc::label_value(int64_t r) const { return load_as_int(labels.data, labels.dtype, label_element(*this, r, labels)); }

bool BatchDesc::is_valid(int64_t r) const {
    if (!valid.data) return true;
    return load_as_int(valid.data, valid.dtype, label_element(*this, r, valid)) != 0;
}

// The bytes a buffer spans, ((rows - 1) * stride + cols) * itemsize, must be a number: a product
// that overflows int64 (a row_stride of 2^62, say) would make row addresses wrap around.
void check_extent(const collapse_buffer* b, const char* what) {
    if (b->rows == 0) return;
    const int64_t stride = b->row_stride == 0 ? b->cols : b->row_stride;
    const int64_t item = (int64_t)dtype_size(b->dtype);
    int64_t elems = 0, bytes = 0;
    if (__builtin_mul_overflow(b->rows - 1, stride, &elems) || __builtin_add_overflow(elems, b->cols, &elems) ||
        __builtin_mul_overflow(elems, item, &bytes))
        fail(COLLAPSE_ERR_SHAPE, what, ": ", b->rows, " rows with row_stride ", stride, " and ", b->cols, " columns of ",
             item, "-byte ", dtype_name(b->dtype), " span more than 2^63 bytes (the size overflows int64)");
    if ((uintptr_t)b->data > UINTPTR_MAX - (uint64_t)bytes)
        fail(COLLAPSE_ERR_SHAPE, what, ": ", b->rows, " rows with row_stride ", stride, " (", bytes,
             " bytes) from address ", b->data, " run past the end of the address space");
}

namespace {

MatrixView view_of(const collapse_buffer* b) {
    MatrixView v;
    v.data = b->data;
    v.dtype = b->dtype;
    v.memory = b->memory;
    v.rows = b->rows;
    v.cols = b->cols;
    v.stride = b->row_stride == 0 ? b->cols : b->row_stride;
    return v;
}

// Checks common to every buffer.
void check_buffer(const collapse_buffer* b, const char* what) {
    if (!b) fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": buffer is NULL");
    if (!dtype_is_valid(raw_enum(b->dtype))) fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": unknown dtype ", raw_enum(b->dtype));
    const int memory = raw_enum(b->memory);
    if (memory != COLLAPSE_MEMORY_HOST && memory != COLLAPSE_MEMORY_DEVICE)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": unknown memory kind ", memory);
    if (b->rows < 0 || b->cols < 1)
        fail(COLLAPSE_ERR_SHAPE, what, ": invalid shape [", b->rows, ", ", b->cols, "]");
    if (b->row_stride != 0 && b->row_stride < b->cols)
        fail(COLLAPSE_ERR_SHAPE, what, ": row_stride ", b->row_stride, " is smaller than cols ", b->cols);
    if (b->rows > 0 && !b->data) fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": data is NULL for ", b->rows, " rows");
    check_extent(b, what);
}

void check_features(const collapse_buffer* f, const char* what, int64_t d) {
    check_buffer(f, what);
    if (!dtype_is_float(f->dtype))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": dtype ", dtype_name(f->dtype),
             " is not a float type (float32, float16, bfloat16, float64)");
    if (d > 0 && f->cols != d)
        fail(COLLAPSE_ERR_SHAPE, what, ": width ", f->cols, " differs from the session's feature width ", d,
             " (set by the options' dim, the classifier's columns or the first batch)");
}

void check_int(const collapse_buffer* b, const char* what, bool allow_bytes) {
    const bool ok = b->dtype == COLLAPSE_I32 || b->dtype == COLLAPSE_I64 ||
                    (allow_bytes && (b->dtype == COLLAPSE_U8 || b->dtype == COLLAPSE_BOOL));
    if (!ok)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": dtype ", dtype_name(b->dtype), " is not ",
             allow_bytes ? "uint8, bool, int32 or int64" : "int32 or int64");
}

// "13 of the input (row 3 of this batch)" when the caller gave an offset, else "3 of the batch".
std::string where(const BatchDesc& b, int64_t r) {
    if (b.row_offset == 0) return std::to_string(r) + " of the batch";
    return std::to_string(b.row_offset + r) + " of the input (" + std::to_string(r) + " of this batch)";
}

void check_same_memory(const collapse_buffer* a, const collapse_buffer* b, const char* what) {
    if (b && a->memory != b->memory)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": memory kind differs from the features' (all buffers of a batch must be host or all device)");
}

}  // namespace

BatchDesc describe_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid,
                        int64_t d) {
    check_features(features, "features", d);
    check_buffer(labels, "labels");
    check_int(labels, "labels", false);
    if (labels->rows != features->rows || labels->cols != 1)
        fail(COLLAPSE_ERR_SHAPE, "labels: shape [", labels->rows, ", ", labels->cols, "] does not match ", features->rows,
             " feature rows (expected [", features->rows, ", 1])");
    check_same_memory(features, labels, "labels");
    BatchDesc b;
    b.features = view_of(features);
    b.labels = view_of(labels);
    if (valid) {
        check_buffer(valid, "valid mask");
        check_int(valid, "valid mask", true);
        if (valid->rows != features->rows || valid->cols != 1)
            fail(COLLAPSE_ERR_SHAPE, "valid mask: shape [", valid->rows, ", ", valid->cols, "] does not match ",
                 features->rows, " feature rows");
        check_same_memory(features, valid, "valid mask");
        b.valid = view_of(valid);
    }
    return b;
}

BatchDesc describe_sequences(const collapse_buffer* hidden, const collapse_buffer* input_ids,
                             const collapse_buffer* mask, int64_t batch, int64_t seq_len, int64_t d) {
    check_features(hidden, "hidden", d);
    if (batch < 0 || seq_len < 1)
        fail(COLLAPSE_ERR_SHAPE, "sequences: invalid batch ", batch, " or seq_len ", seq_len);
    int64_t tokens = 0;
    if (__builtin_mul_overflow(batch, seq_len, &tokens))
        fail(COLLAPSE_ERR_SHAPE, "sequences: batch ", batch, " * seq_len ", seq_len, " overflows int64");
    if (hidden->rows != tokens)
        fail(COLLAPSE_ERR_SHAPE, "hidden: ", hidden->rows, " rows, expected batch*seq_len = ", tokens);
    check_buffer(input_ids, "input_ids");
    check_int(input_ids, "input_ids", false);
    if (input_ids->rows != batch || input_ids->cols != seq_len)
        fail(COLLAPSE_ERR_SHAPE, "input_ids: shape [", input_ids->rows, ", ", input_ids->cols, "], expected [", batch,
             ", ", seq_len, "]");
    check_same_memory(hidden, input_ids, "input_ids");
    BatchDesc b;
    b.sequences = true;
    b.batch = batch;
    b.seq_len = seq_len;
    b.features = view_of(hidden);
    b.labels = view_of(input_ids);
    if (mask) {
        check_buffer(mask, "attention_mask");
        check_int(mask, "attention_mask", true);
        if (mask->rows != batch || mask->cols != seq_len)
            fail(COLLAPSE_ERR_SHAPE, "attention_mask: shape [", mask->rows, ", ", mask->cols, "], expected [", batch,
                 ", ", seq_len, "]");
        check_same_memory(hidden, mask, "attention_mask");
        b.valid = view_of(mask);
    }
    return b;
}

std::string ignore_hint(std::optional<int64_t> ignore_index, int64_t label) {
    if (label >= 0) return "";
    if (!ignore_index) return " (ignore_index is null: set ignore_index to " + std::to_string(label) + " to drop such rows)";
    return " (ignore_index is " + std::to_string(*ignore_index) + ": only that label is dropped)";
}

int64_t first_nonfinite(const void* row, collapse_dtype t, int64_t d) {
    switch (t) {
        case COLLAPSE_F32: {
            const float* p = static_cast<const float*>(row);
            for (int64_t k = 0; k < d; ++k)
                if (!std::isfinite(p[k])) return k;
            return -1;
        }
        case COLLAPSE_F64: {
            const double* p = static_cast<const double*>(row);
            for (int64_t k = 0; k < d; ++k)
                if (!(std::fabs(p[k]) <= (double)FLT_MAX)) return k;
            return -1;
        }
        case COLLAPSE_F16:
        case COLLAPSE_BF16: {
            // Exponent all ones is inf/nan in both formats.
            const uint16_t* p = static_cast<const uint16_t*>(row);
            const uint16_t mask = t == COLLAPSE_F16 ? 0x7c00u : 0x7f80u;
            for (int64_t k = 0; k < d; ++k)
                if ((p[k] & mask) == mask) return k;
            return -1;
        }
        default: return -1;
    }
}

AcceptedRows accept_rows(const BatchDesc& b, int64_t num_classes, const std::vector<uint8_t>& excluded,
                         std::optional<int64_t> ignore_index, collapse_nonfinite_policy policy, bool check_finite) {
    AcceptedRows out;
    const int64_t n = b.num_rows();
    out.rows_seen = n;
    out.feature_row.reserve((size_t)n);
    out.label.reserve((size_t)n);
    const int64_t d = b.features.cols;
    for (int64_t r = 0; r < n; ++r) {
        if (!b.is_valid(r)) {
            ++out.rows_masked;
            continue;
        }
        const int64_t y = b.label_value(r);
        if (ignore_index && y == *ignore_index) {  // "no target" (Hugging Face: -100); a masked row stays masked
            ++out.rows_ignored;
            continue;
        }
        if (y < 0 || y >= num_classes) {
            if (b.sequences)
                fail(COLLAPSE_ERR_BAD_INPUT, "label ", y, " at sequence ", where(b, r / (b.seq_len - 1)), ", position ",
                     r % (b.seq_len - 1) + 1, " of input_ids is outside [0, ", num_classes, ")", ignore_hint(ignore_index, y));
            fail(COLLAPSE_ERR_BAD_INPUT, "label ", y, " at row ", where(b, r), " is outside [0, ", num_classes, ")", ignore_hint(ignore_index, y));
        }
        if (excluded[(size_t)y]) {
            ++out.rows_excluded;
            continue;
        }
        const int64_t fr = b.feature_row(r);
        if (check_finite) {
            const int64_t k = first_nonfinite(b.features.row(fr), b.features.dtype, d);
            if (k >= 0) {
                if (policy == COLLAPSE_NONFINITE_SKIP_ROW) {
                    ++out.rows_nonfinite;
                    continue;
                }
                const double v = load_as_double(b.features.row(fr), b.features.dtype, k);
                const char* what = std::isfinite(v) ? "feature value outside the float32 range " : "non-finite feature value ";
                if (b.sequences)
                    fail(COLLAPSE_ERR_BAD_INPUT, what, v, " at sequence ", where(b, r / (b.seq_len - 1)), ", position ",
                         r % (b.seq_len - 1), ", column ", k, " (nonfinite_policy: error; skip_row drops such rows)");
                fail(COLLAPSE_ERR_BAD_INPUT, what, v, " at row ", where(b, fr), ", column ", k,
                     " (nonfinite_policy: error; skip_row drops such rows)");
            }
        }
        out.feature_row.push_back(fr);
        out.label.push_back((int32_t)y);
    }
    return out;
}

}  // namespace collapse::internal
