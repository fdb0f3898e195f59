// collapse_llama2c: a small llama2.c inference program, the engine's first real client. It talks to
// the engine only through include/collapse/collapse.h, as an outside inference server would.
//
// The model (formats: ../shared/models/stories260k/README.md): token embedding, n_layers of
// {RMSNorm, GQA attention with RoPE over a KV cache, RMSNorm, SwiGLU feed-forward}, final RMSNorm,
// classifier shared with the embedding. `Engine` is one backend's batched forward pass.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "collapse/collapse.h"

namespace llama2c {

struct Config {
    int dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
    bool shared_classifier = true;  // vocab_size > 0 in the file header
    int head_size() const { return dim / n_heads; }
    int kv_dim() const { return dim / n_heads * n_kv_heads; }
};

// fp32 weights in llama2.c order; matrices are row-major [out, in] (y = W x).
struct Weights {
    std::vector<float> token_embedding;  // [V, dim]
    std::vector<float> rms_att;          // [L, dim]
    std::vector<float> wq;               // [L, dim, dim]
    std::vector<float> wk;               // [L, kv_dim, dim]
    std::vector<float> wv;               // [L, kv_dim, dim]
    std::vector<float> wo;               // [L, dim, dim]
    std::vector<float> rms_ffn;          // [L, dim]
    std::vector<float> w1;               // [L, hidden, dim]
    std::vector<float> w2;               // [L, dim, hidden]
    std::vector<float> w3;               // [L, hidden, dim]
    std::vector<float> rms_final;        // [dim]
    std::vector<float> wcls;             // [V, dim] (a copy of token_embedding when shared)
};

struct Model {
    Config config;
    Weights weights;
};
// Reads a llama2.c checkpoint; every size is checked against the file's length (errors name the file).
Model load_model(const std::string& path);

// One backend's batched forward pass with a KV cache of `max_batch` sequences x seq_len positions.
// Sequence slot b has its own cache; step() advances the given slots by one token each.
class Engine {
public:
    virtual ~Engine() = default;
    virtual const char* name() const = 0;
    // Forgets every cached position (new sequences).
    virtual void reset() = 0;
    // One step: slot[i] (distinct, < max_batch) consumes token[i] at position pos[i] (its cache holds
    // positions 0..pos[i]-1 already). n <= max_batch. Host arrays. Asynchronous on CUDA (the
    // program's stream); results are valid on that stream after the call.
    virtual void step(const int32_t* slot, const int32_t* token, const int32_t* pos, int n) = 0;
    // Results of the last step, row i for the i-th entry of that step: final-norm hidden states
    // [n, dim] and logits [n, V], float32, contiguous, in memory() (host or device).
    virtual const float* hidden() const = 0;
    virtual const float* logits() const = 0;
    virtual collapse_memory memory() const = 0;
    // The CUDA stream the work runs on (cudaStream_t as void*; nullptr on the CPU).
    virtual void* stream() const = 0;
    // Next tokens from the last step's logits: argmax when temperature == 0, else a sample of
    // softmax(logits / temperature) with coin[i] in [0, 1) (the caller's RNG, so both backends draw
    // the same numbers). Writes n host ints; waits for the step on CUDA.
    virtual void sample(float temperature, const float* coin, int32_t* next, int n) = 0;
    // The n tokens of the last sample(), int32, in memory() (on CUDA a device copy, valid on the
    // stream): the labels handed to the session with hidden(), which must share its memory kind.
    virtual const int32_t* sampled() const = 0;
    // Copies the last step's hidden states and logits to host arrays (either may be null); waits.
    virtual void download(float* hidden, float* logits, int n) const = 0;
};

std::unique_ptr<Engine> make_cpu_engine(const Model& model, int max_batch);
// Built only with CUDA (COLLAPSE_LLAMA2C_CUDA); throws std::runtime_error without a usable device.
std::unique_ptr<Engine> make_cuda_engine(const Model& model, int max_batch);
bool cuda_engine_built();

}  // namespace llama2c
