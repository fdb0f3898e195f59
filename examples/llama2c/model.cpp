// Reading llama2.c checkpoints (format: ../shared/models/stories260k/README.md).
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "engine.hpp"

namespace llama2c {

namespace {

[[noreturn]] void bad(const std::string& path, const std::string& what) { throw std::runtime_error(path + ": " + what); }

}  // namespace

Model load_model(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) bad(path, "cannot open model (" + std::string(std::strerror(errno)) + ")");
    in.seekg(0, std::ios::end);
    const int64_t size = (int64_t)in.tellg();
    in.seekg(0);
    int32_t h[7];
    if (size < (int64_t)sizeof h || !in.read((char*)h, sizeof h))
        bad(path, "too short for a llama2.c header (" + std::to_string(size) + " bytes, need 28)");
    Model m;
    Config& c = m.config;
    c.dim = h[0];
    c.hidden_dim = h[1];
    c.n_layers = h[2];
    c.n_heads = h[3];
    c.n_kv_heads = h[4];
    c.shared_classifier = h[5] > 0;  // llama2.c: a negative vocab_size means a separate classifier
    c.vocab_size = (int)std::min<int64_t>(std::llabs((int64_t)h[5]), INT32_MAX);
    c.seq_len = h[6];
    const std::string header = "dim " + std::to_string(c.dim) + ", hidden_dim " + std::to_string(c.hidden_dim) + ", n_layers " +
                               std::to_string(c.n_layers) + ", n_heads " + std::to_string(c.n_heads) + ", n_kv_heads " +
                               std::to_string(c.n_kv_heads) + ", vocab_size " + std::to_string(h[5]) + ", seq_len " +
                               std::to_string(c.seq_len);
    // Bounds keep every product below in int64 and reject garbage headers before allocating.
    const auto in_range = [](int v, int hi) { return v >= 1 && v <= hi; };
    if (!in_range(c.dim, 1 << 16) || !in_range(c.hidden_dim, 1 << 18) || !in_range(c.n_layers, 1024) ||
        !in_range(c.n_heads, 1024) || !in_range(c.n_kv_heads, 1024) || !in_range(c.vocab_size, 1 << 22) ||
        !in_range(c.seq_len, 1 << 20))
        bad(path, "not a llama2.c checkpoint: header (" + header + ") out of range");
    if (c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || c.head_size() % 2 != 0)
        bad(path, "inconsistent header (" + header + "): dim must be a multiple of n_heads, n_heads of n_kv_heads, and the head size even");

    const int64_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size, KV = c.kv_dim(), hs = c.head_size();
    const int64_t floats = V * D + L * D + L * D * D + 2 * L * KV * D + L * D * D + L * D + 3 * L * H * D + D +
                           c.seq_len * hs + (c.shared_classifier ? 0 : V * D);
    const int64_t expect = 28 + 4 * floats;
    if (size != expect)
        bad(path, "has " + std::to_string(size) + " bytes, the header (" + header + ") needs exactly " + std::to_string(expect) +
                      (size < expect ? " (truncated?)" : ""));

    Weights& w = m.weights;
    const auto take = [&](std::vector<float>& v, int64_t n) {
        v.resize((size_t)n);
        if (!in.read((char*)v.data(), n * 4)) bad(path, "read failed");
    };
    take(w.token_embedding, V * D);
    take(w.rms_att, L * D);
    take(w.wq, L * D * D);
    take(w.wk, L * KV * D);
    take(w.wv, L * KV * D);
    take(w.wo, L * D * D);
    take(w.rms_ffn, L * D);
    take(w.w1, L * H * D);
    take(w.w2, L * D * H);
    take(w.w3, L * H * D);
    take(w.rms_final, D);
    in.seekg(c.seq_len * hs * 4, std::ios::cur);  // llama2.c's unused RoPE tables
    if (c.shared_classifier) w.wcls = w.token_embedding;
    else take(w.wcls, V * D);
    return m;
}

}  // namespace llama2c
