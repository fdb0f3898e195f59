// The `collapse` command: analyze (dump -> report), synth (synthetic dumps), merge (checkpoints),
// compare (two reports).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <cstdlib>

#include "cli/analyze_cmd.hpp"
#include "cli/compare_cmd.hpp"
#include "cli/merge_cmd.hpp"
#include "cli/synth_cmd.hpp"
#include "collapse/collapse.h"
#include "base/error.hpp"
#include "driver/analysis.hpp"

// OpenBLAS (the pthreads build) starts its worker threads when it loads, and after each job
// they spin in sched_yield for OPENBLAS_THREAD_TIMEOUT (default 2^28 cycles, 0.1 s) before they
// sleep: on a 2-core machine that took a core from a short run's own threads (sys time 0.15 s of a
// 0.2 s run), at the start and after every call that woke them. Unless the user set it, the
// timeout becomes 2^24 cycles (about 6 ms: LAPACK's runs of small threaded calls, such as dsyevd's
// dsymv, still find the workers awake; at 2^20 a loaded machine made each call wait for a wake-up),
// and the workers started at load are stopped (nothing has called BLAS yet) so that they start
// again under it on the first call that uses them. Weak references: with another BLAS the symbols are absent and nothing is done.
extern "C" int blas_thread_shutdown_(void) __attribute__((weak));
extern "C" void openblas_read_env(void) __attribute__((weak));

namespace {
void quiet_blas_threads() {
    if (!blas_thread_shutdown_ || !openblas_read_env || std::getenv("OPENBLAS_THREAD_TIMEOUT")) return;
    ::setenv("OPENBLAS_THREAD_TIMEOUT", "24", 0);
    openblas_read_env();
    blas_thread_shutdown_();
}
}  // namespace

int main(int argc, char** argv) {
    quiet_blas_threads();
    CLI::App app{"collapse: neural-collapse metrics of language-model hidden states"};
    app.set_version_flag("--version", std::string("collapse ") + collapse_version_string());
    app.require_subcommand(1);
    collapse::internal::add_analyze_command(app);
    collapse::internal::add_synth_command(app);
    collapse::internal::add_merge_command(app);
    collapse::internal::add_compare_command(app);
    collapse::internal::set_command_line(argc, argv);
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    } catch (const collapse::internal::driver::AnalysisInterrupted& e) {
        std::fprintf(stderr, "collapse: interrupted by signal %d: stopped, temporary files removed, no report written\n",
                     e.signal);
        return 128 + e.signal;
    } catch (const collapse::internal::Error& e) {
        std::fprintf(stderr, "collapse: error: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "collapse: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
