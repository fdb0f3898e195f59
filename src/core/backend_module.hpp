// The entry points of the CUDA backend module, libcollapse_cuda.so (cuda/cuda_module.cu), which
// src/core/backend_registry.cpp opens with dlopen and looks up with dlsym. Both sides are built from
// the same headers by the same compiler, so C++ types cross: the Backend* and the exceptions it
// throws (collapse::internal::Error, matched by type name across the two copies of the core).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "core/backend.hpp"
#include "core/host_budget.hpp"
#include "core/config.hpp"

namespace collapse::internal {

// The module's file name and the names of its only exported symbols. The factory's name carries the
// version of its signature (_v2: the session's host budget was added), so that a module built
// against another signature is refused by name ("does not export ...") instead of being called
// with arguments it reads differently.
inline constexpr const char* kCudaModuleFile = "libcollapse_cuda.so";
inline constexpr const char* kCudaModuleAvailable = "collapse_cuda_module_available";
inline constexpr const char* kCudaModuleCreate = "collapse_cuda_module_create_v2";

}  // namespace collapse::internal

extern "C" {
// 1 when a CUDA device is usable; else 0 and why (the CUDA error text) in why[0..n), NUL-terminated.
typedef int (*collapse_cuda_module_available_fn)(char* why, size_t n);
// A new CUDA backend, owned by the caller; throws collapse::internal::Error like any backend.
// version and config_size are the loader's COLLAPSE_VERSION_STRING and sizeof(Config): a module
// built from other sources is refused rather than handed a Config of another layout. budget: the
// session's host budget (the backend keeps a copy of the pointer; null: one made from cfg).
typedef collapse::internal::Backend* (*collapse_cuda_module_create_fn)(const char* version, size_t config_size,
                                                                       const collapse::internal::Config* cfg,
                                                                       int64_t num_classes, int64_t dim,
                                                                       const std::shared_ptr<collapse::internal::HostBudget>* budget);
}
