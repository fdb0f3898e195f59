// Owning pointers for C API handles, and shell helpers for tests that run the `collapse` binary.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

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

// A session of these options (a failed creation is a test failure and gives null).
inline SessionPtr make_session(const collapse_options& o) {
    collapse_session* s = nullptr;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    return SessionPtr(s);
}

// A C API buffer view (host memory and contiguous rows unless told otherwise).
inline collapse_buffer buf(const void* p, collapse_dtype t, int64_t rows, int64_t cols = 1, int64_t stride = 0,
                           collapse_memory mem = COLLAPSE_MEMORY_HOST) {
    return collapse_buffer{p, t, mem, rows, cols, stride};
}

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

// Runs `<cli> <args>` in `dir` through sh (OpenBLAS single-threaded, no stdin); stdout and stderr
// captured separately through dir/.stdout and dir/.stderr.
inline CliRun run_cli(const std::string& cli, const std::string& dir, const std::string& args) {
    const std::string out = dir + "/.stdout", err = dir + "/.stderr";
    const std::string cmd = "cd " + quote(dir) + " && OPENBLAS_NUM_THREADS=1 " + quote(cli) + " " + args + " >" + quote(out) + " 2>" +
                            quote(err) + " </dev/null";
    const int rc = std::system(cmd.c_str());
    CliRun r;
    r.status = (rc != -1 && WIFEXITED(rc)) ? WEXITSTATUS(rc) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
}

// A report's JSON minus engine.timings_seconds (wall-clock times never agree between runs).
inline nlohmann::json report_json(collapse_report* r) {
    const char* text = nullptr;
    EXPECT_EQ(collapse_report_json(r, &text), COLLAPSE_OK);
    nlohmann::json doc = nlohmann::json::parse(text);
    doc["engine"].erase("timings_seconds");
    return doc;
}

// The session's final report (collapse_session_compute) minus engine.timings_seconds; null on failure.
inline nlohmann::json final_report(collapse_session* s) {
    collapse_report* r = nullptr;
    const collapse_status st = collapse_session_compute(s, &r);
    EXPECT_EQ(st, COLLAPSE_OK) << collapse_last_error();
    if (st != COLLAPSE_OK) return nlohmann::json();
    ReportPtr hold(r);
    return report_json(r);
}

}  // namespace testutil
