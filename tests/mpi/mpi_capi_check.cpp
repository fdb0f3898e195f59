// A program on the public API alone (collapse.h, collapse_mpi.h; linked to libcollapse_mpi.so),
// run under mpirun by test_mpi_capi.cpp:
//   mpi_capi_check MODE OUT_DIR     MODE: exact | sampled | off
// Every rank ingests its contiguous share of a deterministic data set, the sessions are combined
// (and the second pass spread) with collapse_session_mpi_*; rank 0 writes the combined report to
// OUT_DIR/mpi.json and the report of one session that saw every row to OUT_DIR/single.json.
//   mpi_capi_check mismatch OUT_DIR
// Rank 1's session has another V: every rank must get the same error from the combine; each rank
// writes OUT_DIR/status.<rank> ("<status> <message>").
//   mpi_capi_check noclassifier OUT_DIR
// Exact mode, rank 1's session has no classifier: its part of the spread row store has no NC4, and
// every rank gets the root's refusal (status.<rank> as above).
// After either failure each rank tries a checkpoint, a row and a report: save.<rank>, ingest.<rank>,
// compute.<rank> ("<status> <message>").
//   mpi_capi_check spread OUT_DIR
// Exact mode, combined: the root's session, whose rows now live on their owner ranks, refuses a
// checkpoint and more rows; it writes OUT_DIR/save and OUT_DIR/ingest ("<status> <message>").
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "collapse/collapse_mpi.h"

namespace {

constexpr int64_t N = 1200, D = 6, V = 10;

float feature(int64_t i, int64_t k) {
    const int64_t c = i % V;
    uint64_t h = (uint64_t)(i * 131 + k * 7 + 1) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    return (float)(std::cos((double)(c * D + k)) * 3.0 + (double)(h % 1000) / 1000.0 - 0.5);
}

collapse_session* make_session(const std::string& mode, int64_t classes, bool classifier = true) {
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = classes;
    o.svd_mode = mode == "sampled" ? COLLAPSE_SVD_SAMPLED : mode == "off" ? COLLAPSE_SVD_OFF : COLLAPSE_SVD_EXACT;
    o.svd_max_rows_per_token = 1000;
    o.compute_nc4 = 1;
    o.max_tokens_to_analyze = 7;
    collapse_session* s = nullptr;
    if (collapse_session_create(&o, &s) != COLLAPSE_OK) {
        std::fprintf(stderr, "create: %s\n", collapse_last_error());
        std::exit(2);
    }
    if (!classifier) return s;
    std::vector<float> w((size_t)(classes * D));
    for (int64_t c = 0; c < classes; ++c)
        for (int64_t k = 0; k < D; ++k) w[(size_t)(c * D + k)] = (float)std::cos((double)(c * D + k));
    const collapse_buffer wb = {w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, classes, D, 0};
    if (collapse_session_set_classifier(s, &wb, nullptr) != COLLAPSE_OK) std::exit(2);
    return s;
}

// Rows [lo, hi) in batches of 100.
void ingest(collapse_session* s, int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b += 100) {
        const int64_t n = std::min<int64_t>(100, hi - b);
        std::vector<float> x((size_t)(n * D));
        std::vector<int32_t> y((size_t)n);
        for (int64_t i = 0; i < n; ++i) {
            y[(size_t)i] = (int32_t)((b + i) % V);
            for (int64_t k = 0; k < D; ++k) x[(size_t)(i * D + k)] = feature(b + i, k);
        }
        const collapse_buffer xb = {x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, D, 0};
        const collapse_buffer yb = {y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
        if (collapse_session_ingest_rows(s, &xb, &yb, nullptr, nullptr) != COLLAPSE_OK) {
            std::fprintf(stderr, "ingest: %s\n", collapse_last_error());
            std::exit(2);
        }
    }
}

void write_report(collapse_session* s, const std::string& path) {
    collapse_report* r = nullptr;
    if (collapse_session_compute(s, &r) != COLLAPSE_OK || collapse_report_write_json(r, path.c_str()) != COLLAPSE_OK) {
        std::fprintf(stderr, "report: %s\n", collapse_last_error());
        std::exit(2);
    }
    collapse_report_destroy(r);
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    if (argc != 3) return 2;
    const std::string mode = argv[1], dir = argv[2];
    int rank = 0, P = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &P);
    const int64_t lo = N * rank / P, hi = N * (rank + 1) / P;
    if (mode == "mismatch" || mode == "noclassifier") {
        collapse_session* s = mode == "mismatch" ? make_session("exact", rank == 1 ? V + 1 : V) : make_session("exact", V, rank != 1);
        ingest(s, lo, hi);
        const collapse_status st = collapse_session_mpi_combine(s, MPI_COMM_WORLD, 0);
        const std::string r = std::to_string(rank);
        std::ofstream(dir + "/status." + r) << (int)st << " " << collapse_last_error();
        // The failed combine left the session with part of another rank's state: refused from now on.
        const collapse_status saved = collapse_session_save(s, (dir + "/after." + r + ".ckpt").c_str());
        std::ofstream(dir + "/save." + r) << (int)saved << " " << collapse_last_error();
        const std::vector<float> x(D, 1.0f);
        const int32_t y = 0;
        const collapse_buffer xb = {x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 1, D, 0};
        const collapse_buffer yb = {&y, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 1, 1, 0};
        const collapse_status took = collapse_session_ingest_rows(s, &xb, &yb, nullptr, nullptr);
        std::ofstream(dir + "/ingest." + r) << (int)took << " " << collapse_last_error();
        collapse_report* report = nullptr;
        const collapse_status computed = collapse_session_compute(s, &report);
        std::ofstream(dir + "/compute." + r) << (int)computed << " " << collapse_last_error();
        if (report) collapse_report_destroy(report);
        collapse_session_destroy(s);
        MPI_Finalize();
        return 0;
    }
    if (mode == "spread") {
        collapse_session* s = make_session("exact", V);
        ingest(s, lo, hi);
        if (collapse_session_mpi_combine(s, MPI_COMM_WORLD, 0) != COLLAPSE_OK) {
            std::fprintf(stderr, "rank %d: %s\n", rank, collapse_last_error());
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        if (rank == 0) {
            collapse_status st = collapse_session_save(s, (dir + "/after.ckpt").c_str());
            std::ofstream(dir + "/save") << (int)st << " " << collapse_last_error();
            const std::vector<float> x(D, 1.0f);
            const int32_t y = 0;
            const collapse_buffer xb = {x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 1, D, 0};
            const collapse_buffer yb = {&y, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 1, 1, 0};
            st = collapse_session_ingest_rows(s, &xb, &yb, nullptr, nullptr);
            std::ofstream(dir + "/ingest") << (int)st << " " << collapse_last_error();
        }
        collapse_session_destroy(s);
        MPI_Finalize();
        return 0;
    }
    collapse_session* s = make_session(mode, V);
    ingest(s, lo, hi);
    int needed = 0;
    if (collapse_session_mpi_combine(s, MPI_COMM_WORLD, 0) != COLLAPSE_OK ||
        collapse_session_mpi_begin_second_pass(s, MPI_COMM_WORLD, 0, &needed) != COLLAPSE_OK) {
        std::fprintf(stderr, "rank %d: %s\n", rank, collapse_last_error());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    if (needed) {
        ingest(s, lo, hi);
        if (collapse_session_mpi_end_second_pass(s, MPI_COMM_WORLD, 0) != COLLAPSE_OK) {
            std::fprintf(stderr, "rank %d: %s\n", rank, collapse_last_error());
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    if (rank == 0) {
        write_report(s, dir + "/mpi.json");
        collapse_session* one = make_session(mode, V);
        ingest(one, 0, N);
        collapse_session_needs_second_pass(one, &needed);
        if (needed) {
            collapse_session_begin_second_pass(one);
            ingest(one, 0, N);
        }
        write_report(one, dir + "/single.json");
        collapse_session_destroy(one);
        std::ofstream(dir + "/needed") << needed;
    }
    collapse_session_destroy(s);
    MPI_Finalize();
    return 0;
}
