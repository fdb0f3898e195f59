// For optional components built on the C API (src/mpi/): run a body on a C session handle as the
// C entry points do (the session's busy flag held; exceptions turned into a status and the
// thread-local last-error text that collapse_last_error returns).
#pragma once
#include <functional>

#include "collapse/collapse.h"
#include "core/session.hpp"

namespace collapse::internal {

collapse_status run_session_call(collapse_session* s, const std::function<void(Session&)>& body) noexcept;
// The same for a body without a session (the last-error text set or cleared).
collapse_status run_call(const std::function<void()>& body) noexcept;

}  // namespace collapse::internal
