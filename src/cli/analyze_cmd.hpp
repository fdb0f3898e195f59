// `collapse analyze`: a dump (or the built-in synthetic default) -> JSON report.
#pragma once

namespace CLI {
class App;
}

namespace collapse::internal {
void add_analyze_command(CLI::App& app);
}  // namespace collapse::internal
