// The analysis driver: a row source -> batches -> first pass (checkpoints, intermediate reports,
// skipped batches) -> second pass when a metric needs the rows again -> the result and its report.
// The `collapse` command, a Python package and MPI ranks all run analyses through this one loop;
// they keep only their flags, bindings and printing.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/metrics.hpp"
#include "core/session.hpp"
#include "driver/row_source.hpp"

namespace collapse::internal::driver {

struct AnalysisOptions {
    std::string checkpoint;  // written every save_every first-pass batches and at the end of the first pass
    bool resume = false;     // continue from `checkpoint` when it exists (same input and config)
    // Called after every batch: the phase ("ingest", "second pass"), rows done and in all.
    std::function<void(const char* phase, int64_t done, int64_t total)> progress;
    // Warnings (a batch skipped under continue_on_error) and debug lines.
    std::function<void(const std::string&)> warn;
    std::function<void(const std::string&)> debug;
    // Polled between batches: a nonzero signal number stops the run (AnalysisInterrupted).
    std::function<int()> interrupted;
    // The command line or call that started the run, recorded in the report.
    std::string command;
};

// Thrown when `interrupted` returned a signal: the caller exits with 128 + signal.
struct AnalysisInterrupted {
    int signal;
};

struct AnalysisOutcome {
    Result result;
    nlohmann::json report;     // build_report + input provenance + run
    int64_t resumed_at = -1;   // input position a resume started from (-1: no resume)
};

// Runs the whole analysis of `source` in `session` (whose config gives batch_rows, save_every,
// continue_on_error and the intermediate-report keys). The session must be fresh.
AnalysisOutcome run_analysis(Session& session, RowSource& source, const AnalysisOptions& options);

// A fingerprint mismatch between the input a checkpoint was made from and `source`, in words
// ("" when they agree or the checkpoint records no input).
std::string input_difference(const std::string& checkpoint_identity, const InputInfo& source);

}  // namespace collapse::internal::driver
