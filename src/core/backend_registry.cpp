// The backend registry: the CUDA backend is a module, libcollapse_cuda.so (cuda/cuda_module.cu),
// opened with dlopen the first time a session asks for backend cuda or
// collapse_backend_available("cuda") asks, so that a CPU-only process never maps a CUDA library.
// Where the module is looked for, in order:
//   1. $COLLAPSE_CUDA_MODULE (the file, or a directory holding it). When set it is the only place:
//      a wrong path is reported rather than silently replaced by some other copy;
//   2. the directory of the executable or library that holds this code (dladdr), then ../lib
//      relative to it (bin/collapse finds lib/libcollapse_cuda.so; build/tests finds build/lib);
//   3. the default dlopen search path (LD_LIBRARY_PATH, RUNPATH, ld.so.cache).
// A loaded module is never closed: its backends' code must outlive every backend.
// collapse_backend_available("cuda") first checks for an NVIDIA driver (nvidia_driver_present) and
// answers 0 without loading anything where there is none, unless $COLLAPSE_CUDA_MODULE is set.
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/backend.hpp"
#include "core/backend_module.hpp"

namespace collapse::internal {
namespace {

struct CudaModule {
    std::string path;  // the file loaded
    std::string why;   // when nothing could be loaded: each place tried and dlopen's answer
    collapse_cuda_module_available_fn available = nullptr;
    collapse_cuda_module_create_fn create = nullptr;
};

bool is_directory(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// The directory of the executable or shared library this code is linked into (symlinks resolved).
std::string own_directory() {
    Dl_info info{};
    struct link_map* lm = nullptr;
    if (!dladdr1(reinterpret_cast<void*>(&own_directory), &info, reinterpret_cast<void**>(&lm), RTLD_DL_LINKMAP))
        return "";
    std::string file;
    if (lm && lm->l_name && lm->l_name[0]) {
        file = lm->l_name;
    } else {  // the main program's link_map has no name
        char buf[PATH_MAX];
        const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
        if (n <= 0) return "";
        file.assign(buf, (size_t)n);
    }
    char real[PATH_MAX];
    if (realpath(file.c_str(), real)) file = real;
    const size_t slash = file.rfind('/');
    return slash == std::string::npos ? std::string(".") : file.substr(0, slash);
}

// Opens one candidate; false (and what went wrong appended to `tried`) when it is not a module.
bool try_open(const std::string& file, CudaModule& m, std::string& tried) {
    if (!tried.empty()) tried += "; ";
    void* h = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char* e = dlerror();
        tried += e ? e : file + ": dlopen failed";
        return false;
    }
    m.available = reinterpret_cast<collapse_cuda_module_available_fn>(dlsym(h, kCudaModuleAvailable));
    m.create = reinterpret_cast<collapse_cuda_module_create_fn>(dlsym(h, kCudaModuleCreate));
    struct link_map* lm = nullptr;
    m.path = dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name[0] ? lm->l_name : file;
    if (!m.available || !m.create) {
        tried += m.path + ": loaded, but it does not export " + (m.available ? kCudaModuleCreate : kCudaModuleAvailable);
        m = CudaModule{};
        dlclose(h);
        return false;
    }
    return true;
}

CudaModule load(const std::string& env) {
    std::vector<std::string> candidates;
    if (!env.empty()) {
        candidates.push_back(is_directory(env) ? env + "/" + kCudaModuleFile : env);
    } else {
        const std::string dir = own_directory();
        if (!dir.empty()) {
            candidates.push_back(dir + "/" + kCudaModuleFile);
            const std::string lib = dir.substr(0, dir.rfind('/')) + "/lib";
            if (lib != dir) candidates.push_back(lib + "/" + kCudaModuleFile);  // ../lib
        }
        candidates.push_back(kCudaModuleFile);  // the default search path
    }
    CudaModule m;
    std::string tried;
    for (const std::string& c : candidates)
        if (try_open(c, m, tried)) return m;
    m.why = std::string("the CUDA module ") + kCudaModuleFile + " could not be loaded (" +
            (env.empty() ? "" : "COLLAPSE_CUDA_MODULE=" + env + "; ") + "tried: " + tried +
            "). Build collapse with -DCOLLAPSE_CUDA=ON where nvcc is installed, or set COLLAPSE_CUDA_MODULE to the module";
    return m;
}

// The module for the current $COLLAPSE_CUDA_MODULE, loaded once per value.
const CudaModule& cuda_module() {
    static std::mutex mu;
    static std::map<std::string, CudaModule> modules;
    const char* env = std::getenv("COLLAPSE_CUDA_MODULE");
    const std::string key = env ? env : "";
    std::lock_guard<std::mutex> lock(mu);
    auto it = modules.find(key);
    if (it == modules.end()) it = modules.emplace(key, load(key)).first;
    return it->second;
}

// Whether a CUDA backend can be made here; when not, *why says which part is missing.
bool cuda_usable(const CudaModule& m, std::string* why) {
    if (!m.available) {
        *why = m.why;
        return false;
    }
    char text[512] = {0};
    if (m.available(text, sizeof text)) return true;
    *why = "the CUDA module " + m.path + " is loaded, but no CUDA device is usable: " + text;
    return false;
}

}  // namespace

void require_cuda_backend() {
    std::string why;
    if (!cuda_usable(cuda_module(), &why)) fail(COLLAPSE_ERR_NO_CUDA, "backend cuda requested, but ", why);
}

// Whether this machine has an NVIDIA driver at all (Linux device node or driver directory, or WSL's
// GPU node). Loading the module maps the CUDA runtime libraries, 0.2-0.8 s measured on a machine
// without a GPU, only to learn there is no device; this check costs three stat calls.
bool nvidia_driver_present() {
    struct stat st;
    for (const char* p : {"/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg"})
        if (stat(p, &st) == 0) return true;
    return false;
}

bool cuda_backend_available() {
    // Without a driver no device can be usable: answer without opening the module, unless
    // $COLLAPSE_CUDA_MODULE names one (then it is asked, as it would be for backend cuda). An
    // explicit backend cuda always loads it (require_cuda_backend) and reports its error.
    const char* env = std::getenv("COLLAPSE_CUDA_MODULE");
    if ((!env || !*env) && !nvidia_driver_present()) return false;
    std::string why;
    return cuda_usable(cuda_module(), &why);
}

std::unique_ptr<Backend> make_cuda_backend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget) {
    require_cuda_backend();
    return std::unique_ptr<Backend>(cuda_module().create(COLLAPSE_VERSION_STRING, sizeof(Config), &cfg, num_classes, dim, &budget));
}

}  // namespace collapse::internal
