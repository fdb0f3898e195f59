#include "core/host_budget.hpp"

#include <limits>

#include "base/bytes.hpp"
#include "base/error.hpp"
#include "core/config.hpp"

namespace collapse::internal {

namespace {
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
}

int64_t mul_bytes(int64_t a, int64_t b, int64_t c) {
    if (a <= 0 || b <= 0 || c <= 0) return 0;
    int64_t ab = 0, abc = 0;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return kMax;
    return abc;
}

int64_t add_bytes(int64_t a, int64_t b) {
    int64_t s = 0;
    return __builtin_add_overflow(a, b, &s) ? kMax : s;
}

std::shared_ptr<HostBudget> HostBudget::from_config(const Config& cfg) { return std::make_shared<HostBudget>(cfg.host_memory_limit); }

HostBudget::Lease& HostBudget::Lease::operator=(Lease&& o) noexcept {
    if (this != &o) {
        reset();
        budget_ = o.budget_, bytes_ = o.bytes_;
        o.budget_ = nullptr, o.bytes_ = 0;
    }
    return *this;
}

void HostBudget::Lease::resize(int64_t bytes, const std::string& what, const std::string& fix) {
    if (!budget_) return;  // a lease of no budget counts nothing (a row store made without one)
    if (bytes > bytes_) budget_->check(bytes - bytes_, what, fix);
    update(bytes);
}

void HostBudget::Lease::update(int64_t bytes) {
    if (!budget_) return;
    budget_->held_ += bytes - bytes_;
    bytes_ = bytes;
}

HostBudget::Lease HostBudget::reserve(int64_t bytes, const std::string& what, const std::string& fix) {
    check(bytes, what, fix);
    held_ += bytes;
    return Lease(this, bytes);
}

void HostBudget::check(int64_t bytes, const std::string& what, const std::string& fix) const {
    if (!fits(bytes)) refuse(bytes, what, fix);
}

void HostBudget::refuse(int64_t bytes, const std::string& what, const std::string& fix) const {
    fail(COLLAPSE_ERR_OUT_OF_MEMORY, what, " would need ", format_bytes(bytes), " (", bytes, " bytes) of host memory; with ", format_bytes(held_),
         " already held that is ", format_bytes(add_bytes(held_, bytes)), ", more than host_memory_limit = ", format_bytes(limit_),
         "; ", fix.empty() ? std::string("raise host_memory_limit") : fix);
}

}  // namespace collapse::internal
