// The llama2.c tokenizer file (tok512.bin): int32 max_token_length, then per token float32 score,
// int32 length, bytes. Only decoding is needed here (generation starts from BOS).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace llama2c {

class Tokenizer {
public:
    // Reads `vocab_size` tokens; errors name the file and the token.
    Tokenizer(const std::string& path, int vocab_size);
    int vocab_size() const { return (int)pieces_.size(); }
    // The text of `token` following `prev`, as llama2.c prints it: a leading space is dropped right
    // after BOS (id 1), byte-fallback pieces "<0xNN>" become that byte, and a lone byte that is
    // neither printable nor whitespace prints as nothing.
    std::string decode(int prev, int token) const;

private:
    std::vector<std::string> pieces_;
};

}  // namespace llama2c
