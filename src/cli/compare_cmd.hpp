// `collapse compare A.json B.json`: two reports side by side (src/report/compare.hpp does the work).
#pragma once

namespace CLI {
class App;
}

namespace collapse::internal {
void add_compare_command(CLI::App& app);
}  // namespace collapse::internal
