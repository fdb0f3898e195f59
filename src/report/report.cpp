#include "report/report.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>

#include "base/error.hpp"

namespace collapse::internal {

namespace {

nlohmann::json opt(const std::optional<double>& v) {
    if (v && std::isfinite(*v)) return *v;
    return nullptr;
}

}  // namespace

nlohmann::json build_report(const Config& cfg, const Counts& counts, const MetricValues& mv, const EngineInfo& info) {
    using nlohmann::json;
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
                     {"rows_excluded", counts.rows_excluded},
                     {"rows_nonfinite", counts.rows_nonfinite},
                     {"rows_kept", counts.rows_kept},
                     {"classes_seen", counts.classes_seen},
                     {"classes_kept", counts.classes_kept},
                     {"classes_below_min", counts.classes_below_min},
                     {"classes_cut_by_max_tokens", counts.classes_cut}};

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
    o["nc4_agreement"] = opt(mv.nc4_agreement);
    o["nc4_rows"] = mv.nc4_rows;
    o["svd_zero_matrices"] = mv.svd_zero_matrices;
    auto unc3_note = mv.notes.find("overall_unc3");
    if (unc3_note != mv.notes.end()) o["unc3_note"] = unc3_note->second;
    o["notes"] = json::object();
    for (const auto& n : mv.notes) o["notes"][n.first] = n.second;
    doc["overall_analysis"] = o;

    json tokens = json::object();
    for (const auto& t : mv.tokens) {
        tokens[std::to_string(t.id)] = {{"svd_entropy", opt(t.svd_entropy)},
                                        {"effective_rank", opt(t.effective_rank)},
                                        {"normalized_entropy", opt(t.normalized_entropy)},
                                        {"num_samples", t.num_samples},
                                        {"svd_rows", t.svd_rows},
                                        {"sampled", t.sampled}};
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

void write_report_file(const nlohmann::json& doc, const std::string& path) {
    const std::string tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        if (!f) fail(COLLAPSE_ERR_IO, "cannot write report to '", path, "': ", std::strerror(errno));
        f << doc.dump(2) << '\n';
        f.flush();
        if (!f) {
            std::remove(tmp.c_str());
            fail(COLLAPSE_ERR_IO, "writing report '", path, "' failed: ", std::strerror(errno));
        }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        fail(COLLAPSE_ERR_IO, "cannot rename '", tmp, "' to '", path, "': ", std::strerror(errno));
    }
}

bool report_scalar(const nlohmann::json& doc, const std::string& key, double* value, bool* is_null) {
    const nlohmann::json* node = nullptr;
    const auto dot = key.find('.');
    if (dot != std::string::npos) {
        const std::string sec = key.substr(0, dot), k = key.substr(dot + 1);
        if (doc.contains(sec) && doc[sec].is_object() && doc[sec].contains(k)) node = &doc[sec][k];
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
