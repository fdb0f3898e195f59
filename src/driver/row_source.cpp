#include "driver/row_source.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "base/crc32c.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "base/text.hpp"

namespace collapse::internal::driver {

namespace {

std::string hex(uint64_t v, int digits) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%0*llx", digits, (unsigned long long)v);
    return buf;
}

InputPart part_of(const std::string& role, const io::Tensor& t, const std::string& kind) {
    InputPart p;
    p.role = role;
    p.path = t.file->path();
    p.tensor = kind == "safetensors" ? t.name : "";
    p.dtype = dtype_name(t.dtype);
    p.shape = t.shape;
    p.file_bytes = (int64_t)t.file->size();
    p.fingerprint = tensor_fingerprint(t);
    return p;
}

void finish_info(InputInfo& info) {
    uint32_t a = 0, b = 0x9E3779B9u;
    for (const auto& p : info.parts) {
        const std::string s = p.role + "|" + p.fingerprint + "|" + shape_text(p.shape);
        a = crc32c(s.data(), s.size(), a);
        b = crc32c(s.data(), s.size(), b ^ a);
    }
    a = crc32c(info.synthetic_spec.data(), info.synthetic_spec.size(), a);
    b = crc32c(info.synthetic_spec.data(), info.synthetic_spec.size(), b);
    info.fingerprint = hex(((uint64_t)a << 32) | b, 16);
}

void require_integer(const io::Tensor& t, const char* role) {
    if (t.dtype != COLLAPSE_I32 && t.dtype != COLLAPSE_I64)
        fail(COLLAPSE_ERR_SHAPE, role, " '", t.name, "' has dtype ", dtype_name(t.dtype), "; expected int32 or int64");
}

// The largest label + 1, read in pieces with pread (a file that changes under the run is an error).
// A label past the engine's class limit (2^31 - 1) is named with its place here: "largest + 1"
// of 2^63 - 1 overflowed, and the error then named another row.
int64_t scan_label_bound(const io::Tensor& t) {
    const io::Tensor flat = [&] {
        io::Tensor f = t;
        f.shape = {t.numel()};
        return f;
    }();
    std::vector<uint8_t> buf;
    int64_t mx = -1, at = -1;
    constexpr int64_t kPiece = 1 << 20;
    for (int64_t i0 = 0; i0 < flat.numel(); i0 += kPiece) {
        const int64_t n = std::min(kPiece, flat.numel() - i0);
        const void* p = flat.read_rows(i0, n, buf);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t v = load_as_int(p, t.dtype, i);
            if (v > mx) mx = v, at = i0 + i;
        }
    }
    if (mx >= INT32_MAX) {
        const bool seqs = t.shape.size() == 2 && t.shape[1] > 1;
        const std::string where = seqs ? "sequence " + std::to_string(at / t.shape[1]) + ", position " + std::to_string(at % t.shape[1])
                                       : "row " + std::to_string(at);
        fail(COLLAPSE_ERR_BAD_INPUT, "label ", mx, " at ", where, " of '", t.name, "' is too large: class ids must be below 2^31 - 1");
    }
    return mx + 1;
}

class TensorRows : public RowSource {
public:
    TensorRows(io::Tensor x, io::Tensor y, std::optional<io::Tensor> valid, const std::string& kind, std::optional<io::Tensor> seq,
               std::optional<io::Tensor> pos)
        : x_(std::move(x)), y_(std::move(y)), valid_(std::move(valid)), seq_(std::move(seq)), pos_(std::move(pos)) {
        if (x_.shape.size() != 2)
            fail(COLLAPSE_ERR_SHAPE, "features '", x_.name, "' must be 2-D [N, d], has shape ", shape_text(x_.shape));
        io::require_label_shape(y_, x_.rows(), "labels");
        require_integer(y_, "labels");
        if (valid_) io::require_label_shape(*valid_, x_.rows(), "valid mask");
        info_.kind = kind;
        info_.parts.push_back(part_of("features", x_, kind));
        info_.parts.push_back(part_of("labels", y_, kind));
        if (valid_) info_.parts.push_back(part_of("valid", *valid_, kind));
        // Sequence ids and positions (windows), .npy files checked like the labels.
        if (pos_ && !seq_) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--positions needs --sequence-ids");
        if (seq_) {
            io::require_label_shape(*seq_, x_.rows(), "sequence ids");
            require_integer(*seq_, "sequence ids");
            info_.parts.push_back(part_of("sequence_ids", *seq_, "npy"));
        }
        if (pos_) {
            io::require_label_shape(*pos_, x_.rows(), "positions");
            require_integer(*pos_, "positions");
            info_.parts.push_back(part_of("positions", *pos_, "npy"));
        }
        finish_info(info_);
    }
    bool sequences() const override { return false; }
    int64_t length() const override { return x_.rows(); }
    int64_t rows_per_position() const override { return 1; }
    int64_t dim() const override { return x_.shape[1]; }
    int64_t label_bound() const override { return scan_label_bound(y_); }
    SourceBatch batch(int64_t first, int64_t count) override {
        SourceBatch b;
        b.first = first;
        b.count = count;
        // Copied with pread, not read through the mapping: a file that shrinks during the run is
        // an error that says so instead of a SIGBUS.
        b.x = collapse_buffer{x_.read_rows(first, count, xb_), x_.dtype, COLLAPSE_MEMORY_HOST, b.count, dim(), 0};
        b.y = collapse_buffer{y_.read_rows(first, count, yb_), y_.dtype, COLLAPSE_MEMORY_HOST, b.count, 1, 0};
        if (valid_) b.mask = collapse_buffer{valid_->read_rows(first, count, mb_), valid_->dtype, COLLAPSE_MEMORY_HOST, b.count, 1, 0};
        if (seq_) b.sequence_ids = collapse_buffer{seq_->read_rows(first, count, sb_), seq_->dtype, COLLAPSE_MEMORY_HOST, b.count, 1, 0};
        if (pos_) b.positions = collapse_buffer{pos_->read_rows(first, count, pb_), pos_->dtype, COLLAPSE_MEMORY_HOST, b.count, 1, 0};
        return b;
    }
    const InputInfo& info() const override { return info_; }

private:
    io::Tensor x_, y_;
    std::optional<io::Tensor> valid_, seq_, pos_;
    std::vector<uint8_t> xb_, yb_, mb_, sb_, pb_;  // the current batch
    InputInfo info_;
};

class TensorSequences : public RowSource {
public:
    TensorSequences(io::Tensor h, io::Tensor ids, std::optional<io::Tensor> mask, const std::string& kind)
        : h_(std::move(h)), ids_(std::move(ids)), mask_(std::move(mask)) {
        if (h_.shape.size() != 3)
            fail(COLLAPSE_ERR_SHAPE, "hidden '", h_.name, "' must be [B, T, d], has shape ", shape_text(h_.shape));
        const int64_t B = h_.shape[0], T = h_.shape[1];
        io::require_shape(ids_, {B, T}, "input ids");
        if (mask_) io::require_shape(*mask_, {B, T}, "attention mask");
        require_integer(ids_, "input ids");
        info_.kind = kind;
        info_.parts.push_back(part_of("hidden", h_, kind));
        info_.parts.push_back(part_of("input_ids", ids_, kind));
        if (mask_) info_.parts.push_back(part_of("attention_mask", *mask_, kind));
        finish_info(info_);
    }
    bool sequences() const override { return true; }
    int64_t length() const override { return h_.shape[0]; }
    int64_t seq_len() const override { return h_.shape[1]; }
    int64_t rows_per_position() const override { return std::max<int64_t>(0, seq_len() - 1); }
    int64_t dim() const override { return h_.shape[2]; }
    int64_t label_bound() const override { return scan_label_bound(ids_); }
    SourceBatch batch(int64_t first, int64_t count) override {
        const int64_t T = seq_len();
        SourceBatch b;
        b.first = first;
        b.count = count;
        b.x = collapse_buffer{h_.read_rows(first, count, hb_), h_.dtype, COLLAPSE_MEMORY_HOST, b.count * T, dim(), 0};
        b.y = collapse_buffer{ids_.read_rows(first, count, ib_), ids_.dtype, COLLAPSE_MEMORY_HOST, b.count, T, 0};
        if (mask_) b.mask = collapse_buffer{mask_->read_rows(first, count, mb_), mask_->dtype, COLLAPSE_MEMORY_HOST, b.count, T, 0};
        return b;
    }
    const InputInfo& info() const override { return info_; }

private:
    io::Tensor h_, ids_;
    std::optional<io::Tensor> mask_;
    std::vector<uint8_t> hb_, ib_, mb_;  // the current batch
    InputInfo info_;
};

class SyntheticRows : public RowSource {
public:
    explicit SyntheticRows(const SynthSpec& spec) : gen_(spec) {
        info_.kind = "synthetic";
        const nlohmann::json j = {{"rows", spec.rows},         {"dim", spec.dim},     {"classes", spec.classes},
                                  {"zipf_s", spec.zipf_s},     {"collapse", spec.collapse}, {"noise", spec.noise},
                                  {"mean_norm", spec.mean_norm}, {"classifier_noise", spec.classifier_noise},
                                  {"seed", spec.seed},         {"dtype", dtype_name(spec.dtype)}};
        info_.synthetic_spec = j.dump();
        finish_info(info_);
    }
    bool sequences() const override { return false; }
    int64_t length() const override { return gen_.spec().rows; }
    int64_t rows_per_position() const override { return 1; }
    int64_t dim() const override { return gen_.spec().dim; }
    int64_t label_bound() const override { return gen_.spec().classes; }
    SourceBatch batch(int64_t first, int64_t count) override {
        const SynthSpec& sp = gen_.spec();
        SourceBatch b;
        b.first = first;
        b.count = count;
        labels_.resize((size_t)b.count);
        features_.resize((size_t)(b.count * sp.dim) * dtype_size(sp.dtype));
        gen_.labels(first, b.count, labels_.data());
        gen_.features(first, b.count, labels_.data(), features_.data());
        b.x = collapse_buffer{features_.data(), sp.dtype, COLLAPSE_MEMORY_HOST, b.count, sp.dim, 0};
        b.y = collapse_buffer{labels_.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, b.count, 1, 0};
        return b;
    }
    const InputInfo& info() const override { return info_; }
    std::vector<float> built_in_classifier() const override {
        std::vector<float> w((size_t)(gen_.spec().classes * gen_.spec().dim));
        gen_.classifier(w.data());
        return w;
    }

private:
    SynthGenerator gen_;
    std::vector<int32_t> labels_;
    std::vector<uint8_t> features_;
    InputInfo info_;
};

}  // namespace

std::string tensor_fingerprint(const io::Tensor& t) {
    const size_t bytes = (size_t)t.numel() * dtype_size(t.dtype);
    const std::string head = std::string(dtype_name(t.dtype)) + shape_text(t.shape) + "@" + std::to_string(t.offset) + "/" +
                             std::to_string(t.file->size());
    uint32_t c = crc32c(head.data(), head.size());
    std::vector<uint8_t> buf;
    auto add = [&](size_t at, size_t n) {  // bytes [at, at + n) of the tensor, read with pread
        buf.resize(n);
        t.file->read(t.offset + at, n, buf.data());
        c = crc32c(buf.data(), n, c);
    };
    constexpr size_t kEdge = 64 << 10, kBlock = 4 << 10, kBlocks = 16;
    if (bytes <= 2 * kEdge + kBlocks * kBlock) {
        add(0, bytes);
    } else {
        add(0, kEdge);
        const size_t span = bytes - 2 * kEdge - kBlock;
        for (size_t i = 0; i < kBlocks; ++i) add(kEdge + span * i / (kBlocks - 1), kBlock);
        add(bytes - kEdge, kEdge);
    }
    return hex(c, 8);
}

nlohmann::json to_json(const InputInfo& info) {
    nlohmann::json j;
    j["kind"] = info.kind;
    j["fingerprint"] = info.fingerprint;
    if (!info.synthetic_spec.empty()) j["synthetic"] = nlohmann::json::parse(info.synthetic_spec);
    nlohmann::json parts = nlohmann::json::array();
    for (const auto& p : info.parts) {
        nlohmann::json e = {{"role", p.role},   {"path", p.path},           {"dtype", p.dtype},
                            {"shape", p.shape}, {"file_bytes", p.file_bytes}, {"fingerprint", p.fingerprint}};
        if (!p.tensor.empty()) e["tensor"] = p.tensor;
        parts.push_back(e);
    }
    j["tensors"] = parts;
    return j;
}

std::unique_ptr<RowSource> tensor_rows(io::Tensor features, io::Tensor labels, std::optional<io::Tensor> valid,
                                       const std::string& kind, std::optional<io::Tensor> sequence_ids,
                                       std::optional<io::Tensor> positions) {
    return std::make_unique<TensorRows>(std::move(features), std::move(labels), std::move(valid), kind, std::move(sequence_ids),
                                        std::move(positions));
}

std::unique_ptr<RowSource> tensor_sequences(io::Tensor hidden, io::Tensor input_ids, std::optional<io::Tensor> mask,
                                            const std::string& kind) {
    return std::make_unique<TensorSequences>(std::move(hidden), std::move(input_ids), std::move(mask), kind);
}

std::unique_ptr<RowSource> synthetic_rows(const SynthSpec& spec) { return std::make_unique<SyntheticRows>(spec); }

}  // namespace collapse::internal::driver
