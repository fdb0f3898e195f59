#include "tokenizer.hpp"

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace llama2c {

Tokenizer::Tokenizer(const std::string& path, int vocab_size) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot open tokenizer (" + std::string(std::strerror(errno)) + ")");
    int32_t max_len = 0;
    if (!in.read((char*)&max_len, 4) || max_len < 1 || max_len > (1 << 16))
        throw std::runtime_error(path + ": not a llama2.c tokenizer (bad max_token_length)");
    pieces_.resize((size_t)vocab_size);
    for (int i = 0; i < vocab_size; ++i) {
        float score;
        int32_t len;
        if (!in.read((char*)&score, 4) || !in.read((char*)&len, 4))
            throw std::runtime_error(path + ": truncated at token " + std::to_string(i) + " of " + std::to_string(vocab_size));
        if (len < 0 || len > max_len)
            throw std::runtime_error(path + ": token " + std::to_string(i) + " has length " + std::to_string(len) +
                                     " (max_token_length " + std::to_string(max_len) + ")");
        pieces_[(size_t)i].resize((size_t)len);
        if (len > 0 && !in.read(pieces_[(size_t)i].data(), len))
            throw std::runtime_error(path + ": truncated at token " + std::to_string(i) + " of " + std::to_string(vocab_size));
    }
}

std::string Tokenizer::decode(int prev, int token) const {
    if (token < 0 || token >= vocab_size()) return std::string();
    std::string piece = pieces_[(size_t)token];
    if (prev == 1 && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    unsigned int byte = 0;
    char tail = 0;
    if (piece.size() == 6 && std::sscanf(piece.c_str(), "<0x%02X%c", &byte, &tail) == 2 && tail == '>')
        piece = std::string(1, (char)byte);
    if (piece.size() == 1) {
        const unsigned char b = (unsigned char)piece[0];
        if (!(std::isprint(b) || std::isspace(b))) return std::string();
    }
    return piece;
}

}  // namespace llama2c
