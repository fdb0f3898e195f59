// OpenBLAS set up for a program that owns its process (the `collapse` CLI and collapse_bench call
// setup_process_blas first thing in main, before any BLAS call). The library itself never does
// this: in an embedding process another component may be inside BLAS at any time.
#pragma once
#include <string>

namespace collapse::internal::cpu {

// The OpenBLAS core to switch to, or nullptr to keep `current`. OpenBLAS's DYNAMIC_ARCH build picks
// its kernels by CPU model at load time, and a model it does not know gets its oldest x86-64 set,
// "Prescott" (SSE3): Debian 12's 0.3.21 does that on Emerald Rapids (family 6, model 207), where
// its dgemm then runs 16-19 GFLOP/s on 2 cores instead of 58-95 (SkylakeX kernels). A core without
// AVX2 on a CPU with AVX-512 (F, BW, VL, DQ) becomes SkylakeX, on one with AVX2 + FMA Haswell.
const char* better_blas_core(const char* current, bool avx2_fma, bool avx512);

// Once per process, before any BLAS call. Unless OPENBLAS_CORETYPE is set, switches to
// better_blas_core's choice for this CPU (OpenBLAS's own dynamic init, run again); then, unless
// OPENBLAS_THREAD_TIMEOUT is set, makes the worker threads sleep after 2^24 cycles instead of
// spinning 2^28 in sched_yield (they took a core from a short run's own threads) and stops the
// ones started at load. Weak references: with another BLAS nothing is done. Returns what changed,
// for the log ("" when nothing did).
std::string setup_process_blas();

// OpenBLAS's build and kernel set ("OpenBLAS 0.3.21 ... SkylakeX MAX_THREADS=64"), or "" with another BLAS.
std::string blas_description();

}  // namespace collapse::internal::cpu
