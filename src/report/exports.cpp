#include "report/exports.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "base/atomic_file.hpp"

#include "base/error.hpp"
#include "io/output_file.hpp"
#include "io/tensor_file.hpp"

namespace collapse::internal {

namespace {

// Per-token keys in the CSV's column order (after token_id and token).
const char* const kColumns[] = {"num_samples",     "svd_rows",    "sampled",     "svd_entropy",  "effective_rank",
                                "normalized_entropy", "mean_norm", "within_variance", "duality_cos", "duality_dot",
                                "nc4_hit_rate",    "nc4_rows"};

// RFC 4180: a field with a comma, quote or line break is quoted, its quotes doubled.
std::string csv_field(const std::string& s) {
    if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
    std::string out = "\"";
    for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
    return out + "\"";
}

std::string csv_value(const nlohmann::json& v) {
    if (v.is_null()) return "";
    if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
    if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
    if (v.is_number()) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", v.get<double>());
        return buf;
    }
    if (v.is_string()) return csv_field(v.get<std::string>());
    return csv_field(v.dump());
}

void write_npy_file(const std::string& dir, const std::string& name, collapse_dtype dtype, const std::vector<int64_t>& shape,
                    const void* data, std::vector<std::string>& written) {
    const std::vector<std::string>& known = export_file_names();
    if (std::find(known.begin(), known.end(), name) == known.end()) fail(COLLAPSE_ERR_INTERNAL, "exports: ", name, " is not in export_file_names()");
    write_file_atomically(dir + "/" + name, io::npy_bytes(dtype, shape, data), "export");
    written.push_back(name);
}

}  // namespace

const std::vector<std::string>& export_file_names() {
    static const std::vector<std::string> names = {"class_means.npy",     "class_ids.npy",    "num_samples.npy", "mean_norm.npy",
                                                   "within_variance.npy", "duality_cos.npy",  "duality_dot.npy", "nc4_hit_rate.npy",
                                                   "nc4_rows.npy",        "svd_entropy.npy",  "sigma_w.npy",     "token_analysis.csv"};
    return names;
}

void prepare_export_dir(const std::string& dir) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::file_status st = fs::status(dir, ec);
    if (fs::exists(st) && !fs::is_directory(st))
        fail(COLLAPSE_ERR_IO, "--export-dir ", dir, " exists and is not a directory");
    if (!fs::exists(st)) {
        fs::create_directories(dir, ec);
        if (ec) fail(COLLAPSE_ERR_IO, "--export-dir ", dir, ": cannot create the directory: ", ec.message());
    }
    io::probe_writable_dir(dir, "--export-dir " + dir);
}

std::string token_table_csv(const nlohmann::json& doc, const std::vector<int64_t>& ids) {
    const nlohmann::json& ta = doc.at("token_analysis");
    bool strings = false;
    for (auto it = ta.begin(); it != ta.end() && !strings; ++it) strings = it.value().contains("token");
    std::string out = "token_id";
    if (strings) out += ",token";
    for (const char* c : kColumns) out += std::string(",") + c;
    out += "\n";
    for (int64_t id : ids) {
        const nlohmann::json& e = ta.at(std::to_string(id));
        out += std::to_string(id);
        if (strings) out += "," + (e.contains("token") ? csv_value(e["token"]) : std::string());
        for (const char* c : kColumns) out += "," + (e.contains(c) ? csv_value(e[c]) : std::string());
        out += "\n";
    }
    return out;
}

int64_t token_table_csv_bound(const nlohmann::json& doc, const std::vector<int64_t>& ids) {
    const nlohmann::json& ta = doc.at("token_analysis");
    constexpr int64_t kField = 1 + 32;  // a comma and a number (%.17g, an int64 or a bool)
    int64_t bytes = 16 + 2 * (int64_t)(sizeof kColumns / sizeof kColumns[0]) * kField;  // the header
    for (int64_t id : ids) {
        bytes = add_bytes(bytes, kField * (2 + (int64_t)(sizeof kColumns / sizeof kColumns[0])));
        const auto it = ta.find(std::to_string(id));
        if (it != ta.end() && it->contains("token") && (*it)["token"].is_string())  // quoted, its quotes doubled
            bytes = add_bytes(bytes, 2 * (int64_t)(*it)["token"].get_ref<const std::string&>().size() + 3);
    }
    return bytes;
}

std::vector<std::string> write_exports(const std::string& dir, const Result& r, const nlohmann::json& doc, HostBudget& budget) {
    const MetricValues& mv = r.metrics;
    const int64_t K = (int64_t)mv.tokens.size(), d = r.engine.dim;
    if (K != r.counts.classes_kept || (int64_t)mv.class_means.size() != K * d)
        fail(COLLAPSE_ERR_INTERNAL, "exports: the result has ", K, " tokens and ", mv.class_means.size(), " mean values for ",
             r.counts.classes_kept, " kept classes of width ", d);
    // At the peak: the ten per-class vectors and either the largest .npy image (a header of at
    // most 4 KiB and the data) or the CSV text; all counted before the first file is written.
    const bool sigma = (int64_t)mv.sigma_w.size() == d * d && d > 0;
    const int64_t image = add_bytes(4096, std::max(mul_bytes(K, d, 8), sigma ? mul_bytes(d, d, 8) : 0));
    std::vector<int64_t> ids;
    const HostBudget::Lease ids_lease = budget.reserve(mul_bytes(K, 8), "--export-dir " + dir + ": the ids of K = " + std::to_string(K) + " kept classes",
                                                       "raise host_memory_limit, or leave out --export-dir");
    for (const TokenMetrics& t : mv.tokens) ids.push_back(t.id);
    const HostBudget::Lease lease = budget.reserve(
        add_bytes(mul_bytes(K, 8 * 8), std::max(image, token_table_csv_bound(doc, ids))),
        "--export-dir " + dir + ": the exports of K = " + std::to_string(K) + " kept classes of width d = " + std::to_string(d) +
            " (eight per-class vectors, the largest .npy image and the CSV text; no file was written)",
        "raise host_memory_limit, or leave out --export-dir");
    std::vector<std::string> written;
    std::vector<int64_t> n, nc4_rows;
    std::vector<double> mean_norm, within, cosv, dot, hit, entropy;
    auto val = [](const std::optional<double>& v) { return v ? *v : std::nan(""); };
    for (const TokenMetrics& t : mv.tokens) {
        n.push_back(t.num_samples);
        mean_norm.push_back(val(t.mean_norm));
        within.push_back(val(t.within_variance));
        cosv.push_back(val(t.duality_cos));
        dot.push_back(val(t.duality_dot));
        hit.push_back(t.nc4_rows > 0 ? (double)t.nc4_hits / (double)t.nc4_rows : std::nan(""));
        nc4_rows.push_back(t.nc4_rows);
        entropy.push_back(val(t.svd_entropy));
    }
    write_npy_file(dir, "class_means.npy", COLLAPSE_F64, {K, d}, mv.class_means.data(), written);
    write_npy_file(dir, "class_ids.npy", COLLAPSE_I64, {K}, ids.data(), written);
    write_npy_file(dir, "num_samples.npy", COLLAPSE_I64, {K}, n.data(), written);
    write_npy_file(dir, "mean_norm.npy", COLLAPSE_F64, {K}, mean_norm.data(), written);
    write_npy_file(dir, "within_variance.npy", COLLAPSE_F64, {K}, within.data(), written);
    write_npy_file(dir, "duality_cos.npy", COLLAPSE_F64, {K}, cosv.data(), written);
    write_npy_file(dir, "duality_dot.npy", COLLAPSE_F64, {K}, dot.data(), written);
    write_npy_file(dir, "nc4_hit_rate.npy", COLLAPSE_F64, {K}, hit.data(), written);
    write_npy_file(dir, "nc4_rows.npy", COLLAPSE_I64, {K}, nc4_rows.data(), written);
    write_npy_file(dir, "svd_entropy.npy", COLLAPSE_F64, {K}, entropy.data(), written);
    // Sigma_W [d, d] (the anchors' within-class covariance), when the run computed it.
    if (sigma) write_npy_file(dir, "sigma_w.npy", COLLAPSE_F64, {d, d}, mv.sigma_w.data(), written);
    write_file_atomically(dir + "/token_analysis.csv", token_table_csv(doc, ids), "export");
    written.push_back("token_analysis.csv");
    return written;
}

}  // namespace collapse::internal
