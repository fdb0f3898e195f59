// `collapse synth`: writes a deterministic synthetic data set (features, labels, classifier) with a
// controlled amount of neural collapse, streamed in chunks so no [N, d] array is ever in memory.
#pragma once

namespace CLI {
class App;
}

namespace collapse::internal {

// Registers the `synth` subcommand on `app`; its callback generates and writes the files and throws
// collapse::internal::Error on failure (the main program prints it).
void add_synth_command(CLI::App& app);

}  // namespace collapse::internal
