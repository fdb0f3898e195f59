#include "cli/compare_cmd.hpp"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>

#include "base/atomic_file.hpp"
#include "base/error.hpp"
#include "base/json_text.hpp"
#include "io/output_file.hpp"
#include "report/compare.hpp"

namespace collapse::internal {

namespace {

struct CompareArgs {
    std::string a, b, output;
    int64_t top = 10;
};

void run_compare(const CompareArgs& args) {
    if (args.top < 1) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "--top must be at least 1, got ", args.top);
    if (!args.output.empty()) {
        io::check_outputs_distinct({{"A", args.a}, {"B", args.b}}, {{"--output", args.output}});
        io::check_output_writable({"--output", args.output});
    }
    const nlohmann::json a = read_report_file(args.a);
    const nlohmann::json b = read_report_file(args.b);
    const nlohmann::json cmp = compare_reports(a, b, args.top, args.a, args.b);
    if (!args.output.empty()) write_file_atomically(args.output, json_text(cmp, 2) + "\n", "comparison");
    std::fputs(format_comparison(cmp).c_str(), stdout);
}

}  // namespace

void add_compare_command(CLI::App& app) {
    auto args = std::make_shared<CompareArgs>();
    CLI::App* sub = app.add_subcommand("compare", "Two reports side by side: every metric with B - A, and the tokens that moved most");
    sub->add_option("A", args->a, "first report (JSON of collapse analyze)")->required();
    sub->add_option("B", args->b, "second report; differences are B - A")->required();
    sub->add_option("--output,-o", args->output, "also write the comparison as JSON");
    sub->add_option("--top", args->top, "how many tokens to list by the move of their svd_entropy (default 10)");
    sub->callback([args] { run_compare(*args); });
}

}  // namespace collapse::internal
