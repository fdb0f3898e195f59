#include "cli/analyze_cmd.hpp"

#include <unistd.h>

#include <CLI/CLI.hpp>

#include <chrono>
#include <csignal>
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
#include "driver/analysis.hpp"
#include "driver/row_source.hpp"
#include "io/tensor_file.hpp"
#include "io/output_file.hpp"
#include "io/session_checkpoint.hpp"
#include "report/report.hpp"

namespace collapse::internal {

namespace {

struct AnalyzeArgs {
    std::string features, labels, mask, classifier, bias, config;
    std::string hidden, input_ids, attention_mask;
    std::string sequence_ids, positions;  // rows layout: windows (docs/METRICS.md)
    std::string safetensors, features_key = "features", labels_key = "labels", mask_key, classifier_key;
    std::string hidden_key, input_ids_key, attention_mask_key;
    bool keys_given = false;  // a --features-key or --labels-key was given explicitly
    bool synthetic = false;
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
    explicit Progress(bool quiet) : quiet_(quiet), t0_(Clock::now()), last_(t0_) {}
    void update(int64_t done, int64_t total, const char* phase) {
        if (quiet_) return;
        const auto now = Clock::now();
        const double el = std::chrono::duration<double>(now - t0_).count();
        if (el < 1.0 || std::chrono::duration<double>(now - last_).count() < 0.5) return;
        last_ = now;
        shown_ = true;
        std::fprintf(stderr, "%s%s: %lld rows, %.0f rows/s, %.1f%%%s", tty_ ? "\r" : "", phase, (long long)done,
                     done / el, total > 0 ? 100.0 * (double)done / (double)total : 100.0, tty_ ? "" : "\n");
        std::fflush(stderr);
    }
    void finish() {
        if (shown_ && tty_) std::fprintf(stderr, "\n");
    }

private:
    bool quiet_;
    Clock::time_point t0_, last_;
    bool shown_ = false;
    bool tty_ = isatty(2) != 0;
};

std::string g_command_line;  // recorded in reports (set_command_line)

// SIGINT, SIGTERM and SIGHUP end a run between batches (the driver polls): the session's
// destructors remove spill directories and temporary files, and the process exits 128 + n.
volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_signal(int sig) { g_signal = sig; }
void install_signal_handlers() {
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;  // a write to a spill file must not fail with EINTR
    sigemptyset(&sa.sa_mask);
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
}

io::Tensor need_2d(io::Tensor t, const char* what) {
    if (t.shape.size() != 2) fail(COLLAPSE_ERR_SHAPE, what, " '", t.name, "' must be 2-D, has ", t.shape.size(), " dimensions");
    return t;
}

// Classifier names tried in a .safetensors file when --classifier-key is not given.
const char* const kClassifierNames[] = {"classifier", "lm_head.weight", "output.weight", "classifier.weight"};

// The input: a row source, and the classifier that comes with it.
struct Input {
    std::unique_ptr<driver::RowSource> rows;
    std::optional<io::Tensor> classifier, bias;
    std::string classifier_note;  // how the classifier was found, when it was not named
};

Input open_input(const AnalyzeArgs& a, bool quiet) {
    const bool rows_flags = !a.features.empty() || !a.labels.empty() || !a.mask.empty();
    const bool seq_flags = !a.hidden.empty() || !a.input_ids.empty() || !a.attention_mask.empty() || !a.hidden_key.empty() ||
                           !a.input_ids_key.empty() || !a.attention_mask_key.empty();
    const bool files = rows_flags || seq_flags || !a.safetensors.empty();
    if (rows_flags && seq_flags)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "both the rows layout (--features/--labels/--mask) and the sequence layout ",
             "(--hidden/--input-ids/--attention-mask) were given: choose one");
    if (a.synthetic && files) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--synthetic takes no input files");
    if (!a.synthetic && !files)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "no input: give --features F --labels L, --hidden H --input-ids I, ",
             "--safetensors FILE, or --synthetic for the built-in synthetic data set");
    if (a.safetensors.empty() && (a.keys_given || !a.classifier_key.empty()))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "a --*-key option names a tensor of --safetensors FILE, which was not given");
    if (!a.safetensors.empty() && (!a.features.empty() || !a.labels.empty() || !a.mask.empty() || !a.hidden.empty() ||
                                   !a.input_ids.empty() || !a.attention_mask.empty()))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--safetensors reads its tensors by key (--features-key, --hidden-key, ...); ",
             "do not also give .npy files for them");
    const bool tags = !a.sequence_ids.empty() || !a.positions.empty();
    if (tags && a.synthetic)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, !a.sequence_ids.empty() ? "--sequence-ids" : "--positions",
             " tags rows of --features files; --synthetic has none");
    if (tags && seq_flags)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, !a.sequence_ids.empty() ? "--sequence-ids" : "--positions",
             " is for the rows layout; the sequence layout (--hidden/--input-ids) tags its rows itself (sequence = its index, position = t)");
    if (!a.positions.empty() && a.sequence_ids.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--positions needs --sequence-ids");
    auto npy_opt = [](const std::string& path) { return path.empty() ? std::nullopt : std::optional<io::Tensor>(io::open_npy(path)); };
    if (!a.bias.empty() && a.classifier.empty() && a.classifier_key.empty() && a.safetensors.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--bias needs a classifier (--classifier)");

    Input in;
    if (a.synthetic) {
        in.rows = driver::synthetic_rows(SynthSpec{});
    } else if (!a.safetensors.empty()) {
        io::SafetensorsFile st(a.safetensors);
        const bool seq = seq_flags;
        auto opt = [&](const std::string& key) { return key.empty() ? std::nullopt : std::optional<io::Tensor>(st.tensor(key)); };
        if (seq) {
            if (a.hidden_key.empty() || a.input_ids_key.empty())
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the sequence layout of --safetensors needs --hidden-key and --input-ids-key");
            in.rows = driver::tensor_sequences(st.tensor(a.hidden_key), st.tensor(a.input_ids_key), opt(a.attention_mask_key),
                                               "safetensors");
        } else {
            in.rows = driver::tensor_rows(st.tensor(a.features_key), st.tensor(a.labels_key), opt(a.mask_key), "safetensors",
                                          npy_opt(a.sequence_ids), npy_opt(a.positions));
        }
        if (!a.classifier_key.empty()) {
            in.classifier = need_2d(st.tensor(a.classifier_key), "classifier");
        } else if (a.classifier.empty()) {
            for (const char* name : kClassifierNames)
                if (st.has(name)) {
                    in.classifier = need_2d(st.tensor(name), "classifier");
                    in.classifier_note = std::string("classifier: tensor '") + name + "' of " + a.safetensors +
                                         " (found by its conventional name; --classifier-key chooses another)";
                    break;
                }
        }
    } else if (rows_flags) {
        if (a.features.empty() || a.labels.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the rows layout needs both --features and --labels");
        in.rows = driver::tensor_rows(io::open_npy(a.features), io::open_npy(a.labels),
                                      a.mask.empty() ? std::nullopt : std::optional<io::Tensor>(io::open_npy(a.mask)), "npy",
                                      npy_opt(a.sequence_ids), npy_opt(a.positions));
    } else {
        if (a.hidden.empty() || a.input_ids.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "the sequence layout needs both --hidden and --input-ids");
        in.rows = driver::tensor_sequences(io::open_npy(a.hidden), io::open_npy(a.input_ids),
                                           a.attention_mask.empty() ? std::nullopt : std::optional<io::Tensor>(io::open_npy(a.attention_mask)),
                                           "npy");
    }
    if (!a.classifier.empty()) in.classifier = need_2d(io::open_npy(a.classifier), "classifier");
    if (!a.bias.empty()) in.bias = io::open_npy(a.bias);
    if (!in.classifier_note.empty() && !quiet) std::fprintf(stderr, "%s\n", in.classifier_note.c_str());
    return in;
}

collapse_buffer buffer_of(const io::Tensor& t, int64_t rows, int64_t cols) {
    return collapse_buffer{t.data(), t.dtype, COLLAPSE_MEMORY_HOST, rows, cols, 0};
}

void apply_classifier(Session& session, const io::Tensor& w, const std::optional<io::Tensor>& bias) {
    const collapse_buffer wb = buffer_of(w, w.shape[0], w.shape[1]);
    std::optional<collapse_buffer> bb;
    if (bias) bb = buffer_of(*bias, bias->numel(), 1);
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
    // Rows dropped as "no target" (ignore_index) are said, so that a count that looks low is explained.
    const int64_t ignored = doc["counts"].value("rows_ignored", int64_t(0));
    const std::string ignored_text =
        ignored > 0 ? " (" + num("counts", "rows_ignored") + " ignored: label " + doc["config"].value("ignore_index", nlohmann::json()).dump() + ")" : "";
    std::printf("  rows kept %s of %s%s, classes kept %s\n", num("counts", "rows_kept").c_str(), num("counts", "rows_seen").c_str(),
                ignored_text.c_str(), num("counts", "classes_kept").c_str());
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
    if (!a.features.empty() || !a.hidden.empty() || !a.safetensors.empty() || a.synthetic || !a.labels.empty() ||
        !a.input_ids.empty() || !a.sequence_ids.empty() || !a.positions.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--from-checkpoint takes no input files (the rows are in the checkpoint)");
    if (!a.checkpoint.empty() || a.resume)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--from-checkpoint reads a checkpoint; --checkpoint/--resume do not apply");
    const Config saved = io::checkpoint_config(a.from_checkpoint);
    if (a.config.empty()) cfg = saved;
    cfg.num_classes = saved.num_classes;
    cfg.batch_rows = saved.batch_rows;
    Session session(cfg);
    if (!a.classifier.empty())
        apply_classifier(session, need_2d(io::open_npy(a.classifier), "classifier"),
                         a.bias.empty() ? std::nullopt : std::optional<io::Tensor>(io::open_npy(a.bias)));
    io::load_checkpoint(session, a.from_checkpoint);
    if (session.expects_classifier() && cfg.compute_class_metrics)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", a.from_checkpoint, " was made with a classifier (hash ",
             session.checkpoint_classifier_hash(), "): pass it with --classifier (and --bias) so that UNC3 and NC3 are computed");
    nlohmann::json doc = build_report(cfg, session.compute(true));
    if (cfg.compute_nc4)
        doc["overall_analysis"]["notes"]["nc4_agreement"] =
            "computed from a checkpoint: NC4 needs the rows again unless a row store is kept";
    doc["input"] = {{"kind", "checkpoint"}, {"path", a.from_checkpoint}};
    doc["run"] = {{"command", g_command_line}};
    write_report_file(doc, a.output);
    if (!quiet) print_headline(doc, a.output);
}

// Every path option given on the command line must name something: an empty shell variable
// (--features "") must not fall back to a default.
void refuse_empty_paths(const CLI::App& sub) {
    for (const CLI::Option* opt : sub.get_options()) {
        if (opt->count() == 0 || opt->get_type_size() == 0) continue;
        for (const std::string& v : opt->results())
            if (v.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, opt->get_name(), " was given an empty value");
    }
}

// No output may be an input or another output (compared by device and inode): a report written
// over the labels file, or a checkpoint over the report, would destroy what it names.
void check_files(const AnalyzeArgs& a) {
    std::vector<io::FileArg> in, out;
    const std::pair<const char*, const std::string*> inputs[] = {
        {"--features", &a.features}, {"--labels", &a.labels}, {"--mask", &a.mask}, {"--classifier", &a.classifier},
        {"--bias", &a.bias}, {"--config", &a.config}, {"--hidden", &a.hidden}, {"--input-ids", &a.input_ids},
        {"--attention-mask", &a.attention_mask}, {"--safetensors", &a.safetensors}, {"--from-checkpoint", &a.from_checkpoint},
        {"--sequence-ids", &a.sequence_ids}, {"--positions", &a.positions}};
    for (const auto& [what, path] : inputs)
        if (!path->empty()) in.push_back({what, *path});
    out.push_back({"--output", a.output});
    if (!a.checkpoint.empty()) out.push_back({"--checkpoint", a.checkpoint});
    io::check_outputs_distinct(in, out);
}

int run_analyze(const AnalyzeArgs& a) {
    check_files(a);
    Config cfg = a.config.empty() ? Config{} : load_yaml_file(a.config);
    if (a.batch_rows > 0) cfg.batch_rows = a.batch_rows;
    if (a.backend == "cuda") cfg.backend = COLLAPSE_BACKEND_CUDA;
    else if (a.backend == "cpu") cfg.backend = COLLAPSE_BACKEND_CPU;
    // --quiet, or a log_level above info, silences progress and informational lines.
    const bool quiet = a.quiet || cfg.log_level == "warning" || cfg.log_level == "error";
    const bool debug = !a.quiet && cfg.log_level == "debug";

    if (!a.from_checkpoint.empty()) {
        analyze_checkpoint(a, cfg, quiet);
        return 0;
    }
    if (a.resume && a.checkpoint.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--resume needs --checkpoint FILE");
    Input in = open_input(a, quiet);
    driver::RowSource& src = *in.rows;
    // V: the flag, the config, the classifier, or the largest label + 1.
    int64_t V = a.num_classes > 0 ? a.num_classes : cfg.num_classes;
    if (V <= 0 && in.classifier) V = in.classifier->shape[0];
    if (V <= 0) V = src.label_bound();
    if (V <= 0) V = 1;  // no labels at all: an empty report
    if (in.classifier && in.classifier->shape[0] != V) {
        const auto& s = in.classifier->shape;
        if (s[1] == V && s[0] == src.dim())
            fail(COLLAPSE_ERR_SHAPE, "classifier '", in.classifier->name, "' has shape [", s[0], ", ", s[1], "]: it looks transposed; ",
                 "expected [V, d] = [", V, ", ", src.dim(), "]");
        fail(COLLAPSE_ERR_SHAPE, "classifier '", in.classifier->name, "' has ", s[0], " rows, but V = ", V);
    }
    cfg.num_classes = V;
    Session session(cfg);

    if (in.classifier) {
        apply_classifier(session, *in.classifier, in.bias);
    } else if (const std::vector<float> w = src.built_in_classifier(); !w.empty()) {
        const collapse_buffer wb{w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, V, src.dim(), 0};
        session.set_classifier(&wb, nullptr);
    }
    if (a.synthetic && !quiet)
        std::fprintf(stderr, "analysing the built-in synthetic data set (%lld rows, d = %lld, V = %lld)\n",
                     (long long)src.length(), (long long)src.dim(), (long long)V);

    driver::AnalysisOptions opt;
    opt.checkpoint = a.checkpoint;
    opt.resume = a.resume;
    opt.command = g_command_line;
    Progress progress(quiet);
    opt.progress = [&](const char* phase, int64_t done, int64_t total) { progress.update(done, total, phase); };
    if (cfg.log_level != "error") opt.warn = [](const std::string& m) { std::fprintf(stderr, "collapse: %s\n", m.c_str()); };
    if (debug) opt.debug = [](const std::string& m) { std::fprintf(stderr, "collapse: %s\n", m.c_str()); };
    opt.interrupted = [] { return (int)g_signal; };
    install_signal_handlers();
    driver::AnalysisOutcome out = driver::run_analysis(session, src, opt);
    progress.finish();
    if (out.resumed_at >= 0 && !quiet)
        std::fprintf(stderr, "resumed from %s at input position %lld\n", a.checkpoint.c_str(), (long long)out.resumed_at);
    write_report_file(out.report, a.output);
    if (!quiet) print_headline(out.report, a.output);
    const EngineInfo& e = out.result.engine;
    if (e.batches_failed > 0) {
        // Loud, whatever the log level: the report covers fewer rows than the input has.
        std::fprintf(stderr,
                     "collapse: WARNING: %lld batch(es) with %lld rows were skipped under continue_on_error; the report "
                     "covers the other rows only (counts.batches_failed, counts.rows_skipped). Exit status %d.\n",
                     (long long)e.batches_failed, (long long)e.rows_skipped, kExitRowsSkipped);
        return kExitRowsSkipped;
    }
    return 0;
}

}  // namespace

void set_command_line(int argc, char** argv) {
    g_command_line.clear();
    for (int i = 0; i < argc; ++i) g_command_line += (i ? " " : "") + std::string(argv[i]);
}

void add_analyze_command(CLI::App& app) {
    auto args = std::make_shared<AnalyzeArgs>();
    CLI::App* sub = app.add_subcommand("analyze", "Analyse a dump (or, with no input, the built-in synthetic data) into a JSON report");
    sub->add_option("--features", args->features, "features .npy [N, d] (float16/bfloat16/float32/float64)");
    sub->add_option("--labels", args->labels, "labels .npy [N] or [N, 1] (int32/int64): the NEXT token of each row");
    sub->add_option("--mask", args->mask, "rows layout: valid .npy [N] (nonzero = analyse the row)");
    sub->add_flag("--synthetic", args->synthetic, "analyse the built-in synthetic data set (200,000 rows, d = 256, V = 2048)");
    sub->add_option("--classifier", args->classifier, "classifier W .npy [V, d]");
    sub->add_option("--bias", args->bias, "classifier bias .npy [V]");
    sub->add_option("--hidden", args->hidden, "sequence layout: hidden states .npy [B, T, d]");
    sub->add_option("--input-ids", args->input_ids, "sequence layout: token ids .npy [B, T]");
    sub->add_option("--attention-mask", args->attention_mask, "sequence layout: attention mask .npy [B, T]");
    sub->add_option("--sequence-ids", args->sequence_ids,
                    "rows layout: sequence id of each row .npy [N] or [N, 1] (int32/int64), for the generation-time window "
                    "entropy (report sections sequence_analysis, window_summary; config window_size)");
    sub->add_option("--positions", args->positions,
                    "rows layout: position of each row within its sequence .npy [N] or [N, 1] (int32/int64, >= 0; default: "
                    "file order within the sequence)");
    sub->add_option("--safetensors", args->safetensors, "read tensors from this .safetensors file");
    sub->add_option("--features-key", args->features_key, "safetensors: features tensor name")->capture_default_str();
    sub->add_option("--labels-key", args->labels_key, "safetensors: labels tensor name")->capture_default_str();
    sub->add_option("--mask-key", args->mask_key, "safetensors: valid mask tensor name (rows layout)");
    sub->add_option("--classifier-key", args->classifier_key,
                    "safetensors: classifier tensor name (default: the first of classifier, lm_head.weight, output.weight, "
                    "classifier.weight that exists)");
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
    sub->callback([args, sub] {
        refuse_empty_paths(*sub);
        args->keys_given = sub->count("--features-key") + sub->count("--labels-key") + sub->count("--mask-key") > 0;
        const int status = run_analyze(*args);
        if (status != 0) throw CLI::RuntimeError(status);
    });
}

}  // namespace collapse::internal
