// Token strings for the report (collapse analyze --tokenizer): the llama2.c tokenizer format
// (../shared/models/stories260k/README.md) and a Hugging Face tokenizer.json. Only the text of
// each id and the special ids are read; nothing here encodes or decodes text.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace collapse::internal::io {

struct Tokenizer {
    std::string path;
    std::string format;                // "llama2c" or "tokenizer.json"
    std::vector<std::string> text;     // [V]: the id's piece as the file spells it
    std::vector<uint8_t> has_text;     // [V]: 0 where a tokenizer.json names no token (padded V)
    std::vector<int64_t> special_ids;  // ascending
};

// The file is a tokenizer.json when its first non-blank byte is '{', else a llama2.c tokenizer.
// llama2.c: int32 max_token_length, then per token float32 score, int32 length, bytes; it must
// hold exactly vocab_size tokens; ids 0, 1, 2 (unk, bos, eos) are its special ids.
// tokenizer.json: model.vocab (an object token -> id, or Unigram's array of [piece, score]) and
// added_tokens ([{id, content, special}]); every id in [0, vocab_size) and named once; the special
// ids are the added tokens with "special": true. Errors: COLLAPSE_ERR_IO naming the file and what
// is wrong (truncated, the token count or an id against V, a missing or mistyped JSON key).
// max_bytes bounds the file (and so what it costs in memory).
Tokenizer load_tokenizer(const std::string& path, int64_t vocab_size, size_t max_bytes);

// Bytes the tokenizer of a file of file_bytes bytes for V ids takes in memory (an upper bound).
int64_t tokenizer_bytes(int64_t file_bytes, int64_t vocab_size);

}  // namespace collapse::internal::io
