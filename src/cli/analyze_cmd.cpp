#include "cli/analyze_cmd.hpp"

#include <unistd.h>

#include <CLI/CLI.hpp>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/cli_checks.hpp"
#include "core/config.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "base/interrupt.hpp"
#include "core/session.hpp"
#include "core/synth.hpp"
#include "driver/analysis.hpp"
#include "driver/row_source.hpp"
#include "io/tensor_file.hpp"
#include "io/tokenizer.hpp"
#include "core/host_budget.hpp"
#include "report/exports.hpp"
#include "driver/ood_mean.hpp"
#include "io/output_file.hpp"
#include "io/session_checkpoint.hpp"
#include "report/report.hpp"
#if COLLAPSE_HAVE_MPI
#include "mpi/mpi_cli.hpp"
#endif

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
    bool mpi = false;  // run as a rank of an MPI job (also when a launcher's environment is found)
    std::string tokenizer;                  // token strings (llama2.c .bin or tokenizer.json)
    std::string export_dir;                 // class means, ids, per-class arrays, the CSV
    std::string nc4_features, nc4_labels;   // held-out NC4 rows
    std::string ood_features;               // nc5_ood_dev: out-of-distribution rows (their mean)
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

// SIGINT, SIGTERM and SIGHUP end a run between batches (the driver polls) or at the next tile or
// class of a compute (base/interrupt.hpp): the session's destructors remove spill directories and
// temporary files, and the process exits 128 + n.
extern "C" void on_signal(int sig) { request_interrupt(sig); }
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
    if (a.safetensors.empty() && (a.keys_given || !a.classifier_key.empty() || !a.hidden_key.empty() || !a.input_ids_key.empty() ||
                                  !a.attention_mask_key.empty()))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "a --*-key option names a tensor of --safetensors FILE, which was not given");
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


// Config changes that follow from the flags (both the input and the --from-checkpoint paths).
void apply_run_flags(const AnalyzeArgs& a, Config& cfg) {
    if (!a.export_dir.empty()) {
        cfg.per_class_arrays = true;  // what the exports are made of
        cfg.keep_class_means = true;
        cfg.keep_sigma_w = true;
    }
    if (a.nc4_features.empty() != a.nc4_labels.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "held-out NC4 needs both --nc4-features and --nc4-labels");
    if (!a.nc4_features.empty()) {
        cfg.nc4_held_out = true;
        cfg.compute_nc4 = true;
    }
    if (cfg.exclude_special_tokens && a.tokenizer.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "exclude_special_tokens: true needs --tokenizer FILE (the special ids come from it)");
}

// The held-out NC4 rows (null without --nc4-features), checked against V (V < 0: later) before the run.
std::unique_ptr<driver::RowSource> open_held_out(const AnalyzeArgs& a, const Config& cfg, int64_t dim) {
    if (a.nc4_features.empty()) return nullptr;
    auto src = driver::tensor_rows(io::open_npy(a.nc4_features), io::open_npy(a.nc4_labels), std::nullopt, "npy");
    if (dim > 0 && src->dim() != dim)
        fail(COLLAPSE_ERR_SHAPE, "--nc4-features ", a.nc4_features, " has rows of width ", src->dim(), ", the input's are ", dim);
    if (src->label_bound() > cfg.num_classes)
        fail(COLLAPSE_ERR_BAD_INPUT, "--nc4-labels ", a.nc4_labels, " has label ", src->label_bound() - 1, ", outside [0, V = ",
             cfg.num_classes, ")");
    return src;
}

// --tokenizer, read for V = cfg.num_classes (counted in host_memory_limit first); its special ids
// join exclude_token_ids under exclude_special_tokens.
std::optional<io::Tokenizer> open_tokenizer(const AnalyzeArgs& a, Config& cfg) {
    if (a.tokenizer.empty()) return std::nullopt;
    constexpr size_t kMaxTokenizerBytes = size_t(1) << 30;
    std::error_code ec;
    const auto file_bytes = std::filesystem::file_size(a.tokenizer, ec);
    const std::shared_ptr<HostBudget> budget = HostBudget::from_config(cfg);
    budget->check(io::tokenizer_bytes(ec ? 0 : (int64_t)std::min<uintmax_t>(file_bytes, kMaxTokenizerBytes), cfg.num_classes),
                  "the tokenizer " + a.tokenizer + " (its text and the strings of V = " + std::to_string(cfg.num_classes) + " ids)",
                  "raise host_memory_limit, or leave out --tokenizer");
    io::Tokenizer tok = io::load_tokenizer(a.tokenizer, cfg.num_classes, kMaxTokenizerBytes);
    if (cfg.exclude_special_tokens) {
        std::vector<int64_t>& ex = cfg.exclude_token_ids;
        ex.insert(ex.end(), tok.special_ids.begin(), tok.special_ids.end());
        std::sort(ex.begin(), ex.end());
        ex.erase(std::unique(ex.begin(), ex.end()), ex.end());
    }
    return tok;
}

// Token strings, the exports, then the report (the last file written says the run is complete).
void finish_outputs(const AnalyzeArgs& a, const Result& result, nlohmann::json& doc, const std::optional<io::Tokenizer>& tok,
                    HostBudget& budget, bool quiet) {
    if (tok) add_token_strings(doc, *tok);
    if (!a.export_dir.empty()) {
        const std::vector<std::string> files = write_exports(a.export_dir, result, doc, budget);
        if (!quiet) std::printf("exports written to %s (%zu files)\n", a.export_dir.c_str(), files.size());
    }
    write_report_file(doc, a.output);
}

// --from-checkpoint: the report of a saved (or merged) first pass, with no input rows.
// nc5_ood_dev: the mean of --ood-features's rows, of the input's width `dim`.
void apply_ood_mean(const AnalyzeArgs& a, Session& session, int64_t dim, const char* whose) {
    if (a.ood_features.empty()) return;
    const std::vector<double> mean = driver::ood_mean_of_npy(a.ood_features, *session.budget_account());
    if ((int64_t)mean.size() != dim)
        fail(COLLAPSE_ERR_SHAPE, "--ood-features ", a.ood_features, " has rows of width ", mean.size(), ", ", whose, " are ", dim);
    session.set_ood_mean(mean.data(), (int64_t)mean.size());
}

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
    apply_run_flags(a, cfg);
    std::unique_ptr<driver::RowSource> held_out = open_held_out(a, cfg, -1);
    if (held_out && a.classifier.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "held-out NC4 (--nc4-features) compares the classifier's predictions: give --classifier");
    const std::optional<io::Tokenizer> tok = open_tokenizer(a, cfg);
    Session session(cfg);
    if (!a.classifier.empty())
        apply_classifier(session, need_2d(io::open_npy(a.classifier), "classifier"),
                         a.bias.empty() ? std::nullopt : std::optional<io::Tensor>(io::open_npy(a.bias)));
    io::load_checkpoint(session, a.from_checkpoint);
    apply_ood_mean(a, session, session.dim(), "the checkpoint's");
    if (session.expects_classifier() && cfg.compute_class_metrics)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", a.from_checkpoint, " was made with a classifier (hash ",
             session.checkpoint_classifier_hash(), "): pass it with --classifier (and --bias) so that UNC3 and NC3 are computed");
    if (held_out) {
        if (held_out->dim() != session.dim())
            fail(COLLAPSE_ERR_SHAPE, "--nc4-features has rows of width ", held_out->dim(), ", the checkpoint's are ", session.dim());
        driver::AnalysisOptions opt;
        opt.nc4_rows = held_out.get();
        driver::run_held_out_pass(session, *held_out, opt);
    }
    const Result result = session.compute(true);
    nlohmann::json doc = build_report(cfg, result);
    if (cfg.compute_nc4 && !held_out)
        doc["overall_analysis"]["notes"]["nc4_agreement"] =
            "computed from a checkpoint: NC4 needs the rows again unless a row store is kept";
    doc["input"] = {{"kind", "checkpoint"}, {"path", a.from_checkpoint}};
    if (!a.ood_features.empty()) doc["input"]["ood_features"] = a.ood_features;
    if (held_out) doc["input"]["nc4_held_out"] = driver::to_json(held_out->info());
    doc["run"] = {{"command", g_command_line}};
    finish_outputs(a, result, doc, tok, *session.budget_account(), quiet);
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
        {"--sequence-ids", &a.sequence_ids}, {"--positions", &a.positions}, {"--tokenizer", &a.tokenizer},
        {"--nc4-features", &a.nc4_features}, {"--nc4-labels", &a.nc4_labels}, {"--ood-features", &a.ood_features}};
    for (const auto& [what, path] : inputs)
        if (!path->empty()) in.push_back({what, *path});
    out.push_back({"--output", a.output});
    if (!a.checkpoint.empty()) out.push_back({"--checkpoint", a.checkpoint});
    if (!a.export_dir.empty())
        for (const std::string& name : export_file_names()) out.push_back({"--export-dir", a.export_dir + "/" + name});
    io::check_outputs_distinct(in, out);
}

// MPI (src/mpi/, README "MPI"): set while this process is a rank of an MPI run.
struct RankRun {
    bool active = false;
    int rank = 0, size = 1, local_rank = 0, local_size = 1;
};
RankRun g_ranks;

// --checkpoint F under MPI is one file per rank, F.rank{r}of{P}; a resume needs the same P. A
// resume that finds no file of its own but those of another P (or of a run without ranks) is refused.
std::string rank_checkpoint(const std::string& path, int rank, int size) {
    return size > 1 || g_ranks.active ? path + ".rank" + std::to_string(rank) + "of" + std::to_string(size) : path;
}
void check_rank_checkpoints(const AnalyzeArgs& a) {
    if (!a.resume || a.checkpoint.empty()) return;
    const std::string mine = rank_checkpoint(a.checkpoint, g_ranks.rank, g_ranks.size);
    std::error_code ec;
    if (std::filesystem::exists(mine, ec)) return;
    const std::filesystem::path p(a.checkpoint);
    const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : std::filesystem::path(".");
    const std::string stem = p.filename().string() + ".rank";
    for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string n = it->path().filename().string();
        const size_t of = n.rfind("of");
        if (n.rfind(stem, 0) != 0 || of == std::string::npos || of < stem.size()) continue;
        const std::string P = n.substr(of + 2);
        if (P.empty() || P.find_first_not_of("0123456789") != std::string::npos || P == std::to_string(g_ranks.size)) continue;
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot resume: ", it->path().string(), " is a checkpoint of a run on ", P,
             " MPI ranks, this run has ", g_ranks.size, g_ranks.active ? "" : " (no MPI)", "; resume with the same number of ranks (",
             "mpirun -np ", P, ")");
    }
    if (g_ranks.active && std::filesystem::exists(a.checkpoint, ec))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot resume: ", a.checkpoint, " is a checkpoint of a run without MPI, this run has ",
             g_ranks.size, " ranks (their checkpoints are ", a.checkpoint, ".rank{r}of", g_ranks.size, ")");
}

// This rank's share of the input, its checkpoint file, the combine hooks, and its messages.
void apply_ranks(driver::RowSource& src, driver::AnalysisOptions& opt) {
    if (!g_ranks.active) return;
#if COLLAPSE_HAVE_MPI
    const auto [first, end] = driver::rank_share(src, g_ranks.rank, g_ranks.size);
    opt.first = first, opt.end = end;
    if (!opt.checkpoint.empty()) opt.checkpoint = rank_checkpoint(opt.checkpoint, g_ranks.rank, g_ranks.size);
    opt.ranks = mpi::world_hooks(mpi::World{g_ranks.rank, g_ranks.size, g_ranks.local_rank, g_ranks.local_size});
    if (opt.warn) {
        const std::string prefix = "rank " + std::to_string(g_ranks.rank) + ": ";
        opt.warn = [w = opt.warn, prefix](const std::string& m) { w(prefix + m); };
    }
    // Tests: COLLAPSE_TEST_MPI_KILL_RANK=r makes rank r die (SIGKILL) after its first batch.
    if (const char* k = std::getenv("COLLAPSE_TEST_MPI_KILL_RANK"); k && std::atoi(k) == g_ranks.rank)
        opt.progress = [p = opt.progress](const char* phase, int64_t done, int64_t total) {
            if (p) p(phase, done, total);
            std::raise(SIGKILL);
        };
#endif
}

int run_analyze(const AnalyzeArgs& a) {
    check_files(a);
    Config cfg = a.config.empty() ? Config{} : load_yaml_file(a.config);
    if (a.batch_rows > 0) cfg.batch_rows = a.batch_rows;
    if (a.backend == "cuda") cfg.backend = COLLAPSE_BACKEND_CUDA;
    else if (a.backend == "cpu") cfg.backend = COLLAPSE_BACKEND_CPU;
    // --quiet, or a log_level above info, silences progress and informational lines.
    // Under MPI only rank 0 shows progress and the summary.
    const bool quiet = a.quiet || cfg.log_level == "warning" || cfg.log_level == "error" || g_ranks.rank > 0;
    const bool debug = !a.quiet && cfg.log_level == "debug";

    if (!a.export_dir.empty()) prepare_export_dir(a.export_dir);  // before any work
    // A missing or read-only directory is found now, not after the whole run (after the export
    // directory exists: -o may be inside it).
    io::check_output_writable({"--output", a.output});
    if (!a.checkpoint.empty()) io::check_output_writable({"--checkpoint", a.checkpoint});
    if (g_ranks.active && cfg.backend == COLLAPSE_BACKEND_CUDA) {
#if COLLAPSE_HAVE_MPI
        // The ranks of a node spread over its GPUs unless the config names one, which they all use.
        // Ranks that share a device divide its default memory limit (each would otherwise size its
        // buffers to 90% of the device).
        if (cfg.device_pinned) {
            cfg.device_shared_by = g_ranks.local_size;
        } else {
            const mpi::DeviceShare share = mpi::local_device(g_ranks.local_rank, g_ranks.local_size);
            cfg.device_ordinal = share.ordinal;
            cfg.device_shared_by = share.ranks;
        }
#endif
    }
    if (!a.from_checkpoint.empty()) {
        if (g_ranks.active) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--from-checkpoint reads one file: run it without mpirun/srun");
        analyze_checkpoint(a, cfg, quiet);
        return 0;
    }
    apply_run_flags(a, cfg);
    if (a.resume && a.checkpoint.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--resume needs --checkpoint FILE");
    Input in = open_input(a, quiet);
    driver::RowSource& src = *in.rows;
    const int64_t V = driver::resolve_num_classes(a.num_classes, cfg.num_classes, in.classifier ? &*in.classifier : nullptr, src);
    cfg.num_classes = V;
    std::unique_ptr<driver::RowSource> held_out = open_held_out(a, cfg, src.dim());
    const std::optional<io::Tokenizer> tok = open_tokenizer(a, cfg);
    Session session(cfg);
    apply_ood_mean(a, session, src.dim(), "the input's");
    if (held_out && !in.classifier && src.built_in_classifier().empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "held-out NC4 (--nc4-features) compares the classifier's predictions: give --classifier");

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
    opt.nc4_rows = held_out.get();
    Progress progress(quiet);
    opt.progress = [&](const char* phase, int64_t done, int64_t total) { progress.update(done, total, phase); };
    if (cfg.log_level != "error") opt.warn = [](const std::string& m) { std::fprintf(stderr, "collapse: %s\n", m.c_str()); };
    if (debug) opt.debug = [](const std::string& m) { std::fprintf(stderr, "collapse: %s\n", m.c_str()); };
    opt.interrupted = [] { return interrupt_requested(); };
    check_rank_checkpoints(a);
    apply_ranks(src, opt);
    install_signal_handlers();
    driver::AnalysisOutcome out = driver::run_analysis(session, src, opt);
    progress.finish();
    if (!out.computed) return 0;  // an MPI rank other than 0: its rows are in rank 0's report
    if (!a.ood_features.empty()) out.report["input"]["ood_features"] = a.ood_features;
    if (out.resumed_at >= 0 && !quiet)
        std::fprintf(stderr, "resumed from %s at input position %lld\n", a.checkpoint.c_str(), (long long)out.resumed_at);
    finish_outputs(a, out.result, out.report, tok, *session.budget_account(), quiet);
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

// Under mpirun/srun (a launcher's environment) or --mpi: MPI is started, and an error on any rank
// ends every rank (printed, then MPI_Abort), so that no rank waits forever for another.
int run_analyze_ranks(const AnalyzeArgs& a) {
#if COLLAPSE_HAVE_MPI
    if (!a.mpi && mpi::launcher_variable().empty()) return run_analyze(a);
    const mpi::World w = mpi::start();
    g_ranks = RankRun{true, w.rank, w.size, w.local_rank, w.local_size};
    int status = 0;
    try {
        status = run_analyze(a);
    } catch (const driver::AnalysisInterrupted& e) {
        std::fprintf(stderr, "collapse: rank %d of %d interrupted by signal %d: ending every rank, no report written\n", w.rank, w.size, e.signal);
        std::fflush(stderr);
        mpi::abort_all(128 + e.signal);
    } catch (const std::exception& e) {
        if (!mpi::collective(e)) {
            std::fprintf(stderr, "collapse: error: rank %d of %d: %s\n", w.rank, w.size, e.what());
            std::fflush(stderr);
            mpi::abort_all(1);
        }
        // Every rank has the same error (a shared outcome): rank 0 says it, all end normally.
        if (w.rank == 0) std::fprintf(stderr, "collapse: error: %s\n", e.what());
        status = 1;
    }
    mpi::finish();
    return status;
#else
    if (a.mpi) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--mpi: this collapse was built without MPI (install libopenmpi-dev and rebuild)");
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
        if (const char* n = std::getenv(v); n && std::atoi(n) > 1)
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, "started by an MPI launcher (", v, " = ", n, ") but this collapse was built without MPI: ",
                 "every process would analyse every row (install libopenmpi-dev and rebuild)");
    return run_analyze(a);
#endif
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
        ->check(positive());
    sub->add_option("--num-classes", args->num_classes, "V (default: classifier rows, else the largest label + 1)")
        ->check(positive());
    sub->add_option("--backend", args->backend, "cpu or cuda (overrides the config)")->check(CLI::IsMember({"cpu", "cuda"}));
    sub->add_option("--output,-o", args->output, "report path")->capture_default_str();
    sub->add_flag("--quiet,-q", args->quiet, "no progress and no summary");
    sub->add_option("--checkpoint", args->checkpoint,
                    "write a crash-safe checkpoint of the first pass here every save_every batches and at its end");
    sub->add_flag("--resume", args->resume, "continue from --checkpoint if it exists (same input and config)");
    sub->add_flag("--mpi", args->mpi,
                  "run as one rank of an MPI job (implied under mpirun/srun): each rank reads its share of the rows, rank 0 "
                  "writes the report; --checkpoint F becomes F.rank{r}of{P}");
    sub->add_option("--from-checkpoint", args->from_checkpoint, "report of a saved or merged checkpoint, without input files");
    sub->add_option("--tokenizer", args->tokenizer,
                    "token strings in token_analysis and the CSV: a llama2.c tokenizer (.bin) or a Hugging Face tokenizer.json "
                    "(config exclude_special_tokens drops its special ids)");
    sub->add_option("--export-dir", args->export_dir,
                    "write class_means.npy [K, d], class_ids.npy [K], the per-class arrays (.npy) and token_analysis.csv here "
                    "(turns on per_class_arrays)");
    sub->add_option("--nc4-features", args->nc4_features,
                    "held-out NC4: features .npy [N2, d]; the means and W come from the input, the agreement from these rows");
    sub->add_option("--nc4-labels", args->nc4_labels, "held-out NC4: labels .npy [N2] or [N2, 1] of --nc4-features");
    sub->add_option("--ood-features", args->ood_features,
                    "nc5_ood_dev: out-of-distribution features .npy [N3, d] (no labels; their plain mean is the OoD global mean)");
    sub->callback([args, sub] {
        refuse_empty_paths(*sub);
        args->keys_given = sub->count("--features-key") + sub->count("--labels-key") + sub->count("--mask-key") > 0;
        const int status = run_analyze_ranks(*args);
        if (status != 0) throw CLI::RuntimeError(status);
    });
}

}  // namespace collapse::internal
