// collapse_session_mpi_* from a program on the public API (tests/mpi/mpi_capi_check.cpp, linked to
// libcollapse_mpi.so) under `mpirun -np P`: the root's combined report equals one session's that
// saw every row, and a state the root refuses is every rank's error.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/capi_helpers.hpp"
#include "common/compare.hpp"

#ifndef COLLAPSE_MPIEXEC
#define COLLAPSE_MPIEXEC "mpirun"
#endif

namespace test_mpi_capi {
namespace {

using testutil::quote;

class MpiCapi : public ::testing::Test {
protected:
    void SetUp() override {
        std::string tmpl = (std::filesystem::path(::testing::TempDir()) / "collapse_mpi_XXXXXX").string();
        ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        std::error_code ec;
        std::filesystem::remove_all(dir_, ec);
    }
    // A rank's "<status> <message>" file, written by mpi_capi_check.
    static std::pair<int, std::string> read_status(const std::string& path) {
        std::ifstream in(path);
        int st = 0;
        in >> st;
        std::string msg;
        std::getline(in, msg);
        return {st, msg};
    }
    // After a failed combine every rank's session refuses a checkpoint, rows and a report, naming
    // the failed call (it holds part of another rank's state: adopted class sums, a partial merge).
    void expect_unusable_after_failed_combine(int P) const {
        for (int r = 0; r < P; ++r)
            for (const char* what : {"save", "ingest", "compute"}) {
                const auto [st, msg] = read_status(dir_ + "/" + what + "." + std::to_string(r));
                EXPECT_EQ(st, (int)COLLAPSE_ERR_STATE) << what << " on rank " << r << ": " << msg;
                EXPECT_NE(msg.find("the session is unusable since collapse_session_mpi_combine failed partway"), std::string::npos)
                    << what << " on rank " << r << ": " << msg;
                EXPECT_FALSE(std::filesystem::exists(dir_ + "/after." + std::to_string(r) + ".ckpt"));
            }
    }
    int run(int P, const std::string& mode, std::string* err) const {
        const std::string e = dir_ + "/.err";
        const std::string cmd = "cd " + quote(dir_) +
                                " && OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout -k 5 60 " +
                                quote(COLLAPSE_MPIEXEC) + " --oversubscribe -np " + std::to_string(P) +
                                " -x OPENBLAS_NUM_THREADS -x COLLAPSE_MPI_CHUNK_BYTES=256 " + quote(COLLAPSE_MPI_CAPI_PATH) + " " + mode +
                                " " + quote(dir_) + " >/dev/null 2>" + quote(e) + " </dev/null";
        const int rc = std::system(cmd.c_str());
        *err = testutil::slurp(e);
        return (rc != -1 && WIFEXITED(rc)) ? WEXITSTATUS(rc) : -1;
    }
    nlohmann::json numbers(const std::string& name) const {
        std::ifstream in(dir_ + "/" + name);
        EXPECT_TRUE(in.good()) << name;
        nlohmann::json j = nlohmann::json::parse(in);
        j.erase("engine");
        return j;
    }
    std::string dir_;
};

TEST_F(MpiCapi, CombinedEqualsOneSessionEveryMode) {
    for (const char* mode : {"exact", "sampled", "off"})
        for (int P : {2, 3}) {
            SCOPED_TRACE(std::string(mode) + ", P = " + std::to_string(P));
            std::string err;
            ASSERT_EQ(run(P, mode, &err), 0) << err;
            const nlohmann::json single = numbers("single.json");
            ASSERT_FALSE(single["overall_analysis"]["nc4_agreement"].is_null());
            testutil::expect_same_json(single, numbers("mpi.json"), 1e-12);
            std::ifstream needed(dir_ + "/needed");
            int n = -1;
            needed >> n;
            EXPECT_EQ(n, std::string(mode) == "exact" ? 0 : 1) << "the second pass runs exactly without a row store";
        }
}

// Exact mode spreads the row store over the ranks by class: a rank without the classifier has no
// NC4 for its classes, which the root refuses, on every rank.
TEST_F(MpiCapi, PartWithoutNc4IsEveryRanksError) {
    std::string err;
    ASSERT_EQ(run(3, "noclassifier", &err), 0) << err;
    for (int r = 0; r < 3; ++r) {
        const auto [st, msg] = read_status(dir_ + "/status." + std::to_string(r));
        EXPECT_EQ(st, (int)COLLAPSE_ERR_IO) << "rank " << r << ": " << msg;
        EXPECT_NE(msg.find("rank 1's part was refused by the root"), std::string::npos) << "rank " << r << ": " << msg;
        EXPECT_NE(msg.find("lacks section part_nc4 (was a classifier set on every rank?)"), std::string::npos) << msg;
    }
    expect_unusable_after_failed_combine(3);  // the ranks had adopted the root's class sums
}

// After the rows moved to their owners the root's state is no longer one process's: no checkpoint
// of it, and no more first-pass rows.
TEST_F(MpiCapi, SpreadSessionRefusesCheckpointAndRows) {
    std::string err;
    ASSERT_EQ(run(2, "spread", &err), 0) << err;
    for (const char* what : {"save", "ingest"}) {
        const auto [st, msg] = read_status(dir_ + "/" + what);
        EXPECT_EQ(st, (int)COLLAPSE_ERR_STATE) << what << ": " << msg;
        EXPECT_NE(msg.find("spread over MPI ranks by class"), std::string::npos) << what << ": " << msg;
    }
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/after.ckpt"));
}

TEST_F(MpiCapi, RefusedStateIsEveryRanksError) {
    std::string err;
    ASSERT_EQ(run(3, "mismatch", &err), 0) << err;
    for (int r = 0; r < 3; ++r) {
        const auto [st, msg] = read_status(dir_ + "/status." + std::to_string(r));
        EXPECT_EQ(st, (int)COLLAPSE_ERR_INVALID_ARGUMENT) << "rank " << r << ": " << msg;
        EXPECT_NE(msg.find("rank 1's state was refused by the root"), std::string::npos) << "rank " << r << ": " << msg;
        EXPECT_NE(msg.find("V = 11"), std::string::npos) << msg;
    }
    expect_unusable_after_failed_combine(3);  // whatever each held when it failed
}

}  // namespace
}  // namespace test_mpi_capi
