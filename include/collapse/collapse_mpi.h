/* collapse_mpi.h: the optional MPI component of collapse (libcollapse_mpi; built when MPI is found).
 *
 * Sessions on the ranks of a communicator, each fed its own rows, combined into the report of one
 * process that saw every row. The core C API (collapse.h) stays free of MPI types; link
 * collapse::collapse_mpi (CMake) instead of collapse::collapse: libcollapse_mpi contains the whole
 * library plus the functions below.
 *
 *   every rank:  collapse_session_create(&opts, &s); set_classifier; ingest_* its own rows
 *   every rank:  collapse_session_mpi_combine(s, comm, 0)
 *   every rank:  collapse_session_mpi_begin_second_pass(s, comm, 0, &needed)
 *                if (needed) { ingest its own rows again; collapse_session_mpi_end_second_pass(s, comm, 0); }
 *   rank 0 only: collapse_session_compute(s, &report)
 *
 * The root's session ends with every rank's first-pass state, added in rank order exactly as
 * collapse_session_merge adds checkpoints (sums, counts, the Gram and exact row stores exactly;
 * sampled reservoirs by weighted re-sampling; window trackers of disjoint sequences): with
 * root 0 and rank r holding the r-th contiguous share of the rows, its report equals the
 * single-process report within float64 rounding of sums (counts exact). The other ranks' sessions
 * keep their own state, serve their second pass, and compute nothing useful.
 *
 * State moves in pieces of at most 64 MiB (COLLAPSE_MPI_CHUNK_BYTES overrides): the root asks one
 * rank at a time and spools its state into a private file in the session's intermediate_save_dir
 * (removed after the merge), so no rank holds another's row store in memory.
 *
 * An exact row store (svd_mode exact, on every rank) is not sent to the root: the
 * combine gives every rank the combined class counts and sums, moves each kept class's rows to
 * an owner rank (rank order kept, in pieces, every rank sending and receiving at once), and every
 * rank computes the row-store metrics of its classes (per-token SVDs, within-class variances,
 * NC4, a cut kept set's Gram and scatter) at once; the root adds them. Sampled reservoirs go
 * the same way: the root decides each class's merged sample from the counts (the rows
 * collapse_session_merge would keep), only those rows move to the owners, which compute the
 * per-token SVDs. Every session in the communicator then takes no more rows, and
 * collapse_session_save refuses (COLLAPSE_ERR_STATE): checkpoint before the combine. The
 * classifier must be set on every rank before the combine (the owners' NC4 needs it).
 * After an error of any of these functions (other than a refused argument) every rank's session
 * holds part of another's state: each refuses every further call (COLLAPSE_ERR_STATE, naming the
 * function that failed) and is fit only for destroy.
 *
 * Every function is collective over `comm` and returns the same status on every rank: an error on
 * any rank (a refused state, a full disk) is every rank's error, with that rank's message in
 * collapse_last_error() ("rank r: ..."). A rank that dies is the MPI runtime's matter (mpirun and
 * srun end the job). CUDA sessions take part in all of it (the spread rows, the pair tiles, the
 * second pass), moving their state through host memory; each computes its part on its device.
 */
#ifndef COLLAPSE_MPI_H
#define COLLAPSE_MPI_H

/* The MPI C API only (OpenMPI's and MPICH's C++ bindings would need their C++ library). */
#if defined(__cplusplus) && !defined(OMPI_SKIP_MPICXX)
#define OMPI_SKIP_MPICXX 1
#endif
#if defined(__cplusplus) && !defined(MPICH_SKIP_MPICXX)
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include "collapse/collapse.h"

#ifdef __cplusplus
extern "C" {
#endif

/* After every rank's first pass: the root's session takes the state of every rank. */
collapse_status collapse_session_mpi_combine(collapse_session* session, MPI_Comm comm, int root);

/* After combine: *needed = 1 when a requested metric needs a second pass (NC4 or the kept Gram
 * without a row store); then every rank has begun its second pass with the root's combined class
 * means and ingests its own rows again. */
collapse_status collapse_session_mpi_begin_second_pass(collapse_session* session, MPI_Comm comm, int root, int* needed);

/* After every rank's second pass: its partial results (rows, NC4 agreements, the kept Gram) are
 * added on the root, whose compute then gives the report. */
collapse_status collapse_session_mpi_end_second_pass(collapse_session* session, MPI_Comm comm, int root);

#ifdef __cplusplus
}  /* extern "C" */

#include "collapse/collapse.hpp"

namespace collapse {

/* C++: the same collectives on a collapse::Session; they throw collapse::ApiError on every rank. */
inline void mpi_combine(Session& s, MPI_Comm comm, int root = 0) { check(collapse_session_mpi_combine(s.get(), comm, root)); }
inline bool mpi_begin_second_pass(Session& s, MPI_Comm comm, int root = 0) {
    int needed = 0;
    check(collapse_session_mpi_begin_second_pass(s.get(), comm, root, &needed));
    return needed != 0;
}
inline void mpi_end_second_pass(Session& s, MPI_Comm comm, int root = 0) {
    check(collapse_session_mpi_end_second_pass(s.get(), comm, root));
}

}  // namespace collapse
#endif

#endif /* COLLAPSE_MPI_H */
