// collapse_llama2c: a small llama2.c inference program that drives the collapse engine through its
// C API (include/collapse/collapse.h) as an outside inference server would.
//   forward   teacher-forced forward pass over (sequence, position, token) rows: hidden states + NLL
//   generate  batched decoding from BOS; every row goes into a collapse session with its sequence
//             id and position; live snapshots, final report
//   bench     decode tokens/s with the session attached vs the same loop without it
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <exception>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine.hpp"
#include "engine_self_check.hpp"
#include "monitor.hpp"
#include "npy.hpp"
#include "tokenizer.hpp"

namespace llama2c {

namespace {

constexpr int kBos = 1;

const char* const kUsage =
    "usage:\n"
    "  collapse_llama2c forward --model M --inputs I.npy --seq S.npy --pos P.npy --output F.npy [--nll N.npy]\n"
    "                           [--labels L.npy] [--backend cpu|cuda] [--batch B]\n"
    "  collapse_llama2c generate --model M [--tokenizer T] --batch B --steps N [--temperature T] [--seed S]\n"
    "                            [--config C.yaml] [--output R.json] [--snapshot-every K] [--print-text]\n"
    "                            [--backend cpu|cuda]\n"
    "  collapse_llama2c bench --model M [--backend cpu|cuda] [--batch 1,32] [--steps N] [--config C.yaml]\n"
    "  collapse_llama2c selfcheck [--backend cpu|cuda] [--model M] [--quick]   (engine vs a float64 reference; exit 1 on failure)\n";

// --name value options and bare --flags; anything else is an error naming it.
class Args {
public:
    Args(int argc, char** argv, int first, const std::set<std::string>& valued, const std::set<std::string>& flags) {
        for (int i = first; i < argc; ++i) {
            const std::string a = argv[i];
            if (flags.count(a)) {
                flags_.insert(a);
            } else if (valued.count(a)) {
                if (i + 1 >= argc) throw std::runtime_error("option " + a + " needs a value");
                values_[a] = argv[++i];
            } else {
                throw std::runtime_error("unknown argument '" + a + "'");
            }
        }
    }
    bool has(const std::string& k) const { return values_.count(k) || flags_.count(k); }
    std::string get(const std::string& k, const std::string& dflt = std::string()) const {
        auto it = values_.find(k);
        return it == values_.end() ? dflt : it->second;
    }
    std::string need(const std::string& k) const {
        if (!values_.count(k)) throw std::runtime_error("missing required option " + k);
        return values_.at(k);
    }
    long long integer(const std::string& k, long long dflt, long long lo, long long hi) const {
        if (!values_.count(k)) return dflt;
        const std::string& s = values_.at(k);
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || *end || errno || v < lo || v > hi)
            throw std::runtime_error(k + " '" + s + "': expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
        return v;
    }
    double real(const std::string& k, double dflt, double lo) const {
        if (!values_.count(k)) return dflt;
        const std::string& s = values_.at(k);
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || *end || !std::isfinite(v) || v < lo) throw std::runtime_error(k + " '" + s + "': expected a number >= " + std::to_string(lo));
        return v;
    }

private:
    std::map<std::string, std::string> values_;
    std::set<std::string> flags_;
};

collapse_backend parse_backend(const std::string& b) {
    if (b == "cpu") return COLLAPSE_BACKEND_CPU;
    if (b == "cuda") return COLLAPSE_BACKEND_CUDA;
    throw std::runtime_error("--backend '" + b + "': expected cpu or cuda");
}

std::unique_ptr<Engine> make_engine(collapse_backend backend, const Model& m, int max_batch) {
    if (backend == COLLAPSE_BACKEND_CPU) return make_cpu_engine(m, max_batch);
    if (!cuda_engine_built()) throw std::runtime_error("--backend cuda: this build has no CUDA engine (configure with CUDA)");
    return make_cuda_engine(m, max_batch);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double cpu_seconds() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// splitmix64: the coins of temperature sampling, drawn on the host so both backends see the same.
class Rng {
public:
    explicit Rng(uint64_t seed) : s_(seed) {}
    float coin() {
        uint64_t z = (s_ += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        return (float)(z >> 40) / 16777216.0f;  // 24 bits: [0, 1)
    }

private:
    uint64_t s_;
};

// ---------------------------------------------------------------- forward

// Checked before any work: each output's folder exists and is writable, and no output is one of
// the inputs or another output (a long run must not end in an unwritable path or a destroyed input).
void check_outputs(const std::vector<std::string>& outputs, const std::vector<std::string>& inputs) {
    namespace fs = std::filesystem;
    for (size_t i = 0; i < outputs.size(); ++i) {
        const std::string& o = outputs[i];
        if (o.empty()) continue;
        const fs::path dir = fs::path(o).parent_path().empty() ? fs::path(".") : fs::path(o).parent_path();
        std::error_code ec;
        if (!fs::is_directory(dir, ec) || ::access(dir.c_str(), W_OK) != 0)
            throw std::runtime_error("output " + o + ": folder " + dir.string() + " does not exist or is not writable");
        auto same = [&](const std::string& other) { return !other.empty() && fs::exists(o, ec) && fs::equivalent(o, other, ec); };
        for (const std::string& in : inputs)
            if (same(in)) throw std::runtime_error("output " + o + " is the input " + in + " (it would be overwritten)");
        for (size_t j = 0; j < i; ++j)
            if (same(outputs[j]) || o == outputs[j]) throw std::runtime_error("two outputs name the same file " + o);
    }
}

int cmd_forward(const Args& a) {
    const std::string model_path = a.need("--model"), in_path = a.need("--inputs"), seq_path = a.need("--seq"),
                      pos_path = a.need("--pos"), out_path = a.need("--output"), nll_path = a.get("--nll"),
                      labels_path = a.get("--labels");
    const collapse_backend backend = parse_backend(a.get("--backend", "cpu"));
    const int batch = (int)a.integer("--batch", 64, 1, 4096);
    check_outputs({out_path, nll_path}, {model_path, in_path, seq_path, pos_path, labels_path});
    const Model model = load_model(model_path);
    const Config& c = model.config;

    const std::vector<int64_t> tokens = read_npy_ints(in_path), seq = read_npy_ints(seq_path), pos = read_npy_ints(pos_path);
    std::vector<int64_t> labels;
    if (!labels_path.empty()) labels = read_npy_ints(labels_path);
    const int64_t N = (int64_t)tokens.size();
    const auto same_length = [&](const std::vector<int64_t>& v, const std::string& path) {
        if ((int64_t)v.size() != N)
            throw std::runtime_error(path + ": " + std::to_string(v.size()) + " rows, but " + in_path + " has " + std::to_string(N));
    };
    same_length(seq, seq_path);
    same_length(pos, pos_path);
    if (!labels_path.empty()) same_length(labels, labels_path);

    // Validate every row before any work: tokens and labels in range, each sequence's positions
    // 0, 1, 2, ... in row order (the KV cache is filled in that order).
    struct Seq {
        std::vector<int64_t> rows;
    };
    std::vector<Seq> seqs;
    std::unordered_map<int64_t, size_t> index;
    for (int64_t r = 0; r < N; ++r) {
        if (tokens[(size_t)r] < 0 || tokens[(size_t)r] >= c.vocab_size)
            throw std::runtime_error(in_path + ": row " + std::to_string(r) + ": token " + std::to_string(tokens[(size_t)r]) +
                                     " is out of range [0, " + std::to_string(c.vocab_size) + ")");
        if (!labels.empty() && (labels[(size_t)r] < 0 || labels[(size_t)r] >= c.vocab_size))
            throw std::runtime_error(labels_path + ": row " + std::to_string(r) + ": label " + std::to_string(labels[(size_t)r]) +
                                     " is out of range [0, " + std::to_string(c.vocab_size) + ")");
        auto it = index.emplace(seq[(size_t)r], seqs.size()).first;
        if (it->second == seqs.size()) seqs.emplace_back();
        Seq& s = seqs[it->second];
        const int64_t want = (int64_t)s.rows.size();
        if (pos[(size_t)r] != want)
            throw std::runtime_error(pos_path + ": row " + std::to_string(r) + ": position " + std::to_string(pos[(size_t)r]) + " of sequence " +
                                     std::to_string(seq[(size_t)r]) +
                                     (want == 0 ? std::string(" does not start at 0")
                                                : " does not follow the previous one (" + std::to_string(want - 1) + ", row " +
                                                      std::to_string(s.rows.back()) + "); expected " + std::to_string(want)));
        if (want >= c.seq_len)
            throw std::runtime_error(pos_path + ": row " + std::to_string(r) + ": position " + std::to_string(want) + " of sequence " +
                                     std::to_string(seq[(size_t)r]) + " is beyond the model's seq_len " + std::to_string(c.seq_len));
        s.rows.push_back(r);
    }

    // On the CPU, `threads` workers each run their own engine over a share of the slots and pull the
    // next sequence from a shared counter: no barrier between them (an OpenMP loop per layer would
    // wait on a preempted thread at every layer of every step on a busy machine). The GEMMs' rounding
    // depends on which rows share a step, so results vary with --batch and the thread count at the
    // 1e-5 level.
    const int threads = backend == COLLAPSE_BACKEND_CPU ? std::max(1, std::min(omp_get_max_threads(), (int)seqs.size())) : 1;
    const int slots = std::max(1, (int)std::min<size_t>((size_t)batch, seqs.size()) / threads);
    std::vector<std::unique_ptr<Engine>> engines;
    for (int w = 0; w < threads; ++w) engines.push_back(make_engine(backend, model, slots));
    const int D = c.dim, V = c.vocab_size;
    std::vector<float> features((size_t)(N * D)), nll((size_t)N, NAN);
    std::atomic<size_t> next_seq{0};
    std::exception_ptr failure;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
    try {
        Engine& engine = *engines[(size_t)omp_get_thread_num()];
        std::vector<float> h((size_t)slots * D), lg((size_t)slots * V);
        // Slot b runs sequence active[b] at its step cursor[b]; a finished sequence's slot takes the next.
        std::vector<int64_t> active((size_t)slots, -1), cursor((size_t)slots, 0);
        std::vector<int32_t> s_slot, s_tok, s_pos;
        std::vector<int64_t> s_row;
        for (;;) {
            s_slot.clear(), s_tok.clear(), s_pos.clear(), s_row.clear();
            for (int b = 0; b < slots; ++b) {
                if (active[(size_t)b] < 0 || cursor[(size_t)b] == (int64_t)seqs[(size_t)active[(size_t)b]].rows.size()) {
                    const size_t k = next_seq.fetch_add(1);
                    active[(size_t)b] = k < seqs.size() ? (int64_t)k : -1;
                    cursor[(size_t)b] = 0;
                }
                if (active[(size_t)b] < 0) continue;
                const int64_t r = seqs[(size_t)active[(size_t)b]].rows[(size_t)cursor[(size_t)b]];
                s_slot.push_back(b);
                s_tok.push_back((int32_t)tokens[(size_t)r]);
                s_pos.push_back((int32_t)cursor[(size_t)b]);
                s_row.push_back(r);
            }
            const int n = (int)s_slot.size();
            if (n == 0) break;
            engine.step(s_slot.data(), s_tok.data(), s_pos.data(), n);
            engine.download(h.data(), lg.data(), n);
            for (int i = 0; i < n; ++i) {
                const int b = s_slot[(size_t)i];
                const int64_t r = s_row[(size_t)i];
                std::memcpy(&features[(size_t)(r * D)], &h[(size_t)i * D], sizeof(float) * D);
                const Seq& sq = seqs[(size_t)active[(size_t)b]];
                const size_t k = (size_t)cursor[(size_t)b];
                // The label: --labels when given, else the next row's token; the last row has none (NaN).
                int64_t label = -1;
                if (!labels.empty()) label = labels[(size_t)r];
                else if (k + 1 < sq.rows.size()) label = tokens[(size_t)sq.rows[k + 1]];
                if (label >= 0) {
                    const float* l = &lg[(size_t)i * V];
                    double mx = -INFINITY, sum = 0.0;
                    for (int v = 0; v < V; ++v) mx = std::max(mx, (double)l[v]);
                    for (int v = 0; v < V; ++v) sum += std::exp((double)l[v] - mx);
                    nll[(size_t)r] = (float)(mx + std::log(sum) - (double)l[label]);
                }
                ++cursor[(size_t)b];
            }
        }
    } catch (...) {
#pragma omp critical(llama2c_forward_failure)
        if (!failure) failure = std::current_exception();
        next_seq.store(seqs.size());  // the other workers finish their current sequences and stop
    }
    if (failure) std::rethrow_exception(failure);
    const double secs = seconds_since(t0);
    write_npy_f32(out_path, {N, (int64_t)D}, features.data());
    if (!nll_path.empty()) write_npy_f32(nll_path, {N}, nll.data());
    double total = 0;
    int64_t counted = 0;
    for (float v : nll)
        if (!std::isnan(v)) total += v, ++counted;
    std::fprintf(stderr, "forward (%s): %lld rows, %zu sequences, %d x %d slots, %.3f s (%.0f rows/s); mean NLL %.4f over %lld labelled rows\n",
                 engines[0]->name(), (long long)N, seqs.size(), threads, slots, secs, secs > 0 ? (double)N / secs : 0.0,
                 counted ? total / (double)counted : NAN, (long long)counted);
    return 0;
}

// ---------------------------------------------------------------- decoding loop

struct DecodeResult {
    std::vector<std::vector<int32_t>> tokens;  // per sequence, BOS first
    int64_t rows = 0;                          // rows stepped (= rows handed to the monitor)
    double seconds = 0;      // wall clock
    double cpu_seconds = 0;  // CPU time of the process (every thread), steadier on a busy machine
};

// B sequences from BOS, `steps` steps. At step t each active sequence consumes its token at
// position t; the token sampled from that step's logits is both its next input and the label of
// the step's hidden state (X = hidden[:, :-1], Y = tokens[:, 1:]), so the row goes to the monitor
// right after sampling, from the engine's own memory (device buffers on the engine's stream).
// With stop_at_bos a sequence that samples BOS (end of story) stops after handing that row over.
DecodeResult decode(Engine& engine, Monitor* monitor, int B, int steps, float temperature, uint64_t seed, bool stop_at_bos,
                    int snapshot_every) {
    DecodeResult res;
    res.tokens.assign((size_t)B, std::vector<int32_t>{kBos});
    std::vector<int32_t> slot, tok, pos, next((size_t)B);
    std::vector<int64_t> positions((size_t)B);
    std::vector<float> coin((size_t)B);
    std::vector<char> live((size_t)B, 1);
    Rng rng(seed);
    engine.reset();
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_seconds();
    for (int t = 0; t < steps; ++t) {
        slot.clear(), tok.clear(), pos.clear();
        for (int b = 0; b < B; ++b)
            if (live[(size_t)b]) slot.push_back(b), tok.push_back(res.tokens[(size_t)b].back()), pos.push_back(t);
        const int n = (int)slot.size();
        if (n == 0) break;
        engine.step(slot.data(), tok.data(), pos.data(), n);
        for (int i = 0; i < n; ++i) coin[(size_t)i] = rng.coin();
        engine.sample(temperature, coin.data(), next.data(), n);
        if (monitor) {
            std::fill_n(positions.begin(), n, (int64_t)t);
            monitor->ingest(engine.hidden(), engine.sampled(), engine.memory(), n, slot.data(), positions.data(), engine.stream());
        }
        res.rows += n;
        for (int i = 0; i < n; ++i) {
            const int b = slot[(size_t)i];
            res.tokens[(size_t)b].push_back(next[(size_t)i]);
            if (stop_at_bos && next[(size_t)i] == kBos) live[(size_t)b] = 0;
        }
        if (monitor && snapshot_every > 0 && (t + 1) % snapshot_every == 0)
            std::printf("step %d: active=%d %s\n", t + 1, n, monitor->snapshot_line().c_str()), std::fflush(stdout);
    }
    res.seconds = seconds_since(t0);
    res.cpu_seconds = cpu_seconds() - c0;
    return res;
}

// ---------------------------------------------------------------- generate

int cmd_generate(const Args& a) {
    const std::string model_path = a.need("--model"), tok_path = a.get("--tokenizer"), config = a.get("--config"), output = a.get("--output");
    const collapse_backend backend = parse_backend(a.get("--backend", "cpu"));
    const int B = (int)a.integer("--batch", 1, 1, 4096);
    const long long steps = a.integer("--steps", -1, 1, 1 << 20);
    if (steps < 0) throw std::runtime_error("missing required option --steps");
    const float temperature = (float)a.real("--temperature", 1.0, 0.0);
    const uint64_t seed = (uint64_t)a.integer("--seed", 0, 0, INT64_MAX);
    const int every = (int)a.integer("--snapshot-every", 0, 0, 1 << 30);
    const bool print = a.has("--print-text");
    if (print && tok_path.empty()) throw std::runtime_error("--print-text needs --tokenizer");
    check_outputs({output}, {model_path, tok_path, config});

    const Model model = load_model(model_path);
    if (steps > model.config.seq_len)
        throw std::runtime_error("--steps " + std::to_string(steps) + " exceeds the model's seq_len " + std::to_string(model.config.seq_len));
    std::unique_ptr<Tokenizer> tokenizer;
    if (!tok_path.empty()) tokenizer = std::make_unique<Tokenizer>(tok_path, model.config.vocab_size);
    Monitor monitor(model, config, backend);
    std::unique_ptr<Engine> engine = make_engine(backend, model, B);

    const DecodeResult r = decode(*engine, &monitor, B, (int)steps, temperature, seed, true, every);
    const auto tf = std::chrono::steady_clock::now();
    const int64_t kept = monitor.finish(output);
    const double finish_s = seconds_since(tf);
    if (print) {
        for (int b = 0; b < B; ++b) {
            const auto& ts = r.tokens[(size_t)b];
            std::string text;
            for (size_t i = 1; i < ts.size(); ++i)
                if (ts[i] != kBos) text += tokenizer->decode(ts[i - 1], ts[i]);
            if (B > 1) std::printf("--- sequence %d (%zu tokens)\n", b, ts.size() - 1);
            std::printf("%s\n", text.c_str());
        }
    }
    std::fprintf(stderr, "generate (%s): %d sequences, %lld rows handed to the session in %.3f s (%.0f tokens/s); rows_kept %lld; final compute %.3f s%s%s\n",
                 engine->name(), B, (long long)r.rows, r.seconds, r.seconds > 0 ? (double)r.rows / r.seconds : 0.0, (long long)kept, finish_s,
                 output.empty() ? "" : "; report ", output.c_str());
    return 0;
}

// ---------------------------------------------------------------- bench

int cmd_bench(const Args& a) {
    const Model model = load_model(a.need("--model"));
    const collapse_backend backend = parse_backend(a.get("--backend", "cpu"));
    const int steps = (int)a.integer("--steps", 256, 1, model.config.seq_len);
    const std::string config = a.get("--config");
    std::vector<int> batches;
    {
        const std::string list = a.get("--batch", "1,32");
        size_t p = 0;
        while (p <= list.size()) {
            const size_t q = std::min(list.find(',', p), list.size());
            const std::string item = list.substr(p, q - p);
            char* end = nullptr;
            const long v = std::strtol(item.c_str(), &end, 10);
            if (item.empty() || *end || v < 1 || v > 4096) throw std::runtime_error("--batch '" + list + "': expected a list of integers in [1, 4096]");
            batches.push_back((int)v);
            p = q + 1;
        }
    }
    const int reps = 7;
    std::printf("collapse_llama2c bench: %s engine, %d OpenMP threads, OPENBLAS_NUM_THREADS=%s, model dim %d, %d layers, V %d;\n"
                "  %d decode steps from BOS at temperature 1 (no early stop, so every step has B rows); with and without\n"
                "  the session interleaved, best of %d each (wall clock and process CPU time); config: %s\n",
                backend == COLLAPSE_BACKEND_CPU ? "cpu" : "cuda", omp_get_max_threads(),
                std::getenv("OPENBLAS_NUM_THREADS") ? std::getenv("OPENBLAS_NUM_THREADS") : "(unset)", model.config.dim,
                model.config.n_layers, model.config.vocab_size, steps, reps, config.empty() ? "defaults" : config.c_str());
    for (int B : batches) {
        std::unique_ptr<Engine> engine = make_engine(backend, model, B);
        decode(*engine, nullptr, B, std::min(steps, 16), 1.0f, 1, false, 0);  // warm-up
        double wall_off = INFINITY, wall_on = INFINITY, cpu_off = INFINITY, cpu_on = INFINITY, in_ingest = INFINITY;
        int64_t rows = 0;
        // Interleaved, so that drifting machine load hits both sides alike.
        for (int rep = 0; rep < reps; ++rep) {
            const DecodeResult off = decode(*engine, nullptr, B, steps, 1.0f, 1, false, 0);
            wall_off = std::min(wall_off, off.seconds);
            cpu_off = std::min(cpu_off, off.cpu_seconds);
            Monitor monitor(model, config, backend);
            const DecodeResult on = decode(*engine, &monitor, B, steps, 1.0f, 1, false, 0);
            wall_on = std::min(wall_on, on.seconds);
            cpu_on = std::min(cpu_on, on.cpu_seconds);
            in_ingest = std::min(in_ingest, monitor.ingest_seconds() / on.seconds);
            rows = on.rows;
        }
        // The engine's share of step time, (with - without) / with, by the wall clock (what a
        // server's step takes: the goal) and by process CPU time (what the engine costs in all,
        // its window worker thread included; on a shared machine it moves less than the wall clock).
        const double share_wall = 100.0 * (wall_on - wall_off) / wall_on;
        const double share_cpu = 100.0 * (cpu_on - cpu_off) / cpu_on;
        std::printf("B=%-3d with session %9.0f tokens/s (%9.0f per CPU-s)   ceiling, no session %9.0f tokens/s (%9.0f per CPU-s)   "
                    "ratio %.3f (%.3f)   engine share of step time %.2f%% (wall clock), of CPU time %.2f%%%s\n",
                    B, (double)rows / wall_on, (double)rows / cpu_on, (double)rows / wall_off, (double)rows / cpu_off, wall_off / wall_on,
                    cpu_off / cpu_on, share_wall, share_cpu, B >= 32 ? (share_wall <= 3.0 ? "   goal<=3% met" : "   goal<=3% MISSED") : "");
        std::printf("      time inside the ingest calls: %.2f%% of the loop's wall clock (best of %d)\n", 100.0 * in_ingest, reps);
        std::fflush(stdout);
    }
    return 0;
}

}  // namespace

}  // namespace llama2c

int main(int argc, char** argv) {
    using namespace llama2c;
    if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
        std::fputs(kUsage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const std::string cmd = argv[1];
    try {
        if (cmd == "forward")
            return cmd_forward(Args(argc, argv, 2, {"--model", "--inputs", "--seq", "--pos", "--output", "--nll", "--labels", "--backend", "--batch"}, {}));
        if (cmd == "generate")
            return cmd_generate(Args(argc, argv, 2,
                                     {"--model", "--tokenizer", "--batch", "--steps", "--temperature", "--seed", "--config", "--output",
                                      "--snapshot-every", "--backend"},
                                     {"--print-text"}));
        if (cmd == "bench") return cmd_bench(Args(argc, argv, 2, {"--model", "--backend", "--batch", "--steps", "--config"}, {}));
        if (cmd == "selfcheck") {  // engine_self_check.hpp
            const Args a(argc, argv, 2, {"--model", "--backend"}, {"--quick"});
            const std::string backend = a.get("--backend", "cpu");
            parse_backend(backend);
            const std::unique_ptr<Model> model = a.has("--model") ? std::make_unique<Model>(load_model(a.get("--model"))) : nullptr;
            return engine_self_check(backend, model.get(), stdout, a.has("--quick")) == 0 ? 0 : 1;
        }
        throw std::runtime_error("unknown subcommand '" + cmd + "' (forward, generate, bench, selfcheck)");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "collapse_llama2c: error: %s\n", e.what());
        return 1;
    }
}
