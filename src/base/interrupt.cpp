#include "base/interrupt.hpp"

#include <atomic>

namespace collapse::internal {

namespace {
std::atomic<int> g_interrupt{0};
static_assert(std::atomic<int>::is_always_lock_free, "request_interrupt must be async-signal-safe");
}  // namespace

void request_interrupt(int signal) noexcept { g_interrupt.store(signal, std::memory_order_relaxed); }
void clear_interrupt() noexcept { g_interrupt.store(0, std::memory_order_relaxed); }
int interrupt_requested() noexcept { return g_interrupt.load(std::memory_order_relaxed); }

void throw_if_interrupted() {
    if (const int sig = interrupt_requested()) throw Interrupted{sig};
}

}  // namespace collapse::internal
