// A JSON document's text. JSON text is UTF-8, but a path, a command line or a spill directory on a
// POSIX system may hold any byte: each byte of a string that is not UTF-8 becomes U+FFFD
// (nlohmann's replace handler), where dump() would throw and lose a finished report or checkpoint.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace collapse::internal {

// indent < 0: one line.
inline std::string json_text(const nlohmann::json& doc, int indent = -1) {
    return doc.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Whether s is UTF-8 text (a JSON string holds it unchanged).
inline bool is_utf8(const std::string& s) {
    try {
        (void)nlohmann::json(s).dump();
        return true;
    } catch (const nlohmann::json::type_error&) {
        return false;
    }
}

}  // namespace collapse::internal
