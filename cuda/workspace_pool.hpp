// The workspace pool of a session (how it is used, and THE RULE for leases: resources.cuh).
// Header-only plain C++ over the CUDA runtime API, so that tests/cuda/test_workspace_pool.cpp runs
// its bookkeeping on any machine with a fake allocator.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/bytes.hpp"
#include "base/error.hpp"
#include "device_memory.hpp"

namespace collapse::internal::cuda {

class WorkspacePool;

// The pool reuses an idle slab of exactly the size asked (acquire, below). A workspace whose
// size follows the data (a solver's, a batch's eigenvalues) is therefore taken as `bytes` rounded
// up to a power of two of at least `floor`, so that a later compute with somewhat more rows gets
// the same slab instead of a new cudaMalloc; the exact size when the rounded one does not fit.
inline size_t reusable_bytes(const Budget& budget, size_t bytes, size_t floor) {
    size_t e = floor;
    while (e < bytes) e *= 2;
    return (int64_t)e <= budget.limit() - budget.used() ? e : bytes;
}

// One cudaMalloc'ed block of the pool.
struct Slab {
    void* ptr = nullptr;
    size_t bytes = 0;
    bool leased = false;
    uint64_t last_use = 0;  // release tick, for least-recently-used trimming
};

// A typed view of a pool slab for the lifetime of the lease (move-only). Empty (nullptr) for n = 0.
template <class T>
class Lease {
public:
    Lease() = default;
    ~Lease() { reset(); }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&& o) noexcept { *this = std::move(o); }
    Lease& operator=(Lease&& o) noexcept {
        if (this != &o) {
            reset();
            std::swap(pool_, o.pool_);
            std::swap(slab_, o.slab_);
            std::swap(n_, o.n_);
        }
        return *this;
    }
    inline void reset() noexcept;
    T* data() const { return slab_ ? static_cast<T*>(slab_->ptr) : nullptr; }
    size_t size() const { return n_; }
    size_t bytes() const { return n_ * sizeof(T); }

private:
    friend class WorkspacePool;
    Lease(WorkspacePool* pool, Slab* slab, size_t n) : pool_(pool), slab_(slab), n_(n) {}
    WorkspacePool* pool_ = nullptr;
    Slab* slab_ = nullptr;
    size_t n_ = 0;
};

// Where slabs come from: cudaMalloc/cudaFree (tests substitute their own).
struct SlabAllocator {
    cudaError_t (*allocate)(void**, size_t) = [](void** p, size_t n) { return cudaMalloc(p, n); };
    cudaError_t (*free)(void*) = [](void* p) { return cudaFree(p); };
};

class WorkspacePool {
public:
    explicit WorkspacePool(Budget* budget, SlabAllocator alloc = {}) : budget_(budget), alloc_(alloc) {
        budget_->set_reclaimer([this](int64_t bytes) { trim(bytes); });
    }
    ~WorkspacePool() {
        budget_->set_reclaimer(nullptr);
        trim(budget_->cached());  // every slab is idle by now: leases are scoped to a call
    }
    WorkspacePool(const WorkspacePool&) = delete;
    WorkspacePool& operator=(const WorkspacePool&) = delete;

    // n elements of T for `what` (see THE RULE in resources.cuh). Refused like a DeviceBuffer,
    // with the same message, when the budget has no room.
    template <class T>
    Lease<T> take(size_t n, const std::string& what, const std::string& hint = "") {
        if (n == 0) return Lease<T>();
        return Lease<T>(this, acquire(n * sizeof(T), what, hint), n);
    }

    // Frees idle slabs, least recently used first, until `bytes` are given back or none is idle.
    void trim(int64_t bytes) noexcept {
        while (bytes > 0) {
            auto oldest = slabs_.end();
            for (auto it = slabs_.begin(); it != slabs_.end(); ++it)
                if (!(*it)->leased && (oldest == slabs_.end() || (*it)->last_use < (*oldest)->last_use)) oldest = it;
            if (oldest == slabs_.end()) return;
            // cudaFree waits for the device: work still queued on the freed slab has finished.
            const cudaError_t e = alloc_.free((*oldest)->ptr);
            if (e != cudaSuccess) std::fprintf(stderr, "collapse: cudaFree failed: %s\n", cudaGetErrorString(e));
            budget_->count_device_call();
            budget_->uncache((int64_t)(*oldest)->bytes);
            bytes -= (int64_t)(*oldest)->bytes;
            slabs_.erase(oldest);
        }
    }
    size_t slabs() const { return slabs_.size(); }

private:
    template <class T>
    friend class Lease;

    Slab* acquire(size_t bytes, const std::string& what, const std::string& hint) {
        // An idle slab of exactly this size (no slack: the budget counts what was asked for), the
        // most recently used first.
        Slab* best = nullptr;
        for (auto& s : slabs_)
            if (!s->leased && s->bytes == bytes && (!best || s->last_use > best->last_use)) best = s.get();
        if (best) {
            budget_->reserve_cached((int64_t)bytes, what, hint);
            best->leased = true;
            return best;
        }
        budget_->reserve((int64_t)bytes, what, hint);  // frees idle slabs first if they are in the way
        void* p = nullptr;
        const cudaError_t e = counted_malloc(&p, bytes, budget_, alloc_.allocate);
        if (e != cudaSuccess) {
            budget_->release((int64_t)bytes);
            (void)cudaGetLastError();
            fail(COLLAPSE_ERR_OUT_OF_MEMORY, "cudaMalloc of ", format_bytes((int64_t)bytes), " for ", what, " failed: ",
                 cudaGetErrorString(e));
        }
        auto slab = std::make_unique<Slab>();
        slab->ptr = p;
        slab->bytes = bytes;
        slab->leased = true;
        slabs_.push_back(std::move(slab));
        return slabs_.back().get();
    }

    void give_back(Slab* slab) noexcept {
        slab->leased = false;
        slab->last_use = ++tick_;
        budget_->release((int64_t)slab->bytes);
        budget_->cache((int64_t)slab->bytes);
    }

    Budget* budget_;
    SlabAllocator alloc_;
    std::vector<std::unique_ptr<Slab>> slabs_;
    uint64_t tick_ = 0;
};

template <class T>
void Lease<T>::reset() noexcept {
    if (slab_) pool_->give_back(slab_);
    pool_ = nullptr;
    slab_ = nullptr;
    n_ = 0;
}

}  // namespace collapse::internal::cuda
