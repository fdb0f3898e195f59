#include "io/tokenizer.hpp"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "base/file.hpp"
#include "core/host_budget.hpp"

namespace collapse::internal::io {

namespace {

int32_t read_i32(const std::string& b, size_t at) {
    int32_t v;
    std::memcpy(&v, b.data() + at, 4);  // little-endian, as llama2.c writes it (x86, ARM)
    return v;
}

Tokenizer read_llama2c(const std::string& path, const std::string& b, int64_t V) {
    if (b.size() < 4) fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": truncated: ", b.size(), " bytes, no max_token_length header");
    const int32_t max_len = read_i32(b, 0);
    if (max_len < 1 || max_len > (1 << 20))
        fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": max_token_length ", max_len,
             " is not a llama2.c tokenizer's (expected 1 to 2^20; a tokenizer.json starts with '{')");
    Tokenizer t;
    t.path = path;
    t.format = "llama2c";
    size_t at = 4;
    while (at < b.size()) {
        const int64_t i = (int64_t)t.text.size();
        if (b.size() - at < 8) fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": truncated in the header of token ", i, " (byte ", at, ")");
        const int32_t len = read_i32(b, at + 4);
        if (len < 0 || len > max_len)
            fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": token ", i, " has length ", len, " (max_token_length ", max_len, ")");
        if (b.size() - at - 8 < (size_t)len)
            fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": truncated in token ", i, " (", len, " bytes announced, ", b.size() - at - 8, " left)");
        if (i >= V)
            fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": holds more than V = ", V, " tokens (token ", i, " at byte ", at,
                 "); the vocabulary size must equal the classifier's rows");
        t.text.emplace_back(b.data() + at + 8, (size_t)len);
        at += 8 + (size_t)len;
    }
    if ((int64_t)t.text.size() != V)
        fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": holds ", t.text.size(), " tokens, but V = ", V,
             " (the vocabulary size must equal the classifier's rows)");
    t.has_text.assign((size_t)V, 1);
    for (int64_t id : {0, 1, 2})  // llama2.c: <unk>, <s> (BOS), </s> (EOS)
        if (id < V) t.special_ids.push_back(id);
    return t;
}

Tokenizer read_json(const std::string& path, const std::string& b, int64_t V) {
    using nlohmann::json;
    json doc;
    try {
        doc = json::parse(b);
    } catch (const json::parse_error& e) {
        fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": not valid JSON (", e.what(), ")");
    }
    Tokenizer t;
    t.path = path;
    t.format = "tokenizer.json";
    t.text.assign((size_t)V, std::string());
    t.has_text.assign((size_t)V, 0);
    auto put = [&](int64_t id, const std::string& text, const std::string& where) {
        if (id < 0 || id >= V)
            fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": ", where, " has id ", id, ", outside [0, V = ", V,
                 ") (the vocabulary must fit the classifier's rows)");
        if (t.has_text[(size_t)id] && t.text[(size_t)id] != text)
            fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": ", where, ": id ", id, " is already the token '", t.text[(size_t)id], "'");
        t.text[(size_t)id] = text;
        t.has_text[(size_t)id] = 1;
    };
    if (!doc.is_object() || !doc.contains("model") || !doc["model"].is_object())
        fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": no object \"model\" (a Hugging Face tokenizer.json has model.vocab)");
    const json& model = doc["model"];
    if (!model.contains("vocab")) fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": no key \"model.vocab\"");
    const json& vocab = model["vocab"];
    if (vocab.is_object()) {  // BPE, WordPiece, WordLevel: token -> id
        for (auto it = vocab.begin(); it != vocab.end(); ++it) {
            if (!it.value().is_number_integer())
                fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": model.vocab[\"", it.key(), "\"] is ", it.value().dump(), ", not an integer id");
            put(it.value().get<int64_t>(), it.key(), "model.vocab[\"" + it.key() + "\"]");
        }
    } else if (vocab.is_array()) {  // Unigram: [[piece, score], ...], the index is the id
        for (size_t i = 0; i < vocab.size(); ++i) {
            const json& e = vocab[i];
            if (!e.is_array() || e.empty() || !e[0].is_string())
                fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": model.vocab[", i, "] is ", e.dump(), ", not [piece, score]");
            put((int64_t)i, e[0].get<std::string>(), "model.vocab[" + std::to_string(i) + "]");
        }
    } else {
        fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": model.vocab is ", vocab.type_name(), ", not an object (token -> id) or an array");
    }
    if (doc.contains("added_tokens") && !doc["added_tokens"].is_null()) {
        const json& added = doc["added_tokens"];
        if (!added.is_array()) fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": added_tokens is ", added.type_name(), ", not an array");
        for (size_t i = 0; i < added.size(); ++i) {
            const json& e = added[i];
            const std::string where = "added_tokens[" + std::to_string(i) + "]";
            if (!e.is_object() || !e.contains("id") || !e["id"].is_number_integer() || !e.contains("content") || !e["content"].is_string())
                fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": ", where, " is not an object with an integer \"id\" and a string \"content\"");
            if (e.contains("special") && !e["special"].is_boolean())
                fail(COLLAPSE_ERR_IO, "tokenizer ", path, ": ", where, ".special is ", e["special"].dump(), ", not true or false");
            const int64_t id = e["id"].get<int64_t>();
            put(id, e["content"].get<std::string>(), where);
            if (e.value("special", false)) t.special_ids.push_back(id);
        }
    }
    std::sort(t.special_ids.begin(), t.special_ids.end());
    t.special_ids.erase(std::unique(t.special_ids.begin(), t.special_ids.end()), t.special_ids.end());
    return t;
}

}  // namespace

int64_t tokenizer_bytes(int64_t file_bytes, int64_t vocab_size) {
    // The file's bytes, a parsed JSON tree (a few times the text) and the strings per id.
    return add_bytes(mul_bytes(file_bytes, 8), mul_bytes(vocab_size, 64));
}

Tokenizer load_tokenizer(const std::string& path, int64_t V, size_t max_bytes) {
    const std::string b = read_regular_file(path, "tokenizer", max_bytes);
    size_t first = 0;
    while (first < b.size() && (b[first] == ' ' || b[first] == '\t' || b[first] == '\n' || b[first] == '\r')) ++first;
    // A llama2.c file whose max_token_length is 123 also starts with '{' (then three zero bytes).
    const bool llama_header = first == 0 && b.size() >= 4 && b[1] == 0 && b[2] == 0 && b[3] == 0;
    if (first < b.size() && b[first] == '{' && !llama_header) return read_json(path, b, V);
    return read_llama2c(path, b, V);
}

}  // namespace collapse::internal::io
