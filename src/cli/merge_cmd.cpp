#include "cli/merge_cmd.hpp"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/session.hpp"
#include "io/output_file.hpp"
#include "io/session_checkpoint.hpp"

namespace collapse::internal {

namespace {

struct MergeArgs {
    std::vector<std::string> inputs;
    std::string output;
    bool quiet = false;
};

void run_merge(const MergeArgs& a) {
    // A shard given twice would count its rows twice; the merged file must not replace a shard.
    std::vector<io::FileArg> in;
    for (const std::string& p : a.inputs) in.push_back({"checkpoint", p});
    io::check_inputs_distinct(in, "its rows would be counted twice");
    io::check_outputs_distinct(in, {{"--output", a.output}});
    io::check_output_writable({"--output", a.output});
    // The first checkpoint's config; every other must agree on V, d and the state-affecting keys.
    Session session(io::checkpoint_config(a.inputs.front()));
    io::load_checkpoint(session, a.inputs.front());
    for (size_t i = 1; i < a.inputs.size(); ++i) io::merge_checkpoint(session, a.inputs[i]);
    io::save_checkpoint(session, a.output);
    if (!a.quiet) {
        const Counts c = session.row_counts();
        std::printf("merged %zu checkpoints (%lld rows seen) into %s\n", a.inputs.size(), (long long)c.rows_seen, a.output.c_str());
    }
}

}  // namespace

void add_merge_command(CLI::App& app) {
    auto args = std::make_shared<MergeArgs>();
    CLI::App* sub = app.add_subcommand("merge", "Merge checkpoints of shards into one (then: analyze --from-checkpoint)");
    sub->add_option("checkpoints", args->inputs, "checkpoint files (any split of the rows)")->required()->expected(1, -1);
    sub->add_option("--output,-o", args->output, "merged checkpoint")->required();
    sub->add_flag("--quiet,-q", args->quiet, "no summary line");
    sub->callback([args] { run_merge(*args); });
}

}  // namespace collapse::internal
