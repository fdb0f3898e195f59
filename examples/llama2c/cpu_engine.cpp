// The CPU backend of collapse_llama2c: llama2.c's forward pass, batched over sequence slots. The
// projections of all rows of a step are one GEMM each (OpenBLAS); attention, norms and RoPE are
// plain loops, parallel over rows (and heads) with OpenMP.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "engine.hpp"

namespace llama2c {

namespace {

// out = weight * x / rms(x), llama2.c's RMSNorm (eps 1e-5, float arithmetic).
void rmsnorm(float* out, const float* x, const float* weight, int size) {
    float ss = 0.0f;
    for (int j = 0; j < size; ++j) ss += x[j] * x[j];
    ss = 1.0f / std::sqrt(ss / (float)size + 1e-5f);
    for (int j = 0; j < size; ++j) out[j] = weight[j] * (ss * x[j]);
}

// C[n, m] = A[n, k] * W[m, k]^T (W row-major [out, in], as llama2.c stores it).
void matmul(float* c, const float* a, const float* w, int n, int m, int k) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, m, k, 1.0f, a, k, w, k, 0.0f, c, m);
}

class CpuEngine final : public Engine {
public:
    CpuEngine(const Model& model, int max_batch) : m_(model), cfg_(model.config), B_(max_batch) {
        if (max_batch < 1) throw std::runtime_error("cpu engine: max_batch must be >= 1");
        const Config& c = cfg_;
        const int64_t D = c.dim, H = c.hidden_dim, KV = c.kv_dim(), L = c.n_layers, hs = c.head_size();
        // Fused projections: [q; k; v] and [w1; w3] per layer, one GEMM each.
        wqkv_.resize((size_t)(L * (D + 2 * KV) * D));
        w13_.resize((size_t)(L * 2 * H * D));
        const Weights& w = m_.weights;
        for (int64_t l = 0; l < L; ++l) {
            float* q = wqkv_.data() + l * (D + 2 * KV) * D;
            std::copy_n(w.wq.data() + l * D * D, D * D, q);
            std::copy_n(w.wk.data() + l * KV * D, KV * D, q + D * D);
            std::copy_n(w.wv.data() + l * KV * D, KV * D, q + (D + KV) * D);
            float* f = w13_.data() + l * 2 * H * D;
            std::copy_n(w.w1.data() + l * H * D, H * D, f);
            std::copy_n(w.w3.data() + l * H * D, H * D, f + H * D);
        }
        // RoPE angles exactly as llama2.c computes them (float powf / cosf / sinf per position).
        rope_cos_.resize((size_t)(c.seq_len * hs / 2));
        rope_sin_.resize(rope_cos_.size());
        for (int p = 0; p < c.seq_len; ++p)
            for (int i = 0; i < hs; i += 2) {
                const float freq = 1.0f / std::pow(10000.0f, (float)i / (float)hs);
                const float val = (float)p * freq;
                rope_cos_[(size_t)(p * hs / 2 + i / 2)] = std::cos(val);
                rope_sin_[(size_t)(p * hs / 2 + i / 2)] = std::sin(val);
            }
        // Per layer and slot: keys [KV][seq_len] (transposed), values [seq_len][KV].
        const size_t cache = (size_t)(L * B_ * c.seq_len * KV);
        key_cache_.assign(cache, 0.0f);
        value_cache_.assign(cache, 0.0f);
        x_.resize((size_t)(B_ * D));
        xb_.resize((size_t)(B_ * D));
        qkv_.resize((size_t)(B_ * (D + 2 * KV)));
        att_out_.resize((size_t)(B_ * D));
        hb_.resize((size_t)(B_ * 2 * H));
        hb2_.resize((size_t)(B_ * H));
        hidden_.resize((size_t)(B_ * D));
        logits_.resize((size_t)(B_ * c.vocab_size));
        scores_.resize((size_t)(B_ * c.n_heads * c.seq_len));
        sampled_.resize((size_t)B_);
        cached_.assign((size_t)B_, 0);
    }

    const char* name() const override { return "cpu"; }
    // A slot's cache is only read below the positions it has written, so forgetting is bookkeeping.
    void reset() override { std::fill(cached_.begin(), cached_.end(), 0); }

    void step(const int32_t* slot, const int32_t* token, const int32_t* pos, int n) override {
        const Config& c = cfg_;
        const int D = c.dim, H = c.hidden_dim, KV = c.kv_dim(), hs = c.head_size(), QKV = D + 2 * KV;
        const int kv_mul = c.n_heads / c.n_kv_heads, S = c.seq_len;
        if (n < 0 || n > B_) throw std::runtime_error("cpu engine: step of " + std::to_string(n) + " rows, max_batch " + std::to_string(B_));
        // Everything is checked before anything changes: a refused step leaves the engine as it was.
        std::vector<char> seen((size_t)B_, 0);
        for (int i = 0; i < n; ++i) {
            const std::string row = "cpu engine: row " + std::to_string(i) + " (slot " + std::to_string(slot[i]) + ", token " +
                                    std::to_string(token[i]) + ", position " + std::to_string(pos[i]) + "): ";
            if (slot[i] < 0 || slot[i] >= B_) throw std::runtime_error(row + "slot out of range [0, " + std::to_string(B_) + ")");
            if (seen[(size_t)slot[i]]++) throw std::runtime_error(row + "slot given twice in one step");
            if (token[i] < 0 || token[i] >= c.vocab_size) throw std::runtime_error(row + "token out of range");
            if (pos[i] < 0 || pos[i] >= S) throw std::runtime_error(row + "position out of range [0, " + std::to_string(S) + ")");
            if (pos[i] > cached_[(size_t)slot[i]])
                throw std::runtime_error(row + "the slot's cache holds only positions below " + std::to_string(cached_[(size_t)slot[i]]));
        }
        for (int i = 0; i < n; ++i) cached_[(size_t)slot[i]] = pos[i] + 1;
        n_ = n;
        const Weights& w = m_.weights;
        for (int i = 0; i < n; ++i) std::memcpy(&x_[(size_t)i * D], &w.token_embedding[(size_t)token[i] * D], sizeof(float) * D);
        // Threads only for long attention work (about a millisecond per layer): a parallel region
        // per layer costs a barrier, which a busy machine turns into a wait on a preempted thread.
        int64_t att_work = 0;
        for (int i = 0; i < n; ++i) att_work += (int64_t)(pos[i] + 1) * D;
        const bool par = att_work >= (int64_t(1) << 20) && !omp_in_parallel();
        for (int l = 0; l < c.n_layers; ++l) {
            for (int i = 0; i < n; ++i) rmsnorm(&xb_[(size_t)i * D], &x_[(size_t)i * D], &w.rms_att[(size_t)l * D], D);
            matmul(qkv_.data(), xb_.data(), &wqkv_[(size_t)l * QKV * D], n, QKV, D);
            float* kc = &key_cache_[(size_t)l * B_ * S * KV];
            float* vc = &value_cache_[(size_t)l * B_ * S * KV];
            // RoPE on q and k, then k and v into the slot's cache at its position.
            for (int i = 0; i < n; ++i) {
                float* q = &qkv_[(size_t)i * QKV];
                float* k = q + D;
                const float* cs = &rope_cos_[(size_t)pos[i] * hs / 2];
                const float* sn = &rope_sin_[(size_t)pos[i] * hs / 2];
                for (int j = 0; j < D; j += 2) {
                    const int f = (j % hs) / 2;
                    const float q0 = q[j], q1 = q[j + 1];
                    q[j] = q0 * cs[f] - q1 * sn[f];
                    q[j + 1] = q0 * sn[f] + q1 * cs[f];
                    if (j < KV) {
                        const float k0 = k[j], k1 = k[j + 1];
                        k[j] = k0 * cs[f] - k1 * sn[f];
                        k[j + 1] = k0 * sn[f] + k1 * cs[f];
                    }
                }
                // Keys transposed ([hs][S] per kv head) so that the scores are a loop over positions.
                float* kt = kc + (size_t)slot[i] * S * KV;
                for (int j = 0; j < KV; ++j) kt[(size_t)j * S + (size_t)pos[i]] = k[j];
                std::memcpy(vc + ((size_t)slot[i] * S + (size_t)pos[i]) * KV, k + KV, sizeof(float) * KV);
            }
            // Attention of each (row, head) over its slot's positions 0..pos.
            const float scale = 1.0f / std::sqrt((float)hs);
#pragma omp parallel for schedule(dynamic, 4) if (par)
            for (int ih = 0; ih < n * c.n_heads; ++ih) {
                const int i = ih / c.n_heads, h = ih % c.n_heads;
                const float* q = &qkv_[(size_t)i * QKV + (size_t)h * hs];
                float* att = &scores_[(size_t)ih * S];
                const int T = pos[i] + 1;
                const float* kt = kc + ((size_t)slot[i] * KV + (size_t)(h / kv_mul) * hs) * S;
                std::fill_n(att, T, 0.0f);
                for (int j = 0; j < hs; ++j) {
                    const float qj = q[j] * scale;
                    const float* row = kt + (size_t)j * S;
                    for (int t = 0; t < T; ++t) att[t] += qj * row[t];
                }
                float mx = -INFINITY;
                for (int t = 0; t < T; ++t) mx = std::max(mx, att[t]);
                const size_t base = (size_t)slot[i] * S * KV + (size_t)(h / kv_mul) * hs;
                float sum = 0.0f;
                for (int t = 0; t < T; ++t) {
                    att[t] = std::exp(att[t] - mx);
                    sum += att[t];
                }
                float* out = &att_out_[(size_t)i * D + (size_t)h * hs];
                std::fill_n(out, hs, 0.0f);
                for (int t = 0; t < T; ++t) {
                    const float* v = vc + base + (size_t)t * KV;
                    const float a = att[t] / sum;
                    for (int j = 0; j < hs; ++j) out[j] += a * v[j];
                }
            }
            // x += Wo att; x += W2 (silu(W1 xn) * W3 xn)
            matmul(xb_.data(), att_out_.data(), &w.wo[(size_t)l * D * D], n, D, D);
            for (size_t e = 0; e < (size_t)n * D; ++e) x_[e] += xb_[e];
            for (int i = 0; i < n; ++i) rmsnorm(&xb_[(size_t)i * D], &x_[(size_t)i * D], &w.rms_ffn[(size_t)l * D], D);
            matmul(hb_.data(), xb_.data(), &w13_[(size_t)l * 2 * H * D], n, 2 * H, D);
            for (int i = 0; i < n; ++i) {
                const float* g = &hb_[(size_t)i * 2 * H];
                float* o = &hb2_[(size_t)i * H];
                for (int j = 0; j < H; ++j) o[j] = g[j] * (1.0f / (1.0f + std::exp(-g[j]))) * g[H + j];
            }
            matmul(xb_.data(), hb2_.data(), &w.w2[(size_t)l * D * H], n, D, H);
            for (size_t e = 0; e < (size_t)n * D; ++e) x_[e] += xb_[e];
        }
        for (int i = 0; i < n; ++i) rmsnorm(&hidden_[(size_t)i * D], &x_[(size_t)i * D], w.rms_final.data(), D);
        matmul(logits_.data(), hidden_.data(), w.wcls.data(), n, c.vocab_size, D);
    }

    const float* hidden() const override { return hidden_.data(); }
    const float* logits() const override { return logits_.data(); }
    collapse_memory memory() const override { return COLLAPSE_MEMORY_HOST; }
    void* stream() const override { return nullptr; }

    void sample(float temperature, const float* coin, int32_t* next, int n) override {
        if (n < 0 || n > n_) throw std::runtime_error("cpu engine: sample of " + std::to_string(n) + " rows after a step of " + std::to_string(n_));
        if (temperature > 0.0f)
            for (int i = 0; i < n; ++i)
                if (!(coin[i] >= 0.0f && coin[i] < 1.0f)) throw std::runtime_error("cpu engine: coin " + std::to_string(i) + " is not in [0, 1)");
        const int V = cfg_.vocab_size;
        std::vector<float> p(temperature > 0.0f ? (size_t)V : 0);
        for (int i = 0; i < n; ++i) {
            const float* lg = &logits_[(size_t)i * V];
            int best = 0;
            if (temperature <= 0.0f) {
                for (int v = 1; v < V; ++v)
                    if (lg[v] > lg[best]) best = v;
            } else {
                // llama2.c: softmax(logits / t), then the first id whose CDF exceeds the coin.
                float mx = -INFINITY, sum = 0.0f;
                for (int v = 0; v < V; ++v) mx = std::max(mx, lg[v] / temperature);
                for (int v = 0; v < V; ++v) sum += (p[(size_t)v] = std::exp(lg[v] / temperature - mx));
                float cdf = 0.0f;
                best = V - 1;
                for (int v = 0; v < V; ++v) {
                    cdf += p[(size_t)v] / sum;
                    if (coin[i] < cdf) {
                        best = v;
                        break;
                    }
                }
            }
            next[i] = sampled_[(size_t)i] = best;
        }
    }
    const int32_t* sampled() const override { return sampled_.data(); }

    void download(float* hidden, float* logits, int n) const override {
        if (hidden) std::memcpy(hidden, hidden_.data(), sizeof(float) * (size_t)n * cfg_.dim);
        if (logits) std::memcpy(logits, logits_.data(), sizeof(float) * (size_t)n * cfg_.vocab_size);
    }

private:
    const Model& m_;
    Config cfg_;
    int B_;
    int n_ = 0;
    std::vector<float> wqkv_, w13_, rope_cos_, rope_sin_, key_cache_, value_cache_;
    std::vector<float> x_, xb_, qkv_, att_out_, hb_, hb2_, hidden_, logits_, scores_;
    std::vector<int32_t> sampled_;
    std::vector<int32_t> cached_;  // per slot: positions 0..cached_-1 are in its cache
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(const Model& model, int max_batch) {
    return std::make_unique<CpuEngine>(model, max_batch);
}

}  // namespace llama2c
