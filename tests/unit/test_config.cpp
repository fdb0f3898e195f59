// Tests of the YAML configuration (src/core/config.cpp): defaults, the shipped configs, per-key
// type and range errors with their line, suggestions, device/backend forms, byte sizes and the
// conversions with the C options struct.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <thread>

#include "core/config.hpp"
#include "base/error.hpp"

#ifndef COLLAPSE_SOURCE_DIR
#define COLLAPSE_SOURCE_DIR "/work/main"
#endif

namespace collapse::internal {
namespace test_config {
namespace {

const std::string kSrc = COLLAPSE_SOURCE_DIR;

// Every YAML key of the config, as listed in the design (device_ordinal is not a key).
const std::set<std::string> kAllKeys{
    "save_every", "max_buffer_size", "device", "min_samples_per_token", "max_tokens_to_analyze",
    "compute_token_metrics", "compute_overall_metrics", "compute_class_metrics", "min_classes_for_gnc2",
    "min_classes_for_unc3", "continue_on_error", "log_level", "save_intermediate_results",
    "intermediate_save_dir", "exclude_token_ids", "svd_mode", "svd_max_rows_per_token", "svd_center",
    "global_mean", "cdnv_power", "unc3_classifier", "compute_nc4", "seed", "num_classes", "dim",
    "host_memory_limit", "device_memory_limit", "backend", "nonfinite_policy", "allow_tf32", "batch_rows", "ignore_index",
    "window_size", "compute_window_metrics", "per_class_arrays", "exclude_special_tokens"};

// The message and status of the Error that parsing `yaml` throws ("" when it does not throw).
struct Failure {
    collapse_status status = COLLAPSE_OK;
    std::string message;
};
Failure parse_failure(const std::string& yaml) {
    try {
        parse_yaml(yaml, "t.yaml");
    } catch (const Error& e) {
        return {e.status(), e.what()};
    }
    return {};
}

#define EXPECT_CONFIG_ERROR(yaml, expected)                                                 \
    do {                                                                                    \
        Failure f_ = parse_failure(yaml);                                                   \
        EXPECT_EQ(f_.status, COLLAPSE_ERR_CONFIG) << f_.message;                            \
        EXPECT_NE(f_.message.find(expected), std::string::npos) << "message: " << f_.message; \
    } while (0)

template <class F>
Failure failure_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return {e.status(), e.what()};
    }
    return {};
}

bool same(const Config& a, const Config& b) { return to_json(a) == to_json(b); }

// ------------------------------------------------------------------ defaults and shipped files

TEST(Config, DefaultsAreTheDocumentedOnesAndValid) {
    Config c;
    EXPECT_EQ(c.save_every, 1024);
    EXPECT_EQ(c.max_buffer_size, 10000);
    EXPECT_EQ(c.device, "cpu");
    EXPECT_EQ(c.min_samples_per_token, 2);
    EXPECT_EQ(c.max_tokens_to_analyze, 0);
    EXPECT_EQ(c.svd_mode, COLLAPSE_SVD_EXACT);
    EXPECT_EQ(c.host_memory_limit, int64_t(8) << 30);
    EXPECT_EQ(c.backend, COLLAPSE_BACKEND_CPU);
    EXPECT_NO_THROW(validate(c));
}

TEST(Config, EmptyDocumentsGiveDefaults) {
    for (const char* text : {"", "{}", "# only a comment\n", "---\n"}) {
        SCOPED_TRACE(text);
        EXPECT_TRUE(same(parse_yaml(text, "t.yaml"), Config{}));
    }
}

TEST(Config, DefaultYamlEqualsDefaultsAndListsEveryKey) {
    const std::string path = kSrc + "/configs/default.yaml";
    Config c = load_yaml_file(path);
    EXPECT_EQ(to_json(c), to_json(Config{}));
    std::set<std::string> in_file;
    for (const auto& kv : YAML::LoadFile(path)) in_file.insert(kv.first.Scalar());
    EXPECT_EQ(in_file, kAllKeys);
}

TEST(Config, SampledServerExampleParses) {
    Config c = load_yaml_file(kSrc + "/configs/sampled_server.yaml");
    EXPECT_EQ(c.svd_mode, COLLAPSE_SVD_SAMPLED);
    EXPECT_EQ(c.exclude_token_ids, (std::vector<int64_t>{0, 1, 2}));
    EXPECT_EQ(c.host_memory_limit, int64_t(2) << 30);
    EXPECT_EQ(c.nonfinite_policy, COLLAPSE_NONFINITE_SKIP_ROW);
}

TEST(Config, EveryKeyIsRead) {
    Config c = parse_yaml(R"(
save_every: 7
max_buffer_size: 99
device: cuda:1
min_samples_per_token: 3
max_tokens_to_analyze: 50
compute_token_metrics: false
compute_overall_metrics: false
compute_class_metrics: false
min_classes_for_gnc2: 4
min_classes_for_unc3: 5
continue_on_error: true
log_level: debug
save_intermediate_results: true
intermediate_save_dir: /tmp/x
exclude_token_ids: [3, 1]
svd_mode: off
svd_max_rows_per_token: 64
svd_center: true
global_mean: token_weighted
cdnv_power: 2.5
unc3_classifier: class_means
compute_nc4: true
seed: 18446744073709551615
num_classes: 100
dim: 16
host_memory_limit: 1GiB
device_memory_limit: 512MiB
backend: cuda
nonfinite_policy: skip_row
allow_tf32: true
batch_rows: 128
ignore_index: -7
window_size: 32
compute_window_metrics: false
per_class_arrays: true
exclude_special_tokens: true
)",
                          "t.yaml");
    nlohmann::json expected = {{"save_every", 7},
                               {"max_buffer_size", 99},
                               {"device", "cuda:1"},
                               {"min_samples_per_token", 3},
                               {"max_tokens_to_analyze", 50},
                               {"compute_token_metrics", false},
                               {"compute_overall_metrics", false},
                               {"compute_class_metrics", false},
                               {"min_classes_for_gnc2", 4},
                               {"min_classes_for_unc3", 5},
                               {"continue_on_error", true},
                               {"log_level", "debug"},
                               {"save_intermediate_results", true},
                               {"intermediate_save_dir", "/tmp/x"},
                               {"exclude_token_ids", {1, 3}},
                               {"svd_mode", "off"},
                               {"svd_max_rows_per_token", 64},
                               {"svd_center", true},
                               {"global_mean", "token_weighted"},
                               {"cdnv_power", 2.5},
                               {"unc3_classifier", "class_means"},
                               {"compute_nc4", true},
                               {"seed", std::numeric_limits<uint64_t>::max()},
                               {"num_classes", 100},
                               {"dim", 16},
                               {"host_memory_limit", int64_t(1) << 30},
                               {"device_memory_limit", int64_t(512) << 20},
                               {"backend", "cuda"},
                               {"nonfinite_policy", "skip_row"},
                               {"allow_tf32", true},
                               {"batch_rows", 128},
                               {"ignore_index", -7},
                               {"window_size", 32},
                               {"compute_window_metrics", false},
                               {"per_class_arrays", true},
                               {"exclude_special_tokens", true}};
    EXPECT_EQ(to_json(c), expected);
    EXPECT_EQ(c.device_ordinal, 1);
}

// ------------------------------------------------------------------ per-key type and range errors

struct KeyCase {
    const char* key;
    const char* bad_type;      // a value of the wrong type
    const char* type_message;  // expected text after "t.yaml:3: "
    const char* bad_range;     // a well-typed value out of range ("" when the type admits none)
    const char* range_message;
};
// Test names in ctest's listing: the key, not the struct's bytes.
void PrintTo(const KeyCase& k, std::ostream* os) { *os << k.key; }

// The bad key sits on line 3, between a comment and valid keys; the key after it matters for an
// empty value, which yaml-cpp marks on the next line.
std::string key_doc(const KeyCase& k, const char* value) {
    const std::string key = k.key;
    const std::string before = key == "svd_center" ? "svd_mode: exact" : "svd_center: false";
    const std::string after = key == "batch_rows" ? "dim: 3" : "batch_rows: 7";
    return "# config\n" + before + "\n" + key + ": " + value + "\n" + after + "\n";
}

class ConfigKeyTypeError : public ::testing::TestWithParam<KeyCase> {};
class ConfigKeyRangeError : public ::testing::TestWithParam<KeyCase> {};

TEST_P(ConfigKeyTypeError, NamesKeyLineExpectationAndValue) {
    const KeyCase& k = GetParam();
    EXPECT_CONFIG_ERROR(key_doc(k, k.bad_type), std::string("t.yaml:3: ") + k.type_message);
}

TEST_P(ConfigKeyRangeError, NamesKeyLineExpectationAndValue) {
    const KeyCase& k = GetParam();
    EXPECT_CONFIG_ERROR(key_doc(k, k.bad_range), std::string("t.yaml:3: ") + k.range_message);
}

const KeyCase kKeyCases[] = {
    {"save_every", "two", "key 'save_every' expects an integer >= 1, got 'two'", "0",
     "key 'save_every' expects an integer >= 1, got 0"},
    {"max_buffer_size", "2.5", "key 'max_buffer_size' expects an integer >= 1, got '2.5'", "-3",
     "key 'max_buffer_size' expects an integer >= 1, got -3"},
    {"min_samples_per_token", "two", "key 'min_samples_per_token' expects an integer >= 1, got 'two'", "0",
     "key 'min_samples_per_token' expects an integer >= 1, got 0"},
    {"min_classes_for_gnc2", "[2]", "key 'min_classes_for_gnc2' expects an integer >= 2, got a sequence", "1",
     "key 'min_classes_for_gnc2' expects an integer >= 2, got 1"},
    {"min_classes_for_unc3", "\"3\"", "key 'min_classes_for_unc3' expects an integer >= 2, got the string \"3\"", "1",
     "key 'min_classes_for_unc3' expects an integer >= 2, got 1"},
    {"svd_max_rows_per_token", "1e3", "key 'svd_max_rows_per_token' expects an integer >= 2, got '1e3'", "1",
     "key 'svd_max_rows_per_token' expects an integer >= 2, got 1"},
    {"num_classes", "", "key 'num_classes' expects an integer >= 0, got null", "-1",
     "key 'num_classes' expects an integer >= 0, got -1"},
    {"dim", "99999999999999999999", "key 'dim' expects an integer >= 0, got '99999999999999999999' (too large", "-1",
     "key 'dim' expects an integer >= 0, got -1"},
    {"batch_rows", "{a: 1}", "key 'batch_rows' expects an integer >= 1, got a map", "0",
     "key 'batch_rows' expects an integer >= 1, got 0"},
    {"host_memory_limit", "lots", "key 'host_memory_limit': invalid byte size 'lots'", "512KiB",
     "key 'host_memory_limit' expects a byte size >= 1 MiB (an integer of bytes or a string such as \"8GiB\"), "
     "got 524288"},
    {"device_memory_limit", "8XB", "key 'device_memory_limit': invalid byte size '8XB': unknown unit 'XB'", "-1GiB",
     "key 'device_memory_limit': invalid byte size '-1GiB': negative"},
    {"max_tokens_to_analyze", "all", "key 'max_tokens_to_analyze' expects null (no limit) or an integer >= 1, got 'all'",
     "0", "key 'max_tokens_to_analyze' expects null (no limit) or an integer >= 1, got '0'"},
    {"compute_token_metrics", "maybe", "key 'compute_token_metrics' expects true or false, got 'maybe'", "", ""},
    {"compute_overall_metrics", "1", "key 'compute_overall_metrics' expects true or false, got '1'", "", ""},
    {"compute_class_metrics", "\"true\"", "key 'compute_class_metrics' expects true or false, got the string \"true\"",
     "", ""},
    {"continue_on_error", "[]", "key 'continue_on_error' expects true or false, got a sequence", "", ""},
    {"save_intermediate_results", "", "key 'save_intermediate_results' expects true or false, got null", "", ""},
    {"svd_center", "0", "key 'svd_center' expects true or false, got '0'", "", ""},
    {"compute_nc4", "nope", "key 'compute_nc4' expects true or false, got 'nope'", "", ""},
    {"allow_tf32", "2", "key 'allow_tf32' expects true or false, got '2'", "", ""},
    {"per_class_arrays", "all", "key 'per_class_arrays' expects true or false, got 'all'", "", ""},
    {"exclude_special_tokens", "[1]", "key 'exclude_special_tokens' expects true or false, got a sequence", "", ""},
    {"log_level", "loud", "key 'log_level' expects one of debug, info, warning, error, got 'loud'", "", ""},
    {"svd_mode", "[exact]", "key 'svd_mode' expects one of exact, sampled, off, got a sequence", "", ""},
    {"global_mean", "mean", "key 'global_mean' expects one of class_balanced, token_weighted, got 'mean'", "", ""},
    {"unc3_classifier", "w", "key 'unc3_classifier' expects one of weights, class_means, got 'w'", "", ""},
    {"nonfinite_policy", "ignore", "key 'nonfinite_policy' expects one of error, skip_row, got 'ignore'", "", ""},
    {"backend", "tpu", "key 'backend' expects one of cpu, cuda, got 'tpu'", "", ""},
    {"cdnv_power", "strong", "key 'cdnv_power' expects a finite number > 0, got 'strong'", "0",
     "key 'cdnv_power' expects a finite number > 0, got 0"},
    {"seed", "-1", "key 'seed' expects an integer in [0, 2^64), got '-1'", "", ""},
    {"exclude_token_ids", "5", "key 'exclude_token_ids' expects a sequence of token ids (integers >= 0), got '5'",
     "[1, -2]", "key 'exclude_token_ids' expects a sequence of token ids (integers >= 0), got '-2'"},
    {"intermediate_save_dir", "[a]", "key 'intermediate_save_dir' expects a directory path, got a sequence", "\"\"",
     "key 'intermediate_save_dir' expects a non-empty directory path, got an empty string"},
    {"window_size", "wide", "key 'window_size' expects an integer >= 2, got 'wide'", "1", "key 'window_size' expects an integer >= 2, got 1"},
    {"compute_window_metrics", "sometimes", "key 'compute_window_metrics' expects true, false or auto, got 'sometimes'", "", ""},
    {"ignore_index", "x", "key 'ignore_index' expects null (off) or an integer label outside [0, num_classes), e.g. -100, got 'x'", "", ""},
    {"device", "gpu", "key 'device' expects cpu, cuda, cuda:N or a CUDA device ordinal N >= 0, got 'gpu'", "cuda:-1",
     "key 'device' expects cpu, cuda, cuda:N or a CUDA device ordinal N >= 0, got 'cuda:-1'"},
};
std::vector<KeyCase> cases_with_range() {
    std::vector<KeyCase> out;
    for (const auto& k : kKeyCases)
        if (*k.bad_range) out.push_back(k);
    return out;
}
std::string case_name(const ::testing::TestParamInfo<KeyCase>& info) { return info.param.key; }

INSTANTIATE_TEST_SUITE_P(EveryKey, ConfigKeyTypeError, ::testing::ValuesIn(kKeyCases), case_name);
INSTANTIATE_TEST_SUITE_P(KeysWithRanges, ConfigKeyRangeError, ::testing::ValuesIn(cases_with_range()), case_name);

TEST(ConfigKeyCases, CoverEveryKey) {
    std::set<std::string> covered;
    for (const auto& k : kKeyCases) covered.insert(k.key);
    EXPECT_EQ(covered, kAllKeys);
}

TEST(Config, ErrorInABlockSequenceNamesTheItemsLine) {
    EXPECT_CONFIG_ERROR("exclude_token_ids:\n  - 1\n  - x\n", "t.yaml:3: key 'exclude_token_ids' expects");
}

TEST(Config, RangeErrorOnALaterLineIsReportedThere) {
    EXPECT_CONFIG_ERROR("save_every: 5\n\n\nbatch_rows: 0\n", "t.yaml:4: key 'batch_rows'");
}

// ------------------------------------------------------------------ suggestions

TEST(Config, UnknownKeySuggestsTheClosest) {
    EXPECT_CONFIG_ERROR("svd_mode: exact\nsvd_mod: exact\n", "t.yaml:2: unknown key 'svd_mod' (did you mean 'svd_mode'?)");
    EXPECT_CONFIG_ERROR("min_sample_per_token: 2\n", "unknown key 'min_sample_per_token' (did you mean 'min_samples_per_token'?)");
    EXPECT_CONFIG_ERROR("SVD_MODE: exact\n", "(did you mean 'svd_mode'?)");
    EXPECT_CONFIG_ERROR("max_tokens: 5\n", "(did you mean 'max_tokens_to_analyze'?)");
    EXPECT_CONFIG_ERROR("device_ordinal: 1\n", "unknown key 'device_ordinal'");
}

TEST(Config, UnknownKeyFarFromAllListsTheValidKeys) {
    Failure f = parse_failure("zzzzzzzz: 1\n");
    EXPECT_EQ(f.status, COLLAPSE_ERR_CONFIG);
    EXPECT_NE(f.message.find("t.yaml:1: unknown key 'zzzzzzzz' (valid keys: "), std::string::npos) << f.message;
    EXPECT_EQ(f.message.find("did you mean"), std::string::npos) << f.message;
}

TEST(Config, BadEnumValueListsValuesAndSuggests) {
    EXPECT_CONFIG_ERROR("svd_mode: sampeld\n",
                        "t.yaml:1: key 'svd_mode' expects one of exact, sampled, off, got 'sampeld' (did you mean 'sampled'?)");
    EXPECT_CONFIG_ERROR("log_level: warn\n", "(did you mean 'warning'?)");
    EXPECT_CONFIG_ERROR("global_mean: class_balance\n", "(did you mean 'class_balanced'?)");
    EXPECT_CONFIG_ERROR("nonfinite_policy: skip\n", "(did you mean 'skip_row'?)");
}

// ------------------------------------------------------------------ device and backend

TEST(Config, DeviceForms) {
    struct Case {
        const char* yaml;
        collapse_backend backend;
        int ordinal;
        const char* device;
        bool pinned;  // an ordinal was named (MPI ranks then all use it)
    };
    const Case cases[] = {
        {"device: cpu\n", COLLAPSE_BACKEND_CPU, 0, "cpu", false},
        {"device: cuda\n", COLLAPSE_BACKEND_CUDA, 0, "cuda:0", false},
        {"device: cuda:3\n", COLLAPSE_BACKEND_CUDA, 3, "cuda:3", true},
        {"device: cuda:0\n", COLLAPSE_BACKEND_CUDA, 0, "cuda:0", true},
        {"device: 2\n", COLLAPSE_BACKEND_CUDA, 2, "cuda:2", true},
        {"device: \"cuda:1\"\n", COLLAPSE_BACKEND_CUDA, 1, "cuda:1", true},
        {"backend: cuda\n", COLLAPSE_BACKEND_CUDA, 0, "cuda:0", false},
        {"backend: cpu\n", COLLAPSE_BACKEND_CPU, 0, "cpu", false},
        {"device: cuda:1\nbackend: cuda\n", COLLAPSE_BACKEND_CUDA, 1, "cuda:1", true},
        {"backend: cuda\ndevice: 4\n", COLLAPSE_BACKEND_CUDA, 4, "cuda:4", true},
        {"device: cpu\nbackend: cpu\n", COLLAPSE_BACKEND_CPU, 0, "cpu", false},
    };
    for (const auto& k : cases) {
        SCOPED_TRACE(k.yaml);
        Config c = parse_yaml(k.yaml, "t.yaml");
        EXPECT_EQ(c.backend, k.backend);
        EXPECT_EQ(c.device_ordinal, k.ordinal);
        EXPECT_EQ(c.device, k.device);
        EXPECT_EQ(c.device_pinned, k.pinned);
        EXPECT_EQ(to_json(c)["device"], k.device);
    }
}

TEST(Config, DeviceAndBackendThatDisagreeNameBothLines) {
    EXPECT_CONFIG_ERROR("device: cuda:1\nsave_every: 3\nbackend: cpu\n",
                        "t.yaml:3: key 'device' (line 1) selects cuda:1 but key 'backend' (line 3) selects cpu");
    EXPECT_CONFIG_ERROR("backend: cuda\ndevice: cpu\n",
                        "t.yaml:2: key 'device' (line 2) selects cpu but key 'backend' (line 1) selects cuda");
}

TEST(Config, BadDeviceForms) {
    for (const char* v : {"\"cuda:\"", "cuda:x", "cuda1", "-1", "CUDA", "[0]", "cuda:99999999999"}) {
        SCOPED_TRACE(v);
        EXPECT_CONFIG_ERROR(std::string("device: ") + v + "\n", "t.yaml:1: key 'device' expects");
    }
}

// ------------------------------------------------------------------ other value forms

TEST(Config, MaxTokensNullMeansNoLimit) {
    EXPECT_EQ(parse_yaml("max_tokens_to_analyze: null\n", "t.yaml").max_tokens_to_analyze, 0);
    EXPECT_EQ(parse_yaml("max_tokens_to_analyze: ~\n", "t.yaml").max_tokens_to_analyze, 0);
    EXPECT_EQ(parse_yaml("max_tokens_to_analyze:\n", "t.yaml").max_tokens_to_analyze, 0);
    EXPECT_EQ(parse_yaml("max_tokens_to_analyze: 100\n", "t.yaml").max_tokens_to_analyze, 100);
    EXPECT_TRUE(to_json(Config{})["max_tokens_to_analyze"].is_null());
}

TEST(Config, ExcludeIdsAreDeduplicatedAndSorted) {
    EXPECT_EQ(parse_yaml("exclude_token_ids: [5, 1, 5, 3, 1]\n", "t.yaml").exclude_token_ids,
              (std::vector<int64_t>{1, 3, 5}));
    EXPECT_EQ(parse_yaml("exclude_token_ids:\n  - 2\n  - 0\n", "t.yaml").exclude_token_ids,
              (std::vector<int64_t>{0, 2}));
    EXPECT_TRUE(parse_yaml("exclude_token_ids: []\n", "t.yaml").exclude_token_ids.empty());
}

TEST(Config, ExcludeIdsMustBeBelowNumClasses) {
    EXPECT_NO_THROW(parse_yaml("num_classes: 6\nexclude_token_ids: [5]\n", "t.yaml"));
    EXPECT_CONFIG_ERROR("exclude_token_ids: [5]\nnum_classes: 4\n",
                        "t.yaml:1: key 'exclude_token_ids' has token id 5, which is not below num_classes (4)");
}

TEST(Config, MemoryLimitsTakeIntegersAndUnits) {
    EXPECT_EQ(parse_yaml("host_memory_limit: 1073741824\n", "t.yaml").host_memory_limit, int64_t(1) << 30);
    EXPECT_EQ(parse_yaml("host_memory_limit: \"1.5GB\"\n", "t.yaml").host_memory_limit, 1500000000);
    EXPECT_EQ(parse_yaml("host_memory_limit: 64MB\n", "t.yaml").host_memory_limit, 64000000);
    EXPECT_EQ(parse_yaml("device_memory_limit: 0\n", "t.yaml").device_memory_limit, 0);
    EXPECT_EQ(parse_yaml("device_memory_limit: 4096\n", "t.yaml").device_memory_limit, 4096);
}

TEST(Config, NumbersKeepTheirTypes) {
    EXPECT_EQ(parse_yaml("cdnv_power: 2\n", "t.yaml").cdnv_power, 2.0);
    EXPECT_EQ(parse_yaml("save_every: +8\n", "t.yaml").save_every, 8);
    EXPECT_CONFIG_ERROR("cdnv_power: .inf\n", "key 'cdnv_power' expects a finite number > 0");
    EXPECT_CONFIG_ERROR("seed: 18446744073709551616\n", "key 'seed' expects an integer in [0, 2^64)");
    EXPECT_CONFIG_ERROR("save_every: 0x10\n", "key 'save_every' expects an integer >= 1, got '0x10'");
}

TEST(Config, BooleansAcceptYamlBooleans) {
    EXPECT_FALSE(parse_yaml("compute_token_metrics: false\n", "t.yaml").compute_token_metrics);
    EXPECT_TRUE(parse_yaml("compute_nc4: true\n", "t.yaml").compute_nc4);
    EXPECT_TRUE(parse_yaml("compute_nc4: yes\n", "t.yaml").compute_nc4);  // yaml-cpp's as<bool> reading
}

// ------------------------------------------------------------------ document-level errors

TEST(Config, YamlSyntaxErrorKeepsMessageAndLine) {
    EXPECT_CONFIG_ERROR("save_every: 1\nexclude_token_ids: [1, 2\nbatch_rows: 3\n",
                        "t.yaml:3: YAML syntax error: end of sequence flow not found");
    EXPECT_CONFIG_ERROR("save_every: 1\n bad: 2\n", "t.yaml:2: YAML syntax error: illegal map value");
}

TEST(Config, NonMapDocumentsAreRefused) {
    EXPECT_CONFIG_ERROR("- 1\n- 2\n", "t.yaml:1: the config must be a map of `key: value` lines, got a sequence");
    EXPECT_CONFIG_ERROR("5\n", "t.yaml:1: the config must be a map");
    EXPECT_CONFIG_ERROR("\n\nhello\n", "t.yaml:3: the config must be a map");
}

TEST(Config, RepeatedKeysAndSecondDocumentsAreRefused) {
    EXPECT_CONFIG_ERROR("seed: 1\nseed: 2\n", "t.yaml:2: key 'seed' is given twice (first on line 1)");
    EXPECT_CONFIG_ERROR("seed: 1\n---\nseed: 2\n", "t.yaml:3: a config holds one YAML document");
    EXPECT_CONFIG_ERROR("[a]: 1\n", "t.yaml:1: a key must be a plain name");
}

// A key or value with a newline or a control character (YAML's "\n", "\x01" escapes) went into the
// one-line message as it was.
TEST(Config, MessagesQuoteControlCharactersOfKeysAndValues) {
    EXPECT_CONFIG_ERROR("\"svd\\nmode\": exact\n", "t.yaml:1: unknown key 'svd\\x0Amode' (");
    EXPECT_CONFIG_ERROR("svd_mode: \"ex\\x01act\\tx\"\n", "key 'svd_mode' expects one of exact, sampled, off, got the string \"ex\\x01act\\x09x\"");
    EXPECT_CONFIG_ERROR("seed: \"1\\n2\"\n", "got the string \"1\\x0A2\"");
}

// yaml-cpp 0.7's LoadAll never returns on these (found by fuzz_config); yaml-cpp reads them as an
// empty document, which must not mean "all defaults".
TEST(Config, MalformedTextThatYamlReadsAsEmptyIsRefusedAndDoesNotHang) {
    for (const char* text : {",", ",\n", "  ,  # c\n", "seed: 1\n,\n"}) {
        SCOPED_TRACE(text);
        const Failure f = failure_of([&] { parse_yaml(text, "t.yaml"); });
        EXPECT_EQ(f.status, COLLAPSE_ERR_CONFIG) << f.message;
        EXPECT_NE(f.message.find("t.yaml:"), std::string::npos) << f.message;
    }
    // Comments and document markers alone are still an empty config: every default.
    EXPECT_EQ(parse_yaml("# nothing\n---\n...\n", "t.yaml").seed, Config{}.seed);
}

TEST(Config, UnreadableFileIsAnIoErrorNamingThePath) {
    Failure missing = failure_of([] { load_yaml_file("/nonexistent/dir/c.yaml"); });
    EXPECT_EQ(missing.status, COLLAPSE_ERR_IO);
    EXPECT_NE(missing.message.find("/nonexistent/dir/c.yaml"), std::string::npos) << missing.message;
    Failure dir = failure_of([] { load_yaml_file("/tmp"); });
    EXPECT_EQ(dir.status, COLLAPSE_ERR_IO) << dir.message;
    EXPECT_NE(dir.message.find("/tmp"), std::string::npos) << dir.message;
}

TEST(Config, FileErrorsUseThePathAsSource) {
    const std::string path = ::testing::TempDir() + "collapse_test_config.yaml";
    {
        std::ofstream out(path);
        out << "save_every: 1\nsvd_mode: exactly\n";
    }
    Failure f = failure_of([&] { load_yaml_file(path); });
    std::remove(path.c_str());
    EXPECT_EQ(f.status, COLLAPSE_ERR_CONFIG);
    EXPECT_EQ(f.message.rfind(path + ":2: key 'svd_mode'", 0), 0u) << f.message;
}

// ------------------------------------------------------------------ validate()

TEST(Config, ValidateRefusesOutOfRangeWithoutALine) {
    struct Case {
        void (*spoil)(Config&);
        const char* message;
    };
    const Case cases[] = {
        {[](Config& c) { c.save_every = 0; }, "invalid configuration: key 'save_every' expects an integer >= 1, got 0"},
        {[](Config& c) { c.max_buffer_size = 0; }, "key 'max_buffer_size'"},
        {[](Config& c) { c.min_samples_per_token = 0; }, "key 'min_samples_per_token'"},
        {[](Config& c) { c.max_tokens_to_analyze = -1; }, "key 'max_tokens_to_analyze'"},
        {[](Config& c) { c.min_classes_for_gnc2 = 1; }, "key 'min_classes_for_gnc2'"},
        {[](Config& c) { c.min_classes_for_unc3 = 1; }, "key 'min_classes_for_unc3'"},
        {[](Config& c) { c.svd_max_rows_per_token = 1; }, "key 'svd_max_rows_per_token'"},
        {[](Config& c) { c.cdnv_power = 0; }, "key 'cdnv_power' expects a finite number > 0, got 0"},
        {[](Config& c) { c.cdnv_power = std::nan(""); }, "key 'cdnv_power'"},
        {[](Config& c) { c.cdnv_power = HUGE_VAL; }, "key 'cdnv_power' expects a finite number > 0, got inf"},
        {[](Config& c) { c.host_memory_limit = 1000; }, "key 'host_memory_limit'"},
        {[](Config& c) { c.device_memory_limit = -1; }, "key 'device_memory_limit'"},
        {[](Config& c) { c.num_classes = -1; }, "key 'num_classes'"},
        {[](Config& c) { c.dim = -1; }, "key 'dim'"},
        {[](Config& c) { c.batch_rows = 0; }, "key 'batch_rows'"},
        {[](Config& c) { c.exclude_token_ids = {-1}; }, "key 'exclude_token_ids' expects token ids >= 0, got -1"},
        {[](Config& c) { c.num_classes = 3, c.exclude_token_ids = {3}; }, "which is not below num_classes (3)"},
        {[](Config& c) { c.intermediate_save_dir.clear(); }, "key 'intermediate_save_dir'"},
        {[](Config& c) { c.svd_mode = collapse_svd_mode(7); }, "key 'svd_mode' expects one of exact, sampled, off"},
        {[](Config& c) { c.backend = collapse_backend(-1); }, "key 'backend'"},
        {[](Config& c) { c.log_level = "verbose"; }, "key 'log_level'"},
        {[](Config& c) { c.device_ordinal = -1; }, "key 'device' expects a CUDA device ordinal >= 0, got -1"},
        {[](Config& c) { c.intermediate_save_dir = std::string(2000, 'a'); },
         "key 'intermediate_save_dir' expects a path shorter than 1024 bytes, got 2000"},
    };
    for (const auto& k : cases) {
        Config c;
        k.spoil(c);
        Failure f = failure_of([&] { validate(c); });
        SCOPED_TRACE(k.message);
        EXPECT_EQ(f.status, COLLAPSE_ERR_INVALID_ARGUMENT) << f.message;
        EXPECT_NE(f.message.find(k.message), std::string::npos) << f.message;
    }
}

// ------------------------------------------------------------------ bytes

TEST(Bytes, ParsesSizesWithUnits) {
    const std::pair<const char*, int64_t> cases[] = {
        {"0", 0},
        {"4096", 4096},
        {"512 B", 512},
        {"1KB", 1000},
        {"1kb", 1000},
        {"1KiB", 1024},
        {"8GiB", int64_t(8) << 30},
        {"512MiB", int64_t(512) << 20},
        {"512mib", int64_t(512) << 20},
        {"64MB", 64000000},
        {"1.5GB", 1500000000},
        {"1.5GiB", 1610612736},
        {"2 TiB", int64_t(2) << 40},
        {"3TB", 3000000000000},
        {"1e9", 1000000000},
        {" 7 mib ", int64_t(7) << 20},
        {"0.5KiB", 512},
        {".25 KiB", 256},
        {"9223372036854775807", std::numeric_limits<int64_t>::max()},
    };
    for (const auto& [text, bytes] : cases) {
        SCOPED_TRACE(text);
        EXPECT_EQ(parse_bytes(text), bytes);
    }
}

TEST(Bytes, RefusesMalformedNegativeAndOverflowingSizes) {
    for (const char* text : {"", " ", "-1", "-1GiB", "abc", "GiB", "1.2.3", "1 2", "8XB", "8 G", "+5", "0x10",
                             "nan", "inf", "1e", "9223372036854775808", "9000000TiB", "1e30", "1e400"}) {
        SCOPED_TRACE(text);
        Failure f = failure_of([&] { parse_bytes(text); });
        EXPECT_EQ(f.status, COLLAPSE_ERR_INVALID_ARGUMENT);
        EXPECT_NE(f.message.find(std::string("invalid byte size '") + text + "'"), std::string::npos) << f.message;
    }
}

TEST(Bytes, Formats) {
    EXPECT_EQ(format_bytes(0), "0 B");
    EXPECT_EQ(format_bytes(512), "512 B");
    EXPECT_EQ(format_bytes(1023), "1023 B");
    EXPECT_EQ(format_bytes(1024), "1 KiB");
    EXPECT_EQ(format_bytes(1610612736), "1.50 GiB");
    EXPECT_EQ(format_bytes(int64_t(8) << 30), "8 GiB");
    EXPECT_EQ(format_bytes(1500000000), "1.40 GiB");
    EXPECT_EQ(format_bytes(-2048), "-2 KiB");
    EXPECT_EQ(format_bytes(std::numeric_limits<int64_t>::min()), "-8 EiB");
}

// ------------------------------------------------------------------ C options and JSON

Config non_default_options_config() {
    Config c;
    c.num_classes = 50;
    c.dim = 8;
    c.exclude_token_ids = {0, 7, 9};
    c.min_samples_per_token = 4;
    c.max_tokens_to_analyze = 20;
    c.compute_token_metrics = false;
    c.compute_overall_metrics = false;
    c.compute_class_metrics = false;
    c.min_classes_for_gnc2 = 3;
    c.min_classes_for_unc3 = 4;
    c.svd_mode = COLLAPSE_SVD_SAMPLED;
    c.svd_max_rows_per_token = 32;
    c.svd_center = true;
    c.global_mean = COLLAPSE_MEAN_TOKEN_WEIGHTED;
    c.cdnv_power = 2;
    c.unc3_classifier = COLLAPSE_UNC3_CLASS_MEANS;
    c.compute_nc4 = true;
    c.seed = 42;
    c.host_memory_limit = int64_t(3) << 30;
    c.device_memory_limit = int64_t(1) << 30;
    c.backend = COLLAPSE_BACKEND_CUDA;
    c.device_ordinal = 2;
    c.device = "cuda:2";
    c.nonfinite_policy = COLLAPSE_NONFINITE_SKIP_ROW;
    c.allow_tf32 = true;
    c.ignore_index = -3;
    return c;
}

TEST(Options, RoundTripKeepsEveryOptionField) {
    Config c = non_default_options_config();
    collapse_options o = to_options(c);
    EXPECT_EQ(o.struct_size, sizeof(collapse_options));
    EXPECT_EQ(o.exclude_token_ids, c.exclude_token_ids.data());
    EXPECT_EQ(o.num_exclude_token_ids, 3);
    EXPECT_EQ(o.device, 2);
    EXPECT_EQ(o.backend, COLLAPSE_BACKEND_CUDA);
    EXPECT_EQ(o.compute_token_metrics, 0);
    Config back = from_options(o);
    EXPECT_EQ(to_json(back), to_json(c));
    EXPECT_EQ(back.device, "cuda:2");
    EXPECT_EQ(back.device_ordinal, 2);
}

TEST(Options, KeysOutsideTheStructKeepTheirDefaults) {
    Config c;
    c.save_every = 5;
    c.log_level = "debug";
    c.batch_rows = 7;
    c.intermediate_save_dir = "elsewhere";
    c.max_buffer_size = 77;
    Config back = from_options(to_options(c));
    EXPECT_EQ(back.save_every, Config{}.save_every);
    EXPECT_EQ(back.log_level, "info");
    EXPECT_EQ(back.batch_rows, Config{}.batch_rows);
    // The spill directory and the device buffer are in the struct (sessions spill through the C API too).
    EXPECT_EQ(back.intermediate_save_dir, "elsewhere");
    EXPECT_EQ(back.max_buffer_size, 77);
}

TEST(Options, SpillDirectoryMustBeTerminated) {
    collapse_options o = to_options(Config{});
    std::memset(o.intermediate_save_dir, 'x', sizeof o.intermediate_save_dir);
    const Failure f = failure_of([&] { from_options(o); });
    EXPECT_EQ(f.status, COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(f.message.find("intermediate_save_dir is not NUL-terminated"), std::string::npos) << f.message;
}

TEST(Options, ExcludeIdsAreCopiedSortedAndUnique) {
    const int64_t ids[] = {9, 2, 9};
    collapse_options o = to_options(Config{});
    o.exclude_token_ids = ids;
    o.num_exclude_token_ids = 3;
    EXPECT_EQ(from_options(o).exclude_token_ids, (std::vector<int64_t>{2, 9}));
    EXPECT_EQ(to_options(Config{}).exclude_token_ids, nullptr);
}

TEST(Options, MalformedStructIsRefused) {
    collapse_options o = to_options(Config{});
    o.struct_size = 0;
    EXPECT_EQ(failure_of([&] { from_options(o); }).status, COLLAPSE_ERR_INVALID_ARGUMENT);
    o = to_options(Config{});
    o.num_exclude_token_ids = 2;  // with a NULL pointer
    EXPECT_EQ(failure_of([&] { from_options(o); }).status, COLLAPSE_ERR_INVALID_ARGUMENT);
}

TEST(Json, HasEveryKeyWithEffectiveValues) {
    Config c = non_default_options_config();
    nlohmann::json j = to_json(c);
    std::set<std::string> keys;
    for (const auto& item : j.items()) keys.insert(item.key());
    EXPECT_EQ(keys, kAllKeys);
    EXPECT_EQ(j["device"], "cuda:2");
    EXPECT_EQ(j["backend"], "cuda");
    EXPECT_EQ(j["svd_mode"], "sampled");
    EXPECT_EQ(j["global_mean"], "token_weighted");
    EXPECT_EQ(j["unc3_classifier"], "class_means");
    EXPECT_EQ(j["nonfinite_policy"], "skip_row");
    EXPECT_EQ(j["log_level"], "info");
    EXPECT_TRUE(j["host_memory_limit"].is_number_integer());
    EXPECT_EQ(j["host_memory_limit"], int64_t(3) << 30);
    EXPECT_EQ(j["max_tokens_to_analyze"], 20);
    EXPECT_EQ(j["exclude_token_ids"], nlohmann::json({0, 7, 9}));
}

TEST(Json, ParsesBackAsYaml) {
    // JSON is YAML: the report's config section must load back to the same config.
    Config c = non_default_options_config();
    c.save_every = 3;
    c.intermediate_save_dir = "some dir/with: colon";
    EXPECT_EQ(to_json(parse_yaml(to_json(c).dump(), "report.json")), to_json(c));
    EXPECT_EQ(to_json(parse_yaml(to_json(Config{}).dump(2), "report.json")), to_json(Config{}));
}

}  // namespace
}  // namespace test_config
}  // namespace collapse::internal

// The C API's YAML readers write only the caller's struct: a program built against collapse 0.1.0
// calls the functions of the macros' names (they fill the 0.1.0 struct, nothing past it); the sized
// forms fill what the size holds; a size the library does not know is refused before anything is
// written, and the options of the previous call stay as they were.
TEST(OptionsAbi, YamlReadersWriteOnlyTheCallersStruct) {
    const std::string path = ::testing::TempDir() + "/options_abi.yaml";
    std::ofstream(path) << "seed: 7\nwindow_size: 32\nexclude_token_ids: [3, 1]\n";
    collapse_options old[2];
    std::memset(static_cast<void*>(old), 0xAB, sizeof old);
    ASSERT_EQ((collapse_options_from_yaml_file)(path.c_str(), &old[0]), COLLAPSE_OK) << collapse_last_error();
    const auto* bytes = reinterpret_cast<const unsigned char*>(old);
    for (size_t i = collapse::internal::kOptionsSize010; i < sizeof old; ++i) ASSERT_EQ(bytes[i], 0xAB) << "byte " << i;
    EXPECT_EQ(old[0].struct_size, collapse::internal::kOptionsSize010);
    EXPECT_EQ(old[0].seed, 7u);
    ASSERT_EQ(old[0].num_exclude_token_ids, 2);
    EXPECT_EQ(old[0].exclude_token_ids[0], 1);

    collapse_options o;
    ASSERT_EQ(collapse_options_from_yaml_file(path.c_str(), &o), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(o.struct_size, sizeof(collapse_options));
    EXPECT_EQ(o.window_size, 32);
    unsigned char before[sizeof o];
    std::memcpy(before, static_cast<const void*>(&o), sizeof o);
    EXPECT_EQ(collapse_options_from_yaml_string_sized("seed: 9\n", "t.yaml", &o, 7), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find("struct_size is 7"), std::string::npos) << collapse_last_error();
    EXPECT_EQ(std::memcmp(static_cast<const void*>(&o), before, sizeof o), 0);
    EXPECT_EQ(o.exclude_token_ids[1], 3);  // the previous call's storage is kept
    EXPECT_EQ(collapse_options_from_yaml_file_sized(path.c_str(), &o, sizeof o + 8), COLLAPSE_ERR_INVALID_ARGUMENT);
}

// A server reads its config on a start-up thread and creates sessions on others: the storage that
// exclude_token_ids points into was freed when the reading thread exited (a use after free that
// ASan and valgrind see; natively the session refused a garbage token id).
TEST(OptionsAbi, YamlStorageOutlivesTheReadingThread) {
    collapse_options o;
    collapse_status st = COLLAPSE_ERR_INTERNAL;
    std::thread reader([&] { st = collapse_options_from_yaml_string("num_classes: 5\nexclude_token_ids: [3, 1]\n", "t.yaml", &o); });
    reader.join();
    ASSERT_EQ(st, COLLAPSE_OK);
    ASSERT_EQ(o.num_exclude_token_ids, 2);
    EXPECT_EQ(o.exclude_token_ids[0], 1);
    EXPECT_EQ(o.exclude_token_ids[1], 3);
    collapse_session* s = nullptr;
    ASSERT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    collapse_session_destroy(s);
}

// exclude_special_tokens needs a tokenizer, which only the command line reads: every C API reader
// of YAML refuses it (the string reader and collapse_analyze_files took it and excluded nothing,
// and the latter's report said it had).
TEST(OptionsAbi, ExcludeSpecialTokensIsRefusedByEveryCReader) {
    collapse_options o;
    EXPECT_EQ(collapse_options_from_yaml_string("exclude_special_tokens: true\n", "t.yaml", &o), COLLAPSE_ERR_CONFIG);
    EXPECT_NE(std::string(collapse_last_error()).find("t.yaml: exclude_special_tokens: true needs a tokenizer"), std::string::npos)
        << collapse_last_error();
    collapse_analysis a;
    std::memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.features = "never-opened.npy";
    a.labels = "never-opened.npy";
    a.config_yaml = "exclude_special_tokens: true\n";
    a.config_source = "server.yaml";
    collapse_report* r = nullptr;
    EXPECT_EQ(collapse_analyze_files(&a, &r), COLLAPSE_ERR_CONFIG);
    EXPECT_EQ(r, nullptr);
    EXPECT_NE(std::string(collapse_last_error()).find("server.yaml: exclude_special_tokens"), std::string::npos) << collapse_last_error();
}
