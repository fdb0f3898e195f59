// Owning device and pinned-host buffers, and the byte budget of device_memory_limit: every
// allocation goes through a Budget, so a run that cannot fit fails before it allocates, with the
// numbers.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "core/config.hpp"
#include "cuda_check.hpp"

namespace collapse::internal::cuda {

class Budget {
public:
    explicit Budget(int64_t limit) : limit_(limit) {}
    // Reserve bytes for `what`, or throw COLLAPSE_ERR_OUT_OF_MEMORY naming what needs how much.
    void reserve(int64_t bytes, const std::string& what, const std::string& hint) {
        if (used_ + bytes > limit_)
            fail(COLLAPSE_ERR_OUT_OF_MEMORY, what, " needs ", format_bytes(bytes), " of device memory; ", format_bytes(used_),
                 " are in use and device_memory_limit is ", format_bytes(limit_), hint.empty() ? "" : "; ", hint);
        used_ += bytes;
    }
    void release(int64_t bytes) { used_ -= bytes; }
    int64_t used() const { return used_; }
    int64_t limit() const { return limit_; }

private:
    int64_t limit_;
    int64_t used_ = 0;
};

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
        const cudaError_t e = cudaMalloc(&p, n * sizeof(T));
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
            if (budget_) budget_->release((int64_t)(n_ * sizeof(T)));
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

template <class T>
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    explicit PinnedBuffer(size_t n) { allocate(n); }
    ~PinnedBuffer() {
        if (p_) COLLAPSE_CUDA_TRY_NO_THROW(cudaFreeHost(p_));
    }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    void allocate(size_t n) {
        if (p_) COLLAPSE_CUDA_TRY(cudaFreeHost(p_));
        p_ = nullptr;
        n_ = 0;
        if (n == 0) return;
        void* p = nullptr;
        COLLAPSE_CUDA_TRY(cudaMallocHost(&p, n * sizeof(T)));
        p_ = static_cast<T*>(p);
        n_ = n;
    }
    T* data() const { return p_; }
    size_t size() const { return n_; }
    T& operator[](size_t i) const { return p_[i]; }

private:
    T* p_ = nullptr;
    size_t n_ = 0;
};

}  // namespace collapse::internal::cuda
