// The `collapse` command under mpirun/srun (src/cli/analyze_cmd.cpp), without MPI types, so that
// the command line compiles the same with and without the MPI component (COLLAPSE_HAVE_MPI).
#pragma once
#include <string>

#include "driver/analysis.hpp"

namespace collapse::internal::mpi {

// A launcher's environment: OMPI_COMM_WORLD_SIZE (mpirun), PMI_SIZE / PMIX_RANK (srun and other
// PMI launchers), or SLURM_STEP_NUM_TASKS with SLURM_PROCID (an srun step). Empty when none; else
// the variable that says so.
std::string launcher_variable();

struct World {
    int rank = 0, size = 1, local_rank = 0, local_size = 1;
};
// MPI_Init (thread level: funneled) and the rank and size in MPI_COMM_WORLD; the local rank from
// OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID or MPI_COMM_TYPE_SHARED.
World start();
void finish();  // MPI_Finalize
// Ends every rank of MPI_COMM_WORLD (after the caller printed why).
[[noreturn]] void abort_all(int code);
// The driver's hooks on MPI_COMM_WORLD, root 0.
driver::AnalysisOptions::Ranks world_hooks(const World& w);
// An error that every rank threw alike (a collective's shared outcome): one rank prints it.
bool collective(const std::exception& e);
// The CUDA device of a rank: local_rank % the node's device count (CUDA_VISIBLE_DEVICES, else
// /proc/driver/nvidia/gpus; 0 when the count is unknown), and how many of the node's ranks get
// that device (they divide its default device_memory_limit).
struct DeviceShare {
    int ordinal = 0, ranks = 1;
};
DeviceShare local_device(int local_rank, int local_size);

}  // namespace collapse::internal::mpi
