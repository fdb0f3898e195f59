// Errors inside the library are exceptions carrying a collapse_status; the C API turns them
// into status codes and the thread-local last-error text (src/core/c_api.cpp).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#include "collapse/collapse.h"

namespace collapse::internal {

class Error : public std::runtime_error {
public:
    Error(collapse_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    collapse_status status() const noexcept { return status_; }

private:
    collapse_status status_;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <class T, class... R>
void append(std::ostringstream& os, const T& v, const R&... rest) {
    os << v;
    append(os, rest...);
}
}  // namespace detail

// fail(COLLAPSE_ERR_IO, "file ", path, ": truncated") builds the message from its pieces.
template <class... A>
[[noreturn]] void fail(collapse_status status, const A&... parts) {
    std::ostringstream os;
    detail::append(os, parts...);
    throw Error(status, os.str());
}

}  // namespace collapse::internal
