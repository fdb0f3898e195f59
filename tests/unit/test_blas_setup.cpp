// cpu/blas_setup.hpp: which OpenBLAS kernel set a program switches to (the decision table), and that
// the `collapse` CLI runs kernels that use this CPU's vector units (OpenBLAS 0.3.21 falls back to
// its SSE3 "Prescott" kernels on CPU models it does not know, 3.5-5x slower in dgemm) while an
// OPENBLAS_CORETYPE the user set is left alone.
#include <gtest/gtest.h>

#include <cstdlib>
#include <sstream>
#include <string>

#include "common/cli_fixture.hpp"
#include "cpu/blas_setup.hpp"

namespace test_blas_setup {
namespace {
using collapse::internal::cpu::better_blas_core;

std::string core_or_none(const char* current, bool avx2_fma, bool avx512) {
    const char* c = better_blas_core(current, avx2_fma, avx512);
    return c ? c : "none";
}

TEST(BlasSetup, OldKernelSetsBecomeTheBestOneTheCpuRuns) {
    EXPECT_EQ(core_or_none("Prescott", true, true), "SkylakeX");
    EXPECT_EQ(core_or_none("PRESCOTT", true, false), "Haswell");
    EXPECT_EQ(core_or_none("Sandybridge", true, false), "Haswell");
    EXPECT_EQ(core_or_none("Nehalem", true, true), "SkylakeX");
    // A CPU without AVX2 + FMA keeps what OpenBLAS chose.
    EXPECT_EQ(core_or_none("Prescott", false, false), "none");
    // OpenBLAS's own modern choices are never second-guessed.
    for (const char* modern : {"Haswell", "SkylakeX", "Cooperlake", "SapphireRapids", "Zen"}) {
        SCOPED_TRACE(modern);
        EXPECT_EQ(core_or_none(modern, true, true), "none");
    }
    EXPECT_EQ(core_or_none(nullptr, true, true), "none");
}

class BlasCli : public testutil::CliTest {};

// `collapse --version` names the BLAS and its kernel set: none of them may be an old set that this
// CPU outgrew; and a user's OPENBLAS_CORETYPE wins.
TEST_F(BlasCli, TheCliRunsKernelsForThisCpu) {
    const testutil::CliRun r = run_ok("--version");
    const size_t at = r.out.find("BLAS: ");
    if (at == std::string::npos) GTEST_SKIP() << "not OpenBLAS: " << r.out;
    EXPECT_NE(r.out.find("OpenBLAS"), std::string::npos) << r.out;
    __builtin_cpu_init();
    const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    std::istringstream words(r.out.substr(at + 6));
    for (std::string w; words >> w;) EXPECT_EQ(better_blas_core(w.c_str(), avx2_fma, avx512), nullptr) << "the CLI runs " << w << ": " << r.out;

    ASSERT_EQ(::setenv("OPENBLAS_CORETYPE", "Prescott", 1), 0);
    const testutil::CliRun forced = run_ok("--version");
    ::unsetenv("OPENBLAS_CORETYPE");
    EXPECT_NE(forced.out.find("Prescott"), std::string::npos) << forced.out;
}

}  // namespace
}  // namespace test_blas_setup
