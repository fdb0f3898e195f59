#include "report/report.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>

#include "base/atomic_file.hpp"
#include "base/error.hpp"
#include "base/text.hpp"
#include "io/tokenizer.hpp"

namespace collapse::internal {

namespace {

nlohmann::json opt(const std::optional<double>& v) {
    if (v && std::isfinite(*v)) return *v;
    return nullptr;
}

// A reason for every null metric of overall_analysis (and the summary's averages) that the backend
// left without a note: first the switch that turned it off, then the family's own note, then the
// counts that were too small.
void explain_nulls(const Config& cfg, const Counts& counts, const EngineInfo& info, const nlohmann::json& o,
                   const nlohmann::json& summary, std::map<std::string, std::string>& notes) {
    // Metrics whose null follows from another's: take that one's note.
    static const std::map<std::string, std::string> kHead = {
        {"overall_effective_rank", "overall_svd_entropy"}, {"gnc2_var", "overall_gnc2"},
        {"gnc2_cov", "overall_gnc2"},                      {"unc3_mean_cos", "overall_unc3"},
        {"unc3_std_cos", "overall_unc3"},                  {"nc2_equiangular_std", "nc2_equiangular_mean"},
        {"nc2_equiangular_ideal", "nc2_equiangular_mean"}, {"std_svd_entropy", "avg_svd_entropy"},
        {"nc1_svd", "nc1_pinv"},                           {"nc2g_dist_var", "nc2g_dist_mean"},
        {"nc2_max_equiangular_dev", "nc2_equiangular_absdev"}};
    static const std::set<std::string> kClassMetrics = {
        "overall_gnc2", "gnc2_var", "gnc2_cov", "overall_unc3", "unc3_mean_cos", "unc3_std_cos", "nc1_cdnv",
        "nc2_equinorm_cov", "nc2_log_norm_std", "nc2_equiangular_mean", "nc2_equiangular_std", "nc2_equiangular_ideal",
        "nc3_self_duality", "nc1_pinv", "nc1_svd", "nc1_quot", "nc2_etf_err", "nc3_dual_err", "nc3u_uni_dual", "nc2g_dist_mean",
        "nc2g_dist_var", "nc2_equiangular_absdev", "nc2_max_equiangular_dev", "nc5_ood_dev"};
    auto why = [&](const std::string& key) -> std::string {
        if (auto it = notes.find(key); it != notes.end()) return it->second;
        if (auto h = kHead.find(key); h != kHead.end())
            if (auto it = notes.find(h->second); it != notes.end()) return it->second;
        if (auto it = notes.find("overall"); it != notes.end()) return it->second;
        if (counts.classes_kept == 0) return "no kept classes (see counts)";
        if (key == "overall_svd_entropy" || key == "overall_effective_rank")
            return cfg.compute_overall_metrics ? "the overall Gram could not be formed" : "compute_overall_metrics is false";
        if (key == "avg_svd_entropy" || key == "std_svd_entropy") {
            if (!cfg.compute_token_metrics) return "compute_token_metrics is false";
            if (cfg.svd_mode == COLLAPSE_SVD_OFF) return "svd_mode is off";
            return "no kept class has a per-token SVD entropy";
        }
        if (key == "nc4_agreement") {
            if (!cfg.compute_nc4) return "compute_nc4 is false";
            if (!info.classifier) return "no classifier was given";
            return "NC4 was not computed (no rows reached it)";
        }
        if (kClassMetrics.count(key)) {
            if (!cfg.compute_class_metrics) return "compute_class_metrics is false";
            const bool unc3 = key == "overall_unc3" || key == "unc3_mean_cos" || key == "unc3_std_cos" || key == "nc3_self_duality" ||
                              key == "nc3_dual_err" || key == "nc3u_uni_dual";
            if (unc3 && !info.classifier) return "no classifier was given";
            const int64_t need = unc3 ? cfg.min_classes_for_unc3 : std::max<int64_t>(2, cfg.min_classes_for_gnc2);
            if (counts.classes_kept < need)
                return "needs at least " + std::to_string(need) + " kept classes, has " + std::to_string(counts.classes_kept);
        }
        return "";
    };
    for (const auto* sec : {&o, &summary})
        for (auto it = sec->begin(); it != sec->end(); ++it) {
            if (!it.value().is_null() || notes.count(it.key())) continue;
            if (sec == &summary && it.key() != "avg_svd_entropy" && it.key() != "std_svd_entropy") continue;  // follow from counts
            const std::string reason = why(it.key());
            notes[it.key()] = reason.empty() ? "not computed for this input" : reason;
        }
}

// sequence_analysis and window_summary (docs/METRICS.md, "Generation-time window entropy"): the
// seed authors' per-sample keys; null with a note in overall_analysis.notes when there are none.
void window_sections(const WindowResult& w, nlohmann::json& doc, std::map<std::string, std::string>& notes) {
    using nlohmann::json;
    if (!w.present) {
        doc["sequence_analysis"] = nullptr;
        doc["window_summary"] = nullptr;
        notes["sequence_analysis"] = notes["window_summary"] = w.note;
        return;
    }
    json seqs = json::object();
    for (const SequenceWindows& s : w.sequences)
        seqs[std::to_string(s.id)] = {{"avg_svd_entropy", s.avg},
                                      {"cv_svd_entropy", s.cv},
                                      {"slope_svd_entropy", s.slope},
                                      {"total_generated_tokens", s.tokens},
                                      {"chunk_size", w.window_size},
                                      {"fixed_chunk_svd_entropies", s.entropies},
                                      {"num_valid_chunks", (int64_t)s.entropies.size()}};
    doc["sequence_analysis"] = std::move(seqs);
    json sum;
    sum["overall_avg_svd_entropy"] = opt(w.overall_avg);
    sum["overall_avg_cv_svd_entropy"] = opt(w.overall_cv);
    sum["overall_avg_slope_svd_entropy"] = opt(w.overall_slope);
    sum["valid_samples_for_summary"] = w.valid_samples;
    sum["total_processed_samples"] = w.total_samples;
    sum["chunk_size"] = w.window_size;
    for (size_t i = 0; i < w.chunk_avg.size(); ++i) {
        sum["avg_chunk_idx_" + std::to_string(i) + "_svd_entropy"] = w.chunk_avg[i];
        sum["chunk_idx_" + std::to_string(i) + "_count"] = w.chunk_count[i];
    }
    if (!w.overall_avg) notes["window_summary"] = "no sequence has a complete window of window_size = " + std::to_string(w.window_size) + " kept rows";
    doc["window_summary"] = std::move(sum);
}

}  // namespace

nlohmann::json build_report(const Config& cfg, const Result& result) {
    using nlohmann::json;
    const Counts& counts = result.counts;
    const MetricValues& mv = result.metrics;
    const EngineInfo& info = result.engine;
    json doc;

    // summary (seed-compatible): over kept classes; entropies over tokens that have one.
    json summary;
    summary["total_tokens_analyzed"] = counts.classes_kept;
    int64_t with = 0;
    double hsum = 0;
    for (const auto& t : mv.tokens)
        if (t.svd_entropy) ++with, hsum += *t.svd_entropy;
    summary["tokens_with_metrics"] = with;
    if (with > 0) {
        const double mean = hsum / (double)with;
        double ss = 0;
        for (const auto& t : mv.tokens)
            if (t.svd_entropy) ss += (*t.svd_entropy - mean) * (*t.svd_entropy - mean);
        summary["avg_svd_entropy"] = mean;
        summary["std_svd_entropy"] = std::sqrt(ss / (double)with);  // population, as np.std
    } else {
        summary["avg_svd_entropy"] = nullptr;
        summary["std_svd_entropy"] = nullptr;
    }
    if (counts.classes_kept > 0) {
        summary["avg_samples_per_token"] = (double)counts.rows_kept / (double)counts.classes_kept;
    } else {
        summary["avg_samples_per_token"] = nullptr;
    }
    int64_t mn = 0, mx = 0;
    bool first = true;
    for (const auto& t : mv.tokens) {
        mn = first ? t.num_samples : std::min(mn, t.num_samples);
        mx = first ? t.num_samples : std::max(mx, t.num_samples);
        first = false;
    }
    summary["min_samples"] = first ? json(nullptr) : json(mn);
    summary["max_samples"] = first ? json(nullptr) : json(mx);
    doc["summary"] = summary;

    doc["counts"] = {{"rows_seen", counts.rows_seen},
                     {"rows_masked", counts.rows_masked},
                     {"rows_ignored", counts.rows_ignored},
                     {"rows_excluded", counts.rows_excluded},
                     {"rows_nonfinite", counts.rows_nonfinite},
                     {"rows_kept", counts.rows_kept},
                     {"classes_seen", counts.classes_seen},
                     {"classes_kept", counts.classes_kept},
                     {"classes_below_min", counts.classes_below_min},
                     {"classes_cut_by_max_tokens", counts.classes_cut}};
    if (info.batches_failed > 0) {  // continue_on_error dropped rows: say how many
        doc["counts"]["batches_failed"] = info.batches_failed;
        doc["counts"]["rows_skipped"] = info.rows_skipped;
    }

    json o;
    o["overall_svd_entropy"] = opt(mv.overall_svd_entropy);
    o["overall_effective_rank"] = opt(mv.overall_effective_rank);
    o["overall_gnc2"] = opt(mv.overall_gnc2);
    o["gnc2_var"] = opt(mv.gnc2_var);
    o["gnc2_cov"] = opt(mv.gnc2_cov);
    o["gnc2_pairs"] = mv.gnc2_pairs;
    o["gnc2_skipped_pairs"] = mv.gnc2_skipped_pairs;
    o["overall_unc3"] = opt(mv.overall_unc3);
    o["unc3_mean_cos"] = opt(mv.unc3_mean_cos);
    o["unc3_std_cos"] = opt(mv.unc3_std_cos);
    o["nc1_cdnv"] = opt(mv.nc1_cdnv);
    o["cdnv_power"] = cfg.cdnv_power;
    o["cdnv_skipped_pairs"] = mv.cdnv_skipped_pairs;
    o["nc2_equinorm_cov"] = opt(mv.nc2_equinorm_cov);
    o["nc2_log_norm_std"] = opt(mv.nc2_log_norm_std);
    o["nc2_equiangular_mean"] = opt(mv.nc2_equiangular_mean);
    o["nc2_equiangular_std"] = opt(mv.nc2_equiangular_std);
    o["nc2_equiangular_ideal"] = opt(mv.nc2_equiangular_ideal);
    o["nc3_self_duality"] = opt(mv.nc3_self_duality);
    // The neural_collapse library's measures (docs/METRICS.md, "Anchor metrics").
    o["nc1_pinv"] = opt(mv.nc1_pinv);
    o["nc1_svd"] = opt(mv.nc1_svd);
    o["nc1_quot"] = opt(mv.nc1_quot);
    o["nc2_etf_err"] = opt(mv.nc2_etf_err);
    o["nc3_dual_err"] = opt(mv.nc3_dual_err);
    o["nc3u_uni_dual"] = opt(mv.nc3u_uni_dual);
    o["nc2g_dist_mean"] = opt(mv.nc2g_dist_mean);
    o["nc2g_dist_var"] = opt(mv.nc2g_dist_var);
    o["nc2_equiangular_absdev"] = opt(mv.nc2_equiangular_absdev);
    o["nc2_max_equiangular_dev"] = opt(mv.nc2_max_equiangular_dev);
    o["nc5_ood_dev"] = opt(mv.nc5_ood_dev);
    o["nc4_agreement"] = opt(mv.nc4_agreement);
    o["nc4_rows"] = mv.nc4_rows;
    // Which rows NC4 was measured on (with a value only): the input's own, or held-out rows.
    if (mv.nc4_agreement) o["nc4_measured_on"] = mv.nc4_held_out ? "held_out_rows" : "input_rows";
    o["svd_zero_matrices"] = mv.svd_zero_matrices;
    // Every null metric says why (issue: a null without a reason reads like a bug).
    std::map<std::string, std::string> notes = mv.notes;
    window_sections(result.windows, doc, notes);
    explain_nulls(cfg, counts, info, o, summary, notes);
    auto unc3_note = notes.find("overall_unc3");
    if (unc3_note != notes.end()) o["unc3_note"] = unc3_note->second;
    o["notes"] = json::object();
    for (const auto& n : notes) o["notes"][n.first] = n.second;
    doc["overall_analysis"] = o;

    json tokens = json::object();
    for (const auto& t : mv.tokens) {
        tokens[std::to_string(t.id)] = {{"svd_entropy", opt(t.svd_entropy)},
                                        {"effective_rank", opt(t.effective_rank)},
                                        {"normalized_entropy", opt(t.normalized_entropy)},
                                        {"num_samples", t.num_samples},
                                        {"svd_rows", t.svd_rows},
                                        {"sampled", t.sampled}};
        if (t.has_per_class) {  // per_class_arrays (docs/METRICS.md "Anchor metrics")
            json& e = tokens[std::to_string(t.id)];
            e["mean_norm"] = opt(t.mean_norm);
            e["within_variance"] = opt(t.within_variance);
            e["duality_cos"] = opt(t.duality_cos);
            e["duality_dot"] = opt(t.duality_dot);
            e["nc4_hit_rate"] = t.nc4_rows > 0 ? json((double)t.nc4_hits / (double)t.nc4_rows) : json(nullptr);
            e["nc4_rows"] = t.nc4_rows;
        }
    }
    doc["token_analysis"] = tokens;

    doc["config"] = to_json(cfg);
    json engine;
    engine["version"] = COLLAPSE_VERSION_STRING;
    engine["build"] = COLLAPSE_BUILD_TYPE;
    engine["backend"] = info.backend;
    engine["dim"] = info.dim;
    engine["num_classes"] = info.num_classes;
    engine["batches"] = info.batches;
    engine["classifier"] = info.classifier;
    engine["timings_seconds"] = info.timings;
    if (!info.row_store.empty()) engine["row_store"] = info.row_store;
    doc["engine"] = engine;
    return doc;
}

namespace {
// JSON text must be UTF-8, but a llama2.c piece can be half a character: each byte that does not
// start a well-formed sequence becomes U+FFFD.
std::string valid_utf8(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        if (const size_t len = utf8_sequence_length(s, i)) {
            out.append(s, i, len);
            i += len;
        } else {
            out += "\xEF\xBF\xBD";
            ++i;
        }
    }
    return out;
}
}  // namespace

void add_token_strings(nlohmann::json& doc, const io::Tokenizer& tok) {
    for (auto it = doc["token_analysis"].begin(); it != doc["token_analysis"].end(); ++it) {
        const size_t id = std::stoul(it.key());
        if (id < tok.text.size() && tok.has_text[id]) it.value()["token"] = valid_utf8(tok.text[id]);
    }
    doc["input"]["tokenizer"] = {{"path", tok.path},
                                 {"format", tok.format},
                                 {"vocab_size", (int64_t)tok.text.size()},
                                 {"special_ids", tok.special_ids}};
}

void write_report_file(const nlohmann::json& doc, const std::string& path) {
    write_file_atomically(path, json_text(doc, 2) + "\n", "report");
}

bool report_scalar(const nlohmann::json& doc, const std::string& key, double* value, bool* is_null) {
    const nlohmann::json* node = nullptr;
    const auto dot = key.find('.');
    if (dot != std::string::npos) {
        const std::string sec = key.substr(0, dot), k = key.substr(dot + 1);
        if (doc.contains(sec) && doc[sec].is_object() && doc[sec].contains(k)) node = &doc[sec][k];
        // A section that is null (windows off: window_summary) has null scalars.
        if (!node && sec == "window_summary" && doc.contains(sec) && doc[sec].is_null()) node = &doc[sec];
    } else {
        for (const char* sec : {"overall_analysis", "summary", "counts"})
            if (doc[sec].contains(key)) {
                node = &doc[sec][key];
                break;
            }
    }
    if (!node || !(node->is_number() || node->is_null() || node->is_boolean())) return false;
    *is_null = node->is_null();
    *value = node->is_null() ? std::nan("") : node->is_boolean() ? (node->get<bool>() ? 1.0 : 0.0) : node->get<double>();
    return true;
}

}  // namespace collapse::internal
