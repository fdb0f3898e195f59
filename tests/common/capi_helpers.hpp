// Owning pointers for C API handles, and shell helpers for tests that run the `collapse` binary.
#pragma once
#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#include "collapse/collapse.h"

namespace testutil {

struct SessionDel {
    void operator()(collapse_session* s) const { collapse_session_destroy(s); }
};
struct ReportDel {
    void operator()(collapse_report* r) const { collapse_report_destroy(r); }
};
using SessionPtr = std::unique_ptr<collapse_session, SessionDel>;
using ReportPtr = std::unique_ptr<collapse_report, ReportDel>;

// One run of the command line tool.
struct CliRun {
    int status = -1;  // exit status, or -1 when the process did not exit normally
    std::string out, err;
};

// Single-quoted for sh.
inline std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

inline std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace testutil
