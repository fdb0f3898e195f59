// `collapse compare`: see compare.hpp.
#include "report/compare.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "base/error.hpp"
#include "base/file.hpp"

namespace collapse::internal {

namespace {

using nlohmann::json;

// Reports grow with V (token_analysis); this only keeps a wrong path from filling memory.
constexpr size_t kMaxReportBytes = size_t(1) << 30;

// A token_analysis key: a non-negative decimal integer, nothing else.
bool token_id(const std::string& key, int64_t* id) {
    if (key.empty()) return false;
    const auto r = std::from_chars(key.data(), key.data() + key.size(), *id);
    return r.ec == std::errc() && r.ptr == key.data() + key.size() && *id >= 0;
}

bool is_metric(const json& v) { return v.is_null() || (v.is_number() && !v.is_boolean()); }

// "avg_chunk_idx_2_..." before "avg_chunk_idx_10_...": runs of digits compare as numbers.
bool natural_less(const std::string& a, const std::string& b) {
    size_t i = 0, j = 0;
    while (i < a.size() && j < b.size()) {
        const bool da = std::isdigit((unsigned char)a[i]) != 0, db = std::isdigit((unsigned char)b[j]) != 0;
        if (da && db) {
            size_t ie = i, je = j;
            while (ie < a.size() && std::isdigit((unsigned char)a[ie])) ++ie;
            while (je < b.size() && std::isdigit((unsigned char)b[je])) ++je;
            // Without leading zeros, the longer run is the larger number.
            size_t iz = i, jz = j;
            while (iz + 1 < ie && a[iz] == '0') ++iz;
            while (jz + 1 < je && b[jz] == '0') ++jz;
            if (ie - iz != je - jz) return ie - iz < je - jz;
            const int c = a.compare(iz, ie - iz, b, jz, je - jz);
            if (c != 0) return c < 0;
            i = ie, j = je;
        } else {
            if (a[i] != b[j]) return (unsigned char)a[i] < (unsigned char)b[j];
            ++i, ++j;
        }
    }
    return a.size() - i < b.size() - j;
}

// b - a: an integer when both are integers (and it fits), else a double; null when either is null.
bool as_int64(const json& v, int64_t* out) {
    if (v.is_number_unsigned()) {  // what a parser makes of a non-negative integer
        const uint64_t u = v.get<uint64_t>();
        if (u > (uint64_t)INT64_MAX) return false;
        *out = (int64_t)u;
        return true;
    }
    if (!v.is_number_integer()) return false;
    *out = v.get<int64_t>();
    return true;
}

json difference(const json& a, const json& b) {
    if (!a.is_number() || !b.is_number()) return nullptr;
    int64_t x = 0, y = 0, d = 0;
    if (as_int64(a, &x) && as_int64(b, &y) && !__builtin_sub_overflow(y, x, &d)) return d;
    return b.get<double>() - a.get<double>();
}

std::string format_value(const json& v) {
    if (v.is_null()) return "null";
    if (v.is_number_integer()) return v.dump();
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.10g", v.get<double>());
    return buf;
}

const char* side_name(bool in_a, bool in_b) { return in_a && in_b ? "both" : in_a ? "a" : "b"; }

}  // namespace

void check_report(const json& doc, const std::string& name) {
    auto missing = [&](const std::string& what) { fail(COLLAPSE_ERR_BAD_INPUT, name, " is not a collapse report: ", what); };
    if (!doc.is_object()) missing("its top level is not a JSON object");
    for (const char* sec : {"overall_analysis", "summary", "token_analysis", "engine"}) {
        if (!doc.contains(sec)) missing(std::string("it has no ") + sec + " section");
        if (!doc[sec].is_object()) missing(std::string("its ") + sec + " section is not an object");
    }
    for (const char* key : {"num_classes", "dim"})
        if (!doc["engine"].contains(key) || !doc["engine"][key].is_number_integer())
            missing(std::string("engine.") + key + " is missing or not an integer");
    // Null when the run computed no window metrics.
    if (doc.contains("window_summary") && !doc["window_summary"].is_object() && !doc["window_summary"].is_null())
        missing("its window_summary section is not an object or null");
    for (auto it = doc["token_analysis"].begin(); it != doc["token_analysis"].end(); ++it) {
        int64_t id = 0;
        if (!token_id(it.key(), &id)) missing("token_analysis key '" + it.key() + "' is not a token id");
        if (!it.value().is_object()) missing("token_analysis." + it.key() + " is not an object");
        const json& t = it.value();
        if (t.contains("svd_entropy") && !is_metric(t["svd_entropy"]))
            missing("token_analysis." + it.key() + ".svd_entropy is not a number or null");
    }
}

json read_report_file(const std::string& path) {
    const std::string text = read_regular_file(path, "report", kMaxReportBytes);
    json doc;
    try {
        doc = json::parse(text);
    } catch (const json::exception& e) {
        fail(COLLAPSE_ERR_IO, "cannot read report ", path, ": it is not JSON (", e.what(), ")");
    }
    check_report(doc, path);
    return doc;
}

json compare_reports(const json& a, const json& b, int64_t top, const std::string& name_a, const std::string& name_b) {
    if (top < 1) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "top must be at least 1, got ", top);
    check_report(a, name_a);
    check_report(b, name_b);
    json out;
    auto side = [](const json& doc, const std::string& name) {
        return json{{"name", name},
                    {"num_classes", doc["engine"]["num_classes"]},
                    {"dim", doc["engine"]["dim"]},
                    {"tokens", doc["token_analysis"].size()}};
    };
    out["a"] = side(a, name_a);
    out["b"] = side(b, name_b);
    json notes = json::array();
    const bool same_v = a["engine"]["num_classes"] == b["engine"]["num_classes"];
    const bool same_d = a["engine"]["dim"] == b["engine"]["dim"];
    out["same_shape"] = same_v && same_d;
    if (!same_v || !same_d) {
        std::string what = !same_v && !same_d ? "V and d" : !same_v ? "V" : "d";
        notes.push_back("the reports differ in " + what + " (A: V = " + a["engine"]["num_classes"].dump() + ", d = " +
                        a["engine"]["dim"].dump() + "; B: V = " + b["engine"]["num_classes"].dump() + ", d = " + b["engine"]["dim"].dump() +
                        "): compared is what they share, metrics by name and tokens present in both");
    }

    json sections = json::object();
    for (const char* sec : kComparedSections) {
        // A null section (window_summary of a run without window metrics) counts as absent.
        const bool in_a = a.contains(sec) && a[sec].is_object(), in_b = b.contains(sec) && b[sec].is_object();
        if (!in_a && !in_b) continue;
        if (!in_a || !in_b) notes.push_back(std::string(sec) + " is only in " + (in_a ? "A" : "B"));
        static const json kEmpty = json::object();
        const json& sa = in_a ? a[sec] : kEmpty;
        const json& sb = in_b ? b[sec] : kEmpty;
        json metrics = json::object();
        for (const json* s : {&sa, &sb})
            for (auto it = s->begin(); it != s->end(); ++it) {
                if (!is_metric(it.value()) || metrics.contains(it.key())) continue;
                const bool ka = sa.contains(it.key()) && is_metric(sa[it.key()]);
                const bool kb = sb.contains(it.key()) && is_metric(sb[it.key()]);
                json m = json::object();
                if (ka) m["a"] = sa[it.key()];
                if (kb) m["b"] = sb[it.key()];
                m["diff"] = ka && kb ? difference(sa[it.key()], sb[it.key()]) : json(nullptr);
                if (!ka || !kb) m["only_in"] = side_name(ka, kb);
                metrics[it.key()] = std::move(m);
            }
        sections[sec] = {{"in", side_name(in_a, in_b)}, {"metrics", std::move(metrics)}};
    }
    out["sections"] = std::move(sections);

    // Tokens: in both, only in one; the largest moves of the per-token entropy.
    const json& ta = a["token_analysis"];
    const json& tb = b["token_analysis"];
    int64_t both = 0, only_a = 0, only_b = 0;
    struct Move {
        int64_t id;
        double a, b, diff;
        json na, nb;
    };
    std::vector<Move> moves;
    for (auto it = ta.begin(); it != ta.end(); ++it) {
        if (!tb.contains(it.key())) {
            ++only_a;
            continue;
        }
        ++both;
        const json& x = it.value();
        const json& y = tb[it.key()];
        const json ha = x.value("svd_entropy", json(nullptr)), hb = y.value("svd_entropy", json(nullptr));
        if (!ha.is_number() || !hb.is_number()) continue;
        int64_t id = 0;
        token_id(it.key(), &id);
        moves.push_back({id, ha.get<double>(), hb.get<double>(), hb.get<double>() - ha.get<double>(),
                         x.value("num_samples", json(nullptr)), y.value("num_samples", json(nullptr))});
    }
    for (auto it = tb.begin(); it != tb.end(); ++it)
        if (!ta.contains(it.key())) ++only_b;
    std::sort(moves.begin(), moves.end(), [](const Move& p, const Move& q) {
        const double x = std::fabs(p.diff), y = std::fabs(q.diff);
        return x != y ? x > y : p.id < q.id;
    });
    json list = json::array();
    for (size_t i = 0; i < moves.size() && (int64_t)i < top; ++i) {
        const Move& m = moves[i];
        list.push_back({{"token", m.id}, {"a", m.a}, {"b", m.b}, {"diff", m.diff}, {"num_samples_a", m.na}, {"num_samples_b", m.nb}});
    }
    out["tokens"] = {{"metric", "svd_entropy"}, {"in_both", both},          {"only_in_a", only_a}, {"only_in_b", only_b},
                     {"ranked", moves.size()},  {"top", top},               {"largest_moves", std::move(list)}};
    out["notes"] = std::move(notes);
    return out;
}

std::string format_comparison(const json& cmp) {
    std::string text;
    auto line = [&](const std::string& s) { text += s + "\n"; };
    for (const char* k : {"a", "b"}) {
        const json& s = cmp[k];
        line(std::string(k[0] == 'a' ? "A" : "B") + ": " + s["name"].get<std::string>() + " (V = " + s["num_classes"].dump() +
             ", d = " + s["dim"].dump() + ", " + s["tokens"].dump() + " tokens)");
    }
    for (const auto& n : cmp["notes"]) line("note: " + n.get<std::string>());

    // One table for every section, so that the columns line up across them; a row without cells
    // after the first is a section title.
    using Row = std::array<std::string, 4>;
    std::vector<Row> rows;
    for (const char* sec : kComparedSections) {
        if (!cmp["sections"].contains(sec)) continue;
        const json& metrics = cmp["sections"][sec]["metrics"];
        rows.push_back({"", "", "", ""});
        rows.push_back({sec, "A", "B", "B - A"});
        std::vector<std::string> keys;
        for (auto it = metrics.begin(); it != metrics.end(); ++it) keys.push_back(it.key());
        std::sort(keys.begin(), keys.end(), natural_less);
        for (const std::string& key : keys) {
            const json& m = metrics[key];
            rows.push_back({"  " + key, m.contains("a") ? format_value(m["a"]) : "absent", m.contains("b") ? format_value(m["b"]) : "absent",
                            format_value(m["diff"])});
        }
    }
    std::array<size_t, 4> width{};
    for (const Row& r : rows)
        for (size_t c = 0; c < 4; ++c) width[c] = std::max(width[c], r[c].size());
    for (const Row& r : rows) {
        if (r[0].empty()) {
            line("");
            continue;
        }
        std::string s = r[0] + std::string(width[0] - r[0].size(), ' ');
        for (size_t c = 1; c < 4; ++c) s += "  " + std::string(width[c] - r[c].size(), ' ') + r[c];
        line(s);
    }

    const json& t = cmp["tokens"];
    line("");
    line("tokens: " + t["in_both"].dump() + " in both, " + t["only_in_a"].dump() + " only in A, " + t["only_in_b"].dump() + " only in B");
    const json& moves = t["largest_moves"];
    if (moves.empty()) {
        line("no token has an svd_entropy in both reports");
        return text;
    }
    line("the " + std::to_string(moves.size()) + " tokens (of " + t["ranked"].dump() +
         " with an svd_entropy in both) whose svd_entropy moved most (|B - A|):");
    std::vector<std::array<std::string, 6>> trows = {{"token", "A", "B", "B - A", "samples A", "samples B"}};
    for (const auto& m : moves)
        trows.push_back({m["token"].dump(), format_value(m["a"]), format_value(m["b"]), format_value(m["diff"]),
                         format_value(m["num_samples_a"]), format_value(m["num_samples_b"])});
    std::array<size_t, 6> tw{};
    for (const auto& r : trows)
        for (size_t c = 0; c < 6; ++c) tw[c] = std::max(tw[c], r[c].size());
    for (const auto& r : trows) {
        std::string s;
        for (size_t c = 0; c < 6; ++c) s += "  " + std::string(tw[c] - r[c].size(), ' ') + r[c];
        line(s);
    }
    return text;
}

}  // namespace collapse::internal
