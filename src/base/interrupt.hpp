// A process-wide request to stop: the CLI's signal handlers make it, and the long loops of a
// compute (per-token SVDs, NC4's tiles, the pair tiles) stop at their next item and throw
// Interrupted, so that SIGTERM during a compute of minutes ends the run within a tile instead of
// after it. The library itself never makes the request; only a program that installs handlers does.
#pragma once

namespace collapse::internal {

// Thrown when a run stops on a signal: the CLI exits with 128 + signal.
struct Interrupted {
    int signal;
};

// Async-signal-safe (a lock-free atomic store). clear_interrupt is for tests.
void request_interrupt(int signal) noexcept;
void clear_interrupt() noexcept;
// The signal asked for, or 0.
int interrupt_requested() noexcept;
// Throws Interrupted when a stop was asked for. Call it outside parallel regions: loops inside
// them skip their remaining items on interrupt_requested() and call this after the region.
void throw_if_interrupted();

}  // namespace collapse::internal
