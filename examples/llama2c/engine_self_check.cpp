// engine_self_check.hpp: an Engine against a float64 reference of llama2.c's forward pass and sampler.
#include "engine_self_check.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#ifdef COLLAPSE_LLAMA2C_CUDA
#include <cuda_runtime.h>
#endif

namespace llama2c {

namespace {

// ------------------------------------------------------------------------------------ the reference

// llama2.c's forward pass for one (slot, token, pos) at a time, in double; the RoPE angles are the
// float values llama2.c computes (the model's definition), their cos/sin in double.
class Reference {
public:
    Reference(const Model& m, int slots) : m_(m), slots_(slots) {
        const Config& c = m.config;
        const size_t cache = (size_t)c.n_layers * slots * c.seq_len * c.kv_dim();
        kc_.assign(cache, 0.0);
        vc_.assign(cache, 0.0);
    }

    void step(int slot, int token, int pos, double* hidden, double* logits) {
        const Config& c = m_.config;
        const Weights& w = m_.weights;
        const int D = c.dim, H = c.hidden_dim, KV = c.kv_dim(), hs = c.head_size(), S = c.seq_len, kv_mul = c.n_heads / c.n_kv_heads;
        std::vector<double> x(D), xb(D), q(D), k(KV), v(KV), att_out(D), h1(H), h3(H), att(pos + 1);
        for (int j = 0; j < D; ++j) x[j] = w.token_embedding[(size_t)token * D + j];
        for (int l = 0; l < c.n_layers; ++l) {
            rmsnorm(xb.data(), x.data(), &w.rms_att[(size_t)l * D], D);
            matvec(q.data(), &w.wq[(size_t)l * D * D], xb.data(), D, D);
            matvec(k.data(), &w.wk[(size_t)l * KV * D], xb.data(), KV, D);
            matvec(v.data(), &w.wv[(size_t)l * KV * D], xb.data(), KV, D);
            for (int i = 0; i < D; i += 2) {
                const float freq = 1.0f / std::pow(10000.0f, (float)(i % hs) / (float)hs);
                const float val = (float)pos * freq;
                const double cr = std::cos((double)val), ci = std::sin((double)val);
                rotate(&q[i], cr, ci);
                if (i < KV) rotate(&k[i], cr, ci);
            }
            double* kc = &kc_[(((size_t)l * slots_ + slot) * S) * KV];
            double* vc = &vc_[(((size_t)l * slots_ + slot) * S) * KV];
            std::copy(k.begin(), k.end(), kc + (size_t)pos * KV);
            std::copy(v.begin(), v.end(), vc + (size_t)pos * KV);
            for (int h = 0; h < c.n_heads; ++h) {
                const size_t off = (size_t)(h / kv_mul) * hs;
                double mx = -INFINITY;
                for (int t = 0; t <= pos; ++t) {
                    double s = 0.0;
                    for (int i = 0; i < hs; ++i) s += q[(size_t)h * hs + i] * kc[(size_t)t * KV + off + i];
                    att[t] = s / std::sqrt((double)hs);
                    mx = std::max(mx, att[t]);
                }
                double sum = 0.0;
                for (int t = 0; t <= pos; ++t) sum += (att[t] = std::exp(att[t] - mx));
                for (int i = 0; i < hs; ++i) {
                    double o = 0.0;
                    for (int t = 0; t <= pos; ++t) o += att[t] / sum * vc[(size_t)t * KV + off + i];
                    att_out[(size_t)h * hs + i] = o;
                }
            }
            add_matvec(x.data(), &w.wo[(size_t)l * D * D], att_out.data(), D, D);
            rmsnorm(xb.data(), x.data(), &w.rms_ffn[(size_t)l * D], D);
            matvec(h1.data(), &w.w1[(size_t)l * H * D], xb.data(), H, D);
            matvec(h3.data(), &w.w3[(size_t)l * H * D], xb.data(), H, D);
            for (int j = 0; j < H; ++j) h1[j] = h1[j] / (1.0 + std::exp(-h1[j])) * h3[j];
            add_matvec(x.data(), &w.w2[(size_t)l * D * H], h1.data(), D, H);
        }
        rmsnorm(hidden, x.data(), w.rms_final.data(), D);
        const std::vector<float>& cls = w.wcls.empty() ? w.token_embedding : w.wcls;
        matvec(logits, cls.data(), hidden, c.vocab_size, D);
    }

private:
    static void rmsnorm(double* out, const double* x, const float* weight, int n) {
        double ss = 0.0;
        for (int j = 0; j < n; ++j) ss += x[j] * x[j];
        const double scale = 1.0 / std::sqrt(ss / n + 1e-5);
        for (int j = 0; j < n; ++j) out[j] = weight[j] * scale * x[j];
    }
    static void matvec(double* y, const float* W, const double* x, int out, int in) {
        for (int o = 0; o < out; ++o) {
            double s = 0.0;
            for (int i = 0; i < in; ++i) s += (double)W[(size_t)o * in + i] * x[i];
            y[o] = s;
        }
    }
    static void add_matvec(double* y, const float* W, const double* x, int out, int in) {
        for (int o = 0; o < out; ++o) {
            double s = 0.0;
            for (int i = 0; i < in; ++i) s += (double)W[(size_t)o * in + i] * x[i];
            y[o] += s;
        }
    }
    static void rotate(double* p, double cr, double ci) {
        const double a = p[0], b = p[1];
        p[0] = a * cr - b * ci;
        p[1] = a * ci + b * cr;
    }

    const Model& m_;
    int slots_;
    std::vector<double> kc_, vc_;
};

// llama2.c's sampler on float logits, with the CDF in double: the expected token, or -1 when the
// coin lies within `margin` of a CDF step (float rounding may then legitimately pick a neighbour).
int reference_sample(const float* logits, int V, float temperature, float coin, double margin) {
    if (temperature == 0.0f) {
        int best = 0;
        for (int v = 1; v < V; ++v)
            if (logits[v] > logits[best]) best = v;
        return best;
    }
    double mx = -INFINITY, sum = 0.0;
    std::vector<double> p((size_t)V);
    for (int v = 0; v < V; ++v) mx = std::max(mx, (double)(logits[v] / temperature));
    for (int v = 0; v < V; ++v) sum += (p[(size_t)v] = std::exp((double)(logits[v] / temperature) - mx));
    double cdf = 0.0;
    int pick = V - 1;
    bool near = false;
    for (int v = 0; v < V; ++v) {
        cdf += p[(size_t)v] / sum;
        if (std::fabs(cdf - coin) < margin) near = true;
        if (coin < cdf) {
            pick = v;
            break;
        }
    }
    if (pick == V - 1 && std::fabs(1.0 - coin) < margin) near = true;
    return near ? -1 : pick;
}

// ------------------------------------------------------------------------------------ bookkeeping

struct Diff {
    double max_abs = 0.0, max_scaled = 0.0;  // scaled: |got - ref| / (1 + |ref|)
    bool finite = true;
    void add(float got, double ref) {
        if (!std::isfinite(got)) finite = false;
        const double d = std::fabs((double)got - ref);
        max_abs = std::max(max_abs, d);
        max_scaled = std::max(max_scaled, d / (1.0 + std::fabs(ref)));
    }
    void add(float got, float other) { add(got, (double)other); }
    bool ok(double tol) const { return finite && max_scaled <= tol; }
};

class Log {
public:
    explicit Log(std::FILE* f) : f_(f) {}
    void result(bool pass, const std::string& name, const std::string& detail) {
        std::fprintf(f_, "%s %s: %s\n", pass ? "PASS" : "FAIL", name.c_str(), detail.c_str());
        std::fflush(f_);
        if (!pass) ++failed_;
        ++run_;
    }
    void skip(const std::string& name, const std::string& why) {
        std::fprintf(f_, "SKIP %s: %s\n", name.c_str(), why.c_str());
        std::fflush(f_);
    }
    int failed() const { return failed_; }
    int run() const { return run_; }

private:
    std::FILE* f_;
    int failed_ = 0, run_ = 0;
};

std::string fmt(const char* f, double a, double b = 0.0, double c = 0.0) {
    char buf[256];
    std::snprintf(buf, sizeof buf, f, a, b, c);
    return buf;
}

std::unique_ptr<Engine> make(const std::string& backend, const Model& m, int max_batch) {
    if (backend == "cpu") return make_cpu_engine(m, max_batch);
    if (backend == "cuda") return make_cuda_engine(m, max_batch);
    throw std::runtime_error("selfcheck: backend '" + backend + "': expected cpu or cuda");
}

// A device (or host) array of the engine's memory kind, copied to the host.
template <class T>
std::vector<T> fetch(const Engine& e, const T* p, size_t count) {
    std::vector<T> out(count);
    if (count == 0) return out;
    if (e.memory() == COLLAPSE_MEMORY_HOST) {
        std::memcpy(out.data(), p, count * sizeof(T));
        return out;
    }
#ifdef COLLAPSE_LLAMA2C_CUDA
    cudaStream_t s = (cudaStream_t)e.stream();
    cudaError_t err = cudaMemcpyAsync(out.data(), p, count * sizeof(T), cudaMemcpyDeviceToHost, s);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s);
    if (err != cudaSuccess) throw std::runtime_error(std::string("selfcheck: device copy failed: ") + cudaGetErrorString(err));
    return out;
#else
    throw std::runtime_error("selfcheck: device memory in a build without CUDA");
#endif
}

// ------------------------------------------------------------------------------------ random models

struct Shape {
    const char* name;
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
    bool shared;
};

Model random_model(const Shape& s, uint64_t seed) {
    Model m;
    Config& c = m.config;
    c.dim = s.dim, c.hidden_dim = s.hidden, c.n_layers = s.layers, c.n_heads = s.heads, c.n_kv_heads = s.kv_heads;
    c.vocab_size = s.vocab, c.seq_len = s.seq_len, c.shared_classifier = s.shared;
    std::mt19937_64 rng(seed);
    const auto fill = [&](std::vector<float>& v, size_t n, double lo, double hi) {
        std::uniform_real_distribution<double> u(lo, hi);
        v.resize(n);
        for (float& x : v) x = (float)u(rng);
    };
    const size_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size, KV = c.kv_dim();
    const double a = 1.5 / std::sqrt((double)D), b = 1.5 / std::sqrt((double)H);
    Weights& w = m.weights;
    fill(w.token_embedding, V * D, -1.0, 1.0);
    fill(w.rms_att, L * D, 0.5, 1.5);
    fill(w.wq, L * D * D, -a, a);
    fill(w.wk, L * KV * D, -a, a);
    fill(w.wv, L * KV * D, -a, a);
    fill(w.wo, L * D * D, -a, a);
    fill(w.rms_ffn, L * D, 0.5, 1.5);
    fill(w.w1, L * H * D, -a, a);
    fill(w.w2, L * D * H, -b, b);
    fill(w.w3, L * H * D, -a, a);
    fill(w.rms_final, D, 0.5, 1.5);
    if (s.shared) w.wcls = w.token_embedding;
    else fill(w.wcls, V * D, -1.0, 1.0);
    return m;
}

struct Row {
    int slot, token, pos;
};
using Schedule = std::vector<std::vector<Row>>;

// Steps in which a random subset of slots, in random order, each advance by one position; now and
// then a slot starts a new sequence at position 0 (slot reuse; positions above go stale).
Schedule random_schedule(const Config& c, int slots, int steps, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<int> next(slots, 0), order(slots);
    for (int b = 0; b < slots; ++b) order[b] = b;
    Schedule sched;
    for (int t = 0; t < steps; ++t) {
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<Row> step;
        const int n = 1 + (int)(rng() % slots);
        for (int i = 0; i < n; ++i) {
            const int b = order[i];
            if (next[b] >= c.seq_len || (next[b] > 3 && rng() % 23 == 0)) next[b] = 0;
            step.push_back({b, (int)(rng() % c.vocab_size), next[b]++});
        }
        sched.push_back(std::move(step));
    }
    return sched;
}

// The slots of `slots` all advance together for `steps` steps, slot b starting `b * stagger` steps in.
Schedule staggered_schedule(const Config& c, int slots, int steps, int stagger, uint64_t seed) {
    std::mt19937_64 rng(seed);
    Schedule sched;
    for (int t = 0; t < steps; ++t) {
        std::vector<Row> step;
        for (int b = slots - 1; b >= 0; --b)  // reverse slot order: rows and slots differ
            if (t >= b * stagger && t - b * stagger < c.seq_len) step.push_back({b, (int)(rng() % c.vocab_size), t - b * stagger});
        if (!step.empty()) sched.push_back(std::move(step));
    }
    return sched;
}

struct RunStats {
    Diff hidden, logits;
    int rows = 0, max_pos = 0;
    int argmax_bad = 0, sample_bad = 0, sample_checked = 0, sample_skipped = 0, sampled_copy_bad = 0, hidden_copy_bad = 0;
    std::vector<float> outputs;  // every step's hidden and logits, in order (for reproducibility)
};

// Runs `sched` on the engine and the reference, comparing every row; samples every step at
// temperature 0 and at `temperature` with random coins against the host sampler on the engine's
// own logits; checks sampled() and hidden() against the host results.
RunStats run(Engine& e, Reference& ref, const Config& c, const Schedule& sched, float temperature, uint64_t seed) {
    const int D = c.dim, V = c.vocab_size;
    RunStats st;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<double> rh(D), rl(V);
    for (size_t si = 0; si < sched.size(); ++si) {
        const auto& step = sched[si];
        const int n = (int)step.size();
        std::vector<int32_t> slot(n), tok(n), pos(n), next(n);
        for (int i = 0; i < n; ++i) slot[i] = step[i].slot, tok[i] = step[i].token, pos[i] = step[i].pos;
        e.step(slot.data(), tok.data(), pos.data(), n);
        std::vector<float> h((size_t)n * D), l((size_t)n * V);
        e.download(h.data(), l.data(), n);
        for (int i = 0; i < n; ++i) {
            ref.step(slot[i], tok[i], pos[i], rh.data(), rl.data());
            for (int j = 0; j < D; ++j) st.hidden.add(h[(size_t)i * D + j], rh[j]);
            for (int j = 0; j < V; ++j) st.logits.add(l[(size_t)i * V + j], rl[j]);
            st.max_pos = std::max(st.max_pos, pos[i]);
        }
        st.rows += n;
        st.outputs.insert(st.outputs.end(), h.begin(), h.end());
        st.outputs.insert(st.outputs.end(), l.begin(), l.end());
        if (si == 0 || si + 1 == sched.size()) {
            const std::vector<float> dh = fetch(e, e.hidden(), (size_t)n * D);
            if (std::memcmp(dh.data(), h.data(), dh.size() * sizeof(float)) != 0) ++st.hidden_copy_bad;
        }
        // argmax: exact on the same floats
        e.sample(0.0f, nullptr, next.data(), n);
        for (int i = 0; i < n; ++i)
            if (next[i] != reference_sample(&l[(size_t)i * V], V, 0.0f, 0.0f, 0.0)) ++st.argmax_bad;
        // temperature: coins include 0 and values near 1
        std::vector<float> coin(n);
        for (int i = 0; i < n; ++i) coin[i] = (si % 7 == 0 && i == 0) ? 0.0f : (si % 11 == 1 && i == 0) ? 0.99999994f : u(rng);
        e.sample(temperature, coin.data(), next.data(), n);
        for (int i = 0; i < n; ++i) {
            const int want = reference_sample(&l[(size_t)i * V], V, temperature, coin[i], 1e-4);
            if (want < 0) {
                ++st.sample_skipped;
                continue;
            }
            ++st.sample_checked;
            if (next[i] != want) ++st.sample_bad;
        }
        const std::vector<int32_t> ds = fetch(e, e.sampled(), (size_t)n);
        if (ds != next) ++st.sampled_copy_bad;
    }
    return st;
}

void report_run(Log& log, const std::string& name, const RunStats& st, double tol) {
    log.result(st.hidden.ok(tol) && st.logits.ok(tol), name + " forward vs float64",
               std::to_string(st.rows) + " rows, positions up to " + std::to_string(st.max_pos) +
                   fmt("; hidden max |diff| %.3g (scaled %.3g)", st.hidden.max_abs, st.hidden.max_scaled) +
                   fmt(", logits max |diff| %.3g (scaled %.3g)", st.logits.max_abs, st.logits.max_scaled) + fmt(", tolerance %.3g", tol));
    log.result(st.argmax_bad == 0 && st.sample_bad == 0 && st.sample_checked > 0, name + " sampling",
               std::to_string(st.argmax_bad) + " argmax and " + std::to_string(st.sample_bad) + " of " +
                   std::to_string(st.sample_checked) + " temperature samples differ from the host sampler on the same logits (" +
                   std::to_string(st.sample_skipped) + " coins within 1e-4 of a CDF step not compared)");
    log.result(st.sampled_copy_bad == 0 && st.hidden_copy_bad == 0, name + " sampled()/hidden() buffers",
               std::to_string(st.sampled_copy_bad) + " steps with sampled() != sample()'s output, " + std::to_string(st.hidden_copy_bad) +
                   " with hidden() != download()");
}

// Each refused call must throw and change nothing: the last step's results stay, and the next
// valid step still matches the reference.
void check_refusals(Log& log, const std::string& backend, const Shape& shape) {
    const Model m = random_model(shape, 99);
    const Config& c = m.config;
    const int B = 3;
    std::unique_ptr<Engine> e = make(backend, m, B);
    Reference ref(m, B);
    // slot 0 at positions 0..4, slot 1 at 0..1; slot 2 untouched
    Schedule warm = {{{0, 5, 0}, {1, 6, 0}}, {{0, 7, 1}, {1, 8, 1}}, {{0, 9, 2}}, {{0, 10, 3}}, {{0, 11, 4}}};
    run(*e, ref, c, warm, 1.0f, 1);
    std::vector<float> h0((size_t)c.dim), l0((size_t)c.vocab_size);
    e->download(h0.data(), l0.data(), 1);
    struct Bad {
        const char* what;
        std::vector<Row> rows;
    };
    const std::vector<Bad> bad = {
        {"slot out of range", {{B, 1, 0}}},
        {"negative slot", {{-1, 1, 0}}},
        {"duplicate slot", {{1, 1, 2}, {1, 2, 2}}},
        {"token out of range", {{1, 1, 2}, {0, c.vocab_size, 5}}},
        {"negative token", {{0, -1, 5}}},
        {"position out of range", {{0, 1, c.seq_len}}},
        {"negative position", {{0, 1, -1}}},
        {"position beyond the slot's cache", {{2, 1, 1}}},
        {"more rows than max_batch", {{0, 1, 5}, {1, 1, 2}, {2, 1, 0}, {0, 1, 5}}},
    };
    std::string not_refused;
    for (const Bad& b : bad) {
        const int n = (int)b.rows.size();
        std::vector<int32_t> slot(n), tok(n), pos(n);
        for (int i = 0; i < n; ++i) slot[i] = b.rows[i].slot, tok[i] = b.rows[i].token, pos[i] = b.rows[i].pos;
        bool threw = false;
        try {
            e->step(slot.data(), tok.data(), pos.data(), n);
        } catch (const std::runtime_error&) {
            threw = true;
        }
        if (!threw) not_refused += std::string(not_refused.empty() ? "" : ", ") + b.what;
    }
    int32_t next = 0;
    const float coin_bad = 1.0f;
    bool threw = false;
    try {
        e->sample(0.0f, nullptr, &next, 2);  // the last step had 1 row
    } catch (const std::runtime_error&) {
        threw = true;
    }
    if (!threw) not_refused += std::string(not_refused.empty() ? "" : ", ") + "sample of more rows than the step";
    threw = false;
    try {
        e->sample(1.0f, &coin_bad, &next, 1);
    } catch (const std::runtime_error&) {
        threw = true;
    }
    if (!threw) not_refused += std::string(not_refused.empty() ? "" : ", ") + "coin 1.0";
    std::vector<float> h1(h0.size()), l1(l0.size());
    e->download(h1.data(), l1.data(), 1);
    const bool unchanged = h0 == h1 && l0 == l1;
    // The caches are intact: continuing matches the reference.
    const RunStats st = run(*e, ref, c, {{{1, 12, 2}, {0, 13, 5}, {2, 14, 0}}, {{2, 15, 1}, {0, 16, 6}}}, 1.0f, 2);
    log.result(not_refused.empty() && unchanged && st.hidden.ok(1e-4) && st.logits.ok(1e-4), "refused calls change nothing",
               (not_refused.empty() ? std::string("every bad call refused") : "NOT refused: " + not_refused) +
                   (unchanged ? "; last results unchanged" : "; last results CHANGED") +
                   fmt("; next steps vs float64: hidden scaled %.3g, logits scaled %.3g", st.hidden.max_scaled, st.logits.max_scaled));
}

}  // namespace

int engine_self_check(const std::string& backend, const Model* real_model, std::FILE* out, bool quick) {
    Log log(out);
    std::fprintf(out, "selfcheck of the %s engine against a float64 reference of llama2.c's forward pass and sampler\n", backend.c_str());
    const double tol = 1e-4;  // |engine - float64| / (1 + |float64|): float32 rounding through a few layers
    const Shape shapes[] = {
        // GQA (2 query heads per kv head), head size 8, separate classifier, slots at random positions
        {"gqa hs8", 32, 40, 2, 4, 2, 67, 40, false},
        // MHA, head size 24 (5 position groups in a 128-thread block), context longer than a block
        {"mha hs24 long", 48, 56, 1, 2, 2, 40, 300, true},
        // head size 160 > block (loops in attention and RoPE), GQA 2:1, odd vocab
        {"gqa hs160", 320, 64, 1, 2, 1, 33, 16, true},
        // multi-query: one kv head for 4 query heads, 3 layers
        {"mqa hs4", 16, 24, 3, 4, 1, 50, 24, true},
    };
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; ++k) {
        const Shape& s = shapes[k];
        try {
            const Model m = random_model(s, 1000 + k);
            const int B = k == 1 ? 2 : 5;
            // The long model runs past 128 positions (one attention block's threads) even when quick.
            const Schedule sched = k == 1 ? staggered_schedule(m.config, B, quick ? 160 : 290, 37, 7 + k)
                                          : random_schedule(m.config, B, quick ? 25 : 60, 7 + k);
            std::unique_ptr<Engine> e = make(backend, m, B);
            Reference ref(m, B);
            const RunStats first = run(*e, ref, m.config, sched, k % 2 ? 0.7f : 1.3f, 11 + k);
            report_run(log, s.name, first, tol);
            if (quick) continue;
            // reset(), the same steps again: the same results, bit for bit.
            e->reset();
            Reference ref2(m, B);
            const RunStats again = run(*e, ref2, m.config, sched, k % 2 ? 0.7f : 1.3f, 11 + k);
            log.result(again.outputs == first.outputs, std::string(s.name) + " reset() then the same steps",
                       again.outputs == first.outputs ? "bitwise equal" : "results differ from the first run");
        } catch (const std::exception& ex) {
            log.result(false, s.name, std::string("threw: ") + ex.what());
        }
    }
    try {
        check_refusals(log, backend, shapes[0]);
    } catch (const std::exception& ex) {
        log.result(false, "refused calls change nothing", std::string("threw: ") + ex.what());
    }

    if (!real_model) {
        log.skip("real model", "no --model given");
    } else {
        try {
            const Model& m = *real_model;
            const Config& c = m.config;
            // 32 slots: a greedy story from BOS in slot 0 (fed the reference's own argmax tokens),
            // random tokens in the others, staggered.
            const int B = 32, steps = 64;
            Schedule sched = staggered_schedule(c, B, steps, 1, 5);
            {
                Reference greedy(m, 1);
                std::vector<double> rh(c.dim), rl(c.vocab_size);
                int tok = 1;
                for (auto& step : sched)
                    for (Row& r : step)
                        if (r.slot == 0) {
                            r.token = tok;
                            greedy.step(0, tok, r.pos, rh.data(), rl.data());
                            tok = (int)(std::max_element(rl.begin(), rl.end()) - rl.begin());
                        }
            }
            std::unique_ptr<Engine> e = make(backend, m, B);
            Reference ref(m, B);
            const RunStats st = run(*e, ref, c, sched, 1.0f, 3);
            report_run(log, "stories260k B=32", st, 1e-4);
            if (backend != "cpu") {
                std::unique_ptr<Engine> cpu = make_cpu_engine(m, B);
                Reference ref3(m, B);
                const RunStats sc = run(*cpu, ref3, c, sched, 1.0f, 3);
                Diff dh, dl;
                size_t o = 0;
                for (const auto& step : sched) {
                    const size_t n = step.size();
                    for (size_t j = 0; j < n * c.dim; ++j, ++o) dh.add(st.outputs[o], sc.outputs[o]);
                    for (size_t j = 0; j < n * c.vocab_size; ++j, ++o) dl.add(st.outputs[o], sc.outputs[o]);
                }
                log.result(dh.ok(2e-4) && dl.ok(2e-4), "stories260k B=32 vs the cpu engine",
                           fmt("hidden max |diff| %.3g, logits max |diff| %.3g (scaled %.3g)", dh.max_abs, dl.max_abs, dl.max_scaled));
            }
            // Greedy decoding from BOS, the engine feeding itself, equals the reference's greedy run.
            e->reset();
            Reference g(m, 1);
            std::vector<double> rh(c.dim), rl(c.vocab_size);
            int tok_e = 1, tok_r = 1, same = 0;
            const int n_greedy = std::min(c.seq_len, 120);
            for (int t = 0; t < n_greedy; ++t) {
                const int32_t s0 = 0, p0 = t, t0 = tok_e;
                e->step(&s0, &t0, &p0, 1);
                int32_t nx = 0;
                e->sample(0.0f, nullptr, &nx, 1);
                g.step(0, tok_r, t, rh.data(), rl.data());
                tok_r = (int)(std::max_element(rl.begin(), rl.end()) - rl.begin());
                tok_e = nx;
                if (tok_e != tok_r) break;
                ++same;
            }
            log.result(same == n_greedy, "stories260k greedy decoding",
                       std::to_string(same) + " of " + std::to_string(n_greedy) + " greedy tokens equal to the float64 reference's");
        } catch (const std::exception& ex) {
            log.result(false, "real model", std::string("threw: ") + ex.what());
        }
    }
    std::fprintf(out, "selfcheck %s: %d of %d checks failed\n", log.failed() ? "FAILED" : "passed", log.failed(), log.run());
    return log.failed();
}

}  // namespace llama2c
