#include "cpu/blas_setup.hpp"

#include <cstdlib>
#include <strings.h>

// OpenBLAS's own entry points (exported by its DYNAMIC_ARCH pthreads build), weak so that the
// program links and runs with any BLAS.
extern "C" {
int blas_thread_shutdown_(void) __attribute__((weak));
void openblas_read_env(void) __attribute__((weak));
void gotoblas_dynamic_init(void) __attribute__((weak));
void gotoblas_dynamic_quit(void) __attribute__((weak));
char* openblas_get_corename(void) __attribute__((weak));
char* openblas_get_config(void) __attribute__((weak));
}

namespace collapse::internal::cpu {

const char* better_blas_core(const char* current, bool avx2_fma, bool avx512) {
    if (!current || !avx2_fma) return nullptr;
    // OpenBLAS's x86-64 cores without AVX2 kernels (its corename strings).
    static const char* const kOld[] = {"prescott", "core2", "penryn", "dunnington", "nehalem", "sandybridge", "atom", "barcelona", "bobcat"};
    bool old = false;
    for (const char* k : kOld) old = old || strcasecmp(current, k) == 0;
    if (!old) return nullptr;
    return avx512 ? "SkylakeX" : "Haswell";
}

std::string setup_process_blas() {
    std::string changed;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (gotoblas_dynamic_init && gotoblas_dynamic_quit && openblas_get_corename && !std::getenv("OPENBLAS_CORETYPE")) {
        __builtin_cpu_init();
        const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512dq");
        const std::string before = openblas_get_corename();
        if (const char* core = better_blas_core(before.c_str(), avx2_fma, avx512)) {
            // Nothing has called BLAS yet and its workers are idle: the kernel table is swapped
            // before the first call reads it. The variable also reaches child processes.
            ::setenv("OPENBLAS_CORETYPE", core, 1);
            gotoblas_dynamic_quit();
            gotoblas_dynamic_init();
            changed = "OpenBLAS kernels " + before + " -> " + openblas_get_corename() + " (CPU model unknown to this OpenBLAS)";
        }
    }
#endif
    if (blas_thread_shutdown_ && openblas_read_env && !std::getenv("OPENBLAS_THREAD_TIMEOUT")) {
        ::setenv("OPENBLAS_THREAD_TIMEOUT", "24", 0);
        openblas_read_env();
        blas_thread_shutdown_();
        if (!changed.empty()) changed += "; ";
        changed += "OpenBLAS thread timeout 2^24 cycles";
    }
    return changed;
}

std::string blas_description() { return openblas_get_config ? std::string(openblas_get_config()) : std::string(); }

}  // namespace collapse::internal::cpu
