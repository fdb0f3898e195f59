// One layout, for every backend, of the per-token section of a rank's part of the row-store
// metrics (core/backend.hpp, "spread"): part_tokens_f float64 [k, 3] (entropy, effective rank,
// normalised entropy; NaN: absent) and part_tokens_i int64 [k, 3] (rows, sampled, zero matrix),
// row s for the part's s-th class (part_slots).
#pragma once
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/backend.hpp"
#include "core/host_budget.hpp"
#include "core/metrics.hpp"
#include "core/row_store.hpp"
#include "core/state_io.hpp"

namespace collapse::internal {

// Once a session's rows have moved to their owner ranks (collapse_session_mpi_combine), its state
// is no longer one process's: every backend refuses more first-pass rows and checkpoints alike.
inline void refuse_if_spread(bool spread, const char* what) {
    if (spread) fail(COLLAPSE_ERR_STATE, "the session's exact row store has been spread over MPI ranks by class (collapse_session_mpi_combine): ", what);
}

// The kept classes this rank owns: those whose rows its store holds (an owner holds every row of
// each, spread_close checked), and their slots in `kept`. own.slot [V] is the caller's to fill
// (fill_slots) once its budget holds it.
template <class RowsOf>
KeptSet owned_classes(const KeptSet& kept, RowsOf rows_of, std::vector<int64_t>& slots) {
    KeptSet own;
    for (size_t s = 0; s < kept.ids.size(); ++s) {
        const int32_t c = kept.ids[s];
        if (rows_of(c) == 0) continue;
        own.ids.push_back(c);
        own.counts.push_back(kept.counts[s]);
        own.rows += kept.counts[s];
        slots.push_back((int64_t)s);
    }
    return own;
}
inline void fill_slots(KeptSet& own, int64_t V) {
    own.slot.assign((size_t)V, -1);
    for (size_t s = 0; s < own.ids.size(); ++s) own.slot[(size_t)own.ids[s]] = (int32_t)s;
}

// n rows of class c (of `count` in all) appended to an owner's store, whose memory `lease` holds
// besides `fixed` bytes of its own: the store makes room (spilling) first, and, where the class's
// vector must grow while the old one still exists, it spills its memory when the budget has no
// room for both.
inline void append_owned_rows(RowStore& store, HostBudget& budget, HostBudget::Lease& lease, int64_t fixed, int32_t c, int64_t count,
                              const double* x, int64_t n, int64_t d) {
    if (store.rows(c) + n > count)
        fail(COLLAPSE_ERR_INTERNAL, "class ", c, " received more rows (", store.rows(c) + n, ") than its count ", count);
    store.make_room([&] { return store.growth(c, n); });
    lease.update(add_bytes(fixed, store.memory_bytes()));
    // While append moves the class's rows to a larger vector, both exist.
    auto need = [&] {
        const int64_t g = store.growth(c, n);
        return g > 0 ? add_bytes(g, store.capacity_bytes(c)) : 0;
    };
    if (!budget.fits(need()) && store.memory_bytes() > 0) {
        store.spill_memory();
        lease.update(add_bytes(fixed, store.memory_bytes()));
    }
    lease.resize(add_bytes(lease.bytes(), need()), "rows of class " + std::to_string(c) + " moved to the rank that owns it");
    std::memcpy(store.append(c, n), x, (size_t)(n * d) * 8);
    lease.update(add_bytes(fixed, store.memory_bytes()));
}

// Reservoirs: n rows of class c, each to its slot in the class's merged sample of k rows, in an
// owner's in-memory store (the class's k rows made, and counted in `lease`, when its first rows
// come); `filled` counts the slots filled so far.
inline void append_sampled_rows(RowStore& store, HostBudget::Lease& lease, int64_t& filled, int32_t c, int64_t k, const double* x, int64_t n,
                                const int64_t* slots, int64_t d) {
    if (filled + n > k) fail(COLLAPSE_ERR_INTERNAL, "class ", c, " received more than its ", k, " sampled rows");
    if (store.rows(c) == 0) {
        lease.resize(add_bytes(lease.bytes(), store.growth(c, k)), "the sampled rows of class " + std::to_string(c) + " moved to the rank that owns it",
                     kFixNumClasses);
        store.append(c, k);
    }
    for (int64_t i = 0; i < n; ++i) {
        if (slots[i] < 0 || slots[i] >= k) fail(COLLAPSE_ERR_INTERNAL, "class ", c, ": slot ", slots[i], " outside its sample of ", k);
        std::memcpy(store.memory_data(c) + slots[i] * d, x + i * d, (size_t)d * 8);
    }
    filled += n;
}

// spread_close's check: every class this rank owns has want(c) rows in its new store, each given
// once (got(c): rows appended, or with reservoirs the slots filled).
template <class Want, class Got>
void check_owned_rows(const RowStore& store, const std::vector<uint8_t>& owned, bool sampled, Want want, Got got) {
    for (size_t c = 0; c < owned.size(); ++c) {
        if (!owned[c]) continue;
        const int64_t w = want((int32_t)c), g = got((int32_t)c);
        if (g != w || store.rows((int32_t)c) != w)
            fail(COLLAPSE_ERR_INTERNAL, "class ", c, " has ", g, " rows on the rank that owns it, ", sampled ? "its sample holds " : "its count is ", w);
    }
}

inline void write_token_part(StateWriter& w, const std::vector<TokenMetrics>& tokens, size_t k) {
    auto pack = [](const std::optional<double>& v) { return v ? *v : std::numeric_limits<double>::quiet_NaN(); };
    std::vector<double> f(k * 3);
    std::vector<int64_t> i(k * 3);
    for (size_t s = 0; s < k && s < tokens.size(); ++s) {
        const TokenMetrics& t = tokens[s];
        f[s * 3] = pack(t.svd_entropy), f[s * 3 + 1] = pack(t.effective_rank), f[s * 3 + 2] = pack(t.normalized_entropy);
        i[s * 3] = t.svd_rows, i[s * 3 + 1] = t.sampled, i[s * 3 + 2] = t.zero_matrix;
    }
    w.add("part_tokens_f", COLLAPSE_F64, {(int64_t)k, 3}, f.data(), f.size() * 8);
    w.add("part_tokens_i", COLLAPSE_I64, {(int64_t)k, 3}, i.data(), i.size() * 8);
}

// Row i of the sections (checked: float64 / int64 [k, 3]) into t, whose id and count the caller sets.
struct TokenPart {
    const double* f = nullptr;
    const int64_t* i = nullptr;
    void take(int64_t row, TokenMetrics& t) const {
        auto unpack = [](double v) { return std::isnan(v) ? std::nullopt : std::optional<double>(v); };
        t.svd_rows = i[row * 3];
        t.sampled = i[row * 3 + 1] != 0;
        t.zero_matrix = i[row * 3 + 2] != 0;
        t.svd_entropy = unpack(f[row * 3]), t.effective_rank = unpack(f[row * 3 + 1]), t.normalized_entropy = unpack(f[row * 3 + 2]);
    }
};
inline TokenPart read_token_part(const StateReader& r, int64_t k) {
    TokenPart p;
    const std::string what = r.description();
    for (const bool f : {true, false}) {
        const char* name = f ? "part_tokens_f" : "part_tokens_i";
        if (!r.has(name)) fail(COLLAPSE_ERR_IO, what, " lacks section ", name);
        const StateSection s = r.section(name);
        if (s.dtype_code != (uint32_t)(f ? COLLAPSE_F64 : COLLAPSE_I64) || s.shape != std::vector<int64_t>{k, 3})
            fail(COLLAPSE_ERR_IO, what, ": section ", name, " is not ", f ? "float64" : "int64", " [", k, ", 3]");
        if (f) p.f = static_cast<const double*>(s.data);
        else p.i = static_cast<const int64_t*>(s.data);
    }
    for (int64_t row = 0; row < k; ++row)
        if (p.i[row * 3] < 0) fail(COLLAPSE_ERR_IO, what, ": section part_tokens_i holds ", p.i[row * 3], " rows at ", row);
    return p;
}

}  // namespace collapse::internal
