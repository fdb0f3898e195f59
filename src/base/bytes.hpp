// Byte sizes: parse_bytes("8GiB") and format_bytes(n) for messages and config keys.
#pragma once
#include <cstdint>
#include <string>

namespace collapse::internal {

// "8GiB", "512MiB", "1e9", 123 -> bytes (used for the memory limit keys and CLI flags).
int64_t parse_bytes(const std::string& text);
std::string format_bytes(int64_t bytes);

}  // namespace collapse::internal
