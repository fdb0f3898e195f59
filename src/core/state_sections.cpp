#include "core/state_sections.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "base/text.hpp"
#include "core/sampling.hpp"

namespace collapse::internal {

namespace {

// The section, refused unless it has exactly this type and shape.
StateSection expect(const StateReader& r, const std::string& name, collapse_dtype t, const std::vector<int64_t>& shape) {
    StateSection s = r.section(name);
    if (s.dtype_code != (uint32_t)t || s.shape != shape)
        fail(COLLAPSE_ERR_IO, r.description(), ": section ", name, " has shape ", shape_text(s.shape), " and type ",
             dtype_name((collapse_dtype)s.dtype_code), ", this session expects ", shape_text(shape), " ", dtype_name(t));
    return s;
}

// A one-dimensional int64 section of any length (its length is checked by the caller).
StateSection expect_i64_vector(const StateReader& r, const std::string& name) {
    const StateSection s = r.section(name);
    if (s.dtype_code != (uint32_t)COLLAPSE_I64 || s.shape.size() != 1)
        fail(COLLAPSE_ERR_IO, r.description(), ": section ", name, " has shape ", shape_text(s.shape), " and type ",
             dtype_name((collapse_dtype)s.dtype_code), ", this session expects [n] int64");
    return s;
}

// The first non-finite value of n doubles, or -1.
int64_t first_nonfinite(const double* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(x[i])) return i;
    return -1;
}

void require_finite(const StateReader& r, const char* name, const double* x, int64_t n, int64_t d) {
    const int64_t i = first_nonfinite(x, n);
    if (i >= 0)
        fail(COLLAPSE_ERR_IO, r.description(), ": section ", name, " holds a non-finite value at row ", i / d, ", column ", i % d,
             " (the engine never accumulates one)");
}

const char* const kRowNames[5] = {"rows seen", "rows masked", "rows excluded", "rows non-finite", "rows ignored"};
constexpr int64_t kRowCounts = 5;

}  // namespace

Counts read_state_rows(const StateReader& r, int64_t V, int64_t d) {
    // [4]: written before rows_ignored existed, when no row could be ignored.
    const StateSection s = r.section("rows");
    const int64_t n = s.shape == std::vector<int64_t>{4} ? 4 : kRowCounts;
    int64_t rows[kRowCounts] = {0, 0, 0, 0, 0};
    std::memcpy(rows, expect(r, "rows", COLLAPSE_I64, {n}).data, (size_t)n * 8);
    for (int i = 0; i < n; ++i)
        if (rows[i] < 0) fail(COLLAPSE_ERR_IO, r.description(), ": section rows: ", kRowNames[i], " is negative (", rows[i], ")");
    // Each part at most what the earlier ones leave of rows_seen: no sum below can overflow.
    int64_t left = rows[0];
    for (int i = 1; i < n; ++i) {
        if (rows[i] > left)
            fail(COLLAPSE_ERR_IO, r.description(), ": section rows: ", rows[1], " masked + ", rows[2], " excluded + ", rows[3],
                 " non-finite + ", rows[4], " ignored rows exceed the ", rows[0], " rows seen");
        left -= rows[i];
    }
    (void)expect(r, "class_sums", COLLAPSE_F64, {V, d});
    Counts c;
    c.rows_seen = rows[0], c.rows_masked = rows[1], c.rows_excluded = rows[2], c.rows_nonfinite = rows[3], c.rows_ignored = rows[4];
    return c;
}

StateView read_state(const StateReader& r, int64_t V, int64_t d, const Config& cfg, bool gram_streaming, bool keeps_rows,
                     int64_t reservoir_cap) {
    const std::string what = r.description();
    StateView v;
    const Counts rows = read_state_rows(r, V, d);
    v.rows = rows;
    v.counts = static_cast<const int64_t*>(expect(r, "class_counts", COLLAPSE_I64, {V}).data);
    v.sums = static_cast<const double*>(expect(r, "class_sums", COLLAPSE_F64, {V, d}).data);
    v.sqnorms = static_cast<const double*>(expect(r, "class_sqnorms", COLLAPSE_F64, {V}).data);
    if (gram_streaming != r.has("gram"))
        fail(COLLAPSE_ERR_IO, what, gram_streaming ? " has no overall Gram" : " has an overall Gram", ", this session's configuration ",
             gram_streaming ? "streams one" : "does not");
    if (keeps_rows != r.has("store_rows"))
        fail(COLLAPSE_ERR_IO, what, keeps_rows ? " has no" : " has", " row store, this session's svd_mode ", keeps_rows ? "needs one" : "keeps none");

    // Counts: non-negative, zero for excluded ids, and adding up to the counted rows (each is then
    // at most rows_seen, so no sum of two states' counts can overflow once their totals do not).
    int64_t total = 0;
    for (int64_t c = 0; c < V; ++c) {
        if (v.counts[c] < 0) fail(COLLAPSE_ERR_IO, what, ": section class_counts is negative at class ", c, " (", v.counts[c], ")");
        if (__builtin_add_overflow(total, v.counts[c], &total))
            fail(COLLAPSE_ERR_IO, what, ": section class_counts adds up past 2^63 at class ", c);
    }
    const int64_t counted = rows.rows_seen - rows.rows_masked - rows.rows_excluded - rows.rows_nonfinite - rows.rows_ignored;
    if (total != counted)
        fail(COLLAPSE_ERR_IO, what, ": section class_counts adds up to ", total, " rows, section rows counts ", counted,
             " (seen - masked - excluded - non-finite - ignored)");
    for (int64_t e : cfg.exclude_token_ids)
        if (e >= 0 && e < V && v.counts[e] != 0)
            fail(COLLAPSE_ERR_IO, what, ": section class_counts gives excluded class ", e, " ", v.counts[e], " rows");
    require_finite(r, "class_sums", v.sums, V * d, d);
    for (int64_t c = 0; c < V; ++c)
        if (!(v.sqnorms[c] >= 0) || !std::isfinite(v.sqnorms[c]))
            fail(COLLAPSE_ERR_IO, what, ": section class_sqnorms is negative or not finite at class ", c, " (", v.sqnorms[c], ")");

    if (gram_streaming) {
        v.gram = static_cast<const double*>(expect(r, "gram", COLLAPSE_F64, {d, d}).data);
        for (int64_t a = 0; a < d; ++a)  // the upper triangle: the lower one is not part of the format
            for (int64_t b = a; b < d; ++b)
                if (!std::isfinite(v.gram[a * d + b])) fail(COLLAPSE_ERR_IO, what, ": section gram holds a non-finite value at (", a, ", ", b, ")");
        // Held back: exactly the classes below min_samples_per_token that have rows, all their rows.
        const StateSection ids = expect_i64_vector(r, "holdback_ids");
        v.holdback_classes = ids.shape[0];
        v.holdback_ids = static_cast<const int64_t*>(ids.data);
        v.holdback_counts = static_cast<const int64_t*>(expect(r, "holdback_counts", COLLAPSE_I64, {v.holdback_classes}).data);
        const int64_t min_n = cfg.min_samples_per_token;
        int64_t next = 0;  // entry expected for the next class below the threshold
        for (int64_t c = 0; c < V; ++c) {
            const bool held = v.counts[c] > 0 && v.counts[c] < min_n;
            const bool listed = next < v.holdback_classes && v.holdback_ids[next] == c;
            if (!held && !listed) continue;
            if (held != listed || v.holdback_counts[next] != v.counts[c]) {
                fail(COLLAPSE_ERR_IO, what, ": sections holdback_ids / holdback_counts are inconsistent at entry ", next, " (class ", c, " has ",
                     v.counts[c], " rows and min_samples_per_token is ", min_n, ": ", held ? "its rows must all be held back" : "it is not held back",
                     listed ? ", the entry holds " + std::to_string(v.holdback_counts[next]) : std::string(", it has no entry"), ")");
            }
            v.holdback_total += v.counts[c];
            ++next;
        }
        if (next != v.holdback_classes)  // ids out of [0, V) or not ascending
            fail(COLLAPSE_ERR_IO, what, ": sections holdback_ids / holdback_counts are inconsistent at entry ", next, " (class id ",
                 v.holdback_ids[next], " is out of range [0, ", V, ") or not ascending)");
        v.holdback_rows = static_cast<const double*>(expect(r, "holdback_rows", COLLAPSE_F64, {v.holdback_total, d}).data);
        require_finite(r, "holdback_rows", v.holdback_rows, v.holdback_total * d, d);
    }
    if (keeps_rows) {
        v.store_offsets = static_cast<const int64_t*>(expect(r, "store_offsets", COLLAPSE_I64, {V + 1}).data);
        if (v.store_offsets[0] != 0) fail(COLLAPSE_ERR_IO, what, ": section store_offsets starts at ", v.store_offsets[0], ", not 0");
        for (int64_t c = 0; c < V; ++c) {
            if (v.store_offsets[c + 1] < v.store_offsets[c])
                fail(COLLAPSE_ERR_IO, what, ": section store_offsets is not ascending at class ", c);
            const int64_t n = v.store_offsets[c + 1] - v.store_offsets[c];
            const int64_t want = reservoir_cap > 0 ? std::min(v.counts[c], reservoir_cap) : v.counts[c];
            if (n != want)
                fail(COLLAPSE_ERR_IO, what, ": section store_offsets gives class ", c, " ", n, " stored rows, class_counts ", v.counts[c],
                     reservoir_cap > 0 ? " (a reservoir holds min(count, svd_max_rows_per_token))" : "");
        }
        v.store_section = expect(r, "store_rows", COLLAPSE_F64, {v.store_offsets[V], d});
        v.store_rows = static_cast<const double*>(v.store_section.data);
        // Reservoirs are bounded and held in memory: checked here. The exact store is checked as
        // load_store copies it (it may be far larger than memory).
        if (reservoir_cap > 0) require_finite(r, "store_rows", v.store_rows, v.store_offsets[V] * d, d);
    }
    return v;
}

void write_state_core(StateWriter& w, const Counts& rows, int64_t V, int64_t d, const int64_t* counts, const double* sums,
                      const double* sqnorms) {
    const int64_t r[kRowCounts] = {rows.rows_seen, rows.rows_masked, rows.rows_excluded, rows.rows_nonfinite, rows.rows_ignored};
    w.add("rows", COLLAPSE_I64, {kRowCounts}, r, sizeof r);
    w.add("class_counts", COLLAPSE_I64, {V}, counts, (size_t)V * 8);
    w.add("class_sums", COLLAPSE_F64, {V, d}, sums, (size_t)(V * d) * 8);
    w.add("class_sqnorms", COLLAPSE_F64, {V}, sqnorms, (size_t)V * 8);
}

void write_store(StateWriter& w, const RowStore& store, int64_t V, int64_t d, int64_t load_budget) {
    std::vector<int64_t> off((size_t)V + 1, 0);
    std::vector<int32_t> all;
    for (int64_t c = 0; c < V; ++c) {
        off[(size_t)c + 1] = off[(size_t)c] + store.rows((int32_t)c);
        if (store.rows((int32_t)c) > 0) all.push_back((int32_t)c);
    }
    w.add("store_offsets", COLLAPSE_I64, {V + 1}, off.data(), off.size() * 8);
    w.begin_section("store_rows", COLLAPSE_F64, {off.back(), d}, (size_t)(off.back() * d) * 8);
    store.for_each_class(all, load_budget, [&](int32_t, const double* x, int64_t n, int64_t, bool) { w.append(x, (size_t)(n * d) * 8); });
    w.end_section();
}

void load_store(const StateReader& r, const StateView& v, RowStore& store, int64_t V, int64_t d) {
    const int64_t* off = v.store_offsets;
    const RowStore::Mark mark = store.mark([&] {
        int64_t add = 0;
        for (int64_t c = 0; c < V; ++c) add += store.growth((int32_t)c, off[c + 1] - off[c]);
        return add;
    });
    try {
        for (int64_t c = 0; c < V; ++c) {
            const int64_t n = off[c + 1] - off[c];
            if (n == 0) continue;
            const double* src = v.store_rows + off[c] * d;
            const int64_t bad = first_nonfinite(src, n * d);
            if (bad >= 0)
                fail(COLLAPSE_ERR_IO, r.description(), ": section store_rows holds a non-finite value at row ", off[c] + bad / d, ", column ",
                     bad % d, " (the engine never stores one)");
            store.make_room([&] { return store.growth((int32_t)c, n); });
            std::memcpy(store.append((int32_t)c, n), src, (size_t)(n * d) * 8);
            r.release(v.store_section, (size_t)(off[c] * d) * 8, (size_t)(n * d) * 8);  // taken in: its pages can go
        }
    } catch (...) {
        store.rollback(mark);
        throw;
    }
}

std::vector<int64_t> merge_reservoir_picks(uint64_t seed, int32_t c, int64_t cap, int64_t kept_mine, int64_t seen_mine, int64_t kept_theirs,
                                           int64_t seen_theirs) {
    std::vector<int64_t> picks;
    if (kept_mine + kept_theirs <= cap) {  // both fit: every row, mine first
        picks.resize((size_t)(kept_mine + kept_theirs));
        for (size_t j = 0; j < picks.size(); ++j) picks[j] = (int64_t)j;
        return picks;
    }
    struct Cand {
        double key;
        int64_t at;
    };
    std::vector<Cand> cand;
    cand.reserve((size_t)(kept_mine + kept_theirs));
    auto add = [&](int64_t base, int64_t k, int64_t seen, uint64_t shard) {
        const double w = (double)seen / (double)std::max<int64_t>(k, 1);
        for (int64_t j = 0; j < k; ++j) {
            const double u = ((double)(mix64(seed ^ mix64(((uint64_t)c << 20) ^ (shard << 62) ^ (uint64_t)j)) >> 11) + 0.5) * 0x1.0p-53;
            cand.push_back({std::pow(u, 1.0 / w), base + j});
        }
    };
    add(0, kept_mine, seen_mine, 0);
    add(kept_mine, kept_theirs, seen_theirs, 1);
    std::stable_sort(cand.begin(), cand.end(), [](const Cand& x, const Cand& y) { return x.key > y.key; });
    for (int64_t j = 0; j < cap && j < (int64_t)cand.size(); ++j) picks.push_back(cand[(size_t)j].at);
    return picks;
}

RowVector merge_reservoirs(uint64_t seed, int32_t c, int64_t cap, int64_t d, const double* mine, int64_t kept_mine, int64_t seen_mine,
                           const double* theirs, int64_t kept_theirs, int64_t seen_theirs) {
    const std::vector<int64_t> picks = merge_reservoir_picks(seed, c, cap, kept_mine, seen_mine, kept_theirs, seen_theirs);
    RowVector out;
    out.reserve(picks.size() * (size_t)d);
    for (int64_t at : picks) {
        const double* row = at < kept_mine ? mine + at * d : theirs + (at - kept_mine) * d;
        out.insert(out.end(), row, row + d);
    }
    return out;
}

}  // namespace collapse::internal
