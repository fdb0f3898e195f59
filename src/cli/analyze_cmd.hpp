// `collapse analyze`: a dump (or the built-in synthetic default) -> JSON report.
#pragma once

namespace CLI {
class App;
}

namespace collapse::internal {
// Exit status of `collapse analyze` when continue_on_error skipped batches: the report was
// written, but it covers fewer rows than the input has.
constexpr int kExitRowsSkipped = 3;
// Exit status after SIGINT/SIGTERM/SIGHUP: 128 + the signal number (no report is written).
void add_analyze_command(CLI::App& app);
// The command line, recorded in every report's "run" section.
void set_command_line(int argc, char** argv);
}  // namespace collapse::internal
