#include "cli/synth_cmd.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "cli/cli_checks.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/synth.hpp"
#include "io/tensor_file.hpp"

namespace collapse::internal {
namespace {

namespace fs = std::filesystem;

struct SynthOptions {
    SynthSpec spec;
    std::string dtype = "f32";
    std::string format = "npy";
    std::string output_dir;
    int64_t chunk_rows = 65536;
    int64_t sequences = 0;  // T; 0 = no sequence layout
    bool quiet = false;
};

collapse_dtype parse_dtype(const std::string& s) {
    if (s == "f32") return COLLAPSE_F32;
    if (s == "f16") return COLLAPSE_F16;
    if (s == "bf16") return COLLAPSE_BF16;
    if (s == "f64") return COLLAPSE_F64;
    fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: --dtype ", s, ": expected f32, f16, bf16 or f64");
}

// The generator names SynthSpec fields; tell the user which option sets the one it refused.
[[noreturn]] void rethrow_with_option(const Error& e) {
    static const std::pair<const char*, const char*> options[] = {
        {"synth: rows", "--rows"},         {"synth: dim", "--dim"},           {"synth: classes * dim", "--classes, --dim"},
        {"synth: classes", "--classes"},   {"synth: zipf_s", "--zipf"},       {"synth: collapse", "--collapse"},
        {"synth: noise", "--noise"},       {"synth: mean_norm", "--mean-norm"},
        {"synth: classifier_noise", "--classifier-noise"},
    };
    const std::string what = e.what();
    for (const auto& [prefix, option] : options)
        if (what.rfind(std::string(prefix) + " ", 0) == 0) throw Error(e.status(), what + " (option " + option + ")");
    throw e;
}

// Generates rows [0, N) chunk by chunk, calling fn(first_row, count, labels, features). Features are
// skipped (nullptr) when not wanted, which makes a labels-only pass cheap.
class RowStream {
public:
    RowStream(const SynthGenerator& gen, int64_t chunk_rows) : gen_(gen), chunk_(chunk_rows) {}

    void run(bool with_features, const std::function<void(int64_t, int64_t, const int32_t*, const void*)>& fn) {
        const SynthSpec& s = gen_.spec();
        labels_.resize((size_t)chunk_);
        if (with_features) features_.resize((size_t)(chunk_ * s.dim) * dtype_size(s.dtype));
        for (int64_t r = 0; r < s.rows; r += chunk_) {
            const int64_t n = std::min(chunk_, s.rows - r);
            gen_.labels(r, n, labels_.data());
            if (with_features) {
                gen_.features(r, n, labels_.data(), features_.data());
                check_finite(r, n);
            }
            fn(r, n, labels_.data(), with_features ? features_.data() : nullptr);
        }
    }

private:
    // --mean-norm or --noise past the dtype's range (f16's largest value is 65504) gave a data set
    // of inf that analyze then refused: refused here, before any file is committed.
    void check_finite(int64_t r, int64_t n) const {
        const SynthSpec& s = gen_.spec();
        for (int64_t i = 0; i < n * s.dim; ++i)
            if (!std::isfinite(load_as_double(features_.data(), s.dtype, i)))
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: row ", r + i / s.dim, " has a value outside the range of ", dtype_name(s.dtype),
                     ": lower --mean-norm (", s.mean_norm, ") or --noise (", s.noise, "), or choose a wider --dtype");
    }

    const SynthGenerator& gen_;
    int64_t chunk_;
    std::vector<int32_t> labels_;
    std::vector<uint8_t> features_;
};

// input_ids of whole sequences of length T for rows already laid out as [B, T]. docs/METRICS.md reads
// sequences as x = H[:, :-1], y = I[:, 1:], so I[b, t+1] = label of row (b, t). I[b, 0] has no row
// whose target it is; it takes the label of the last position, the one row the sequence view drops.
void sequence_ids(const int32_t* labels, int64_t count, int64_t T, std::vector<int32_t>& ids) {
    ids.resize((size_t)count);
    for (int64_t b = 0; b < count / T; ++b) {
        const int32_t* y = labels + b * T;
        int32_t* out = ids.data() + b * T;
        out[0] = y[T - 1];
        for (int64_t t = 1; t < T; ++t) out[t] = y[t - 1];
    }
}

std::string human_bytes(uintmax_t bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)bytes;
    int u = 0;
    while (v >= 1024 && u < 4) v /= 1024, ++u;
    char buf[32];
    std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
    return buf;
}

// The data set's files, each written to a temporary name and renamed into place at its end.
void write_files(const SynthOptions& o, const SynthGenerator& gen, const SynthSpec& spec, int64_t chunk, const fs::path& dir) {
    std::error_code ec;
    const int64_t N = spec.rows, d = spec.dim, V = spec.classes, T = o.sequences;

    std::vector<float> classifier((size_t)(V * d));
    gen.classifier(classifier.data());
    const size_t feature_row_bytes = (size_t)d * dtype_size(spec.dtype);
    const std::vector<int64_t> seq_shape = {T == 0 ? 0 : N / T, T};
    const std::vector<int64_t> hidden_shape = {T == 0 ? 0 : N / T, T, d};

    RowStream rows(gen, chunk);
    std::vector<int32_t> ids;
    std::vector<std::string> written;
    if (o.format == "npy") {
        // One pass feeds every file at once.
        io::NpyWriter features((dir / "features.npy").string(), spec.dtype, {N, d});
        io::NpyWriter labels((dir / "labels.npy").string(), COLLAPSE_I32, {N});
        std::unique_ptr<io::NpyWriter> hidden, input_ids;
        if (T != 0) {
            hidden = std::make_unique<io::NpyWriter>((dir / "hidden_states.npy").string(), spec.dtype, hidden_shape);
            input_ids = std::make_unique<io::NpyWriter>((dir / "input_ids.npy").string(), COLLAPSE_I32, seq_shape);
        }
        io::NpyWriter clf((dir / "classifier.npy").string(), COLLAPSE_F32, {V, d});
        clf.append(classifier.data(), classifier.size() * sizeof(float));
        rows.run(true, [&](int64_t, int64_t n, const int32_t* y, const void* x) {
            features.append(x, (size_t)n * feature_row_bytes);
            labels.append(y, (size_t)n * sizeof(int32_t));
            if (T != 0) {
                hidden->append(x, (size_t)n * feature_row_bytes);
                sequence_ids(y, n, T, ids);
                input_ids->append(ids.data(), ids.size() * sizeof(int32_t));
            }
        });
        // Every file's rows are appended before the first is renamed into place: a write that fails
        // on the way (a full disk) leaves the directory as it was, not new features beside an old
        // classifier. (Only each file's last buffer and fsync come later.)
        features.close();
        labels.close();
        clf.close();
        written = {"features.npy", "labels.npy", "classifier.npy"};
        if (T != 0) {
            hidden->close();
            input_ids->close();
            written.push_back("hidden_states.npy");
            written.push_back("input_ids.npy");
        }
    } else {  // safetensors (--format allows only the two)
        // Tensors are filled in declaration order, so each is its own pass; rows are regenerated
        // rather than kept, which the counter-based generator makes exact.
        std::vector<io::TensorSpec> tensors = {{"features", spec.dtype, {N, d}},
                                               {"labels", COLLAPSE_I32, {N}},
                                               {"classifier", COLLAPSE_F32, {V, d}}};
        if (T != 0) {
            tensors.push_back({"hidden_states", spec.dtype, hidden_shape});
            tensors.push_back({"input_ids", COLLAPSE_I32, seq_shape});
        }
        io::SafetensorsWriter out((dir / "synth.safetensors").string(), tensors);
        rows.run(true, [&](int64_t, int64_t n, const int32_t*, const void* x) { out.append(x, (size_t)n * feature_row_bytes); });
        rows.run(false, [&](int64_t, int64_t n, const int32_t* y, const void*) { out.append(y, (size_t)n * sizeof(int32_t)); });
        out.append(classifier.data(), classifier.size() * sizeof(float));
        if (T != 0) {
            rows.run(true, [&](int64_t, int64_t n, const int32_t*, const void* x) { out.append(x, (size_t)n * feature_row_bytes); });
            rows.run(false, [&](int64_t, int64_t n, const int32_t* y, const void*) {
                sequence_ids(y, n, T, ids);
                out.append(ids.data(), ids.size() * sizeof(int32_t));
            });
        }
        out.close();
        written = {"synth.safetensors"};
    }

    if (o.quiet) return;
    uintmax_t total = 0;
    std::string names;
    for (const std::string& f : written) {
        const uintmax_t size = fs::file_size(dir / f, ec);
        total += ec ? 0 : size;
        names += (names.empty() ? "" : ", ") + (dir / f).string();
    }
    std::printf("synth: wrote %s (%lld rows, d = %lld, V = %lld, %s, %s)\n", names.c_str(), (long long)N,
                (long long)d, (long long)V, dtype_name(spec.dtype), human_bytes(total).c_str());
    std::fflush(stdout);
}

void run_synth(const SynthOptions& o) {
    SynthSpec spec = o.spec;
    spec.dtype = parse_dtype(o.dtype);
    std::unique_ptr<SynthGenerator> gen;
    try {
        gen = std::make_unique<SynthGenerator>(spec);
    } catch (const Error& e) {
        rethrow_with_option(e);
    }
    const int64_t N = spec.rows, d = spec.dim, V = spec.classes, T = o.sequences;
    if (T != 0 && (T < 2 || N % T != 0))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: --sequences ", T, " must be >= 2 and divide --rows ", N);
    // With sequences, chunks hold whole sequences so input_ids can be built chunk by chunk.
    int64_t chunk = std::min(o.chunk_rows, N);
    if (T != 0) chunk = std::max<int64_t>(T, chunk / T * T);

    // The directories this run makes (the output directory and missing parents), removed again
    // when it fails.
    std::error_code ec;
    std::vector<fs::path> made;
    fs::path probe = fs::absolute(o.output_dir, ec);  // the nearest existing one
    for (; !probe.empty() && !fs::exists(probe, ec) && probe != probe.parent_path(); probe = probe.parent_path())
        made.push_back(probe);

    // Refused before anything is written when the file system cannot hold the data set.
    {
        const size_t fbytes = dtype_size(spec.dtype);
        const double need = (double)N * (double)d * (double)fbytes * (T != 0 ? 2 : 1) + (double)N * 4 * (T != 0 ? 2 : 1) + (double)V * d * 4;
        const fs::space_info sp = fs::space(probe, ec);
        if (!ec && need > (double)sp.available)
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: the data set needs about ", human_bytes((uintmax_t)need), ", the file system of ",
                 probe.string(), " has ", human_bytes(sp.available), " free (lower --rows or --dim)");
    }
    try {
        fs::create_directories(o.output_dir, ec);
        if (ec || !fs::is_directory(o.output_dir))
            fail(COLLAPSE_ERR_IO, "synth: cannot create output directory ", o.output_dir, ": ",
                 ec ? ec.message() : "not a directory");
        write_files(o, *gen, spec, chunk, fs::path(o.output_dir));
    } catch (...) {
        // The writers have removed their temporary files; fs::remove takes only an empty directory.
        for (const fs::path& p : made) fs::remove(p, ec);
        throw;
    }
}

}  // namespace

void add_synth_command(CLI::App& app) {
    auto o = std::make_shared<SynthOptions>();
    CLI::App* sub = app.add_subcommand("synth", "Write a deterministic synthetic data set with controlled neural collapse");
    SynthSpec& s = o->spec;
    sub->add_option("--rows", s.rows, "rows N")->capture_default_str()->check(positive());
    sub->add_option("--dim", s.dim, "feature width d")->capture_default_str()->check(positive());
    sub->add_option("--classes", s.classes, "classes V (token ids 0..V-1)")->capture_default_str()->check(positive());
    sub->add_option("--zipf", s.zipf_s, "label frequencies ~ rank^-s")->capture_default_str()->check(non_negative());
    sub->add_option("--collapse", s.collapse, "0 = random means and full noise, 1 = simplex ETF and no noise")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 1.0));
    sub->add_option("--noise", s.noise, "within-class std per coordinate at collapse 0")->capture_default_str()->check(non_negative());
    sub->add_option("--mean-norm", s.mean_norm, "norm of every class mean")->capture_default_str()->check(positive());
    sub->add_option("--classifier-noise", s.classifier_noise, "classifier = unit means + this std per coordinate")
        ->capture_default_str()
        ->check(non_negative());
    sub->add_option("--seed", s.seed, "random seed")->capture_default_str();
    sub->add_option("--dtype", o->dtype, "feature dtype")->capture_default_str()->check(CLI::IsMember({"f32", "f16", "bf16", "f64"}));
    sub->add_option("--format", o->format, "output format")->capture_default_str()->check(CLI::IsMember({"npy", "safetensors"}));
    sub->add_option("--output-dir", o->output_dir, "directory to write (created if needed)")->required();
    sub->add_option("--chunk-rows", o->chunk_rows, "rows generated and written per chunk")->capture_default_str()->check(positive());
    sub->add_option("--sequences", o->sequences,
                    "also write the sequence layout hidden_states [N/T, T, d] and input_ids [N/T, T] "
                    "(input_ids[b, t+1] = label of row b*T+t); T must divide --rows")
        ->check(number_from(2, false));
    sub->add_flag("--quiet", o->quiet, "print nothing on success");
    sub->callback([o] { run_synth(*o); });
}

}  // namespace collapse::internal
