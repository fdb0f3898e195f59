// YAML configuration: parsing with line-numbered errors, range checks, conversions with the C
// options struct, and the byte-size helpers. The key tables below are the single source of each
// key's name, field and lower bound: the parser, validate() and to_json() all read them.
#include "core/config.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <memory>
#include <sys/stat.h>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include "base/json_text.hpp"
#include "base/error.hpp"
#include "base/text.hpp"
#include "base/file.hpp"

namespace collapse::internal {
namespace {

constexpr int64_t kMiB = int64_t(1) << 20;

// ---------------------------------------------------------------- key tables

// Integer keys, byte sizes included (those accept "8GiB" as well as a plain integer).
struct IntKey {
    const char* name;
    int64_t Config::*field;
    int64_t min;
    bool bytes;
};
const IntKey kIntKeys[] = {
    {"save_every", &Config::save_every, 1, false},
    {"max_buffer_size", &Config::max_buffer_size, 1, false},
    {"min_samples_per_token", &Config::min_samples_per_token, 1, false},
    {"min_classes_for_gnc2", &Config::min_classes_for_gnc2, 2, false},
    {"min_classes_for_unc3", &Config::min_classes_for_unc3, 2, false},
    {"svd_max_rows_per_token", &Config::svd_max_rows_per_token, 2, false},
    {"num_classes", &Config::num_classes, 0, false},
    {"dim", &Config::dim, 0, false},
    {"batch_rows", &Config::batch_rows, 1, false},
    {"host_memory_limit", &Config::host_memory_limit, kMiB, true},
    {"device_memory_limit", &Config::device_memory_limit, 0, true},
    {"window_size", &Config::window_size, 2, false},
};

struct BoolKey {
    const char* name;
    bool Config::*field;
};
const BoolKey kBoolKeys[] = {
    {"compute_token_metrics", &Config::compute_token_metrics},
    {"compute_overall_metrics", &Config::compute_overall_metrics},
    {"compute_class_metrics", &Config::compute_class_metrics},
    {"continue_on_error", &Config::continue_on_error},
    {"save_intermediate_results", &Config::save_intermediate_results},
    {"svd_center", &Config::svd_center},
    {"compute_nc4", &Config::compute_nc4},
    {"allow_tf32", &Config::allow_tf32},
    {"per_class_arrays", &Config::per_class_arrays},
    {"exclude_special_tokens", &Config::exclude_special_tokens},
};

// Keys whose value is one of a few names. Values are listed in enum order; get() gives the index
// of the current value, or -1 when the field holds no valid value (a bad int from the C options).
struct EnumKey {
    const char* name;
    std::vector<std::string> values;
    int (*get)(const Config&);
    void (*set)(Config&, int);
};
const std::vector<std::string> kLogLevels{"debug", "info", "warning", "error"};

int checked_index(int v, size_t n) { return v >= 0 && size_t(v) < n ? v : -1; }
// An enum field's stored integer, read as bytes: a C caller may have stored any int there, and
// loading an out-of-range value through the enum type is undefined behaviour.
template <class E>
int enum_value(const E& e) {
    int v = 0;
    static_assert(sizeof(E) == sizeof(int), "C enums are int-sized here");
    std::memcpy(&v, &e, sizeof v);
    return v;
}

const std::vector<EnumKey>& enum_keys() {
    static const std::vector<EnumKey> keys{
        {"svd_mode", {"exact", "sampled", "off"},
         [](const Config& c) { return checked_index(enum_value(c.svd_mode), 3); },
         [](Config& c, int i) { c.svd_mode = collapse_svd_mode(i); }},
        {"global_mean", {"class_balanced", "token_weighted"},
         [](const Config& c) { return checked_index(enum_value(c.global_mean), 2); },
         [](Config& c, int i) { c.global_mean = collapse_global_mean(i); }},
        {"unc3_classifier", {"weights", "class_means"},
         [](const Config& c) { return checked_index(enum_value(c.unc3_classifier), 2); },
         [](Config& c, int i) { c.unc3_classifier = collapse_unc3_classifier(i); }},
        {"nonfinite_policy", {"error", "skip_row"},
         [](const Config& c) { return checked_index(enum_value(c.nonfinite_policy), 2); },
         [](Config& c, int i) { c.nonfinite_policy = collapse_nonfinite_policy(i); }},
        {"backend", {"cpu", "cuda"},
         [](const Config& c) { return checked_index(enum_value(c.backend), 2); },
         [](Config& c, int i) { c.backend = collapse_backend(i); }},
        // log_level is a string in Config (the seed's type) but takes the same kind of value.
        {"log_level", kLogLevels,
         [](const Config& c) {
             auto it = std::find(kLogLevels.begin(), kLogLevels.end(), c.log_level);
             return it == kLogLevels.end() ? -1 : int(it - kLogLevels.begin());
         },
         [](Config& c, int i) { c.log_level = kLogLevels[size_t(i)]; }},
    };
    return keys;
}

// Keys handled one by one in read_special(); listed here so the unknown-key suggestion sees them.
const char* const kSpecialKeys[] = {"device", "max_tokens_to_analyze", "cdnv_power", "seed",
                                    "exclude_token_ids", "intermediate_save_dir", "ignore_index",
                                    "compute_window_metrics"};

std::vector<std::string> all_keys() {
    std::vector<std::string> keys;
    for (const auto& k : kIntKeys) keys.push_back(k.name);
    for (const auto& k : kBoolKeys) keys.push_back(k.name);
    for (const auto& k : enum_keys()) keys.push_back(k.name);
    for (const char* k : kSpecialKeys) keys.push_back(k);
    std::sort(keys.begin(), keys.end());  // messages list them alphabetically
    return keys;
}

// ---------------------------------------------------------------- small helpers

size_t levenshtein(const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= b.size(); ++j) {
            size_t up = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
            diag = up;
        }
    }
    return row[b.size()];
}

// The candidate closest to `given`, or "" when none is close enough to be a plausible typo
// (suggesting 'dim' for 'foo' would only mislead).
std::string closest(const std::string& given, const std::vector<std::string>& candidates) {
    const std::string g = lower_ascii(given);
    std::string best;
    size_t best_dist = SIZE_MAX;
    for (const auto& cand : candidates) {
        size_t d = levenshtein(g, cand);
        bool contains = g.size() >= 3 && (cand.find(g) != std::string::npos || g.find(cand) != std::string::npos);
        size_t limit = std::max<size_t>(2, std::max(g.size(), cand.size()) / 2);
        if ((d <= limit || contains) && d < best_dist) {
            best = cand;
            best_dist = d;
        }
    }
    return best;
}

std::string join(const std::vector<std::string>& v) {
    std::string out;
    for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
    return out;
}

// Strict integer text: an optional sign and digits only, so "2.5", "2e3" and "0x10" are refused.
enum class IntParse { ok, not_integer, overflow };
IntParse parse_int(const std::string& s, int64_t& out) {
    const char* first = s.data();
    const char* last = s.data() + s.size();
    if (first != last && *first == '+') {  // from_chars takes '-' but not '+'
        ++first;
        if (first != last && *first == '-') return IntParse::not_integer;
    }
    auto [ptr, ec] = std::from_chars(first, last, out);
    if (ec == std::errc::result_out_of_range) return IntParse::overflow;
    return ec == std::errc() && ptr == last ? IntParse::ok : IntParse::not_integer;
}

std::string device_text(collapse_backend backend, int ordinal) {
    return backend == COLLAPSE_BACKEND_CUDA ? "cuda:" + std::to_string(ordinal) : std::string("cpu");
}

// "cpu", "cuda", "cuda:N" or "N" (= cuda:N).
bool parse_device(const std::string& s, collapse_backend& backend, int& ordinal) {
    if (s == "cpu") {
        backend = COLLAPSE_BACKEND_CPU;
        ordinal = 0;
        return true;
    }
    std::string digits = s;
    if (s == "cuda") {
        digits = "0";
    } else if (s.rfind("cuda:", 0) == 0) {
        digits = s.substr(5);
    }
    if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
        return false;
    int64_t n = 0;
    if (parse_int(digits, n) != IntParse::ok || n > INT32_MAX) return false;
    backend = COLLAPSE_BACKEND_CUDA;
    ordinal = int(n);
    return true;
}

std::string int_expectation(const IntKey& k) {
    if (k.bytes)
        return "a byte size >= " + (k.min == 0 ? std::string("0") : format_bytes(k.min)) +
               " (an integer of bytes or a string such as \"8GiB\")";
    return "an integer >= " + std::to_string(k.min);
}

// ---------------------------------------------------------------- range checks

// A range problem: the key it concerns and what is wrong. Shared by validate() (no line) and
// parse_yaml() (which adds the key's line), so the two cannot drift apart.
struct Problem {
    std::string key;
    std::string what;
};

std::vector<Problem> find_problems(const Config& c) {
    std::vector<Problem> out;
    for (const auto& k : kIntKeys) {
        int64_t v = c.*k.field;
        if (v < k.min)
            out.push_back({k.name, "expects " + int_expectation(k) + ", got " + std::to_string(v) +
                                       (k.bytes ? " (" + format_bytes(v) + ")" : "")});
    }
    for (const auto& k : enum_keys()) {
        if (k.get(c) < 0) out.push_back({k.name, "expects one of " + join(k.values) + ", got an invalid value"});
    }
    if (c.max_tokens_to_analyze < 0)
        out.push_back({"max_tokens_to_analyze",
                       "expects 0 (no limit) or an integer >= 1, got " + std::to_string(c.max_tokens_to_analyze)});
    if (!(c.cdnv_power > 0) || !std::isfinite(c.cdnv_power)) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%g", c.cdnv_power);
        out.push_back({"cdnv_power", std::string("expects a finite number > 0, got ") + buf});
    }
    if (c.device_ordinal < 0)
        out.push_back({"device", "expects a CUDA device ordinal >= 0, got " + std::to_string(c.device_ordinal)});
    if (c.intermediate_save_dir.empty())
        out.push_back({"intermediate_save_dir", "expects a non-empty directory path, got an empty string"});
    // Reports and checkpoints record it as JSON text; another byte would come back as U+FFFD, and a
    // resumed or merged run would spill elsewhere.
    if (!c.intermediate_save_dir.empty() && !is_utf8(c.intermediate_save_dir))
        out.push_back({"intermediate_save_dir", "expects a UTF-8 path (reports and checkpoints record it as JSON text), got other bytes"});
    if (c.intermediate_save_dir.size() >= sizeof(collapse_options::intermediate_save_dir))
        out.push_back({"intermediate_save_dir", "expects a path shorter than " + std::to_string(sizeof(collapse_options::intermediate_save_dir)) +
                                                    " bytes, got " + std::to_string(c.intermediate_save_dir.size())});
    if (c.compute_window_metrics < -1 || c.compute_window_metrics > 1)
        out.push_back({"compute_window_metrics", "expects true (1), false (0) or auto (-1), got " + std::to_string(c.compute_window_metrics)});
    // A value that is a class id would drop that class's rows without a word: refused, naming V.
    if (c.ignore_index && c.num_classes > 0 && *c.ignore_index >= 0 && *c.ignore_index < c.num_classes)
        out.push_back({"ignore_index", "is " + std::to_string(*c.ignore_index) + ", a class id in [0, num_classes = " + std::to_string(c.num_classes) +
                                           "): that class's rows would be dropped; give a label outside [0, V) (the Hugging Face convention "
                                           "is -100) or null to turn it off"});
    for (int64_t id : c.exclude_token_ids) {
        if (id < 0) {
            out.push_back({"exclude_token_ids", "expects token ids >= 0, got " + std::to_string(id)});
            break;
        }
        // Cross-key: an excluded id must be a label that can occur.
        if (c.num_classes > 0 && id >= c.num_classes) {
            out.push_back({"exclude_token_ids", "has token id " + std::to_string(id) + ", which is not below num_classes (" +
                                                    std::to_string(c.num_classes) + ")"});
            break;
        }
    }
    return out;
}

// ---------------------------------------------------------------- YAML reading

// Reads the values of one document, turning every problem into "<source>:<line>: ...".
class Reader {
public:
    explicit Reader(const std::string& source) : source_(source) {}

    template <class... A>
    [[noreturn]] void fail_at(int line, const A&... parts) const {
        fail(COLLAPSE_ERR_CONFIG, source_, ":", line, ": ", parts...);
    }

    // Line (1-based) of a value; an empty value has no useful mark of its own (yaml-cpp puts it on
    // the next line), so the key's line stands in.
    static int line_of(const YAML::Node& value, int key_line) {
        if (value.IsNull() || value.Mark().is_null()) return key_line;
        return value.Mark().line + 1;
    }

    // Plain scalars are untagged text (`5`); quoted ones (`"5"`) are strings and are refused
    // where a number or boolean is expected.
    static bool plain(const YAML::Node& n) { return n.IsScalar() && n.Tag() == "?"; }

    static std::string describe(const YAML::Node& n) {
        if (n.IsNull()) return "null";
        if (n.IsSequence()) return "a sequence";
        if (n.IsMap()) return "a map";
        // A value may hold any character (a quoted "\n" too): quoted printable, on one line.
        if (!plain(n)) return "the string \"" + printable(n.Scalar()) + "\"";
        return "'" + printable(n.Scalar()) + "'";
    }

    [[noreturn]] void expected(const std::string& key, const std::string& what, const YAML::Node& n, int line,
                               const std::string& note = "") const {
        fail_at(line, "key '", key, "' expects ", what, ", got ", describe(n), note);
    }

    int64_t integer(const std::string& key, const std::string& what, const YAML::Node& n, int line) const {
        int64_t v = 0;
        IntParse r = plain(n) ? parse_int(n.Scalar(), v) : IntParse::not_integer;
        if (r == IntParse::overflow) expected(key, what, n, line, " (too large for a 64-bit integer)");
        if (r != IntParse::ok) expected(key, what, n, line);
        return v;
    }

private:
    const std::string& source_;
};

// Counts documents and remembers the line of the second one's first node (its start marker's
// line when it is empty).
struct DocumentCounter : YAML::EventHandler {
    int documents = 0, second_line = 1;
    bool second_node = false;
    void node(const YAML::Mark& m) {
        if (documents == 2 && !second_node) second_line = m.line + 1, second_node = true;
    }
    void OnDocumentStart(const YAML::Mark& m) override {
        if (++documents == 2) second_line = m.line + 1;
    }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark& m, YAML::anchor_t) override { node(m); }
    void OnAlias(const YAML::Mark& m, YAML::anchor_t) override { node(m); }
    void OnScalar(const YAML::Mark& m, const std::string&, YAML::anchor_t, const std::string&) override { node(m); }
    void OnSequenceStart(const YAML::Mark& m, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override { node(m); }
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark& m, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override { node(m); }
    void OnMapEnd() override {}
};

// Text other than blanks, comments and document markers.
bool has_content(const std::string& text) {
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) {
        const size_t b = line.find_first_not_of(" \t\r");
        if (b == std::string::npos || line[b] == '#') continue;
        const std::string t = line.substr(b, line.find_last_not_of(" \t\r") + 1 - b);
        if (t != "---" && t != "...") return true;
    }
    return false;
}

YAML::Node load_document(const Reader& rd, const std::string& text) {
    YAML::Node doc;
    try {
        doc = YAML::Load(text);
        // A second document? yaml-cpp 0.7's LoadAll loops forever on some inputs (a lone ','; fixed
        // upstream after Debian 12's version), so the parser is stepped at most twice.
        std::istringstream in(text);
        YAML::Parser parser(in);
        DocumentCounter counter;
        for (int step = 0; step < 2 && parser.HandleNextDocument(counter); ++step) {
        }
        if (counter.documents > 1) rd.fail_at(counter.second_line, "a config holds one YAML document, found a second one");
    } catch (const YAML::Exception& e) {
        int line = e.mark.is_null() ? 1 : e.mark.line + 1;
        rd.fail_at(line, "YAML syntax error: ", e.msg);
    }
    // yaml-cpp reads some malformed text (",") as an empty document: that is not "all defaults".
    if (doc.IsNull() && has_content(text))
        rd.fail_at(1, "the config must be a map of `key: value` lines; this text is not (YAML read it as empty)");
    return doc;
}

// Reads the value of one known key into c. `device` only records what it selects in
// device_backend: parse_yaml reconciles it with `backend` once every key is read.
void read_value(const Reader& rd, const std::string& key, const YAML::Node& value, int line, Config& c,
                collapse_backend& device_backend) {
    for (const auto& k : kIntKeys) {
        if (key != k.name) continue;
        if (!k.bytes) {
            c.*k.field = rd.integer(key, int_expectation(k), value, line);
        } else {
            if (!value.IsScalar()) rd.expected(key, int_expectation(k), value, line);
            try {
                c.*k.field = parse_bytes(value.Scalar());
            } catch (const Error& e) {
                rd.fail_at(line, "key '", key, "': ", e.what());
            }
        }
        return;
    }
    for (const auto& k : kBoolKeys) {
        if (key != k.name) continue;
        bool b = false;
        if (!Reader::plain(value) || !YAML::convert<bool>::decode(value, b))
            rd.expected(key, "true or false", value, line);
        c.*k.field = b;
        return;
    }
    for (const auto& k : enum_keys()) {
        if (key != k.name) continue;
        const std::string what = "one of " + join(k.values);
        if (!value.IsScalar()) rd.expected(key, what, value, line);
        auto it = std::find(k.values.begin(), k.values.end(), value.Scalar());
        if (it == k.values.end()) {
            std::string hint = closest(value.Scalar(), k.values);
            rd.expected(key, what, value, line, hint.empty() ? "" : " (did you mean '" + hint + "'?)");
        }
        k.set(c, int(it - k.values.begin()));
        return;
    }
    if (key == "device") {
        if (!value.IsScalar() || !parse_device(value.Scalar(), device_backend, c.device_ordinal))
            rd.expected(key, "cpu, cuda, cuda:N or a CUDA device ordinal N >= 0", value, line);
        c.device_pinned = value.Scalar().find(':') != std::string::npos || std::isdigit((unsigned char)value.Scalar()[0]);
    } else if (key == "max_tokens_to_analyze") {
        // The seed's Optional[int]: null means no limit; 0 is refused so that it is not
        // mistaken for "analyse nothing".
        const std::string what = "null (no limit) or an integer >= 1";
        if (value.IsNull()) {
            c.max_tokens_to_analyze = 0;
        } else {
            c.max_tokens_to_analyze = rd.integer(key, what, value, line);
            if (c.max_tokens_to_analyze < 1) rd.expected(key, what, value, line);
        }
    } else if (key == "cdnv_power") {
        const std::string what = "a finite number > 0";
        double v = 0;
        const std::string& s = value.Scalar();
        auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (!Reader::plain(value) || s.empty() || ec != std::errc() || ptr != s.data() + s.size())
            rd.expected(key, what, value, line);
        c.cdnv_power = v;
    } else if (key == "seed") {
        const std::string what = "an integer in [0, 2^64)";
        const std::string& s = value.Scalar();
        auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), c.seed);
        if (!Reader::plain(value) || s.empty() || ec != std::errc() || ptr != s.data() + s.size())
            rd.expected(key, what, value, line);
    } else if (key == "exclude_token_ids") {
        const std::string what = "a sequence of token ids (integers >= 0)";
        if (!value.IsSequence()) rd.expected(key, what, value, line);
        std::vector<int64_t> ids;
        for (const auto& item : value) {
            int item_line = Reader::line_of(item, line);
            int64_t id = rd.integer(key, what, item, item_line);
            if (id < 0) rd.expected(key, what, item, item_line);
            ids.push_back(id);
        }
        std::sort(ids.begin(), ids.end());
        ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        c.exclude_token_ids = std::move(ids);
    } else if (key == "intermediate_save_dir") {
        if (!value.IsScalar()) rd.expected(key, "a directory path", value, line);
        c.intermediate_save_dir = value.Scalar();
    } else if (key == "compute_window_metrics") {
        // true, false or auto (on when rows carry sequence ids); null is auto too.
        bool b = false;
        if (value.IsNull() || (value.IsScalar() && value.Scalar() == "auto")) c.compute_window_metrics = -1;
        else if (Reader::plain(value) && YAML::convert<bool>::decode(value, b)) c.compute_window_metrics = b ? 1 : 0;
        else rd.expected(key, "true, false or auto", value, line);
    } else if (key == "ignore_index") {
        // Any integer; null turns it off. One inside [0, num_classes) is refused by find_problems.
        if (value.IsNull()) c.ignore_index.reset();
        else c.ignore_index = rd.integer(key, "null (off) or an integer label outside [0, num_classes), e.g. -100", value, line);
    }
}

}  // namespace

// ---------------------------------------------------------------- public API

Config parse_yaml(const std::string& text, const std::string& source) {
    Reader rd(source);
    YAML::Node root = load_document(rd, text);
    Config c;
    if (root.IsNull()) return c;  // an empty file or only comments: all defaults
    if (!root.IsMap())
        rd.fail_at(root.Mark().line + 1, "the config must be a map of `key: value` lines, got ",
                   Reader::describe(root));

    const std::vector<std::string> keys = all_keys();
    std::map<std::string, int> lines;  // key -> line where it was given
    collapse_backend device_backend = COLLAPSE_BACKEND_CPU;  // what `device` selects, when given
    for (const auto& kv : root) {
        const YAML::Node& key_node = kv.first;
        const YAML::Node& value = kv.second;
        const int key_line = key_node.Mark().line + 1;
        if (!key_node.IsScalar()) rd.fail_at(key_line, "a key must be a plain name, got ", Reader::describe(key_node));
        const std::string key = key_node.Scalar();
        if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
            std::string hint = closest(key, keys);
            if (!hint.empty()) rd.fail_at(key_line, "unknown key '", printable(key), "' (did you mean '", hint, "'?)");
            rd.fail_at(key_line, "unknown key '", printable(key), "' (valid keys: ", join(keys), ")");
        }
        // yaml-cpp keeps both copies of a repeated key; the second would silently win.
        if (lines.count(key)) rd.fail_at(key_line, "key '", key, "' is given twice (first on line ", lines[key], ")");
        lines[key] = key_line;
        read_value(rd, key, value, Reader::line_of(value, key_line), c, device_backend);
    }

    // `device` (seed key) and `backend` both choose the backend; refuse a config where they differ.
    if (lines.count("device")) {
        if (lines.count("backend") && device_backend != c.backend) {
            int dl = lines["device"], bl = lines["backend"];
            rd.fail_at(std::max(dl, bl), "key 'device' (line ", dl, ") selects ",
                       device_text(device_backend, c.device_ordinal), " but key 'backend' (line ", bl,
                       ") selects ", c.backend == COLLAPSE_BACKEND_CUDA ? "cuda" : "cpu",
                       "; give one of them or make them agree");
        }
        c.backend = device_backend;
    }
    c.device = device_text(c.backend, c.device_ordinal);

    // Range and cross-key checks, reported at the line of the key given first in the file. Every
    // problem concerns a key of the file (defaults are in range); the map's line 1 is a fallback.
    auto line_for = [&](const std::string& key) { return lines.count(key) ? lines[key] : INT_MAX; };
    const Problem* first = nullptr;
    std::vector<Problem> problems = find_problems(c);
    for (const auto& p : problems) {
        if (!first || line_for(p.key) < line_for(first->key)) first = &p;
    }
    if (first) {
        int line = line_for(first->key);
        rd.fail_at(line == INT_MAX ? root.Mark().line + 1 : line, "key '", first->key, "' ", first->what);
    }
    return c;
}

Config load_yaml_file(const std::string& path) {
    // A regular file of bounded size: a FIFO would block forever, /dev/zero would never end, and a
    // config has no business being larger than a few kilobytes.
    constexpr size_t kMaxConfigBytes = size_t(16) << 20;
    return parse_yaml(read_regular_file(path, "config file", kMaxConfigBytes), path);
}

void validate(const Config& c) {
    std::vector<Problem> problems = find_problems(c);
    if (!problems.empty())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "invalid configuration: key '", problems[0].key, "' ", problems[0].what);
    // One second pass cannot serve both: the Gram needs the input's rows, held-out NC4 other rows.
    const bool row_store = c.svd_mode == COLLAPSE_SVD_EXACT && c.compute_token_metrics;
    if (c.nc4_held_out && c.compute_overall_metrics && c.max_tokens_to_analyze > 0 && !row_store)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "held-out NC4 (--nc4-features) measures NC4 in the second pass, which max_tokens_to_analyze ",
             "without a row store needs for the overall Gram: use svd_mode: exact (with compute_token_metrics), or ",
             "compute_overall_metrics: false");
}

// An enum field of a C caller's options: any int may be stored there; refuse what is out of range
// before it is loaded as the enum type (undefined behaviour otherwise).
template <class E>
E option_enum(const E& field, const char* name, int count) {
    const int v = enum_value(field);
    if (v < 0 || v >= count)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "options.", name, " = ", v, " is not a valid value (0 to ", count - 1, ")");
    return static_cast<E>(v);
}

void check_options_size(size_t struct_size) {
    if (struct_size != sizeof(collapse_options) && struct_size != kOptionsSize010)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "collapse_options.struct_size is ", struct_size, ", expected ", sizeof(collapse_options),
             " (or ", kOptionsSize010, ", the size of collapse 0.1.0's struct; initialise the struct with collapse_options_default)");
}

void write_options(const Config& c, collapse_options* out, size_t struct_size) {
    check_options_size(struct_size);
    collapse_options o = to_options(c);
    o.struct_size = uint32_t(struct_size);
    std::memcpy(static_cast<void*>(out), &o, struct_size);
}

// Whether the caller's struct (of its struct_size) has `field`: an older caller's does not, and
// its memory ends before it.
#define COLLAPSE_OPTION_GIVEN(o, field) ((o).struct_size >= offsetof(collapse_options, field) + sizeof((o).field))

Config from_options(const collapse_options& o) {
    check_options_size(o.struct_size);
    if (o.num_exclude_token_ids < 0 || (o.num_exclude_token_ids > 0 && !o.exclude_token_ids))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "collapse_options: exclude_token_ids is NULL or num_exclude_token_ids (",
             o.num_exclude_token_ids, ") is negative");
    Config c;  // keys without an options field (save_every, log_level, ...) keep their defaults
    c.num_classes = o.num_classes;
    c.dim = o.dim;
    c.exclude_token_ids.assign(o.exclude_token_ids, o.exclude_token_ids + o.num_exclude_token_ids);
    std::sort(c.exclude_token_ids.begin(), c.exclude_token_ids.end());
    c.exclude_token_ids.erase(std::unique(c.exclude_token_ids.begin(), c.exclude_token_ids.end()),
                              c.exclude_token_ids.end());
    c.min_samples_per_token = o.min_samples_per_token;
    c.max_tokens_to_analyze = o.max_tokens_to_analyze;
    c.compute_token_metrics = o.compute_token_metrics != 0;
    c.compute_overall_metrics = o.compute_overall_metrics != 0;
    c.compute_class_metrics = o.compute_class_metrics != 0;
    c.min_classes_for_gnc2 = o.min_classes_for_gnc2;
    c.min_classes_for_unc3 = o.min_classes_for_unc3;
    c.svd_mode = option_enum(o.svd_mode, "svd_mode", 3);
    c.svd_max_rows_per_token = o.svd_max_rows_per_token;
    c.svd_center = o.svd_center != 0;
    c.global_mean = option_enum(o.global_mean, "global_mean", 2);
    c.cdnv_power = o.cdnv_power;
    c.unc3_classifier = option_enum(o.unc3_classifier, "unc3_classifier", 2);
    c.compute_nc4 = o.compute_nc4 != 0;
    c.seed = o.seed;
    c.host_memory_limit = o.host_memory_limit;
    c.device_memory_limit = o.device_memory_limit;
    c.backend = option_enum(o.backend, "backend", 2);
    c.device_ordinal = o.device;
    c.nonfinite_policy = option_enum(o.nonfinite_policy, "nonfinite_policy", 2);
    c.allow_tf32 = o.allow_tf32 != 0;
    c.device = device_text(c.backend, c.device_ordinal);
    const size_t dir_len = strnlen(o.intermediate_save_dir, sizeof o.intermediate_save_dir);
    if (dir_len == sizeof o.intermediate_save_dir)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "collapse_options.intermediate_save_dir is not NUL-terminated within its ",
             sizeof o.intermediate_save_dir, " bytes");
    c.intermediate_save_dir.assign(o.intermediate_save_dir, dir_len);
    c.max_buffer_size = o.max_buffer_size;
    if (COLLAPSE_OPTION_GIVEN(o, compute_window_metrics)) {
        c.window_size = o.window_size;
        c.compute_window_metrics = o.compute_window_metrics;
    }
    if (COLLAPSE_OPTION_GIVEN(o, per_class_arrays)) c.per_class_arrays = o.per_class_arrays != 0;
    if (COLLAPSE_OPTION_GIVEN(o, use_ignore_index)) {
        if (!o.use_ignore_index) c.ignore_index.reset();
        else c.ignore_index = o.ignore_index;
    }
    return c;
}

collapse_options to_options(const Config& c) {
    collapse_options o{};
    o.struct_size = sizeof(collapse_options);
    o.num_classes = c.num_classes;
    o.dim = c.dim;
    o.exclude_token_ids = c.exclude_token_ids.empty() ? nullptr : c.exclude_token_ids.data();
    o.num_exclude_token_ids = int64_t(c.exclude_token_ids.size());
    o.min_samples_per_token = c.min_samples_per_token;
    o.max_tokens_to_analyze = c.max_tokens_to_analyze;
    o.compute_token_metrics = c.compute_token_metrics;
    o.compute_overall_metrics = c.compute_overall_metrics;
    o.compute_class_metrics = c.compute_class_metrics;
    o.min_classes_for_gnc2 = c.min_classes_for_gnc2;
    o.min_classes_for_unc3 = c.min_classes_for_unc3;
    o.svd_mode = c.svd_mode;
    o.svd_max_rows_per_token = c.svd_max_rows_per_token;
    o.svd_center = c.svd_center;
    o.global_mean = c.global_mean;
    o.cdnv_power = c.cdnv_power;
    o.unc3_classifier = c.unc3_classifier;
    o.compute_nc4 = c.compute_nc4;
    o.seed = c.seed;
    o.host_memory_limit = c.host_memory_limit;
    o.device_memory_limit = c.device_memory_limit;
    o.backend = c.backend;
    o.device = c.device_ordinal;
    o.nonfinite_policy = c.nonfinite_policy;
    o.allow_tf32 = c.allow_tf32;
    // find_problems() refuses longer paths; cut here only for a config that skipped it.
    std::memcpy(o.intermediate_save_dir, c.intermediate_save_dir.data(),
                std::min(c.intermediate_save_dir.size(), sizeof o.intermediate_save_dir - 1));
    o.max_buffer_size = c.max_buffer_size;
    o.ignore_index = c.ignore_index.value_or(-100);
    o.use_ignore_index = c.ignore_index.has_value();
    o.window_size = c.window_size;
    o.compute_window_metrics = c.compute_window_metrics;
    o.per_class_arrays = c.per_class_arrays;
    return o;
}

nlohmann::json to_json(const Config& c) {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& k : kIntKeys) j[k.name] = c.*k.field;
    for (const auto& k : kBoolKeys) j[k.name] = c.*k.field;
    for (const auto& k : enum_keys()) {
        int i = k.get(c);
        j[k.name] = i < 0 ? nlohmann::json("invalid") : nlohmann::json(k.values[size_t(i)]);
    }
    j["device"] = device_text(c.backend, c.device_ordinal);
    j["max_tokens_to_analyze"] =
        c.max_tokens_to_analyze == 0 ? nlohmann::json(nullptr) : nlohmann::json(c.max_tokens_to_analyze);
    j["cdnv_power"] = c.cdnv_power;
    j["seed"] = c.seed;
    j["exclude_token_ids"] = c.exclude_token_ids;
    j["intermediate_save_dir"] = c.intermediate_save_dir;
    j["ignore_index"] = c.ignore_index ? nlohmann::json(*c.ignore_index) : nlohmann::json(nullptr);
    j["compute_window_metrics"] = c.compute_window_metrics < 0 ? nlohmann::json("auto") : nlohmann::json(c.compute_window_metrics == 1);
    return j;
}

}  // namespace collapse::internal
