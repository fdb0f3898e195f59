#include "driver/analysis.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <sys/stat.h>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "io/session_checkpoint.hpp"
#include "report/report.hpp"

namespace collapse::internal::driver {

namespace {

using Clock = std::chrono::steady_clock;

nlohmann::json report_of(const Session& s, const Result& r, const RowSource& src, const AnalysisOptions& o) {
    nlohmann::json doc = build_report(s.config(), r);
    doc["input"] = to_json(src.info());
    if (o.nc4_rows) doc["input"]["nc4_held_out"] = to_json(o.nc4_rows->info());
    if (!o.command.empty()) doc["run"] = {{"command", o.command}};
    return doc;
}

// Which input a batch came from, for its errors: "label -1 at row 7 of the batch" alone did not
// say whether --labels or --nc4-labels held it, nor where the batch began.
std::string batch_origin(const RowSource& src, bool held_out, int64_t first) {
    std::string files;
    for (const InputPart& p : src.info().parts)
        files += (files.empty() ? "" : ", ") + p.role + " " + p.path + (p.tensor.empty() ? "" : "[" + p.tensor + "]");
    if (files.empty()) files = src.info().kind;
    return std::string(held_out ? "held-out NC4 input (" : "input (") + files + "), batch from " + (src.sequences() ? "sequence " : "row ") +
           std::to_string(first) + ": ";
}

// One pass over the source. The first pass skips nothing of its own; the second pass skips the
// ranges the first pass skipped (so NC4 sees exactly the rows the first pass counted), unless it
// reads held-out rows.
// Positions [from, stop) (stop < 0: to the source's end); progress counts from `begin` (a rank's
// share begins there).
void run_pass(Session& session, RowSource& src, const AnalysisOptions& o, bool first, int64_t from, bool held_out = false,
              int64_t begin = 0, int64_t stop = -1) {
    const Config& cfg = session.config();
    const char* phase = first ? "ingest" : "second pass";
    if (stop < 0) stop = src.length();
    const int64_t total = (stop - begin) * src.rows_per_position();
    int64_t done = (from - begin) * src.rows_per_position(), batch_index = 0;
    // Positions per batch: batch_rows rows, or as many whole sequences as fit (at least one).
    const int64_t per = src.sequences() ? std::max<int64_t>(1, cfg.batch_rows / std::max<int64_t>(1, src.seq_len())) : cfg.batch_rows;
    std::vector<std::pair<int64_t, int64_t>> skipped;  // second pass: the first pass's skipped ranges
    if (!first && !held_out) skipped = session.skipped_ranges();
    std::sort(skipped.begin(), skipped.end());
    size_t next_skip = 0;
    for (int64_t pos = from; pos < stop;) {
        if (o.interrupted)
            if (const int sig = o.interrupted()) throw AnalysisInterrupted{sig};
        while (next_skip < skipped.size() && skipped[next_skip].second <= pos) ++next_skip;
        if (next_skip < skipped.size() && skipped[next_skip].first <= pos) {  // inside a skipped range
            done += (std::min(skipped[next_skip].second, stop) - pos) * src.rows_per_position();
            pos = skipped[next_skip].second;
            continue;
        }
        int64_t count = std::min(per, stop - pos);
        if (next_skip < skipped.size()) count = std::min(count, skipped[next_skip].first - pos);  // stop before it
        SourceBatch b = src.batch(pos, count);
        const int64_t end = b.first + b.count, rows = b.count * src.rows_per_position();
        {
            try {
                const auto t0 = Clock::now();
                session.set_row_offset(b.first);
                const collapse_buffer* mask = b.mask ? &*b.mask : nullptr;
                if (src.sequences())
                    session.ingest_sequences(&b.x, &b.y, mask, b.count, src.seq_len(), nullptr);
                else if (b.sequence_ids)
                    session.ingest_tagged_rows(&b.x, &b.y, mask, &*b.sequence_ids, b.positions ? &*b.positions : nullptr, nullptr);
                else
                    session.ingest_rows(&b.x, &b.y, mask, nullptr);
                if (o.debug) {
                    char line[160];
                    std::snprintf(line, sizeof line, "%s batch %lld: %lld rows in %.3f s", phase, (long long)batch_index,
                                  (long long)rows, std::chrono::duration<double>(Clock::now() - t0).count());
                    o.debug(line);
                }
            } catch (const Error& e) {
                if (!cfg.continue_on_error) throw Error(e.status(), batch_origin(src, held_out, b.first) + e.what());
                if (first) session.skip_batch(b.first, end, rows);
                if (o.warn)
                    o.warn("batch " + std::to_string(batch_index) + " (positions " + std::to_string(b.first) + " to " +
                           std::to_string(end - 1) + ", " + std::to_string(rows) + " rows) skipped (continue_on_error): " + e.what());
            }
        }
        done += rows;
        pos = end;
        ++batch_index;
        if (o.progress) o.progress(phase, done, total);
        if (first && cfg.save_every > 0 && batch_index % cfg.save_every == 0) {
            if (!o.checkpoint.empty()) io::save_checkpoint(session, o.checkpoint);
            if (cfg.save_intermediate_results) {
                std::filesystem::create_directories(cfg.intermediate_save_dir);
                const std::string p = cfg.intermediate_save_dir + "/report_batch_" + std::to_string(batch_index) + ".json";
                write_report_file(report_of(session, session.compute(false), src, o), p);
            }
        }
    }
}

}  // namespace

std::string input_difference(const std::string& identity, const InputInfo& src) {
    if (identity.empty()) return "";
    nlohmann::json was;
    try {
        was = nlohmann::json::parse(identity);
    } catch (const std::exception&) {
        return "the checkpoint's input record is not readable";
    }
    if (was.value("fingerprint", "") == src.fingerprint) return "";
    const nlohmann::json now = to_json(src);
    if (was.value("kind", "") != now["kind"].get<std::string>())
        return "the checkpoint was made from " + was.value("kind", std::string("?")) + " input, this run reads " +
               now["kind"].get<std::string>() + " input";
    const auto& a = was["tensors"];
    const auto& b = now["tensors"];
    for (size_t i = 0; i < std::max(a.size(), b.size()); ++i) {
        if (i >= a.size() || i >= b.size()) return "the inputs have different tensors";
        for (const char* k : {"role", "shape", "dtype", "fingerprint"})
            if (a[i].value(k, nlohmann::json()) != b[i].value(k, nlohmann::json()))
                return std::string("the ") + b[i].value("role", std::string("?")) + " differ in " + k + ": checkpoint " +
                       a[i].value("path", std::string("?")) + " " + a[i].value(k, nlohmann::json()).dump() + ", this run " +
                       b[i].value("path", std::string("?")) + " " + b[i].value(k, nlohmann::json()).dump();
    }
    if (was.contains("synthetic") && now.contains("synthetic") && was["synthetic"] != now["synthetic"])
        return "the synthetic data sets differ: checkpoint " + was["synthetic"].dump() + ", this run " + now["synthetic"].dump();
    return "the input fingerprints differ (checkpoint " + was.value("fingerprint", std::string("?")) + ", this run " +
           src.fingerprint + ")";
}

void run_held_out_pass(Session& session, RowSource& held_out, const AnalysisOptions& o) {
    if (!session.config().nc4_held_out) fail(COLLAPSE_ERR_INTERNAL, "held-out rows for a session without nc4_held_out");
    if (!session.needs_second_pass()) return;
    session.begin_second_pass();
    run_pass(session, held_out, o, false, 0, true);
}

int64_t resolve_num_classes(int64_t given, int64_t configured, const io::Tensor* classifier, RowSource& src) {
    int64_t V = given > 0 ? given : configured;
    if (V <= 0 && classifier) V = classifier->shape[0];
    if (V <= 0) V = src.label_bound();
    if (V <= 0) V = 1;
    if (classifier && classifier->shape[0] != V) {
        const auto& s = classifier->shape;
        if (s[1] == V && s[0] == src.dim())
            fail(COLLAPSE_ERR_SHAPE, "classifier '", classifier->name, "' has shape [", s[0], ", ", s[1], "]: it looks transposed; ",
                 "expected [V, d] = [", V, ", ", src.dim(), "]");
        fail(COLLAPSE_ERR_SHAPE, "classifier '", classifier->name, "' has ", s[0], " rows, but V = ", V);
    }
    return V;
}

std::pair<int64_t, int64_t> rank_share(RowSource& src, int rank, int P) {
    const int64_t N = src.length();
    auto cut = [&](int r) -> int64_t {
        if (r <= 0) return 0;
        if (r >= P) return N;
        int64_t b = (int64_t)((__int128)N * r / P);
        if (b == 0 || b >= N || src.sequences()) return b;
        // Rows layout: past the rows that continue the sequence of row b - 1.
        constexpr int64_t kBlock = 4096;
        const SourceBatch before = src.batch(b - 1, 1);
        if (!before.sequence_ids) return b;
        const int64_t id = load_as_int(before.sequence_ids->data, before.sequence_ids->dtype, 0);
        while (b < N) {
            const int64_t n = std::min(kBlock, N - b);
            const SourceBatch blk = src.batch(b, n);
            int64_t i = 0;
            while (i < n && load_as_int(blk.sequence_ids->data, blk.sequence_ids->dtype, i) == id) ++i;
            b += i;
            if (i < n) break;
        }
        return b;
    };
    const int64_t lo = cut(rank), hi = cut(rank + 1);
    return {std::min(lo, hi), hi};
}

AnalysisOutcome run_analysis(Session& session, RowSource& src, const AnalysisOptions& o) {
    AnalysisOutcome out;
    session.set_input_identity(json_text(to_json(src.info())));
    const int64_t stop = o.end < 0 ? src.length() : o.end;
    if (o.first < 0 || o.first > stop || stop > src.length())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "positions [", o.first, ", ", stop, ") are not a range of the input's ", src.length());
    int64_t start = o.first;
    if (o.resume) {
        if (o.checkpoint.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "resume needs a checkpoint path");
        struct stat st {};
        if (::stat(o.checkpoint.c_str(), &st) == 0) {
            io::load_checkpoint(session, o.checkpoint);
            const std::string diff = input_difference(session.input_identity(), src.info());
            if (!diff.empty())
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot resume from ", o.checkpoint, ": it was made from another input (",
                     diff, ")");
            start = session.input_position();
            if (start < 0 || start > src.length())
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot resume from ", o.checkpoint, ": its input position ", start,
                     " lies beyond the input's end (", src.length(), src.sequences() ? " sequences)" : " rows)");
            if (start < o.first || start > stop)
                fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot resume from ", o.checkpoint, ": its input position ", start,
                     " lies outside this process's share [", o.first, ", ", stop, ")");
            session.set_input_identity(json_text(to_json(src.info())));
            out.resumed_at = start;
        }
    }
    run_pass(session, src, o, true, start, false, o.first, stop);
    if (!o.checkpoint.empty()) io::save_checkpoint(session, o.checkpoint);  // the whole first pass
    if (o.ranks) {
        o.ranks->combine(session);
        if (o.ranks->begin_second_pass(session)) {
            if (o.nc4_rows) {  // held-out NC4: each rank's contiguous share of the held-out rows
                const auto [first, end] = rank_share(*o.nc4_rows, o.ranks->rank, o.ranks->size);
                run_pass(session, *o.nc4_rows, o, false, first, true, first, end);
            } else {
                run_pass(session, src, o, false, o.first, false, o.first, stop);
            }
            o.ranks->end_second_pass(session);
        }
        if (!o.ranks->root) {
            out.computed = false;
            return out;
        }
    } else if (o.nc4_rows) {
        run_held_out_pass(session, *o.nc4_rows, o);
    } else if (session.needs_second_pass()) {
        session.begin_second_pass();
        run_pass(session, src, o, false, 0);
    }
    if (o.interrupted)
        if (const int sig = o.interrupted()) throw AnalysisInterrupted{sig};
    out.result = session.compute(true);
    out.report = report_of(session, out.result, src, o);
    return out;
}

}  // namespace collapse::internal::driver
