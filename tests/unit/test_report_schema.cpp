// schema/report.schema.json against the reports the engine writes.
//
// No JSON Schema validator package exists on the build machines, so this file carries a small one
// that implements exactly the keywords the schema uses (type, with arrays of types; properties;
// required; additionalProperties as a boolean or a schema; patternProperties; enum; minimum; items)
// plus the annotations it ignores ($schema, $id, title, description, $comment). Any other keyword
// is reported as an error, so the schema cannot silently grow a keyword nobody checks.
// The validator is first shown to reject hand-broken documents, then engine reports must pass.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"

#ifndef COLLAPSE_SOURCE_DIR
#define COLLAPSE_SOURCE_DIR "."
#endif

namespace test_report_schema {
namespace {

using nlohmann::json;

// ------------------------------------------------------------------------------------ validator

class MiniValidator {
public:
    explicit MiniValidator(json schema) : schema_(std::move(schema)) {}

    // Every violation, each as "<json pointer>: <what>". Empty = valid.
    std::vector<std::string> validate(const json& doc) const {
        std::vector<std::string> errors;
        check(schema_, doc, "", errors);
        return errors;
    }

private:
    static bool is_type(const json& v, const std::string& t) {
        if (t == "null") return v.is_null();
        if (t == "boolean") return v.is_boolean();
        if (t == "object") return v.is_object();
        if (t == "array") return v.is_array();
        if (t == "string") return v.is_string();
        if (t == "number") return v.is_number();
        if (t == "integer") {  // JSON Schema: a number with a zero fractional part (1.0 counts)
            if (v.is_number_integer()) return true;
            if (!v.is_number_float()) return false;
            const double d = v.get<double>();
            return std::isfinite(d) && d == std::floor(d);
        }
        return false;
    }

    static void check(const json& s, const json& v, const std::string& at, std::vector<std::string>& errors) {
        static const std::set<std::string> kKnown = {"type",     "properties", "required", "additionalProperties",
                                                     "patternProperties",      "enum",     "minimum",
                                                     "items",    "$schema",    "$id",      "title",
                                                     "description",            "$comment"};
        if (s.is_boolean()) {
            if (!s.get<bool>()) errors.push_back(at + ": not allowed (schema false)");
            return;
        }
        if (!s.is_object()) {
            errors.push_back(at + ": schema is neither an object nor a boolean");
            return;
        }
        for (auto it = s.begin(); it != s.end(); ++it)
            if (!kKnown.count(it.key())) errors.push_back(at + ": unsupported schema keyword '" + it.key() + "'");

        if (s.contains("type")) {
            const json& t = s["type"];
            bool ok = false;
            if (t.is_string()) ok = is_type(v, t.get<std::string>());
            else
                for (const auto& one : t) ok = ok || is_type(v, one.get<std::string>());
            if (!ok) {
                errors.push_back(at + ": expected type " + t.dump() + ", got " + v.dump());
                return;  // the other keywords would only repeat the problem
            }
        }
        if (s.contains("enum")) {
            bool found = false;
            for (const auto& e : s["enum"]) found = found || e == v;
            if (!found) errors.push_back(at + ": " + v.dump() + " is not one of " + s["enum"].dump());
        }
        if (s.contains("minimum") && v.is_number()) {
            if (v.get<double>() < s["minimum"].get<double>())
                errors.push_back(at + ": " + v.dump() + " is below the minimum " + s["minimum"].dump());
        }
        if (s.contains("items") && v.is_array()) {
            for (size_t i = 0; i < v.size(); ++i) check(s["items"], v[i], at + "/" + std::to_string(i), errors);
        }
        if (v.is_object()) {
            if (s.contains("required"))
                for (const auto& r : s["required"])
                    if (!v.contains(r.get<std::string>()))
                        errors.push_back(at + ": missing required key '" + r.get<std::string>() + "'");
            for (auto it = v.begin(); it != v.end(); ++it) {
                const std::string key = it.key(), child = at + "/" + key;
                bool matched = false;
                if (s.contains("properties") && s["properties"].contains(key)) {
                    matched = true;
                    check(s["properties"][key], it.value(), child, errors);
                }
                if (s.contains("patternProperties")) {
                    for (auto p = s["patternProperties"].begin(); p != s["patternProperties"].end(); ++p) {
                        if (std::regex_search(key, std::regex(p.key(), std::regex::ECMAScript))) {
                            matched = true;
                            check(p.value(), it.value(), child, errors);
                        }
                    }
                }
                if (!matched && s.contains("additionalProperties")) {
                    const json& ap = s["additionalProperties"];
                    if (ap.is_boolean() && !ap.get<bool>()) errors.push_back(child + ": key not allowed here");
                    else if (!ap.is_boolean()) check(ap, it.value(), child, errors);
                }
            }
        }
    }

    json schema_;
};

json load_schema() {
    const std::string path = std::string(COLLAPSE_SOURCE_DIR) + "/schema/report.schema.json";
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    return json::parse(in);
}

std::string joined(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& e : v) s += "  " + e + "\n";
    return s;
}

#define EXPECT_VALID(validator, doc)                                     \
    do {                                                                 \
        const auto errs_ = (validator).validate(doc);                    \
        EXPECT_TRUE(errs_.empty()) << "schema violations:\n" << joined(errs_); \
    } while (0)

// Rejected, and one of the errors mentions `needle` (the key or the pointer of the break).
#define EXPECT_INVALID(validator, doc, needle)                                                     \
    do {                                                                                           \
        const auto errs_ = (validator).validate(doc);                                              \
        ASSERT_FALSE(errs_.empty()) << "a broken document validated (" << (needle) << ")";         \
        bool named_ = false;                                                                       \
        for (const auto& e_ : errs_) named_ = named_ || e_.find(needle) != std::string::npos;      \
        EXPECT_TRUE(named_) << "no error names '" << (needle) << "':\n" << joined(errs_);           \
    } while (0)

// ------------------------------------------------------------------------------------ engine reports

struct Data {
    int64_t n = 0, d = 0, V = 0;
    std::vector<float> x;
    std::vector<int32_t> y;
};

Data random_data(int64_t n, int64_t d, int64_t V, uint32_t seed) {
    Data r{n, d, V, {}, {}};
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0.f, 1.f);
    std::uniform_int_distribution<int32_t> lab(0, (int32_t)V - 1);
    r.x.resize((size_t)(n * d));
    r.y.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        r.y[(size_t)i] = lab(rng);
        for (int64_t k = 0; k < d; ++k) r.x[(size_t)(i * d + k)] = g(rng) + 0.5f * (float)((r.y[(size_t)i] + k) % 3);
    }
    return r;
}

std::vector<float> random_classifier(int64_t V, int64_t d, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0.f, 1.f);
    std::vector<float> w((size_t)(V * d));
    for (auto& v : w) v = g(rng);
    return w;
}

json report_json(collapse::Session& s) { return json::parse(s.compute().json()); }

class ReportSchema : public ::testing::Test {
protected:
    void SetUp() override { validator_ = std::make_unique<MiniValidator>(load_schema()); }
    const MiniValidator& v() const { return *validator_; }

    // A full report: random rows in two batches, a classifier with bias.
    json full_report() {
        const Data dt = random_data(120, 6, 8, 1);
        auto o = collapse::default_options();
        o.num_classes = dt.V;
        collapse::Session s(o);
        s.ingest_rows(collapse::host_buffer(dt.x.data(), 70, dt.d), collapse::host_buffer(dt.y.data(), 70));
        s.ingest_rows(collapse::host_buffer(dt.x.data() + 70 * dt.d, 50, dt.d), collapse::host_buffer(dt.y.data() + 70, 50));
        // Rows of W follow the class means' pattern, so UNC3's mean cosine is positive.
        std::vector<float> w = random_classifier(dt.V, dt.d, 2);
        for (int64_t c = 0; c < dt.V; ++c)
            for (int64_t k = 0; k < dt.d; ++k) w[(size_t)(c * dt.d + k)] = 0.1f * w[(size_t)(c * dt.d + k)] + 0.5f * (float)((c + k) % 3);
        std::vector<float> b((size_t)dt.V, 0.1f);
        const auto bb = collapse::host_buffer(static_cast<const void*>(b.data()), COLLAPSE_F32, dt.V);
        s.set_classifier(collapse::host_buffer(w.data(), dt.V, dt.d), &bb);
        return report_json(s);
    }

private:
    std::unique_ptr<MiniValidator> validator_;
};

// ---- (a) the validator works: small schemas, then hand-broken reports.

TEST(MiniValidatorSelfTest, KeywordsBehaveAsInJsonSchema) {
    const MiniValidator m(json::parse(R"({
        "type": "object", "required": ["a"], "additionalProperties": false,
        "properties": {
            "a": {"type": ["integer", "null"], "minimum": 0},
            "b": {"enum": ["x", "y"]},
            "c": {"type": "array", "items": {"type": "string"}},
            "d": {"type": "object", "additionalProperties": {"type": "number"}},
            "e": {"type": "object", "additionalProperties": false, "patternProperties": {"^[0-9]+$": {"type": "boolean"}}}
        }})"));
    EXPECT_TRUE(m.validate(json::parse(R"({"a": 1})")).empty());
    EXPECT_TRUE(m.validate(json::parse(R"({"a": null})")).empty());
    EXPECT_TRUE(m.validate(json::parse(R"({"a": 2.0})")).empty()) << "2.0 is an integer in JSON Schema";
    EXPECT_TRUE(m.validate(json::parse(R"({"a": 0, "b": "y", "c": ["p"], "d": {"k": 1.5}, "e": {"12": true}})")).empty());
    EXPECT_FALSE(m.validate(json::parse(R"({})")).empty());                  // required
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1.5})")).empty());          // integer
    EXPECT_FALSE(m.validate(json::parse(R"({"a": "1"})")).empty());          // type
    EXPECT_FALSE(m.validate(json::parse(R"({"a": true})")).empty());         // boolean is no integer
    EXPECT_FALSE(m.validate(json::parse(R"({"a": -1})")).empty());           // minimum
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "z": 1})")).empty());    // additionalProperties false
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "b": "w"})")).empty());  // enum
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "c": [1]})")).empty());  // items
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "d": {"k": "s"}})")).empty());     // additionalProperties schema
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "e": {"12": 1}})")).empty());      // patternProperties
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "e": {"x1": true}})")).empty());   // no pattern matches
    EXPECT_FALSE(m.validate(json::parse(R"({"a": 1, "e": {"1x": true}})")).empty());   // anchored pattern
    // A keyword the validator does not implement is an error, not silently ignored.
    const MiniValidator unknown(json::parse(R"({"type": "object", "maxProperties": 1})"));
    EXPECT_FALSE(unknown.validate(json::parse("{}")).empty());
}

TEST_F(ReportSchema, SchemaFileIsADraft2020Schema) {
    const json s = load_schema();
    EXPECT_EQ(s.value("$schema", ""), "https://json-schema.org/draft/2020-12/schema");
    for (const char* sec : {"summary", "counts", "overall_analysis", "token_analysis", "config", "engine"}) {
        ASSERT_TRUE(s["properties"].contains(sec)) << sec;
        EXPECT_EQ(s["properties"][sec]["additionalProperties"], false) << sec;
    }
}

TEST_F(ReportSchema, RejectsHandBrokenReports) {
    const json good = full_report();
    EXPECT_VALID(v(), good);

    auto broken = [&](auto&& edit) {
        json d = good;
        edit(d);
        return d;
    };
    // Missing required keys, at every level.
    EXPECT_INVALID(v(), broken([](json& d) { d.erase("engine"); }), "engine");
    EXPECT_INVALID(v(), broken([](json& d) { d["counts"].erase("rows_kept"); }), "rows_kept");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"].erase("overall_gnc2"); }), "overall_gnc2");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"].erase("notes"); }), "notes");
    EXPECT_INVALID(v(), broken([](json& d) { d["summary"].erase("max_samples"); }), "max_samples");
    EXPECT_INVALID(v(), broken([](json& d) { d["config"].erase("svd_mode"); }), "svd_mode");
    EXPECT_INVALID(v(), broken([](json& d) { d["token_analysis"].begin()->erase("svd_rows"); }), "svd_rows");
    // Wrong types.
    EXPECT_INVALID(v(), broken([](json& d) { d["counts"]["rows_seen"] = "120"; }), "/counts/rows_seen");
    EXPECT_INVALID(v(), broken([](json& d) { d["counts"]["rows_seen"] = 120.5; }), "/counts/rows_seen");
    EXPECT_INVALID(v(), broken([](json& d) { d["counts"]["rows_seen"] = nullptr; }), "/counts/rows_seen");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"]["overall_gnc2"] = true; }), "/overall_analysis/overall_gnc2");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"]["nc4_rows"] = nullptr; }), "/overall_analysis/nc4_rows");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"]["notes"]["x"] = 1; }), "/overall_analysis/notes/x");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"]["unc3_note"] = nullptr; }), "unc3_note");
    EXPECT_INVALID(v(), broken([](json& d) { d["token_analysis"].begin()->at("sampled") = 0; }), "sampled");
    EXPECT_INVALID(v(), broken([](json& d) { d["engine"]["timings_seconds"]["ingest"] = "fast"; }), "ingest");
    EXPECT_INVALID(v(), broken([](json& d) { d["config"]["exclude_token_ids"] = json::array({1, 2.5}); }), "exclude_token_ids/1");
    EXPECT_INVALID(v(), broken([](json& d) { d["config"]["max_tokens_to_analyze"] = "all"; }), "max_tokens_to_analyze");
    EXPECT_INVALID(v(), broken([](json& d) { d["summary"] = json::array(); }), "/summary");
    // Values out of range.
    EXPECT_INVALID(v(), broken([](json& d) { d["counts"]["rows_masked"] = -1; }), "rows_masked");
    EXPECT_INVALID(v(), broken([](json& d) { d["config"]["svd_mode"] = "fast"; }), "svd_mode");
    EXPECT_INVALID(v(), broken([](json& d) { d["engine"]["backend"] = "tpu"; }), "backend");
    // Extra keys, at every level we control.
    EXPECT_INVALID(v(), broken([](json& d) { d["extra"] = 1; }), "/extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["summary"]["extra"] = 1; }), "/summary/extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["counts"]["extra"] = 1; }), "/counts/extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["overall_analysis"]["extra"] = 1; }), "/overall_analysis/extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["config"]["extra"] = 1; }), "/config/extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["engine"]["extra"] = 1; }), "/engine/extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["token_analysis"].begin()->operator[]("extra") = 1; }), "extra");
    EXPECT_INVALID(v(), broken([](json& d) { d["token_analysis"]["tok7"] = d["token_analysis"].begin().value(); }), "tok7");
    // ...but counts may carry batches_failed (the CLI under continue_on_error), and notes any key.
    EXPECT_VALID(v(), broken([](json& d) { d["counts"]["batches_failed"] = 2; }));
    EXPECT_VALID(v(), broken([](json& d) { d["overall_analysis"]["notes"]["anything"] = "text"; }));
}

// ---- (b) reports the engine produces validate.

TEST_F(ReportSchema, RandomDataWithClassifier) {
    const json doc = full_report();
    EXPECT_VALID(v(), doc);
    EXPECT_EQ(doc["counts"]["rows_seen"], 120);
    EXPECT_TRUE(doc["engine"]["classifier"].get<bool>());
    EXPECT_FALSE(doc["overall_analysis"]["overall_unc3"].is_null());
    EXPECT_FALSE(doc["overall_analysis"]["overall_gnc2"].is_null());
    EXPECT_EQ(doc["token_analysis"].size(), 8u);
}

TEST_F(ReportSchema, EmptySession) {
    auto o = collapse::default_options();
    o.num_classes = 5;
    collapse::Session s(o);
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    EXPECT_TRUE(doc["overall_analysis"]["overall_gnc2"].is_null());
    EXPECT_EQ(doc["engine"]["dim"], 0);
    EXPECT_TRUE(doc["token_analysis"].empty());
    EXPECT_FALSE(doc["overall_analysis"]["notes"].empty());
}

TEST_F(ReportSchema, EmptySessionWithKnownWidth) {
    auto o = collapse::default_options();
    o.num_classes = 5;
    o.dim = 3;
    collapse::Session s(o);
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    EXPECT_EQ(doc["engine"]["dim"], 3);
}

TEST_F(ReportSchema, SampledModeWithNc4AndSecondPass) {
    const Data dt = random_data(300, 4, 5, 3);
    auto o = collapse::default_options();
    o.num_classes = dt.V;
    o.compute_nc4 = 1;
    o.svd_mode = COLLAPSE_SVD_SAMPLED;
    o.svd_max_rows_per_token = 8;  // every class has more rows: all sampled
    o.max_tokens_to_analyze = 4;
    int64_t excl[] = {0};
    o.exclude_token_ids = excl;
    o.num_exclude_token_ids = 1;
    o.seed = 7;
    collapse::Session s(o);
    const auto w = random_classifier(dt.V, dt.d, 4);
    s.set_classifier(collapse::host_buffer(w.data(), dt.V, dt.d));
    const auto x = collapse::host_buffer(dt.x.data(), dt.n, dt.d);
    const auto y = collapse::host_buffer(dt.y.data(), dt.n);
    s.ingest_rows(x, y);
    ASSERT_TRUE(s.needs_second_pass());
    s.begin_second_pass();
    s.ingest_rows(x, y);
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    EXPECT_FALSE(doc["overall_analysis"]["nc4_agreement"].is_null()) << doc["overall_analysis"].dump(1);
    EXPECT_GT(doc["overall_analysis"]["nc4_rows"].get<int64_t>(), 0);
    EXPECT_EQ(doc["config"]["max_tokens_to_analyze"], 4);
    EXPECT_EQ(doc["config"]["svd_mode"], "sampled");
    EXPECT_EQ(doc["config"]["exclude_token_ids"], json::array({0}));
    bool any_sampled = false;
    for (const auto& t : doc["token_analysis"]) any_sampled = any_sampled || t["sampled"].get<bool>();
    EXPECT_TRUE(any_sampled);
    EXPECT_GT(doc["engine"]["timings_seconds"].count("second_pass"), 0u);
}

TEST_F(ReportSchema, ExactModeNc4FromRowStoreAndClassMeansUnc3) {
    const Data dt = random_data(90, 3, 4, 5);
    auto o = collapse::default_options();
    o.num_classes = dt.V;
    o.compute_nc4 = 1;
    o.unc3_classifier = COLLAPSE_UNC3_CLASS_MEANS;
    o.svd_center = 1;
    o.global_mean = COLLAPSE_MEAN_TOKEN_WEIGHTED;
    o.cdnv_power = 2;
    collapse::Session s(o);
    const auto w = random_classifier(dt.V, dt.d, 6);
    s.set_classifier(collapse::host_buffer(w.data(), dt.V, dt.d));
    s.ingest_rows(collapse::host_buffer(dt.x.data(), dt.n, dt.d), collapse::host_buffer(dt.y.data(), dt.n));
    EXPECT_FALSE(s.needs_second_pass());
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    EXPECT_FALSE(doc["overall_analysis"]["nc4_agreement"].is_null());
    EXPECT_EQ(doc["overall_analysis"]["cdnv_power"], 2.0);
}

TEST_F(ReportSchema, EveryMetricNullWhenFewerThanTwoClasses) {
    // All rows in one class (K = 1), plus one class below min_samples_per_token.
    const int64_t n = 10, d = 4, V = 3;
    std::vector<float> x((size_t)(n * d));
    for (size_t i = 0; i < x.size(); ++i) x[i] = (float)std::sin((double)i);
    std::vector<int32_t> y((size_t)n, 1);
    y[0] = 2;
    auto o = collapse::default_options();
    o.num_classes = V;
    o.compute_token_metrics = 0;
    o.compute_overall_metrics = 0;
    collapse::Session s(o);
    const auto w = random_classifier(V, d, 8);
    s.set_classifier(collapse::host_buffer(w.data(), V, d));
    s.ingest_rows(collapse::host_buffer(x.data(), n, d), collapse::host_buffer(y.data(), n));
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    const json& oa = doc["overall_analysis"];
    for (const char* k : {"overall_svd_entropy", "overall_effective_rank", "overall_gnc2", "gnc2_var", "gnc2_cov",
                          "overall_unc3", "unc3_mean_cos", "unc3_std_cos", "nc1_cdnv", "nc2_equinorm_cov",
                          "nc2_log_norm_std", "nc2_equiangular_mean", "nc2_equiangular_std", "nc2_equiangular_ideal",
                          "nc4_agreement"})
        EXPECT_TRUE(oa[k].is_null()) << k << " = " << oa[k].dump();
    EXPECT_TRUE(oa.contains("unc3_note"));
    EXPECT_EQ(doc["counts"]["classes_kept"], 1);
    EXPECT_EQ(doc["counts"]["classes_below_min"], 1);
    EXPECT_TRUE(doc["summary"]["avg_svd_entropy"].is_null());
}

TEST_F(ReportSchema, OnlyMaskedRowsAndNoClassifier) {
    const Data dt = random_data(12, 3, 4, 9);
    std::vector<uint8_t> mask((size_t)dt.n, 0);
    auto o = collapse::default_options();
    o.num_classes = dt.V;
    collapse::Session s(o);
    const auto m = collapse::host_buffer(mask.data(), COLLAPSE_U8, dt.n);
    s.ingest_rows(collapse::host_buffer(dt.x.data(), dt.n, dt.d), collapse::host_buffer(dt.y.data(), dt.n), &m);
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    EXPECT_EQ(doc["counts"]["rows_masked"], 12);
    EXPECT_TRUE(doc["summary"]["min_samples"].is_null());
}

TEST_F(ReportSchema, WrittenFileValidatesToo) {
    const Data dt = random_data(40, 3, 4, 10);
    auto o = collapse::default_options();
    o.num_classes = dt.V;
    collapse::Session s(o);
    s.ingest_rows(collapse::host_buffer(dt.x.data(), dt.n, dt.d), collapse::host_buffer(dt.y.data(), dt.n));
    const std::string path = ::testing::TempDir() + "/collapse_schema_report.json";
    s.compute().write_json(path);
    std::ifstream in(path);
    ASSERT_TRUE(in.good());
    const json doc = json::parse(in);
    EXPECT_VALID(v(), doc);
    std::remove(path.c_str());
}

// Generation-time windows: sequence_analysis and window_summary as objects, then as nulls.
TEST_F(ReportSchema, WindowSections) {
    const Data dt = random_data(90, 4, 5, 12);
    std::vector<int64_t> seq((size_t)dt.n), pos((size_t)dt.n);
    for (int64_t i = 0; i < dt.n; ++i) seq[(size_t)i] = i % 3, pos[(size_t)i] = i / 3;
    auto o = collapse::default_options();
    o.num_classes = dt.V;
    o.window_size = 8;
    collapse::Session s(o);
    s.ingest_tagged_rows(collapse::host_buffer(dt.x.data(), dt.n, dt.d), collapse::host_buffer(dt.y.data(), dt.n), nullptr,
                         collapse::host_buffer(static_cast<const void*>(seq.data()), COLLAPSE_I64, dt.n),
                         nullptr);
    const json doc = report_json(s);
    EXPECT_VALID(v(), doc);
    EXPECT_EQ(doc["sequence_analysis"].size(), 3u);
    EXPECT_EQ(doc["window_summary"]["chunk_idx_2_count"], 3);
    EXPECT_INVALID(v(), [&] { json d = doc; d["window_summary"]["chunk_idx_x_count"] = 1; return d; }(), "chunk_idx_x_count");
    EXPECT_INVALID(v(), [&] { json d = doc; d["sequence_analysis"]["0"].erase("chunk_size"); return d; }(), "chunk_size");
    o.compute_window_metrics = 0;
    collapse::Session off(o);
    off.ingest_rows(collapse::host_buffer(dt.x.data(), dt.n, dt.d), collapse::host_buffer(dt.y.data(), dt.n));
    const json none = report_json(off);
    EXPECT_VALID(v(), none);
    EXPECT_TRUE(none["window_summary"].is_null());
}

}  // namespace
}  // namespace test_report_schema
