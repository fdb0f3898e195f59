// `mpirun -np P collapse analyze` against the single-process report (README "MPI"): equal within
// 1e-12 relative, counts exactly, for P = 1..4 and every svd_mode, with NC4, windows and
// max_tokens_to_analyze; an error on one rank, a rank killed mid-run, per-rank checkpoints.
// Registered only when MPI is found (tests/CMakeLists.txt); every mpirun runs under `timeout`.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "common/cli_fixture.hpp"
#include "common/compare.hpp"
#include "io/tensor_file.hpp"

#ifndef COLLAPSE_MPIEXEC
#define COLLAPSE_MPIEXEC "mpirun"
#endif

namespace test_mpi_cli {
namespace {

using testutil::quote;

class MpiCli : public testutil::CliTest {
protected:
    void SetUp() override {
        CliTest::SetUp();
        if (IsSkipped()) return;
        // 2,000 rows in sequences of 30 (the rank cuts at 2000 r / P fall inside sequences).
        synth("d", "");
        const int64_t N = 2000;
        std::vector<int32_t> seq(N), pos(N);
        for (int64_t i = 0; i < N; ++i) seq[i] = (int32_t)(i / 30), pos[i] = (int32_t)(i % 30);
        collapse::internal::io::write_npy(path("d/seq.npy"), COLLAPSE_I32, {N}, seq.data());
        collapse::internal::io::write_npy(path("d/pos.npy"), COLLAPSE_I32, {N}, pos.data());
    }

    // `mpirun -np P collapse <args>` with a hard time limit; env: extra -x VAR=value for every rank.
    testutil::CliRun mpirun(int P, const std::string& args, const std::string& env = "", int limit = 60) const {
        const std::string out = path(".mpi_out"), err = path(".mpi_err");
        const std::string cmd = "cd " + quote(dir_) +
                                " && OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout -k 5 " +
                                std::to_string(limit) + " " + quote(COLLAPSE_MPIEXEC) + " --oversubscribe -np " + std::to_string(P) +
                                " -x OPENBLAS_NUM_THREADS -x COLLAPSE_MPI_CHUNK_BYTES=512 " + env + " " + quote(COLLAPSE_CLI_PATH) + " " +
                                args + " >" + quote(out) + " 2>" + quote(err) + " </dev/null";
        const int rc = std::system(cmd.c_str());
        testutil::CliRun r;
        r.status = (rc != -1 && WIFEXITED(rc)) ? WEXITSTATUS(rc) : -1;
        r.out = testutil::slurp(out);
        r.err = testutil::slurp(err);
        return r;
    }

    std::string input(bool windows = true) const {
        return "--features d/features.npy --labels d/labels.npy --classifier d/classifier.npy --batch-rows 150 " +
               std::string(windows ? "--sequence-ids d/seq.npy --positions d/pos.npy " : "");
    }

    // The report without what differs between any two runs (engine: batches per process, spill
    // and timings; run, input: provenance).
    nlohmann::json numbers(const std::string& name) const {
        nlohmann::json j = report(name);
        j.erase("engine");
        return j;
    }

    void expect_equal_for_every_p(const std::string& config) {
        testutil::spit(path("c.yaml"), config);
        run_ok("analyze " + input() + "--config c.yaml -q -o single.json");
        const nlohmann::json single = numbers("single.json");
        ASSERT_FALSE(single["window_summary"].is_null()) << "the input must give window metrics";
        ASSERT_FALSE(single["overall_analysis"]["nc4_agreement"].is_null());
        for (int P = 1; P <= 4; ++P) {
            const std::string out = "mpi" + std::to_string(P) + ".json";
            const testutil::CliRun r = mpirun(P, "analyze " + input() + "--config c.yaml -q -o " + out);
            ASSERT_EQ(r.status, 0) << "P = " << P << "\n" << r.err;
            SCOPED_TRACE("P = " + std::to_string(P));
            testutil::expect_same_json(single, numbers(out), 1e-12);
        }
    }
    // Pair-metric tiles spread over the ranks: 16-class tiles (COLLAPSE_PAIR_TILE_EDGE) of 120 kept
    // classes, every rank reduces its share of the pairs, rank 0 merges the moments in rank order;
    // the exact store with a cut kept set for every P of `ranks`, and the sampled one for P = 3.
    // `backend`: extra analyze arguments; rel, abs: the report's tolerance against the single process.
    void expect_pair_tiles_spread(const std::string& backend, double rel, double abs, const std::vector<int>& ranks) {
        run_ok("synth --output-dir " + quote(path("k")) + " --rows 3000 --dim 12 --classes 160 --seed 11 --quiet");
        const std::string args = "analyze " + backend + "--features k/features.npy --labels k/labels.npy --batch-rows 400 --config c.yaml -q -o ";
        // For the single runs here too (same tiles); unset however the test ends.
        struct TileEdge {
            TileEdge() { ::setenv("COLLAPSE_PAIR_TILE_EDGE", "16", 1); }
            ~TileEdge() { ::unsetenv("COLLAPSE_PAIR_TILE_EDGE"); }
        } tile_edge;
        for (const std::string config : {"svd_mode: exact\nmax_tokens_to_analyze: 120\n", "svd_mode: sampled\nsvd_max_rows_per_token: 1000\nmax_tokens_to_analyze: 120\n"}) {
            SCOPED_TRACE(config);
            testutil::spit(path("c.yaml"), config);
            run_ok(args + "single.json");
            const nlohmann::json single = numbers("single.json");
            ASSERT_EQ(single["overall_analysis"]["gnc2_pairs"].get<int64_t>() + single["overall_analysis"]["gnc2_skipped_pairs"].get<int64_t>(), 120 * 119 / 2);
            ASSERT_FALSE(single["overall_analysis"]["overall_gnc2"].is_null());
            for (int P : ranks) {
                if (config.rfind("svd_mode: sampled", 0) == 0 && P != 3) continue;  // the root's variances: one P suffices
                SCOPED_TRACE("P = " + std::to_string(P));
                const std::string out = "pairs" + std::to_string(P) + ".json";
                const testutil::CliRun r = mpirun(P, args + out, "-x COLLAPSE_PAIR_TILE_EDGE -x COLLAPSE_MPI_STATS=1", 120);
                ASSERT_EQ(r.status, 0) << r.err;
                testutil::expect_same_json(single, numbers(out), rel, abs);
                if (P == 1) continue;
                // Rank 0 reduced a first part of the 8 * 9 / 2 = 36 tiles, not all of them.
                const size_t at = r.err.find("collapse: mpi combine, pair tiles 0..");
                ASSERT_NE(at, std::string::npos) << r.err;
                const int64_t end = std::stoll(r.err.substr(at + 37));
                EXPECT_GT(end, 0) << r.err;
                EXPECT_LE(end, 36 / P + 3) << r.err;
                EXPECT_NE(r.err.find(" of 36 on rank 0"), std::string::npos) << r.err;
            }
        }
    }

    // Reservoirs smaller than the classes are merged as checkpoint merge merges them: the MPI
    // report's per-token numbers equal those of `collapse merge` of the ranks' own checkpoints, in
    // rank order. The root decides the merged samples from the counts alone and each owner rank
    // receives only its classes' sampled rows (12 of every class's 50), so rank 0 takes in far
    // fewer bytes than the other ranks' reservoirs. `backend`: extra analyze arguments; rel, abs:
    // the tolerance; ranks: the values of P.
    void expect_reservoirs_merge_as_checkpoint_merge(const std::string& backend, double rel, double abs, const std::vector<int>& ranks) {
        testutil::spit(path("c.yaml"), "svd_mode: sampled\nsvd_max_rows_per_token: 12\nper_class_arrays: true\n");
        for (int P : ranks) {
            SCOPED_TRACE("P = " + std::to_string(P));
            const std::string ck = "run" + std::to_string(P) + ".ckpt", of = "of" + std::to_string(P);
            const testutil::CliRun r = mpirun(P, "analyze " + backend + input(false) + "--config c.yaml -q -o mpi.json --checkpoint " + ck, "-x COLLAPSE_MPI_STATS=1", 120);
            ASSERT_EQ(r.status, 0) << r.err;
            std::string files;
            for (int k = 0; k < P; ++k) {
                EXPECT_TRUE(std::filesystem::exists(path(ck + ".rank" + std::to_string(k) + of)));
                files += " " + ck + ".rank" + std::to_string(k) + of;
            }
            EXPECT_FALSE(std::filesystem::exists(path(ck)));
            run_ok("merge" + files + " -o all.ckpt -q");
            run_ok("analyze " + backend + "--from-checkpoint all.ckpt --classifier d/classifier.npy --config c.yaml -q -o merged.json");
            const nlohmann::json a = numbers("mpi.json"), b = numbers("merged.json");
            ASSERT_TRUE(b["token_analysis"].is_object() || b["token_analysis"].is_array());
            testutil::expect_same_json(a["token_analysis"], b["token_analysis"], rel, abs);
            testutil::expect_same_json(a["summary"], b["summary"], rel, abs);
            testutil::expect_same_json(a["counts"], b["counts"], 0);
            // Rows to their owners: rank 0 owns about 1/P of the 40 classes, 12 rows of d = 8 each.
            const size_t at = r.err.find("rows to their owners: ");
            ASSERT_NE(at, std::string::npos) << r.err;
            const int64_t rows_in = std::stoll(r.err.substr(r.err.find(" s, ", at) + 4));
            EXPECT_GT(rows_in, 0) << r.err;
            EXPECT_LE(rows_in, (40 / P + 2) * 12 * 8 * 8 * 2) << r.err;  // rows and their slots, at most
        }
    }
};

TEST_F(MpiCli, ExactEqualsSingleProcessForP1To4) {
    expect_equal_for_every_p("svd_mode: exact\ncompute_nc4: true\nmax_tokens_to_analyze: 25\nwindow_size: 8\n");
}

// The exact store spread over the ranks by class without a cut kept set (the Gram streams): the
// owners' per-token SVDs, within variances and NC4 hits per class.
TEST_F(MpiCli, ExactPerClassArraysEqualsSingleProcessForP1To4) {
    expect_equal_for_every_p("svd_mode: exact\ncompute_nc4: true\nper_class_arrays: true\nwindow_size: 8\n");
}

// Stores that spill (the ranks' own and the owners' new ones) under a small host_memory_limit;
// rank 0 takes in less than the other rank's rows: only those of the classes it owns come.
TEST_F(MpiCli, ExactSpilledStoresEqualSingleProcess) {
    run_ok("synth --output-dir " + quote(path("big")) + " --rows 20000 --dim 32 --classes 64 --seed 5 --quiet");
    testutil::spit(path("c.yaml"), "svd_mode: exact\nper_class_arrays: true\nhost_memory_limit: 6MiB\nmax_tokens_to_analyze: 50\n");
    const std::string args = "analyze --features big/features.npy --labels big/labels.npy --classifier big/classifier.npy --batch-rows 1000 "
                             "--config c.yaml -q -o ";
    run_ok(args + "single.json");
    ASSERT_GT(report("single.json")["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0);
    const nlohmann::json single = numbers("single.json");
    for (int P : {2, 3}) {
        SCOPED_TRACE("P = " + std::to_string(P));
        const std::string out = "spilled" + std::to_string(P) + ".json";
        const testutil::CliRun r = mpirun(P, args + out, "-x COLLAPSE_MPI_STATS=1");
        ASSERT_EQ(r.status, 0) << r.err;
        testutil::expect_same_json(single, numbers(out), 1e-12);
        EXPECT_GT(report(out)["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0);
        const size_t at = r.err.find("collapse: mpi combine: ");
        ASSERT_NE(at, std::string::npos) << r.err;
        const int64_t received = std::stoll(r.err.substr(r.err.find(" s, ", at) + 4));
        const int64_t other_rows = 20000 - 20000 / P;  // rows of the other ranks, 32 float64 each
        EXPECT_LT(received, other_rows * 32 * 8 * 3 / 4) << r.err;
    }
}

// Pair-metric tiles spread over the ranks (expect_pair_tiles_spread): the exact store (owners'
// variances) and the sampled one (the root's variances).
TEST_F(MpiCli, PairTilesSpreadOverRanksEqualSingleProcess) { expect_pair_tiles_spread("", 1e-12, 0.0, {1, 2, 3, 4}); }

// Reservoirs larger than every class: they hold every row, so sampling is exact too.
TEST_F(MpiCli, SampledEqualsSingleProcessForP1To4) {
    expect_equal_for_every_p(
        "svd_mode: sampled\nsvd_max_rows_per_token: 1000\ncompute_nc4: true\nmax_tokens_to_analyze: 25\nwindow_size: 8\n");
}

// Reservoirs spread over owner ranks by class (per-class arrays: every class's per-token entry):
// reservoirs larger than every class keep every row, in the order one process saw them.
TEST_F(MpiCli, SampledPerClassArraysEqualsSingleProcessForP1To4) {
    expect_equal_for_every_p("svd_mode: sampled\nsvd_max_rows_per_token: 1000\ncompute_nc4: true\nper_class_arrays: true\nwindow_size: 8\n");
}

// No row store: NC4 and the kept set's Gram come from every rank's second pass over its own rows.
TEST_F(MpiCli, OffEqualsSingleProcessForP1To4) {
    expect_equal_for_every_p("svd_mode: off\ncompute_nc4: true\nmax_tokens_to_analyze: 25\nwindow_size: 8\n");
}

// Held-out NC4 (--nc4-features/--nc4-labels): every rank passes its contiguous share of the
// held-out rows (901 of them: the cuts fall at uneven places), rank 0 adds the agreements; with
// the row store spread by class (exact) and without one (off).
TEST_F(MpiCli, HeldOutNc4EqualsSingleProcessForP1To3) {
    run_ok("synth --output-dir " + quote(path("h")) + " --rows 901 --dim 8 --classes 40 --seed 9 --quiet");
    const std::string held = "--nc4-features h/features.npy --nc4-labels h/labels.npy ";
    for (const std::string config : {"svd_mode: off\nper_class_arrays: true\n", "svd_mode: exact\nper_class_arrays: true\nmax_tokens_to_analyze: 25\n"}) {
        SCOPED_TRACE(config);
        testutil::spit(path("c.yaml"), config);
        run_ok("analyze " + input(false) + held + "--config c.yaml -q -o single.json");
        const nlohmann::json single = numbers("single.json");
        ASSERT_EQ(single["overall_analysis"]["nc4_measured_on"], "held_out_rows");
        ASSERT_FALSE(single["overall_analysis"]["nc4_agreement"].is_null());
        for (int P = 1; P <= 3; ++P) {
            SCOPED_TRACE("P = " + std::to_string(P));
            const testutil::CliRun r = mpirun(P, "analyze " + input(false) + held + "--config c.yaml -q -o held.json");
            ASSERT_EQ(r.status, 0) << r.err;
            testutil::expect_same_json(single, numbers("held.json"), 1e-12);
        }
    }
}

// The sequences layout: whole sequences per rank, numbered by their index in the file.
TEST_F(MpiCli, SequencesLayoutEqualsSingleProcess) {
    synth("q", "--sequences 40");
    testutil::spit(path("c.yaml"), "svd_mode: off\ncompute_nc4: true\nwindow_size: 8\n");
    const std::string in = "analyze --hidden q/hidden_states.npy --input-ids q/input_ids.npy --batch-rows 300 --config c.yaml -q ";
    run_ok(in + "-o single.json");
    const nlohmann::json single = numbers("single.json");
    ASSERT_FALSE(single["window_summary"].is_null());
    const testutil::CliRun r = mpirun(3, in + "-o mpi.json");
    ASSERT_EQ(r.status, 0) << r.err;
    testutil::expect_same_json(single, numbers("mpi.json"), 1e-12);
}

// Small reservoirs (expect_reservoirs_merge_as_checkpoint_merge).
TEST_F(MpiCli, SmallReservoirsMergeAsCheckpointMergeDoes) { expect_reservoirs_merge_as_checkpoint_merge("", 1e-12, 0.0, {2, 3, 4}); }

// Checkpoints per rank; a resume with the same P gives the same report, another P is refused
// naming both.
TEST_F(MpiCli, CheckpointPerRankAndResume) {
    testutil::spit(path("c.yaml"), "svd_mode: off\ncompute_nc4: true\nwindow_size: 8\nsave_every: 2\n");
    run_ok("analyze " + input() + "--config c.yaml -q -o single.json");
    testutil::CliRun r = mpirun(2, "analyze " + input() + "--config c.yaml -q -o first.json --checkpoint run.ckpt");
    ASSERT_EQ(r.status, 0) << r.err;
    r = mpirun(2, "analyze " + input() + "--config c.yaml -o resumed.json --checkpoint run.ckpt --resume");
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_NE(r.err.find("resumed from run.ckpt"), std::string::npos) << r.err;
    testutil::expect_same_json(numbers("single.json"), numbers("resumed.json"), 1e-12);
    r = mpirun(3, "analyze " + input() + "--config c.yaml -q -o other.json --checkpoint run.ckpt --resume");
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.status, 124) << "timed out";
    EXPECT_NE(r.err.find("run on 2 MPI ranks, this run has 3"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(path("other.json")));
    // Without MPI the rank files are not a checkpoint of this run either.
    expect_error("analyze " + input() + "--config c.yaml -q -o plain.json --checkpoint run.ckpt --resume",
                 {"run on 2 MPI ranks, this run has 1 (no MPI)"});
}

// A bad label only in rank 2's share: every rank ends, nonzero, with rank 2's message.
TEST_F(MpiCli, ErrorOnOneRankEndsAllWithItsMessage) {
    std::vector<int32_t> labels(2000);
    for (int i = 0; i < 2000; ++i) labels[i] = i % 40;
    labels[1700] = 77;  // rank 2 of 3 reads rows [1333, 2000)
    collapse::internal::io::write_npy(path("bad_labels.npy"), COLLAPSE_I32, {2000}, labels.data());
    const testutil::CliRun r =
        mpirun(3, "analyze --features d/features.npy --labels bad_labels.npy --num-classes 40 --batch-rows 150 -q -o bad.json", "", 30);
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.status, 124) << "timed out: a rank waited for the failed one";
    EXPECT_NE(r.err.find("collapse: error: rank 2 of 3:"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("1700"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(path("bad.json")));
}

// A rank that refuses the rows coming to it during the exchange (as a full disk would): it and the
// ranks sending to it drain the rest, every rank ends with its message, none waits for another.
TEST_F(MpiCli, ErrorDuringRowExchangeEndsAllWithItsMessage) {
    for (const std::string config : {"svd_mode: exact\n", "svd_mode: sampled\nsvd_max_rows_per_token: 12\n"}) {
        SCOPED_TRACE(config);
        testutil::spit(path("c.yaml"), config);
        const testutil::CliRun r = mpirun(3, "analyze " + input(false) + "--config c.yaml -q -o bad.json", "-x COLLAPSE_TEST_MPI_EXCHANGE_FAIL=1", 30);
        EXPECT_EQ(r.status, 1) << r.err;
        EXPECT_NE(r.err.find("collapse: error: rank 1: a piece of class "), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("COLLAPSE_TEST_MPI_EXCHANGE_FAIL"), std::string::npos) << r.err;
        EXPECT_FALSE(std::filesystem::exists(path("bad.json")));
    }
}

// The CUDA backend under mpirun (both ranks on device 0) against its own single process, within
// the CUDA accuracy contract (docs/METRICS.md: 1e-5 relative, per-token entropies 1e-5 absolute,
// counts exact). Exact: the row store spread by class (the owners' per-token SVDs and NC4 on the
// device, cuda/cuda_ranks.cu; one process takes NC4 from its device row buffer); sampled:
// reservoirs holding every row, spread by class as on the CPU (the root's merged samples, each
// owner's SVDs on its device); svd off with NC4, and sampled or exact with a cut kept set: a
// second pass over every rank's rows (NC4, the Gram, Sigma_W), its results added on rank 0
// (save/merge_second_pass), the exact store still spread by class.
TEST_F(MpiCli, CudaExactAndSampledEqualSingleProcessCuda) {
    if (collapse_backend_available("cuda") == 0) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    for (const std::string config :
         {"svd_mode: exact\ncompute_nc4: true\nper_class_arrays: true\n", "svd_mode: sampled\nsvd_max_rows_per_token: 1000\nper_class_arrays: true\n",
          // NC4 by a second pass over every rank's rows, its results added on rank 0 (save/merge_second_pass),
          // and the Gram of a cut kept set by the same second pass; with the exact store spread
          // by class, Sigma_W of the cut kept set by that second pass too.
          "svd_mode: off\ncompute_nc4: true\nper_class_arrays: true\n", "svd_mode: sampled\ncompute_nc4: true\nmax_tokens_to_analyze: 5\n",
          "svd_mode: exact\ncompute_nc4: true\nmax_tokens_to_analyze: 5\n"}) {
        SCOPED_TRACE(config);
        testutil::spit(path("c.yaml"), config);
        const std::string args = "analyze --backend cuda " + input(false) + "--config c.yaml -q -o ";
        run_ok(args + "single.json");
        const nlohmann::json single = numbers("single.json");
        ASSERT_FALSE(single["token_analysis"].is_null());
        if (config.find("compute_nc4") != std::string::npos) ASSERT_FALSE(single["overall_analysis"]["nc4_agreement"].is_null());
        for (int P : {2, 3}) {
            SCOPED_TRACE("P = " + std::to_string(P));
            const std::string out = "cuda" + std::to_string(P) + ".json";
            const testutil::CliRun r = mpirun(P, args + out, "-x COLLAPSE_MPI_STATS=1", 120);
            ASSERT_EQ(r.status, 0) << r.err;
            testutil::expect_same_json(single, numbers(out), 1e-5, 1.0);
            // Exact and sampled: the rows went to their owners (spread_rows), not to rank 0.
            if (config.rfind("svd_mode: off", 0) != 0) EXPECT_NE(r.err.find("rows to their owners"), std::string::npos) << r.err;
        }
    }
}

// The pair-metric tiles spread over CUDA ranks (cuda/cuda_ranks.cu: the root's centred means
// through host memory, each rank's share of the tiles on its device), within the CUDA contract.
TEST_F(MpiCli, CudaPairTilesSpreadOverRanksEqualSingleProcessCuda) {
    if (collapse_backend_available("cuda") == 0) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    expect_pair_tiles_spread("--backend cuda ", 1e-5, 1.0, {2, 3});
}

// Small reservoirs spread over CUDA ranks by class: the owners' per-token SVDs of the merged
// samples equal those of the CUDA backend on `collapse merge` of the ranks' checkpoints.
TEST_F(MpiCli, CudaSmallReservoirsMergeAsCheckpointMergeDoes) {
    if (collapse_backend_available("cuda") == 0) GTEST_SKIP() << "no usable CUDA device on this machine: CUDA backend tests skipped";
    expect_reservoirs_merge_as_checkpoint_merge("--backend cuda ", 1e-5, 1.0, {2, 3});
}

// Rank 1 dies (SIGKILL after its first batch): the others end within the time limit, and the
// launcher says which rank died.
TEST_F(MpiCli, KilledRankEndsTheOthers) {
    const testutil::CliRun r =
        mpirun(3, "analyze " + input() + "-q -o killed.json", "-x COLLAPSE_TEST_MPI_KILL_RANK=1", 30);
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.status, 124) << "timed out: the other ranks waited for the dead one";
    EXPECT_NE(r.err.find("rank 1"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("signal 9"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(path("killed.json")));
}

}  // namespace
}  // namespace test_mpi_cli
