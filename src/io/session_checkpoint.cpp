#include "io/session_checkpoint.hpp"

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/json_text.hpp"
#include "io/checkpoint_file.hpp"

namespace collapse::internal::io {

namespace {

constexpr const char* kFormat = "collapse-session-checkpoint";
constexpr int64_t kMetaVersion = 1;

nlohmann::json state_config_json(const Config& c) {
    const nlohmann::json all = to_json(c);
    nlohmann::json out = nlohmann::json::object();
    for (const std::string& k : state_config_keys()) out[k] = all[k];
    return out;
}

std::string meta_text(const CheckpointMeta& m) {
    nlohmann::json j;
    j["format"] = kFormat;
    j["version"] = kMetaVersion;
    j["engine_version"] = COLLAPSE_VERSION_STRING;
    j["num_classes"] = m.num_classes;
    j["dim"] = m.dim;
    j["backend"] = m.backend;
    j["state_config"] = state_config_json(m.config);
    j["config"] = to_json(m.config);
    j["classifier_hash"] = m.classifier_hash.empty() ? nlohmann::json(nullptr) : nlohmann::json(m.classifier_hash);
    j["batches_failed"] = m.batches_failed;
    j["input_position"] = m.input_position;
    j["batches"] = m.batches;
    j["rows_before_backend"] = m.rows_before_backend;
    j["rows_skipped"] = m.rows_skipped;
    nlohmann::json ranges = nlohmann::json::array();
    for (const auto& r : m.skipped_ranges) ranges.push_back({r.first, r.second});
    j["skipped_ranges"] = ranges;
    j["input_identity"] = m.input_identity;
    return json_text(j);
}

// Each field present with its type; every refusal names the file and the field.
class MetaFields {
public:
    MetaFields(const nlohmann::json& j, std::string what) : j_(j), what_(std::move(what)) {}

    const nlohmann::json& field(const char* key) const {
        if (!j_.contains(key)) bad(key, "is missing");
        return j_[key];
    }
    [[noreturn]] void bad(const std::string& key, const std::string& why) const {
        fail(COLLAPSE_ERR_IO, what_, ": meta field \"", key, "\" ", why);
    }
    static bool is_int64(const nlohmann::json& v) {
        return v.is_number_integer() && (!v.is_number_unsigned() || v.get<uint64_t>() <= (uint64_t)INT64_MAX);
    }
    int64_t integer(const char* key) const {
        const nlohmann::json& v = field(key);
        if (!is_int64(v)) bad(key, "is not a 64-bit integer: " + v.dump());
        return v.get<int64_t>();
    }
    std::string text(const char* key) const {
        const nlohmann::json& v = field(key);
        if (!v.is_string()) bad(key, "is not a string: " + v.dump());
        return v.get<std::string>();
    }

private:
    const nlohmann::json& j_;
    std::string what_;
};

}  // namespace

CheckpointMeta read_checkpoint_meta(const StateReader& r) {
    const std::string what = r.description();
    const StateSection s = r.section("meta");
    if (s.dtype_code != (uint32_t)COLLAPSE_U8 || s.shape.size() != 1)
        fail(COLLAPSE_ERR_IO, what, ": section meta is not a byte string (JSON text)");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(std::string(static_cast<const char*>(s.data), s.bytes));
    } catch (const std::exception& e) {
        fail(COLLAPSE_ERR_IO, what, ": meta section is not JSON: ", e.what());
    }
    if (!j.is_object() || !j.contains("format") || j["format"] != kFormat)
        fail(COLLAPSE_ERR_IO, what, " is not a collapse session checkpoint");
    const MetaFields f(j, what);
    const int64_t version = f.integer("version");
    if (version > kMetaVersion)
        fail(COLLAPSE_ERR_IO, what, " was written by a newer collapse (session checkpoint version ", version, ", this build reads ",
             kMetaVersion, ")");
    if (version < 1) f.bad("version", "is " + std::to_string(version) + ", not a version");

    CheckpointMeta m;
    m.num_classes = f.integer("num_classes");
    m.dim = f.integer("dim");
    m.backend = f.text("backend");
    m.batches_failed = f.integer("batches_failed");
    m.input_position = f.integer("input_position");
    m.batches = f.integer("batches");
    m.rows_before_backend = f.integer("rows_before_backend");
    m.rows_skipped = f.integer("rows_skipped");
    m.input_identity = f.text("input_identity");
    const nlohmann::json& hash = f.field("classifier_hash");
    if (hash.is_string()) {
        m.classifier_hash = hash.get<std::string>();
        const bool digits = !m.classifier_hash.empty() && m.classifier_hash.size() <= 20 &&
                            m.classifier_hash.find_first_not_of("0123456789") == std::string::npos;
        if (!digits) f.bad("classifier_hash", "is not a decimal hash: " + hash.dump());
    } else if (!hash.is_null()) {
        f.bad("classifier_hash", "is neither null nor a string: " + hash.dump());
    }
    const nlohmann::json& ranges = f.field("skipped_ranges");
    if (!ranges.is_array()) f.bad("skipped_ranges", "is not an array");
    for (const nlohmann::json& r : ranges) {
        if (!r.is_array() || r.size() != 2 || !MetaFields::is_int64(r[0]) || !MetaFields::is_int64(r[1]))
            f.bad("skipped_ranges", "holds " + r.dump() + ", not a pair [first, end] of integers");
        m.skipped_ranges.emplace_back(r[0].get<int64_t>(), r[1].get<int64_t>());
    }
    // The config through the normal parser and validation (a crafted value is refused naming its key).
    const nlohmann::json& config = f.field("config");
    if (!config.is_object()) f.bad("config", "is not an object");
    m.config = parse_yaml(config.dump(), what + " (meta config)");
    // state_config repeats the config's state-affecting keys (for a reader of the file): both agree.
    const nlohmann::json& state = f.field("state_config");
    const nlohmann::json want = state_config_json(m.config);
    if (!state.is_object()) f.bad("state_config", "is not an object");
    for (const std::string& k : state_config_keys())
        if (!state.contains(k) || state[k] != want[k])
            f.bad("state_config", "has " + k + " = " + (state.contains(k) ? state[k].dump() : std::string("(missing)")) +
                                      ", its config has " + want[k].dump());
    if (state.size() != want.size()) f.bad("state_config", "has keys that are not state-affecting config keys");
    return m;
}

void write_session_state(Session& session, StateWriter& w) {
    const std::string text = meta_text(session.checkpoint_meta());
    w.add("meta", COLLAPSE_U8, {(int64_t)text.size()}, text.data(), text.size());
    session.save_state(w);
}

void merge_session_state(Session& session, const StateReader& r) { session.load_state(r, read_checkpoint_meta(r), true); }

void save_checkpoint(Session& session, const std::string& path) {
    (void)session.checkpoint_meta();  // refuses before a file is made
    CheckpointWriter w(path);
    write_session_state(session, w);
    w.commit();
}

namespace {

void restore(Session& session, const std::string& path, bool merge) {
    const CheckpointReader r(path);
    session.load_state(r, read_checkpoint_meta(r), merge);
}

}  // namespace

void load_checkpoint(Session& session, const std::string& path) { restore(session, path, false); }
void merge_checkpoint(Session& session, const std::string& path) { restore(session, path, true); }

Config checkpoint_config(const std::string& path) {
    const CheckpointReader r(path);
    return read_checkpoint_meta(r).config;
}

}  // namespace collapse::internal::io
