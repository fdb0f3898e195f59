// The fixture of the command-line tests: the `collapse` binary (COLLAPSE_CLI_PATH) run as a separate
// process in a fresh temporary folder, with helpers for the reports and the errors it writes.
#pragma once
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/capi_helpers.hpp"

#ifndef COLLAPSE_CLI_PATH
#define COLLAPSE_CLI_PATH ""
#endif

namespace testutil {

inline void spit(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    ASSERT_TRUE(out.good()) << path;
}


class CliTest : public ::testing::Test {
protected:
    void SetUp() override {
        if (std::string(COLLAPSE_CLI_PATH).empty() || !std::filesystem::exists(COLLAPSE_CLI_PATH))
            GTEST_SKIP() << "the collapse binary was not built (COLLAPSE_CLI_PATH = '" << COLLAPSE_CLI_PATH << "')";
        std::string tmpl = (std::filesystem::path(::testing::TempDir()) / "collapse_cli_XXXXXX").string();
        ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        if (!dir_.empty()) {
            std::error_code ec;
            std::filesystem::remove_all(dir_, ec);
        }
    }

    std::string path(const std::string& name) const { return (std::filesystem::path(dir_) / name).string(); }

    // Runs `collapse <args>` in the temp folder; stdout and stderr captured separately.
    testutil::CliRun run(const std::string& args) const { return testutil::run_cli(COLLAPSE_CLI_PATH, dir_, args); }

    testutil::CliRun run_ok(const std::string& args) const {
        testutil::CliRun r = run(args);
        EXPECT_EQ(r.status, 0) << "collapse " << args << "\nstdout: " << r.out << "\nstderr: " << r.err;
        return r;
    }

    // A run that must fail: non-zero exit, exactly one line "collapse: error: ..." holding every needle.
    void expect_error(const std::string& args, const std::vector<std::string>& needles) const {
        const testutil::CliRun r = run(args);
        EXPECT_NE(r.status, 0) << "collapse " << args << " succeeded";
        EXPECT_NE(r.status, -1) << "collapse " << args << " did not exit normally (crash?)";
        EXPECT_EQ(r.err.rfind("collapse: error: ", 0), 0u) << "stderr: " << r.err;
        ASSERT_FALSE(r.err.empty());
        EXPECT_EQ(r.err.back(), '\n') << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line expected, got:\n" << r.err;
        for (const auto& n : needles) EXPECT_NE(r.err.find(n), std::string::npos) << "stderr lacks '" << n << "': " << r.err;
    }

    nlohmann::json report(const std::string& name) const {
        std::ifstream in(path(name));
        EXPECT_TRUE(in.good()) << "no report " << path(name);
        if (!in.good()) return nlohmann::json();
        return nlohmann::json::parse(in);
    }

    // `collapse synth` into a sub-folder.
    void synth(const std::string& sub, const std::string& extra) const {
        run_ok("synth --output-dir " + quote(path(sub)) + " --rows 2000 --dim 8 --classes 40 --seed 5 --quiet " + extra);
    }

    std::string dir_;
};

}  // namespace testutil
