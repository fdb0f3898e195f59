// Small text helpers shared by the parsers and their messages.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace collapse::internal {

// "[3, 4]": a tensor or section shape as messages print it.
std::string shape_text(const std::vector<int64_t>& shape);
// ASCII lower case (unit suffixes, key suggestions); other bytes unchanged.
std::string lower_ascii(std::string s);
// Bytes of the well-formed UTF-8 sequence that starts at s[i] (1 for ASCII), or 0 when none does
// (a stray continuation byte, an overlong form, a surrogate, a code point past U+10FFFF, a cut end).
size_t utf8_sequence_length(const std::string& s, size_t i);
// Text read from a file, as a message quotes it: on one line, control characters and bytes that
// are not UTF-8 written as \xNN, cut after max_bytes (a hostile header can hold anything).
std::string printable(const std::string& s, size_t max_bytes = 120);

}  // namespace collapse::internal
