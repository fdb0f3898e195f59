// Session state through MPI (the optional MPI component; include/collapse/collapse_mpi.h).
//
// A state moves as the sections of core/state_sections.hpp (meta first, as in a checkpoint), in
// packets of at most `chunk` bytes: a frame (kind, section name, type, shape, bytes) and then the
// section's bytes in pieces. Nothing ever holds a whole row store: the sender writes straight from
// its backend's arrays (spilled rows come back a bounded group at a time), and the root spools
// what arrives into a checkpoint file of its own (in intermediate_save_dir, removed after) that it
// merges exactly as `collapse merge` does, one rank after the other in rank order, so that the
// result does not depend on timing and rank 0 never receives P states at once.
//
// Every collective here ends with every rank knowing the same outcome: an error on any rank (a
// refused state, a full disk, a rank whose own state cannot be written) is thrown on every rank
// with that rank's message ("rank r: ...").
#pragma once
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "base/error.hpp"
#include "core/session.hpp"

namespace collapse::internal::mpi {

// An error every rank of the collective throws alike (the outcome was shared).
class CollectiveError : public Error {
public:
    using Error::Error;
};

constexpr size_t kDefaultChunk = size_t(64) << 20;
// The piece size: COLLAPSE_MPI_CHUNK_BYTES (tests make it small), else 64 MiB.
size_t chunk_bytes();

// After every rank's first pass: the root's session holds the state of all (rank order). An
// exact row store (or reservoirs) is spread over the ranks by class instead: every rank adopts
// the root's class sums, owns some classes' rows and computes their part, which the root adds.
// After an error of these three, every rank's session refuses all further calls (set_unusable).
void combine(Session& s, MPI_Comm comm, int root, size_t chunk);
// The second pass where one is needed (the root decides): every rank takes the root's combined
// class counts and sums and begins its second pass. Returns whether one runs.
bool begin_second_pass(Session& s, MPI_Comm comm, int root, size_t chunk);
// After every rank's second pass over its own rows: the partial results added on the root.
void end_second_pass(Session& s, MPI_Comm comm, int root, size_t chunk);

// Section bytes this process has received so far (the bench's model check).
int64_t received_bytes();

// Runs body on every rank; if it threw on any, throws on every rank the error of the lowest
// failing rank ("rank r: message"), with its status.
void agree(MPI_Comm comm, const std::function<void()>& body);

}  // namespace collapse::internal::mpi
