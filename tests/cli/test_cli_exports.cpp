// collapse analyze --export-dir, --tokenizer (llama2.c and tokenizer.json), exclude_special_tokens
// and held-out NC4 (--nc4-features/--nc4-labels, also after --from-checkpoint): the files read
// back and compared with a float64 brute force of the inputs, and every error path.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "base/dtype.hpp"
#include "common/cli_fixture.hpp"
#include "io/tensor_file.hpp"
#include "io/tokenizer.hpp"

namespace test_cli_exports {
namespace {

using testutil::quote;
namespace io = collapse::internal::io;

std::vector<double> as_doubles(const io::Tensor& t) {
    std::vector<double> v((size_t)t.numel());
    const bool integer = t.dtype == COLLAPSE_I32 || t.dtype == COLLAPSE_I64;
    for (int64_t i = 0; i < t.numel(); ++i)
        v[(size_t)i] = integer ? (double)collapse::internal::load_as_int(t.data(), t.dtype, i) : collapse::internal::load_as_double(t.data(), t.dtype, i);
    return v;
}

std::string shared() { return std::string(COLLAPSE_SHARED_DIR); }
std::string tok512() { return shared() + "/models/stories260k/tok512.bin"; }

// The pieces of a llama2.c tokenizer, read here independently of src/io.
std::vector<std::string> llama2c_pieces(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    int32_t max_len = 0;
    in.read((char*)&max_len, 4);
    std::vector<std::string> out;
    float score;
    int32_t len;
    while (in.read((char*)&score, 4) && in.read((char*)&len, 4)) {
        std::string s((size_t)len, '\0');
        in.read(s.data(), len);
        out.push_back(s);
    }
    return out;
}

class CliExports : public testutil::CliTest {
protected:
    // synth data set "a" (2000 rows, d = 8, V = 40, with a classifier).
    void SetUp() override {
        testutil::CliTest::SetUp();
        if (IsSkipped()) return;
        synth("a", "");
    }
    std::string data_args(const std::string& sub = "a") const {
        return "--features " + quote(path(sub + "/features.npy")) + " --labels " + quote(path(sub + "/labels.npy")) + " --classifier " +
               quote(path("a/classifier.npy"));
    }
    std::vector<std::string> lines(const std::string& file) const {
        std::ifstream in(path(file));
        std::vector<std::string> out;
        for (std::string l; std::getline(in, l);) out.push_back(l);
        return out;
    }
};

// Every export read back: the means against a brute force of the features, Sigma_W against its
// definition, the ids and per-class arrays against the report, the CSV's header and rows.
TEST_F(CliExports, ExportsReadBackMatchBruteForceAndReport) {
    run_ok("analyze " + data_args() + " --export-dir ex --quiet -o r.json");
    const nlohmann::json doc = report("r.json");
    const io::Tensor X = io::open_npy(path("a/features.npy")), Y = io::open_npy(path("a/labels.npy"));
    const std::vector<double> x = as_doubles(X), yv = as_doubles(Y);
    const int64_t N = X.shape[0], d = X.shape[1];
    // Brute force: class sums (long double), means of the kept classes (n_c >= 2).
    std::map<int64_t, std::vector<long double>> sum;
    std::map<int64_t, int64_t> n;
    for (int64_t i = 0; i < N; ++i) {
        auto& s = sum[(int64_t)yv[(size_t)i]];
        s.resize((size_t)d, 0.0L);
        for (int64_t j = 0; j < d; ++j) s[(size_t)j] += x[(size_t)(i * d + j)];
        ++n[(int64_t)yv[(size_t)i]];
    }
    std::vector<int64_t> kept;
    for (const auto& [c, cnt] : n)
        if (cnt >= 2) kept.push_back(c);
    const int64_t K = (int64_t)kept.size();
    ASSERT_EQ(doc["counts"]["classes_kept"], K);

    const io::Tensor ids = io::open_npy(path("ex/class_ids.npy")), means = io::open_npy(path("ex/class_means.npy"));
    ASSERT_EQ(ids.dtype, COLLAPSE_I64);
    ASSERT_EQ(means.dtype, COLLAPSE_F64);
    ASSERT_EQ(ids.shape, (std::vector<int64_t>{K}));
    ASSERT_EQ(means.shape, (std::vector<int64_t>{K, d}));
    const std::vector<double> idv = as_doubles(ids), mv = as_doubles(means);
    std::vector<double> mu((size_t)(K * d));
    for (int64_t k = 0; k < K; ++k) {
        EXPECT_EQ((int64_t)idv[(size_t)k], kept[(size_t)k]);
        for (int64_t j = 0; j < d; ++j) {
            mu[(size_t)(k * d + j)] = (double)(sum[kept[(size_t)k]][(size_t)j] / (long double)n[kept[(size_t)k]]);
            EXPECT_NEAR(mv[(size_t)(k * d + j)], mu[(size_t)(k * d + j)], 1e-12 * std::max(1.0, std::fabs(mu[(size_t)(k * d + j)])));
        }
    }
    // Sigma_W = (1/N_kept) sum (x - mu_y)(x - mu_y)^T over kept rows.
    if (std::filesystem::exists(path("ex/sigma_w.npy"))) {
        const io::Tensor sw = io::open_npy(path("ex/sigma_w.npy"));
        ASSERT_EQ(sw.shape, (std::vector<int64_t>{d, d}));
        std::vector<long double> S((size_t)(d * d), 0.0L);
        int64_t rows = 0;
        for (int64_t i = 0; i < N; ++i) {
            const auto it = std::find(kept.begin(), kept.end(), (int64_t)yv[(size_t)i]);
            if (it == kept.end()) continue;
            const double* m = &mu[(size_t)((it - kept.begin()) * d)];
            ++rows;
            for (int64_t a = 0; a < d; ++a)
                for (int64_t b = 0; b < d; ++b)
                    S[(size_t)(a * d + b)] += (long double)(x[(size_t)(i * d + a)] - m[a]) * (x[(size_t)(i * d + b)] - m[b]);
        }
        const std::vector<double> got = as_doubles(sw);
        for (int64_t e = 0; e < d * d; ++e) {
            const double want = (double)(S[(size_t)e] / rows);
            EXPECT_NEAR(got[(size_t)e], want, 1e-9 * std::max(1e-3, std::fabs(want))) << "sigma_w element " << e;
        }
    }
    // The per-class arrays: the report's values, in class_ids order.
    const std::map<std::string, std::string> files = {{"num_samples", "num_samples.npy"},   {"mean_norm", "mean_norm.npy"},
                                                      {"within_variance", "within_variance.npy"}, {"duality_cos", "duality_cos.npy"},
                                                      {"duality_dot", "duality_dot.npy"},   {"nc4_rows", "nc4_rows.npy"},
                                                      {"svd_entropy", "svd_entropy.npy"}};
    for (const auto& [key, file] : files) {
        const io::Tensor t = io::open_npy(path("ex/" + file));
        ASSERT_EQ(t.shape, (std::vector<int64_t>{K})) << file;
        const std::vector<double> v = as_doubles(t);
        for (int64_t k = 0; k < K; ++k) {
            const nlohmann::json& e = doc["token_analysis"][std::to_string(kept[(size_t)k])][key];
            if (e.is_null()) EXPECT_TRUE(std::isnan(v[(size_t)k])) << file;
            else EXPECT_EQ(v[(size_t)k], e.get<double>()) << file << " class " << kept[(size_t)k];
        }
    }
    EXPECT_EQ(doc["token_analysis"][std::to_string(kept[0])]["num_samples"], n[kept[0]]);
    // The CSV: a header, then one row per kept class in id order, values as in the report.
    const std::vector<std::string> csv = lines("ex/token_analysis.csv");
    ASSERT_EQ((int64_t)csv.size(), K + 1);
    EXPECT_EQ(csv[0], "token_id,num_samples,svd_rows,sampled,svd_entropy,effective_rank,normalized_entropy,mean_norm,"
                      "within_variance,duality_cos,duality_dot,nc4_hit_rate,nc4_rows");
    for (int64_t k = 0; k < K; ++k) {
        std::stringstream ss(csv[(size_t)(k + 1)]);
        std::vector<std::string> f;
        for (std::string c; std::getline(ss, c, ',');) f.push_back(c);
        ASSERT_GE(f.size(), 9u);
        EXPECT_EQ(f[0], std::to_string(kept[(size_t)k]));
        EXPECT_EQ(std::stoll(f[1]), n[kept[(size_t)k]]);
        const double mn = doc["token_analysis"][f[0]]["mean_norm"].get<double>();
        EXPECT_EQ(std::stod(f[7]), mn);  // %.17g round-trips
    }
    // No temporary files left beside the exports.
    for (const auto& e : std::filesystem::directory_iterator(path("ex")))
        EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

TEST_F(CliExports, ExportDirErrorsBeforeTheRun) {
    testutil::spit(path("file"), "x");
    expect_error("analyze " + data_args() + " --export-dir file --quiet -o r.json", {"--export-dir", "file", "not a directory"});
    expect_error("analyze " + data_args() + " --export-dir file/sub --quiet -o r.json", {"--export-dir", "file/sub", "cannot create"});
    if (::geteuid() != 0) {
        std::filesystem::create_directory(path("ro"));
        ::chmod(path("ro").c_str(), 0555);
        expect_error("analyze " + data_args() + " --export-dir ro --quiet -o r.json", {"--export-dir", "ro", "cannot create a file"});
    }
    expect_error("analyze " + data_args() + " --export-dir /proc --quiet -o r.json", {"--export-dir", "/proc", "cannot create a file"});
    EXPECT_FALSE(std::filesystem::exists(path("r.json")));
}

// tokenizer.json written here: vocab strings in token_analysis and the CSV, its special ids excluded.
TEST_F(CliExports, HuggingFaceTokenizerAndSpecialTokens) {
    nlohmann::json vocab = nlohmann::json::object();
    for (int i = 0; i < 39; ++i) vocab[i == 5 ? std::string("\xC4\xA0the") : i == 6 ? std::string("a,\"b\"") : "tok" + std::to_string(i)] = i;
    const nlohmann::json tj = {{"version", "1.0"},
                               {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
                               {"added_tokens", {{{"id", 39}, {"content", "<|endoftext|>"}, {"special", true}},
                                                 {{"id", 7}, {"content", "tok7"}, {"special", true}}}}};
    testutil::spit(path("tokenizer.json"), tj.dump());
    run_ok("analyze " + data_args() + " --tokenizer tokenizer.json --export-dir ex --quiet -o r.json");
    const nlohmann::json doc = report("r.json");
    ASSERT_FALSE(doc["token_analysis"].empty());
    for (auto it = doc["token_analysis"].begin(); it != doc["token_analysis"].end(); ++it) {
        const int id = std::stoi(it.key());
        const std::string want = id == 5 ? "\xC4\xA0the" : id == 6 ? "a,\"b\"" : id == 39 ? "<|endoftext|>" : "tok" + std::to_string(id);
        EXPECT_EQ(it.value()["token"], want) << id;
    }
    EXPECT_EQ(doc["input"]["tokenizer"]["format"], "tokenizer.json");
    EXPECT_EQ(doc["input"]["tokenizer"]["special_ids"], (std::vector<int64_t>{7, 39}));
    const std::vector<std::string> csv = lines("ex/token_analysis.csv");
    EXPECT_EQ(csv[0].rfind("token_id,token,num_samples,", 0), 0u) << csv[0];
    EXPECT_EQ((int64_t)csv.size(), doc["counts"]["classes_kept"].get<int64_t>() + 1);
    if (doc["token_analysis"].contains("6"))
        for (const std::string& l : csv)
            if (l.rfind("6,", 0) == 0) EXPECT_EQ(l.rfind("6,\"a,\"\"b\"\"\",", 0), 0u) << l;  // RFC 4180 quoting

    // exclude_special_tokens: ids 7 and 39 join exclude_token_ids (with the config's own).
    testutil::spit(path("special.yaml"), "exclude_special_tokens: true\nexclude_token_ids: [3]\n");
    run_ok("analyze " + data_args() + " --tokenizer tokenizer.json --config special.yaml --quiet -o s.json");
    const nlohmann::json s = report("s.json");
    for (const char* id : {"3", "7", "39"}) EXPECT_FALSE(s["token_analysis"].contains(id)) << id;
    EXPECT_EQ(s["config"]["exclude_token_ids"], (std::vector<int64_t>{3, 7, 39}));
    const io::Tensor Y = io::open_npy(path("a/labels.npy"));
    int64_t excluded = 0;
    for (double v : as_doubles(Y)) excluded += (v == 3 || v == 7 || v == 39) ? 1 : 0;
    EXPECT_EQ(s["counts"]["rows_excluded"], excluded);
    expect_error("analyze " + data_args() + " --config special.yaml --quiet -o e.json", {"exclude_special_tokens", "--tokenizer"});
}

TEST_F(CliExports, Llama2cTokenizerOnStories260k) {
    const std::string data = shared() + "/data/stories260k";
    if (!std::filesystem::exists(tok512()) || !std::filesystem::exists(data + "/features.npy")) GTEST_SKIP() << "no stories260k data/model";
    // The engine's reader: byte-fallback pieces <0x00>.. at ids 3.., BOS/EOS as llama2.c exported them.
    const io::Tokenizer t = io::load_tokenizer(tok512(), 512, size_t(1) << 30);
    EXPECT_EQ(t.format, "llama2c");
    EXPECT_EQ(t.text[0], "<unk>");
    EXPECT_EQ(t.text[1], "\n<s>\n");
    EXPECT_EQ(t.text[2], "\n</s>\n");
    EXPECT_EQ(t.text[3], "<0x00>");
    EXPECT_EQ(t.text[13], "<0x0A>");
    EXPECT_EQ(t.text[258], "<0xFF>");
    EXPECT_EQ(t.special_ids, (std::vector<int64_t>{0, 1, 2}));
    // The CLI on the first 3000 rows: every kept token's text is the file's piece.
    const io::Tensor f = io::open_npy(data + "/features.npy"), l = io::open_npy(data + "/labels.npy");
    const int64_t n = 3000, d = f.shape[1];
    io::write_npy(path("f.npy"), f.dtype, {n, d}, f.data());
    io::write_npy(path("l.npy"), l.dtype, {n}, l.data());
    testutil::spit(path("sp.yaml"), "exclude_special_tokens: true\n");
    run_ok("analyze --features f.npy --labels l.npy --classifier " + quote(data + "/classifier.npy") + " --tokenizer " + quote(tok512()) +
           " --config sp.yaml --export-dir ex --quiet -o r.json");
    const nlohmann::json doc = report("r.json");
    const std::vector<std::string> pieces = llama2c_pieces(tok512());
    ASSERT_EQ(pieces.size(), 512u);
    ASSERT_FALSE(doc["token_analysis"].empty());
    for (auto it = doc["token_analysis"].begin(); it != doc["token_analysis"].end(); ++it)
        EXPECT_EQ(it.value()["token"], pieces[std::stoul(it.key())]) << it.key();
    for (const char* id : {"0", "1", "2"}) EXPECT_FALSE(doc["token_analysis"].contains(id)) << id;  // BOS is a label here
    EXPECT_EQ(lines("ex/token_analysis.csv").size(), doc["token_analysis"].size() + 1 + 0);
}

TEST_F(CliExports, BadTokenizerFilesAreNamed) {
    const std::string args = "analyze " + data_args() + " --quiet -o r.json --tokenizer ";
    // llama2.c: truncated, too many tokens for V = 40, too few.
    auto llama = [&](const std::string& name, int count, int cut_bytes) {
        std::string b(4, '\0');
        const int32_t max_len = 8;
        std::memcpy(b.data(), &max_len, 4);
        for (int i = 0; i < count; ++i) {
            const float score = 0;
            const std::string piece = "t" + std::to_string(i);
            const int32_t len = (int32_t)piece.size();
            b.append((const char*)&score, 4).append((const char*)&len, 4).append(piece);
        }
        b.resize(b.size() - (size_t)cut_bytes);
        testutil::spit(path(name), b);
    };
    llama("trunc.bin", 40, 2);
    expect_error(args + "trunc.bin", {"tokenizer", "trunc.bin", "truncated in token 39"});
    llama("big.bin", 512, 0);
    expect_error(args + "big.bin", {"big.bin", "more than V = 40 tokens"});
    llama("small.bin", 30, 0);
    expect_error(args + "small.bin", {"small.bin", "holds 30 tokens, but V = 40"});
    testutil::spit(path("hdr.bin"), std::string("\x01\x00", 2));
    expect_error(args + "hdr.bin", {"hdr.bin", "truncated"});
    // tokenizer.json: bad JSON, a missing key, a mistyped id, an id outside [0, V), a bad added token.
    testutil::spit(path("bad.json"), "{\"model\": {\"vocab\": {\"a\": 0,}}");
    expect_error(args + "bad.json", {"bad.json", "not valid JSON"});
    testutil::spit(path("nomodel.json"), "{\"vocab\": {\"a\": 0}}");
    expect_error(args + "nomodel.json", {"nomodel.json", "\"model\""});
    testutil::spit(path("novocab.json"), "{\"model\": {\"type\": \"BPE\"}}");
    expect_error(args + "novocab.json", {"novocab.json", "model.vocab"});
    testutil::spit(path("type.json"), "{\"model\": {\"vocab\": {\"a\": \"zero\"}}}");
    expect_error(args + "type.json", {"type.json", "model.vocab[\"a\"]", "not an integer id"});
    testutil::spit(path("range.json"), "{\"model\": {\"vocab\": {\"a\": 0, \"b\": 40}}}");
    expect_error(args + "range.json", {"range.json", "id 40", "outside [0, V = 40)"});
    testutil::spit(path("dup.json"), "{\"model\": {\"vocab\": {\"a\": 0}}, \"added_tokens\": [{\"id\": 0, \"content\": \"b\"}]}");
    expect_error(args + "dup.json", {"dup.json", "added_tokens[0]", "id 0 is already"});
    testutil::spit(path("special.json"),
                   "{\"model\": {\"vocab\": {\"a\": 0}}, \"added_tokens\": [{\"id\": 1, \"content\": \"b\", \"special\": \"yes\"}]}");
    expect_error(args + "special.json", {"special.json", "added_tokens[0].special"});
    expect_error(args + "missing.json", {"missing.json"});
    EXPECT_FALSE(std::filesystem::exists(path("r.json")));
}

// The reader on its own: Unigram's array vocabulary, a padded V (ids without text), and a llama2.c
// file whose max_token_length (123) makes it start with '{' like JSON.
TEST_F(CliExports, TokenizerReaderFormats) {
    testutil::spit(path("uni.json"), "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"<pad>\", 0.0], [\"\u2581the\", -1.5]]}, "
                                     "\"added_tokens\": [{\"id\": 0, \"content\": \"<pad>\", \"special\": true}]}");
    const io::Tokenizer u = io::load_tokenizer(path("uni.json"), 5, 1 << 20);
    EXPECT_EQ(u.format, "tokenizer.json");
    EXPECT_EQ(u.text[1], "\xE2\x96\x81the");
    EXPECT_EQ(u.has_text, (std::vector<uint8_t>{1, 1, 0, 0, 0}));
    EXPECT_EQ(u.special_ids, (std::vector<int64_t>{0}));
    std::string b(4, '\0');
    b[0] = '{';  // max_token_length 123
    for (int i = 0; i < 3; ++i) {
        const float score = 0;
        const int32_t len = 1;
        b.append((const char*)&score, 4).append((const char*)&len, 4).append(1, (char)('x' + i));
    }
    testutil::spit(path("brace.bin"), b);
    const io::Tokenizer l = io::load_tokenizer(path("brace.bin"), 3, 1 << 20);
    EXPECT_EQ(l.format, "llama2c");
    EXPECT_EQ(l.text, (std::vector<std::string>{"x", "y", "z"}));
}

// Held-out NC4: means and W from "a", the agreement on the rows of "b" (another synth seed), against
// a brute force; the same from a checkpoint of "a"; and the flags' errors.
TEST_F(CliExports, HeldOutNc4MatchesBruteForceAndCheckpoint) {
    run_ok("synth --output-dir " + quote(path("b")) + " --rows 700 --dim 8 --classes 40 --seed 9 --quiet");
    const std::string held = " --nc4-features b/features.npy --nc4-labels b/labels.npy";
    run_ok("analyze " + data_args() + held + " --checkpoint a.ckpt --export-dir ex --quiet -o r.json");
    const nlohmann::json doc = report("r.json");
    // Brute force.
    const std::vector<double> xa = as_doubles(io::open_npy(path("a/features.npy"))), ya = as_doubles(io::open_npy(path("a/labels.npy"))),
                              xb = as_doubles(io::open_npy(path("b/features.npy"))), yb = as_doubles(io::open_npy(path("b/labels.npy"))),
                              W = as_doubles(io::open_npy(path("a/classifier.npy")));
    const int64_t d = 8, V = 40;
    std::map<int64_t, std::vector<long double>> sum;
    std::map<int64_t, int64_t> n;
    for (size_t i = 0; i < ya.size(); ++i) {
        auto& s = sum[(int64_t)ya[i]];
        s.resize((size_t)d, 0.0L);
        for (int64_t j = 0; j < d; ++j) s[(size_t)j] += xa[i * d + (size_t)j];
        ++n[(int64_t)ya[i]];
    }
    std::vector<int64_t> kept;
    std::vector<double> mu;
    for (const auto& [c, cnt] : n)
        if (cnt >= 2) {
            kept.push_back(c);
            for (int64_t j = 0; j < d; ++j) mu.push_back((double)(sum[c][(size_t)j] / cnt));
        }
    int64_t rows = 0, agree = 0;
    std::map<int64_t, std::pair<int64_t, int64_t>> per;  // class -> (rows, hits)
    for (size_t i = 0; i < yb.size(); ++i) {
        const int64_t c = (int64_t)yb[i];
        if (std::find(kept.begin(), kept.end(), c) == kept.end()) continue;
        const double* x = &xb[i * d];
        int64_t best = 0, near = 0;
        long double bv = 0, nv = 0;
        for (int64_t v = 0; v < V; ++v) {
            long double s = 0;
            for (int64_t j = 0; j < d; ++j) s += (long double)W[(size_t)(v * d + j)] * x[j];
            if (v == 0 || s > bv) bv = s, best = v;
        }
        for (size_t k = 0; k < kept.size(); ++k) {
            long double s = 0;
            for (int64_t j = 0; j < d; ++j) s += (long double)(x[j] - mu[k * d + (size_t)j]) * (x[j] - mu[k * d + (size_t)j]);
            if (k == 0 || s < nv) nv = s, near = (int64_t)k;
        }
        ++rows, ++per[c].first;
        if (best == kept[(size_t)near]) ++agree, ++per[c].second;
    }
    ASSERT_GT(rows, 0);
    EXPECT_EQ(doc["overall_analysis"]["nc4_rows"], rows);
    EXPECT_EQ(doc["overall_analysis"]["nc4_measured_on"], "held_out_rows");
    EXPECT_NEAR(doc["overall_analysis"]["nc4_agreement"].get<double>(), (double)agree / (double)rows, 1e-12);
    EXPECT_EQ(doc["input"]["nc4_held_out"]["tensors"][0]["path"], "b/features.npy");
    for (const auto& [c, rh] : per) {
        const nlohmann::json& e = doc["token_analysis"][std::to_string(c)];
        EXPECT_EQ(e["nc4_rows"], rh.first) << c;
        EXPECT_NEAR(e["nc4_hit_rate"].get<double>(), (double)rh.second / (double)rh.first, 1e-12) << c;
    }
    // From the checkpoint of "a": the same numbers.
    run_ok("analyze --from-checkpoint a.ckpt --classifier a/classifier.npy" + held + " --quiet -o c.json");
    const nlohmann::json c = report("c.json");
    EXPECT_EQ(c["overall_analysis"]["nc4_agreement"], doc["overall_analysis"]["nc4_agreement"]);
    EXPECT_EQ(c["overall_analysis"]["nc4_measured_on"], "held_out_rows");
    EXPECT_FALSE(c["overall_analysis"]["notes"].contains("nc4_agreement"));

    // Errors, before any work.
    expect_error("analyze " + data_args() + " --nc4-features b/features.npy --quiet -o e.json", {"--nc4-features", "--nc4-labels"});
    expect_error("analyze --features a/features.npy --labels a/labels.npy" + held + " --quiet -o e.json", {"--nc4-features", "--classifier"});
    expect_error("analyze --from-checkpoint a.ckpt" + held + " --quiet -o e.json", {"--nc4-features", "--classifier"});
    run_ok("synth --output-dir " + quote(path("w")) + " --rows 100 --dim 5 --classes 40 --seed 9 --quiet");
    expect_error("analyze " + data_args() + " --nc4-features w/features.npy --nc4-labels w/labels.npy --quiet -o e.json",
                 {"--nc4-features", "width 5", "8"});
    std::vector<int32_t> bad(700, 1);
    bad[3] = 45;
    io::write_npy(path("bad_labels.npy"), COLLAPSE_I32, {700}, bad.data());
    expect_error("analyze " + data_args() + " --nc4-features b/features.npy --nc4-labels bad_labels.npy --quiet -o e.json",
                 {"--nc4-labels", "label 45", "V = 40"});
    EXPECT_FALSE(std::filesystem::exists(path("e.json")));
}

}  // namespace
}  // namespace test_cli_exports
