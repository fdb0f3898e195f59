// `collapse merge`: checkpoints of shards -> one checkpoint (same report as one run over all rows).
#pragma once

namespace CLI {
class App;
}

namespace collapse::internal {
void add_merge_command(CLI::App& app);
}  // namespace collapse::internal
