#include "mpi/mpi_cli.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "base/error.hpp"
#include "mpi/mpi_state.hpp"

namespace collapse::internal::mpi {

std::string launcher_variable() {
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
        if (std::getenv(v)) return v;
    if (std::getenv("SLURM_STEP_NUM_TASKS") && std::getenv("SLURM_PROCID")) return "SLURM_STEP_NUM_TASKS";
    return "";
}

World start() {
    int ready = 0;
    MPI_Initialized(&ready);
    if (!ready) {
        int provided = 0;
        MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    }
    World w;
    MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &w.size);
    // The node's ranks (MPI_COMM_TYPE_SHARED): their number, and this rank's place among them
    // unless the launcher says it.
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, w.rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &w.local_rank);
    MPI_Comm_size(node, &w.local_size);
    MPI_Comm_free(&node);
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!local) local = std::getenv("SLURM_LOCALID");
    if (local) w.local_rank = std::atoi(local);
    return w;
}

void finish() {
    int done = 0;
    MPI_Finalized(&done);
    if (!done) MPI_Finalize();
}

void abort_all(int code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this is for the compiler
}

driver::AnalysisOptions::Ranks world_hooks(const World& w) {
    driver::AnalysisOptions::Ranks r;
    const size_t chunk = chunk_bytes();
    // COLLAPSE_MPI_STATS=1: rank 0 says how long each exchange took and how many bytes it took in
    // (bench/mpi_scale.sh checks its model with them).
    const bool stats = w.rank == 0 && std::getenv("COLLAPSE_MPI_STATS");
    auto timed = [stats](const char* what, auto&& body) {
        const double t0 = MPI_Wtime();
        const int64_t b0 = received_bytes();
        auto result = body();
        if (stats)
            std::fprintf(stderr, "collapse: mpi %s: %.4f s, %lld bytes received by rank 0\n", what, MPI_Wtime() - t0,
                         (long long)(received_bytes() - b0));
        return result;
    };
    r.combine = [chunk, timed](Session& s) { timed("combine", [&] { return (combine(s, MPI_COMM_WORLD, 0, chunk), 0); }); };
    r.begin_second_pass = [chunk, timed](Session& s) { return timed("second pass begin", [&] { return begin_second_pass(s, MPI_COMM_WORLD, 0, chunk); }); };
    r.end_second_pass = [chunk, timed](Session& s) { timed("second pass end", [&] { return (end_second_pass(s, MPI_COMM_WORLD, 0, chunk), 0); }); };
    r.root = w.rank == 0;
    r.rank = w.rank, r.size = w.size;
    return r;
}

bool collective(const std::exception& e) { return dynamic_cast<const CollectiveError*>(&e) != nullptr; }

DeviceShare local_device(int local_rank, int local_size) {
    int count = 0;
    if (const char* v = std::getenv("CUDA_VISIBLE_DEVICES")) {
        if (*v) {
            count = 1;
            for (const char* p = v; *p; ++p) count += *p == ',';
        }
    } else {
        std::error_code ec;
        for (std::filesystem::directory_iterator it("/proc/driver/nvidia/gpus", ec), end; !ec && it != end; it.increment(ec)) ++count;
    }
    if (count <= 0) return {0, std::max(1, local_size)};  // unknown: assume they all share device 0
    const int ordinal = local_rank % count;
    int ranks = 0;  // the node's ranks r with r % count == ordinal
    for (int r = 0; r < local_size; ++r) ranks += r % count == ordinal;
    return {ordinal, std::max(1, ranks)};
}

}  // namespace collapse::internal::mpi
