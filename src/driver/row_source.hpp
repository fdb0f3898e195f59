// Where an analysis gets its rows: tensors of .npy/.safetensors files (rows or sequences layout)
// or the synthetic generator. The driver (analysis.hpp) asks a source for batches by position, so a
// resumed run starts where its checkpoint stopped and a second pass meets the same batches again.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "collapse/collapse.h"
#include "core/synth.hpp"
#include "io/tensor_file.hpp"

namespace collapse::internal::driver {

// One batch, described by buffers that stay valid until the source's next batch() call. File
// sources copy the rows with pread into buffers of their own (a file that changes during the run
// is an error, never a SIGBUS), so memory stays at one batch.
struct SourceBatch {
    int64_t first = 0, count = 0;  // positions [first, first + count): rows, or whole sequences
    collapse_buffer x{};           // rows: features [count, d]; sequences: hidden [count * T, d]
    collapse_buffer y{};           // rows: labels [count]; sequences: input ids [count, T]
    std::optional<collapse_buffer> mask;  // rows: valid [count]; sequences: attention mask [count, T]
    std::optional<collapse_buffer> sequence_ids, positions;  // rows: [count] each (windows), when given
};

// What was analysed, recorded in the report and in checkpoints (a resume refuses another input).
// The fingerprint is cheap by design: for each tensor a CRC32C over its dtype, shape, byte size and
// position in the file, its first and last 64 KiB and 16 blocks of 4 KiB spread evenly between
// them. It tells different dumps apart (and a file rewritten in place with other rows in most
// places); it is no cryptographic hash of every byte.
struct InputPart {
    std::string role;      // features, labels, valid, hidden, input_ids, attention_mask
    std::string path;      // the file
    std::string tensor;    // the tensor name in a .safetensors file ("" for .npy)
    std::string dtype;
    std::vector<int64_t> shape;
    int64_t file_bytes = 0;
    std::string fingerprint;  // 8 hex digits
};
struct InputInfo {
    std::string kind;  // "npy", "safetensors" or "synthetic"
    std::vector<InputPart> parts;
    std::string synthetic_spec;           // the generator's spec as JSON text (synthetic input)
    std::string fingerprint;              // all parts together, 16 hex digits
};
nlohmann::json to_json(const InputInfo& info);

class RowSource {
public:
    virtual ~RowSource() = default;
    virtual bool sequences() const = 0;
    // Positions: rows (rows layout) or sequences (sequence layout).
    virtual int64_t length() const = 0;
    // Analysed rows per position: 1, or T - 1 for sequences.
    virtual int64_t rows_per_position() const = 0;
    virtual int64_t dim() const = 0;
    virtual int64_t seq_len() const { return 0; }
    // The largest label + 1 (a scan of the labels; the synthetic source knows its V).
    virtual int64_t label_bound() const = 0;
    // Positions [first, first + count), count >= 1, first + count <= length().
    virtual SourceBatch batch(int64_t first, int64_t count) = 0;
    virtual const InputInfo& info() const = 0;
    // A classifier that comes with the data (the synthetic generator's W, [V, d] float32); empty: none.
    virtual std::vector<float> built_in_classifier() const { return {}; }
};

// Rows layout: features [N, d], labels [N] or [N, 1] (int32/int64), optional valid [N] or [N, 1],
// optional sequence ids and positions [N] or [N, 1] (int32/int64; positions need sequence ids).
std::unique_ptr<RowSource> tensor_rows(io::Tensor features, io::Tensor labels, std::optional<io::Tensor> valid,
                                       const std::string& kind, std::optional<io::Tensor> sequence_ids = std::nullopt,
                                       std::optional<io::Tensor> positions = std::nullopt);
// Sequence layout: hidden [B, T, d], input ids [B, T], optional attention mask [B, T].
std::unique_ptr<RowSource> tensor_sequences(io::Tensor hidden, io::Tensor input_ids, std::optional<io::Tensor> mask,
                                            const std::string& kind);
// The built-in synthetic data set (`collapse synth` writes the same rows to files).
std::unique_ptr<RowSource> synthetic_rows(const SynthSpec& spec);

// The fingerprint of one tensor (see InputInfo), as 8 hex digits.
std::string tensor_fingerprint(const io::Tensor& t);

}  // namespace collapse::internal::driver
