// The `collapse` command: analyze (dump -> report), synth (synthetic dumps), merge (checkpoints),
// compare (two reports).
#include <CLI/CLI.hpp>

#include <cstdio>

#include "cli/analyze_cmd.hpp"
#include "cli/compare_cmd.hpp"
#include "cli/merge_cmd.hpp"
#include "cli/synth_cmd.hpp"
#include "collapse/collapse.h"
#include "base/error.hpp"
#include "cpu/blas_setup.hpp"
#include "driver/analysis.hpp"

int main(int argc, char** argv) {
    // BLAS kernels for this CPU and quiet worker threads (cpu/blas_setup.hpp), before any BLAS call.
    collapse::internal::cpu::setup_process_blas();
    CLI::App app{"collapse: neural-collapse metrics of language-model hidden states"};
    const std::string blas = collapse::internal::cpu::blas_description();
    app.set_version_flag("--version", std::string("collapse ") + collapse_version_string() + (blas.empty() ? "" : "\nBLAS: " + blas));
    app.require_subcommand(1);
    collapse::internal::add_analyze_command(app);
    collapse::internal::add_synth_command(app);
    collapse::internal::add_merge_command(app);
    collapse::internal::add_compare_command(app);
    collapse::internal::set_command_line(argc, argv);
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        // --help, --version and a command's own exit status (CLI::RuntimeError) as CLI11 gives them;
        // every usage error is one line and status 1, as every other error.
        if (e.get_exit_code() == 0 || dynamic_cast<const CLI::RuntimeError*>(&e)) return app.exit(e);
        std::fprintf(stderr, "collapse: error: %s (collapse --help, collapse <command> --help)\n", e.what());
        return 1;
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
