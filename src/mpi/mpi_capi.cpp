// The C functions of include/collapse/collapse_mpi.h.
#include "collapse/collapse_mpi.h"

#include "api/session_call.hpp"
#include "base/error.hpp"
#include "mpi/mpi_state.hpp"

using collapse::internal::Session;
namespace mpi = collapse::internal::mpi;

namespace {
// Arguments every rank can check alike (so all refuse together, before any message moves).
void check_comm(MPI_Comm comm, int root) {
    if (comm == MPI_COMM_NULL) collapse::internal::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "comm is MPI_COMM_NULL");
    int P = 0;
    MPI_Comm_size(comm, &P);
    if (root < 0 || root >= P) collapse::internal::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "root ", root, " is not a rank of the communicator (size ", P, ")");
}
}  // namespace

extern "C" {

collapse_status collapse_session_mpi_combine(collapse_session* session, MPI_Comm comm, int root) {
    return collapse::internal::run_session_call(session, [&](Session& s) {
        check_comm(comm, root);
        mpi::combine(s, comm, root, mpi::chunk_bytes());
    });
}

collapse_status collapse_session_mpi_begin_second_pass(collapse_session* session, MPI_Comm comm, int root, int* needed) {
    return collapse::internal::run_session_call(session, [&](Session& s) {
        check_comm(comm, root);
        if (!needed) collapse::internal::fail(COLLAPSE_ERR_INVALID_ARGUMENT, "needed is NULL");
        *needed = mpi::begin_second_pass(s, comm, root, mpi::chunk_bytes()) ? 1 : 0;
    });
}

collapse_status collapse_session_mpi_end_second_pass(collapse_session* session, MPI_Comm comm, int root) {
    return collapse::internal::run_session_call(session, [&](Session& s) {
        check_comm(comm, root);
        mpi::end_second_pass(s, comm, root, mpi::chunk_bytes());
    });
}

}  // extern "C"
