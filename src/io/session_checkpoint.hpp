// Session checkpoints: a "meta" section (JSON of core's CheckpointMeta: format, version, V, d,
// backend, the state-affecting and the whole config, the classifier's hash, the input position,
// batch counts, skipped ranges, the input identity) and the session's state sections
// (core/state_sections.hpp), in the crash-safe container of io/checkpoint_file.hpp.
//
// Every refusal is an Error naming the file and the check: a damaged container
// (COLLAPSE_ERR_IO), a meta that is not a valid one (COLLAPSE_ERR_IO: a missing or mistyped field,
// a config that the normal config validation refuses), a state that disagrees with the session
// (V, d, config, classifier) or with itself (Session::load_state). A refused load or merge changes
// nothing.
#pragma once
#include <string>

#include "core/checkpoint_meta.hpp"
#include "core/config.hpp"
#include "core/session.hpp"
#include "core/state_io.hpp"

namespace collapse::internal::io {

// The whole first-pass state, atomically (a temp file renamed over `path`).
void save_checkpoint(Session& session, const std::string& path);
// The same sections (meta first) into any StateWriter, and a shard's state from any StateReader
// merged as merge_checkpoint merges a file (MPI ranks stream them: src/mpi/).
void write_session_state(Session& session, StateWriter& w);
void merge_session_state(Session& session, const StateReader& r);
// Replaces the state of a session that has seen no rows.
void load_checkpoint(Session& session, const std::string& path);
// Adds a shard's state.
void merge_checkpoint(Session& session, const std::string& path);
// The config stored in a checkpoint (to create the session that loads or merges it).
Config checkpoint_config(const std::string& path);

// The meta section of an open checkpoint, every field checked for presence and type and the
// config parsed through the normal validation.
CheckpointMeta read_checkpoint_meta(const StateReader& r);

}  // namespace collapse::internal::io
