// Throwing checks for CUDA, cuBLAS and cuSOLVER calls (RAFT error.hpp style): the failed call's
// text and the library's status string reach the caller through collapse::internal::Error; the *_NO_THROW
// variants are for destructors.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdio>

#include "base/error.hpp"

namespace collapse::internal::cuda {

inline const char* cublas_status_name(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

inline const char* cusolver_status_name(cusolverStatus_t s) {
    switch (s) {
        case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
        case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
        case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
        case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
        case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
        case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
        case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
        case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
        default: return "CUSOLVER_STATUS_UNKNOWN";
    }
}

}  // namespace collapse::internal::cuda

#define COLLAPSE_CUDA_TRY(call)                                                                           \
    do {                                                                                                 \
        const cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                           \
            ::collapse::internal::fail(e_ == cudaErrorMemoryAllocation ? COLLAPSE_ERR_OUT_OF_MEMORY : COLLAPSE_ERR_INTERNAL, \
                             "CUDA call '", #call, "' failed: ", cudaGetErrorName(e_), ": ", cudaGetErrorString(e_), \
                             " (", __FILE__, ":", __LINE__, ")");                                         \
    } while (0)

// After a kernel launch: launch-configuration errors surface here.
#define COLLAPSE_CUDA_CHECK_LAUNCH() COLLAPSE_CUDA_TRY(cudaGetLastError())

#define COLLAPSE_CUBLAS_TRY(call)                                                                          \
    do {                                                                                                  \
        const cublasStatus_t s_ = (call);                                                                 \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                  \
            ::collapse::internal::fail(COLLAPSE_ERR_INTERNAL, "cuBLAS call '", #call, "' failed: ",                 \
                             ::collapse::internal::cuda::cublas_status_name(s_), " (", __FILE__, ":", __LINE__, ")"); \
    } while (0)

#define COLLAPSE_CUSOLVER_TRY(call)                                                                            \
    do {                                                                                                      \
        const cusolverStatus_t s_ = (call);                                                                   \
        if (s_ != CUSOLVER_STATUS_SUCCESS)                                                                    \
            ::collapse::internal::fail(COLLAPSE_ERR_INTERNAL, "cuSOLVER call '", #call, "' failed: ",                   \
                             ::collapse::internal::cuda::cusolver_status_name(s_), " (", __FILE__, ":", __LINE__, ")"); \
    } while (0)

#define COLLAPSE_CUDA_TRY_NO_THROW(call)                                                                  \
    do {                                                                                                 \
        const cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) std::fprintf(stderr, "collapse: %s failed: %s\n", #call, cudaGetErrorString(e_)); \
    } while (0)
