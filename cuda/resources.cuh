// The device resources of one session, in one object (RAFT's `resources`): the session's stream,
// the cuBLAS and cuSOLVER handles (bound to the stream of each call on each use), the byte budget
// of device_memory_limit, a workspace pool for the temporaries of finalisation, and the session's
// host budget (host_memory_limit, shared with the session: every host allocation of this backend
// that grows with V, K, d or rows is counted there first).
//
// The pool: slabs allocated with cudaMalloc once and kept, reused by later requests of the same
// byte size (a compute of the same shape asks for the same sizes), handed out as RAII leases. Exact
// sizes, so a lease holds no slack: it counts its bytes against the budget while it lives, with the
// same refusal (and message) as a DeviceBuffer, and the sizes derived from the free budget (the
// pair tile) are what they were without a pool. An idle slab counts as cached() and is freed, least
// recently used first, only when a reservation would push used + cached over device_memory_limit,
// or when a cudaMalloc fails. So after the first batch and the first compute of a shape, ingest and
// compute make no cudaMalloc/cudaFree (Budget::allocation_calls counts them; each cudaFree would
// synchronise the whole device). Ingest's own buffers (scratch, staging) are members sized by the
// largest batch so far; exact mode's pinned upload stage grows with the rows kept.
//
// THE RULE for leases: a lease is for work on the session's own stream (stream()) only. A lease may
// be released while kernels that read or write it are still queued; its slab is then handed to the
// next request, whose work is queued after them on the same stream, so stream order makes the reuse
// safe. Work on any other stream (a caller's stream in ingest) must not use a lease, unless the
// lease outlives a synchronisation of that stream.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/host_budget.hpp"
#include "cuda_check.hpp"
#include "device_memory.hpp"
#include "workspace_pool.hpp"

namespace collapse::internal::cuda {

// Makes the session's device current for the duration of a call, and restores the caller's.
class DeviceGuard {
public:
    explicit DeviceGuard(int device) {
        COLLAPSE_CUDA_TRY(cudaGetDevice(&previous_));
        if (previous_ != device) COLLAPSE_CUDA_TRY(cudaSetDevice(device));
        changed_ = previous_ != device;
    }
    ~DeviceGuard() {
        if (changed_) COLLAPSE_CUDA_TRY_NO_THROW(cudaSetDevice(previous_));
    }

private:
    int previous_ = 0;
    bool changed_ = false;
};

class Resources {
public:
    // Creates the stream and the handles on `device`. host: the session's host budget.
    Resources(int device, int64_t budget_limit, bool allow_tf32, std::shared_ptr<HostBudget> host);
    ~Resources();
    Resources(const Resources&) = delete;
    Resources& operator=(const Resources&) = delete;

    int device() const { return device_; }
    Budget& budget() { return budget_; }
    const Budget& budget() const { return budget_; }
    HostBudget& host() { return *host_; }
    WorkspacePool& pool() { return pool_; }
    // The session's own stream: blocking, so it orders with the legacy default stream, which callers
    // passing NULL and plain cudaMemcpy use.
    cudaStream_t stream() const { return stream_; }
    // The handles, bound to `s` for the call that follows.
    cublasHandle_t blas(cudaStream_t s);
    cusolverDnHandle_t solver(cudaStream_t s);
    cusolverDnParams_t solver_params() const { return solver_params_; }

    template <class T>
    Lease<T> take(size_t n, const std::string& what, const std::string& hint = "") {
        return pool_.template take<T>(n, what, hint);
    }

private:
    void release() noexcept;

    int device_;
    std::shared_ptr<HostBudget> host_;  // first: it outlives every lease of the session's buffers
    Budget budget_;
    WorkspacePool pool_;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t cublas_ = nullptr;
    cusolverDnHandle_t cusolver_ = nullptr;
    cusolverDnParams_t solver_params_ = nullptr;
};

}  // namespace collapse::internal::cuda
