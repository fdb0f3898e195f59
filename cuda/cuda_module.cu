// The entry points of libcollapse_cuda.so, the CUDA backend module that
// src/core/backend_registry.cpp opens on first use (signatures: src/core/backend_module.hpp).
// These two are the module's only exported symbols (cmake/collapse_cuda_module.map).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <type_traits>

#include "base/error.hpp"
#include "core/backend_module.hpp"

using collapse::internal::Backend;
using collapse::internal::Config;

extern "C" {

int collapse_cuda_module_available(char* why, size_t n) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        std::snprintf(why, n, "%s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
        (void)cudaGetLastError();  // not sticky: clear it for the caller's later CUDA calls
        return 0;
    }
    if (count == 0) {
        std::snprintf(why, n, "the CUDA runtime reports no device");
        return 0;
    }
    return 1;
}

// Throws collapse::internal::Error through this C-linkage function on purpose: the loader is C++
// and catches it like any backend error (the C API then turns it into a status).
Backend* collapse_cuda_module_create_v2(const char* version, size_t config_size, const Config* cfg, int64_t num_classes,
                                        int64_t dim, const std::shared_ptr<collapse::internal::HostBudget>* budget) {
    if (std::strcmp(version, COLLAPSE_VERSION_STRING) != 0 || config_size != sizeof(Config))
        collapse::internal::fail(COLLAPSE_ERR_NO_CUDA, "the CUDA module was built from collapse ", COLLAPSE_VERSION_STRING,
                                 " (Config of ", sizeof(Config), " bytes); this library is ", version, " (", config_size,
                                 " bytes): install the module built with this library");
    return collapse::internal::make_cuda_backend(*cfg, num_classes, dim, budget ? *budget : nullptr).release();
}

}  // extern "C"

static_assert(std::is_same_v<decltype(&collapse_cuda_module_available), collapse_cuda_module_available_fn>);
static_assert(std::is_same_v<decltype(&collapse_cuda_module_create_v2), collapse_cuda_module_create_fn>);
