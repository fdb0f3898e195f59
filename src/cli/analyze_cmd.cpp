#include "cli/analyze_cmd.hpp"

#include <unistd.h>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/session.hpp"
#include "core/synth.hpp"
#include "io/tensor_file.hpp"
#include "report/report.hpp"

namespace collapse::internal {

namespace {

struct AnalyzeArgs {
    std::string features, labels, classifier, bias, config;
    std::string hidden, input_ids, attention_mask;
    std::string safetensors, features_key = "features", labels_key = "labels", classifier_key;
    std::string hidden_key, input_ids_key, attention_mask_key;
    std::string output = "collapse_report.json";
    std::string checkpoint, from_checkpoint;
    bool resume = false;
    std::string backend;
    int64_t batch_rows = 0;
    int64_t num_classes = 0;
    bool quiet = false;
};

using Clock = std::chrono::steady_clock;

// Progress on stderr: silent for the first second, then a line at most twice a second.
class Progress {
public:
    Progress(bool quiet, int64_t total) : quiet_(quiet), total_(total), t0_(Clock::now()), last_(t0_) {}
    void update(int64_t done, const char* phase) {
        if (quiet_) return;
        const auto now = Clock::now();
        const double el = std::chrono::duration<double>(now - t0_).count();
        if (el < 1.0 || std::chrono::duration<double>(now - last_).count() < 0.5) return;
        last_ = now;
        shown_ = true;
        std::fprintf(stderr, "%s%s: %lld rows, %.0f rows/s, %.1f%%%s", tty_ ? "\r" : "", phase, (long long)done,
                     done / el, total_ > 0 ? 100.0 * (double)done / (double)total_ : 100.0, tty_ ? "" : "\n");
        std::fflush(stderr);
    }
    void finish() {
        if (shown_ && tty_) std::fprintf(stderr, "\n");
    }

private:
    bool quiet_;
    int64_t total_;
    Clock::time_point t0_, last_;
    bool shown_ = false;
    bool tty_ = isatty(2) != 0;
};

// The input: either tensors from files, or the synthetic generator.
struct Input {
    std::optional<io::Tensor> features, labels, hidden, input_ids, mask, classifier, bias;
    std::unique_ptr<SynthGenerator> synth;
    bool sequences() const { return hidden.has_value(); }
};

io::Tensor need_2d(io::Tensor t, const char* what) {
    if (t.shape.size() != 2) fail(COLLAPSE_ERR_SHAPE, what, " '", t.name, "' must be 2-D, has ", t.shape.size(), " dimensions");
    return t;
}

Input open_input(const AnalyzeArgs& a) {
    Input in;
    std::unique_ptr<io::SafetensorsFile> st;
    if (!a.safetensors.empty()) st = std::make_unique<io::SafetensorsFile>(a.safetensors);
    auto get = [&](const std::string& file, const std::string& key) -> std::optional<io::Tensor> {
        if (st && !key.empty()) return st->tensor(key);
        if (!file.empty()) return io::open_npy(file);
        return std::nullopt;
    };
    const bool seq = !a.hidden.empty() || !a.hidden_key.empty();
    if (seq) {
        in.hidden = get(a.hidden, a.hidden_key);
        in.input_ids = get(a.input_ids, a.input_ids_key);
        if (!in.input_ids) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the sequence layout needs --input-ids (or --input-ids-key)");
        in.mask = get(a.attention_mask, a.attention_mask_key);
        if (in.hidden->shape.size() != 3)
            fail(COLLAPSE_ERR_SHAPE, "hidden '", in.hidden->name, "' must be [B, T, d], has ", in.hidden->shape.size(), " dimensions");
        const int64_t B = in.hidden->shape[0], T = in.hidden->shape[1];
        for (const auto* t : {&in.input_ids, &in.mask})
            if (*t && ((*t)->shape.size() != 2 || (*t)->shape[0] != B || (*t)->shape[1] != T))
                fail(COLLAPSE_ERR_SHAPE, "'", (*t)->name, "' must be [", B, ", ", T, "] to match hidden");
    } else {
        in.features = get(a.features, st ? a.features_key : std::string());
        in.labels = get(a.labels, st ? a.labels_key : std::string());
        if (in.features && !in.labels) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--features needs --labels");
        if (in.labels && !in.features) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--labels needs --features");
        if (in.features) {
            in.features = need_2d(*in.features, "features");
            if (in.labels->numel() != in.features->rows() || in.labels->shape.size() > 2)
                fail(COLLAPSE_ERR_SHAPE, "labels '", in.labels->name, "' has ", in.labels->numel(), " elements, features '",
                     in.features->name, "' has ", in.features->rows(), " rows");
        }
    }
    in.classifier = get(a.classifier, a.classifier_key);
    if (in.classifier) in.classifier = need_2d(*in.classifier, "classifier");
    if (!a.bias.empty()) in.bias = io::open_npy(a.bias);
    if (!in.features && !in.hidden) {
        // The built-in default: a synthetic dump generated in-process (see `collapse synth`).
        in.synth = std::make_unique<SynthGenerator>(SynthSpec{});
    }
    return in;
}

int64_t max_label(const io::Tensor& t) {
    int64_t mx = -1;
    for (int64_t i = 0; i < t.numel(); ++i) mx = std::max(mx, load_as_int(t.data(), t.dtype, i));
    return mx;
}

collapse_buffer buffer_of(const io::Tensor& t, int64_t r0, int64_t rows, int64_t cols) {
    return collapse_buffer{t.row(r0), t.dtype, COLLAPSE_MEMORY_HOST, rows, cols, 0};
}

void apply_classifier(Session& session, const io::Tensor& w, const std::optional<io::Tensor>& bias) {
    const collapse_buffer wb = buffer_of(w, 0, w.shape[0], w.shape[1]);
    std::optional<collapse_buffer> bb;
    if (bias) bb = buffer_of(*bias, 0, bias->numel(), 1);
    session.set_classifier(&wb, bb ? &*bb : nullptr);
}

void print_headline(const nlohmann::json& doc, const std::string& path) {
    auto num = [&](const char* sec, const char* key) -> std::string {
        const auto& v = doc[sec][key];
        if (v.is_null()) return "null";
        char buf[64];
        std::snprintf(buf, sizeof buf, v.is_number_integer() ? "%.0f" : "%.6g", v.get<double>());
        return buf;
    };
    std::printf("report written to %s\n", path.c_str());
    std::printf("  rows kept %s of %s, classes kept %s\n", num("counts", "rows_kept").c_str(),
                num("counts", "rows_seen").c_str(), num("counts", "classes_kept").c_str());
    std::printf("  overall_svd_entropy %s (effective rank %s)\n", num("overall_analysis", "overall_svd_entropy").c_str(),
                num("overall_analysis", "overall_effective_rank").c_str());
    std::printf("  overall_gnc2 %s, nc2_equiangular_mean %s (ideal %s), nc1_cdnv %s\n",
                num("overall_analysis", "overall_gnc2").c_str(), num("overall_analysis", "nc2_equiangular_mean").c_str(),
                num("overall_analysis", "nc2_equiangular_ideal").c_str(), num("overall_analysis", "nc1_cdnv").c_str());
    std::printf("  overall_unc3 %s, nc3_self_duality %s, nc4_agreement %s\n", num("overall_analysis", "overall_unc3").c_str(),
                num("overall_analysis", "nc3_self_duality").c_str(), num("overall_analysis", "nc4_agreement").c_str());
    std::printf("  avg_svd_entropy %s over %s tokens\n", num("summary", "avg_svd_entropy").c_str(),
                num("summary", "tokens_with_metrics").c_str());
    const auto& store = doc["engine"].value("row_store", nlohmann::json::object());
    if (store.value("spilled_bytes", int64_t(0)) > 0)
        std::printf("  row store: %s spilled to disk in %lld flushes (host_memory_limit)\n",
                    format_bytes(store["spilled_bytes"].get<int64_t>()).c_str(), (long long)store["spill_flushes"].get<int64_t>());
}


// --from-checkpoint: the report of a saved (or merged) first pass, with no input rows.
void analyze_checkpoint(const AnalyzeArgs& a, Config cfg, bool quiet) {
    if (!a.features.empty() || !a.hidden.empty() || !a.safetensors.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--from-checkpoint takes no input files (the rows are in the checkpoint)");
    const Config saved = Session::checkpoint_config(a.from_checkpoint);
    if (a.config.empty()) cfg = saved;
    cfg.num_classes = saved.num_classes;
    cfg.batch_rows = saved.batch_rows;
    Session session(cfg);
    if (!a.classifier.empty())
        apply_classifier(session, need_2d(io::open_npy(a.classifier), "classifier"),
                         a.bias.empty() ? std::nullopt : std::optional<io::Tensor>(io::open_npy(a.bias)));
    session.load_checkpoint(a.from_checkpoint);
    auto report = session.compute(true);
    if (session.needs_second_pass() || cfg.compute_nc4)
        report->doc["overall_analysis"]["notes"]["from_checkpoint"] =
            "computed from a checkpoint: metrics that need the rows again (NC4 without a row store) are null";
    write_report_file(report->doc, a.output);
    if (!quiet) print_headline(report->doc, a.output);
}

void run_analyze(const AnalyzeArgs& a) {
    Config cfg = a.config.empty() ? Config{} : load_yaml_file(a.config);
    if (a.batch_rows > 0) cfg.batch_rows = a.batch_rows;
    if (a.backend == "cuda") cfg.backend = COLLAPSE_BACKEND_CUDA;
    else if (a.backend == "cpu") cfg.backend = COLLAPSE_BACKEND_CPU;
    // --quiet, or a log_level above info, silences progress and informational lines.
    const bool quiet = a.quiet || cfg.log_level == "warning" || cfg.log_level == "error";
    const bool debug = !a.quiet && cfg.log_level == "debug";

    if (!a.from_checkpoint.empty()) {
        analyze_checkpoint(a, cfg, quiet);
        return;
    }
    if (a.resume && a.checkpoint.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--resume needs --checkpoint FILE");
    Input in = open_input(a);
    // V: the flag, the config, the classifier, or the largest label + 1.
    int64_t V = a.num_classes > 0 ? a.num_classes : cfg.num_classes;
    if (V <= 0 && in.classifier) V = in.classifier->shape[0];
    if (V <= 0 && in.synth) V = in.synth->spec().classes;
    if (V <= 0) V = max_label(in.sequences() ? *in.input_ids : *in.labels) + 1;
    if (V <= 0) V = 1;  // no labels at all: an empty report
    if (in.classifier && in.classifier->shape[0] != V)
        fail(COLLAPSE_ERR_SHAPE, "classifier '", in.classifier->name, "' has ", in.classifier->shape[0], " rows, but V = ", V);
    cfg.num_classes = V;
    Session session(cfg);

    std::vector<float> synth_w;
    if (in.classifier) {
        apply_classifier(session, *in.classifier, in.bias);
    } else if (in.synth) {
        const auto& sp = in.synth->spec();
        synth_w.resize((size_t)(sp.classes * sp.dim));
        in.synth->classifier(synth_w.data());
        const collapse_buffer w{synth_w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, sp.classes, sp.dim, 0};
        session.set_classifier(&w, nullptr);
        if (!quiet)
            std::fprintf(stderr, "no input given: analysing the built-in synthetic data set (%lld rows, d = %lld, V = %lld, collapse %.2f)\n",
                         (long long)sp.rows, (long long)sp.dim, (long long)sp.classes, sp.collapse);
    }

    const int64_t total = in.synth ? in.synth->spec().rows
                          : in.sequences() ? in.hidden->shape[0] * std::max<int64_t>(0, in.hidden->shape[1] - 1)
                                           : in.features->rows();
    std::vector<int32_t> synth_labels;
    std::vector<uint8_t> synth_features;

    // One pass over the input, in batches of cfg.batch_rows rows (whole sequences).
    // --resume: continue after the input position of the last checkpoint.
    int64_t start = 0;
    if (a.resume && std::filesystem::exists(a.checkpoint)) {
        session.load_checkpoint(a.checkpoint);
        start = session.input_position();
        if (!quiet) std::fprintf(stderr, "resuming from %s at input position %lld\n", a.checkpoint.c_str(), (long long)start);
    }
    auto pass = [&](const char* phase, bool first) {
        Progress progress(quiet, total);
        int64_t done = 0, batch_index = 0;
        const int64_t from = first ? start : 0;
        auto feed = [&](auto&& ingest_batch, int64_t rows_in_batch) {
            try {
                const auto tb = Clock::now();
                ingest_batch();
                if (debug)
                    std::fprintf(stderr, "collapse: %s batch %lld: %lld rows in %.3f s\n", phase, (long long)batch_index,
                                 (long long)rows_in_batch, std::chrono::duration<double>(Clock::now() - tb).count());
            } catch (const Error& e) {
                if (!cfg.continue_on_error) throw;
                if (first) session.note_failed_batch();  // the second pass meets the same batch again
                if (cfg.log_level != "error")
                    std::fprintf(stderr, "collapse: batch %lld skipped (continue_on_error): %s\n", (long long)batch_index, e.what());
            }
            done += rows_in_batch;
            ++batch_index;
            progress.update(done, phase);
            if (first && !a.checkpoint.empty() && batch_index % cfg.save_every == 0) session.save_checkpoint(a.checkpoint);
            if (first && cfg.save_intermediate_results && batch_index % cfg.save_every == 0) {
                std::filesystem::create_directories(cfg.intermediate_save_dir);
                const std::string p = cfg.intermediate_save_dir + "/report_batch_" + std::to_string(batch_index) + ".json";
                write_report_file(session.compute(false)->doc, p);
            }
        };
        if (in.synth) {
            const auto& sp = in.synth->spec();
            const size_t esz = sp.dtype == COLLAPSE_F64 ? 8 : sp.dtype == COLLAPSE_F32 ? 4 : 2;
            for (int64_t r0 = from; r0 < sp.rows; r0 += cfg.batch_rows) {
                const int64_t n = std::min(cfg.batch_rows, sp.rows - r0);
                synth_labels.resize((size_t)n);
                synth_features.resize((size_t)(n * sp.dim) * esz);
                in.synth->labels(r0, n, synth_labels.data());
                in.synth->features(r0, n, synth_labels.data(), synth_features.data());
                const collapse_buffer f{synth_features.data(), sp.dtype, COLLAPSE_MEMORY_HOST, n, sp.dim, 0};
                const collapse_buffer l{synth_labels.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
                session.set_row_offset(r0);
                feed([&] { session.ingest_rows(&f, &l, nullptr, nullptr); }, n);
            }
        } else if (in.sequences()) {
            const int64_t B = in.hidden->shape[0], T = in.hidden->shape[1], d = in.hidden->shape[2];
            const int64_t per = std::max<int64_t>(1, cfg.batch_rows / std::max<int64_t>(1, T));
            for (int64_t b0 = from; b0 < B; b0 += per) {
                const int64_t nb = std::min(per, B - b0);
                const collapse_buffer h{in.hidden->row(b0), in.hidden->dtype, COLLAPSE_MEMORY_HOST, nb * T, d, 0};
                const collapse_buffer ids = buffer_of(*in.input_ids, b0, nb, T);
                std::optional<collapse_buffer> m;
                if (in.mask) m = buffer_of(*in.mask, b0, nb, T);
                session.set_row_offset(b0);
                feed([&] { session.ingest_sequences(&h, &ids, m ? &*m : nullptr, nb, T, nullptr); }, nb * std::max<int64_t>(0, T - 1));
                in.hidden->release_rows(b0, b0 + nb);
            }
        } else {
            const int64_t N = in.features->rows(), d = in.features->shape[1];
            for (int64_t r0 = from; r0 < N; r0 += cfg.batch_rows) {
                const int64_t n = std::min(cfg.batch_rows, N - r0);
                const collapse_buffer f = buffer_of(*in.features, r0, n, d);
                const collapse_buffer l = buffer_of(*in.labels, r0, n, 1);
                session.set_row_offset(r0);
                feed([&] { session.ingest_rows(&f, &l, nullptr, nullptr); }, n);
                in.features->release_rows(r0, r0 + n);
            }
        }
        progress.finish();
    };

    pass("ingest", true);
    if (!a.checkpoint.empty()) session.save_checkpoint(a.checkpoint);  // the whole first pass
    if (session.needs_second_pass()) {
        session.begin_second_pass();
        pass("second pass", false);
    }
    auto report = session.compute(true);
    if (session.failed_batches() > 0) report->doc["counts"]["batches_failed"] = session.failed_batches();
    write_report_file(report->doc, a.output);
    if (!quiet) print_headline(report->doc, a.output);
}

}  // namespace

void add_analyze_command(CLI::App& app) {
    auto args = std::make_shared<AnalyzeArgs>();
    CLI::App* sub = app.add_subcommand("analyze", "Analyse a dump (or, with no input, the built-in synthetic data) into a JSON report");
    sub->add_option("--features", args->features, "features .npy [N, d] (float16/bfloat16/float32/float64)");
    sub->add_option("--labels", args->labels, "labels .npy [N] (int32/int64): the NEXT token of each row");
    sub->add_option("--classifier", args->classifier, "classifier W .npy [V, d]");
    sub->add_option("--bias", args->bias, "classifier bias .npy [V]");
    sub->add_option("--hidden", args->hidden, "sequence layout: hidden states .npy [B, T, d]");
    sub->add_option("--input-ids", args->input_ids, "sequence layout: token ids .npy [B, T]");
    sub->add_option("--attention-mask", args->attention_mask, "sequence layout: attention mask .npy [B, T]");
    sub->add_option("--safetensors", args->safetensors, "read tensors from this .safetensors file");
    sub->add_option("--features-key", args->features_key, "safetensors: features tensor name")->capture_default_str();
    sub->add_option("--labels-key", args->labels_key, "safetensors: labels tensor name")->capture_default_str();
    sub->add_option("--classifier-key", args->classifier_key, "safetensors: classifier tensor name");
    sub->add_option("--hidden-key", args->hidden_key, "safetensors: hidden states tensor name (sequence layout)");
    sub->add_option("--input-ids-key", args->input_ids_key, "safetensors: input ids tensor name");
    sub->add_option("--attention-mask-key", args->attention_mask_key, "safetensors: attention mask tensor name");
    sub->add_option("--config", args->config, "YAML config (see configs/default.yaml)");
    sub->add_option("--batch-rows", args->batch_rows, "rows per batch (default 65536, or the config's batch_rows)")
        ->check(CLI::PositiveNumber);
    sub->add_option("--num-classes", args->num_classes, "V (default: classifier rows, else the largest label + 1)")
        ->check(CLI::PositiveNumber);
    sub->add_option("--backend", args->backend, "cpu or cuda (overrides the config)")->check(CLI::IsMember({"cpu", "cuda"}));
    sub->add_option("--output,-o", args->output, "report path")->capture_default_str();
    sub->add_flag("--quiet,-q", args->quiet, "no progress and no summary");
    sub->add_option("--checkpoint", args->checkpoint,
                    "write a crash-safe checkpoint of the first pass here every save_every batches and at its end");
    sub->add_flag("--resume", args->resume, "continue from --checkpoint if it exists (same input and config)");
    sub->add_option("--from-checkpoint", args->from_checkpoint, "report of a saved or merged checkpoint, without input files");
    sub->callback([args] { run_analyze(*args); });
}

}  // namespace collapse::internal
