// Owning device and pinned-host buffers, and the byte budget of device_memory_limit: every
// allocation goes through a Budget, so a run that cannot fit fails before it allocates, with the
// numbers. The Budget also counts the session's allocation calls: a cudaFree or cudaFreeHost
// synchronises the whole device (and cudaMalloc may), which stalls a server's other streams, so
// after the first batch and the first compute of a shape there should be none (resources.cuh).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "base/bytes.hpp"
#include "core/host_budget.hpp"
#include "cuda_check.hpp"

namespace collapse::internal::cuda {

struct AllocationCalls {
    int64_t device = 0;  // cudaMalloc + cudaFree
    int64_t pinned = 0;  // cudaMallocHost + cudaFreeHost
};

// used(): bytes of live buffers and pool leases (what a run needs; the refusal and the sizes
// derived from the free budget read it). cached(): idle pool slabs, kept for the next call.
// used() + cached() never exceeds the limit: a reservation that would push it over first asks
// the pool (the reclaimer) to free idle slabs.
class Budget {
public:
    explicit Budget(int64_t limit) : limit_(limit) {}
    // Reserve bytes for `what`, or throw COLLAPSE_ERR_OUT_OF_MEMORY naming what needs how much.
    void reserve(int64_t bytes, const std::string& what, const std::string& hint) {
        check(bytes, what, hint);
        used_ += bytes;
        if (used_ + cached_ > limit_ && reclaim_) reclaim_(used_ + cached_ - limit_);
    }
    // An idle pool slab of `bytes` taken for `what`: the same check, no new memory.
    void reserve_cached(int64_t bytes, const std::string& what, const std::string& hint) {
        check(bytes, what, hint);
        used_ += bytes;
        cached_ -= bytes;
    }
    void release(int64_t bytes) { used_ -= bytes; }
    // A pool slab's bytes go idle (released) or are freed (uncached).
    void cache(int64_t bytes) { cached_ += bytes; }
    void uncache(int64_t bytes) { cached_ -= bytes; }
    int64_t used() const { return used_; }
    int64_t cached() const { return cached_; }
    int64_t limit() const { return limit_; }
    // Called with the bytes to give back when used() + cached() would exceed the limit, and with
    // the limit itself when a cudaMalloc failed (give back everything idle, then retry once).
    void set_reclaimer(std::function<void(int64_t)> f) { reclaim_ = std::move(f); }
    void reclaim_all() {
        if (reclaim_ && cached_ > 0) reclaim_(limit_);
    }
    void count_device_call() { ++calls_.device; }
    void count_pinned_call() { ++calls_.pinned; }
    AllocationCalls allocation_calls() const { return calls_; }

private:
    void check(int64_t bytes, const std::string& what, const std::string& hint) const {
        if (used_ + bytes > limit_)
            fail(COLLAPSE_ERR_OUT_OF_MEMORY, what, " needs ", format_bytes(bytes), " of device memory; ", format_bytes(used_),
                 " are in use and device_memory_limit is ", format_bytes(limit_), hint.empty() ? "" : "; ", hint);
    }

    int64_t limit_;
    int64_t used_ = 0;
    int64_t cached_ = 0;
    AllocationCalls calls_;
    std::function<void(int64_t)> reclaim_;
};

// cudaMalloc (or `allocate`) counted by the budget; when it fails, the idle pool slabs are freed
// and it is tried once more. Returns the error of the last try.
inline cudaError_t counted_malloc(void** p, size_t bytes, Budget* budget, cudaError_t (*allocate)(void**, size_t) = nullptr) {
    auto call = [&] { return allocate ? allocate(p, bytes) : cudaMalloc(p, bytes); };
    cudaError_t e = call();
    if (budget) budget->count_device_call();
    if (e != cudaSuccess && budget && budget->cached() > 0) {
        (void)cudaGetLastError();
        budget->reclaim_all();
        e = call();
        budget->count_device_call();
    }
    return e;
}

template <class T>
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    DeviceBuffer(size_t n, Budget* budget, const std::string& what, const std::string& hint = "") { allocate(n, budget, what, hint); }
    ~DeviceBuffer() { reset(); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        if (this != &o) {
            reset();
            std::swap(p_, o.p_);
            std::swap(n_, o.n_);
            std::swap(budget_, o.budget_);
        }
        return *this;
    }
    void allocate(size_t n, Budget* budget, const std::string& what, const std::string& hint = "") {
        reset();
        if (n == 0) return;
        if (budget) budget->reserve((int64_t)(n * sizeof(T)), what, hint);
        void* p = nullptr;
        const cudaError_t e = counted_malloc(&p, n * sizeof(T), budget);
        if (e != cudaSuccess) {
            if (budget) budget->release((int64_t)(n * sizeof(T)));
            (void)cudaGetLastError();
            fail(COLLAPSE_ERR_OUT_OF_MEMORY, "cudaMalloc of ", format_bytes((int64_t)(n * sizeof(T))), " for ", what,
                 " failed: ", cudaGetErrorString(e));
        }
        p_ = static_cast<T*>(p);
        n_ = n;
        budget_ = budget;
    }
    void reset() {
        if (p_) {
            COLLAPSE_CUDA_TRY_NO_THROW(cudaFree(p_));
            if (budget_) {
                budget_->release((int64_t)(n_ * sizeof(T)));
                budget_->count_device_call();
            }
        }
        p_ = nullptr;
        n_ = 0;
        budget_ = nullptr;
    }
    T* data() const { return p_; }
    size_t size() const { return n_; }
    size_t bytes() const { return n_ * sizeof(T); }

private:
    T* p_ = nullptr;
    size_t n_ = 0;
    Budget* budget_ = nullptr;
};

// Pinned host memory: not in the device budget (`counter`, when given, counts the calls), but in
// the session's host budget (host_memory_limit) when one is given: the bytes are counted before
// cudaMallocHost, and a refusal (COLLAPSE_ERR_OUT_OF_MEMORY naming them, `what` and `fix`) leaves
// the buffer as it was.
template <class T>
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    ~PinnedBuffer() {
        if (p_) COLLAPSE_CUDA_TRY_NO_THROW(cudaFreeHost(p_));
    }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    void allocate(size_t n, Budget* counter, HostBudget* host, const std::string& what, const std::string& fix = "") {
        // Counted first: the old buffer is given back below, so only the growth has to fit.
        if (host && !lease_.bytes() && n > 0) lease_ = host->lease();
        lease_.resize(mul_bytes((int64_t)n, (int64_t)sizeof(T)), "pinned host memory for " + what, fix);
        if (p_) {
            if (counter) counter->count_pinned_call();
            COLLAPSE_CUDA_TRY(cudaFreeHost(p_));
        }
        p_ = nullptr;
        n_ = 0;
        if (n == 0) {
            lease_.reset();
            return;
        }
        void* p = nullptr;
        if (counter) counter->count_pinned_call();
        const cudaError_t e = cudaMallocHost(&p, n * sizeof(T));
        if (e != cudaSuccess) {
            lease_.reset();
            (void)cudaGetLastError();
            fail(COLLAPSE_ERR_OUT_OF_MEMORY, "cudaMallocHost of ", format_bytes((int64_t)(n * sizeof(T))), " for ", what,
                 " failed: ", cudaGetErrorString(e));
        }
        p_ = static_cast<T*>(p);
        n_ = n;
    }
    T* data() const { return p_; }
    size_t size() const { return n_; }
    T& operator[](size_t i) const { return p_[i]; }

private:
    T* p_ = nullptr;
    size_t n_ = 0;
    HostBudget::Lease lease_;  // of host_memory_limit, while the memory is held
};

}  // namespace collapse::internal::cuda
