#include "core/state_sections.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/sampling.hpp"

namespace collapse::internal {

namespace {

const io::CheckpointSection& expect(const io::CheckpointSection& s, collapse_dtype t, const std::vector<int64_t>& shape,
                                    const std::string& path) {
    if (s.dtype_code != (uint32_t)t || s.shape != shape) {
        std::string want, got;
        for (int64_t v : shape) want += (want.empty() ? "" : ", ") + std::to_string(v);
        for (int64_t v : s.shape) got += (got.empty() ? "" : ", ") + std::to_string(v);
        fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": section ", s.name, " has shape [", got, "] and type ", dtype_name((collapse_dtype)s.dtype_code),
             ", this session expects [", want, "] ", dtype_name(t));
    }
    return s;
}

int64_t leading(const io::CheckpointSection& s) { return s.shape.empty() ? 0 : s.shape[0]; }

}  // namespace

StateView read_state(const io::CheckpointReader& r, int64_t V, int64_t d, bool gram_streaming, bool keeps_rows, int64_t reservoir_cap) {
    const std::string& path = r.path();
    StateView v;
    v.rows = static_cast<const int64_t*>(expect(r.section("rows"), COLLAPSE_I64, {4}, path).data);
    v.counts = static_cast<const int64_t*>(expect(r.section("class_counts"), COLLAPSE_I64, {V}, path).data);
    v.sums = static_cast<const double*>(expect(r.section("class_sums"), COLLAPSE_F64, {V, d}, path).data);
    v.sqnorms = static_cast<const double*>(expect(r.section("class_sqnorms"), COLLAPSE_F64, {V}, path).data);
    if (gram_streaming != r.has("gram"))
        fail(COLLAPSE_ERR_IO, "checkpoint ", path, gram_streaming ? " has no overall Gram" : " has an overall Gram",
             ", this session's configuration ", gram_streaming ? "streams one" : "does not");
    if (keeps_rows != r.has("store_rows"))
        fail(COLLAPSE_ERR_IO, "checkpoint ", path, keeps_rows ? " has no" : " has", " row store, this session's svd_mode ",
             keeps_rows ? "needs one" : "keeps none");
    for (int64_t c = 0; c < V; ++c)
        if (v.counts[c] < 0) fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": section class_counts is negative at class ", c);
    if (gram_streaming) {
        v.gram = static_cast<const double*>(expect(r.section("gram"), COLLAPSE_F64, {d, d}, path).data);
        const auto ids = r.section("holdback_ids");
        v.holdback_classes = leading(ids);
        v.holdback_ids = static_cast<const int64_t*>(expect(ids, COLLAPSE_I64, {v.holdback_classes}, path).data);
        v.holdback_counts =
            static_cast<const int64_t*>(expect(r.section("holdback_counts"), COLLAPSE_I64, {v.holdback_classes}, path).data);
        for (int64_t i = 0; i < v.holdback_classes; ++i) {
            const int64_t c = v.holdback_ids[i], n = v.holdback_counts[i];
            if (c < 0 || c >= V || (i > 0 && c <= v.holdback_ids[i - 1]) || n < 0 || n > v.counts[c])
                fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": sections holdback_ids / holdback_counts are inconsistent at entry ", i);
            v.holdback_total += n;
        }
        v.holdback_rows = static_cast<const double*>(expect(r.section("holdback_rows"), COLLAPSE_F64, {v.holdback_total, d}, path).data);
    }
    if (keeps_rows) {
        v.store_offsets = static_cast<const int64_t*>(expect(r.section("store_offsets"), COLLAPSE_I64, {V + 1}, path).data);
        for (int64_t c = 0; c < V; ++c) {
            if (v.store_offsets[c] < 0 || v.store_offsets[c + 1] < v.store_offsets[c])
                fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": section store_offsets is not ascending at class ", c);
            const int64_t n = v.store_offsets[c + 1] - v.store_offsets[c];
            const int64_t want = reservoir_cap > 0 ? std::min(v.counts[c], reservoir_cap) : v.counts[c];
            if (n != want)
                fail(COLLAPSE_ERR_IO, "checkpoint ", path, ": section store_offsets gives class ", c, " ", n, " stored rows, class_counts ",
                     v.counts[c], reservoir_cap > 0 ? " (a reservoir holds min(count, svd_max_rows_per_token))" : "");
        }
        v.store_section = expect(r.section("store_rows"), COLLAPSE_F64, {v.store_offsets[V], d}, path);
        v.store_rows = static_cast<const double*>(v.store_section.data);
    }
    return v;
}

void write_state_core(io::CheckpointWriter& w, const Counts& rows, int64_t V, int64_t d, const int64_t* counts, const double* sums,
                      const double* sqnorms) {
    const int64_t r[4] = {rows.rows_seen, rows.rows_masked, rows.rows_excluded, rows.rows_nonfinite};
    w.add("rows", COLLAPSE_I64, {4}, r, sizeof r);
    w.add("class_counts", COLLAPSE_I64, {V}, counts, (size_t)V * 8);
    w.add("class_sums", COLLAPSE_F64, {V, d}, sums, (size_t)(V * d) * 8);
    w.add("class_sqnorms", COLLAPSE_F64, {V}, sqnorms, (size_t)V * 8);
}

void write_store(io::CheckpointWriter& w, const RowStore& store, int64_t V, int64_t d, int64_t load_budget) {
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

void load_store(const io::CheckpointReader& r, const StateView& v, RowStore& store, int64_t V, int64_t d) {
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
            store.make_room([&] { return store.growth((int32_t)c, n); });
            std::memcpy(store.append((int32_t)c, n), v.store_rows + off[c] * d, (size_t)(n * d) * 8);
            r.release(v.store_section, (size_t)(off[c] * d) * 8, (size_t)(n * d) * 8);  // taken in: its pages can go
        }
    } catch (...) {
        store.rollback(mark);
        throw;
    }
}

RowVector merge_reservoirs(uint64_t seed, int32_t c, int64_t cap, int64_t d, const double* mine, int64_t kept_mine, int64_t seen_mine,
                           const double* theirs, int64_t kept_theirs, int64_t seen_theirs) {
    struct Cand {
        double key;
        const double* row;
    };
    std::vector<Cand> cand;
    auto add = [&](const double* base, int64_t k, int64_t seen, uint64_t shard) {
        const double w = (double)seen / (double)std::max<int64_t>(k, 1);
        for (int64_t j = 0; j < k; ++j) {
            const double u = ((double)(mix64(seed ^ mix64(((uint64_t)c << 20) ^ (shard << 62) ^ (uint64_t)j)) >> 11) + 0.5) * 0x1.0p-53;
            cand.push_back({std::pow(u, 1.0 / w), base + j * d});
        }
    };
    add(mine, kept_mine, seen_mine, 0);
    add(theirs, kept_theirs, seen_theirs, 1);
    std::stable_sort(cand.begin(), cand.end(), [](const Cand& x, const Cand& y) { return x.key > y.key; });
    RowVector out;
    for (int64_t j = 0; j < cap && j < (int64_t)cand.size(); ++j) out.insert(out.end(), cand[(size_t)j].row, cand[(size_t)j].row + d);
    return out;
}

}  // namespace collapse::internal
