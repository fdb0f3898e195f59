// The analysis driver: a row source -> batches -> first pass (checkpoints, intermediate reports,
// skipped batches) -> second pass when a metric needs the rows again -> the result and its report.
// The `collapse` command, a Python package and MPI ranks all run analyses through this one loop;
// they keep only their flags, bindings and printing.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "base/interrupt.hpp"
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
    // Held-out NC4 (the session's config has nc4_held_out): the second pass reads these rows
    // instead of the input's; recorded in the report's input.nc4_held_out.
    RowSource* nc4_rows = nullptr;
    // A rank's share of the source (MPI): positions [first, end); end = -1: to the source's end.
    // Positions stay those of the whole source (messages, checkpoints, sequence numbers).
    int64_t first = 0, end = -1;
    // Ranks (src/mpi/): combine after the first pass (and its checkpoint); begin_second_pass
    // returns whether every rank runs one (over its share of the input, or with nc4_rows its
    // contiguous share of the held-out rows, rank_share); end_second_pass adds their results on
    // the root. Only the root computes the report.
    struct Ranks {
        std::function<void(Session&)> combine;
        std::function<bool(Session&)> begin_second_pass;
        std::function<void(Session&)> end_second_pass;
        bool root = true;
        int rank = 0, size = 1;
    };
    std::optional<Ranks> ranks;
};

// Thrown when `interrupted` returned a signal (and by a compute's loops on base/interrupt.hpp's
// request): the caller exits with 128 + signal.
using AnalysisInterrupted = Interrupted;

struct AnalysisOutcome {
    Result result;
    nlohmann::json report;     // build_report + input provenance + run
    int64_t resumed_at = -1;   // input position a resume started from (-1: no resume)
    bool computed = true;      // false on a rank other than the root: no result, no report
};

// Runs the whole analysis of `source` in `session` (whose config gives batch_rows, save_every,
// continue_on_error and the intermediate-report keys). The session must be fresh.
AnalysisOutcome run_analysis(Session& session, RowSource& source, const AnalysisOptions& options);

// The second pass over held-out rows (NC4 on rows the means did not come from), for a session
// whose first pass is done (run_analysis, or a loaded checkpoint). Nothing when no second pass is needed.
void run_held_out_pass(Session& session, RowSource& held_out, const AnalysisOptions& options);

// V as `collapse analyze` takes it: `given` (flag or argument), else the config's, else the
// classifier's rows, else the largest label + 1, else 1 (no labels at all: an empty report). A 2-D
// classifier whose row count is not V is refused, saying so when it looks transposed.
int64_t resolve_num_classes(int64_t given, int64_t configured, const io::Tensor* classifier, RowSource& source);

// Rank `rank` of P's contiguous share of the source's positions: [N r / P, N (r + 1) / P), each
// cut moved forward past rows of the sequence it would split (rows layout with sequence ids, whose
// sequences must then be contiguous in the file; interleaved ones make the combine refuse the
// overlapping sequence ids). The sequences layout splits between whole sequences anyway.
std::pair<int64_t, int64_t> rank_share(RowSource& source, int rank, int P);

// A fingerprint mismatch between the input a checkpoint was made from and `source`, in words
// ("" when they agree or the checkpoint records no input).
std::string input_difference(const std::string& checkpoint_identity, const InputInfo& source);

}  // namespace collapse::internal::driver
