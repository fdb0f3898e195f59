#include "core/pair_part.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "base/error.hpp"

namespace collapse::internal {

namespace {
constexpr int kPairF = 13, kPairI = 3;  // PairTotals as float64 and int64 values
}  // namespace

int64_t pair_tile_edge_override(int64_t K) {
    const char* e = std::getenv("COLLAPSE_PAIR_TILE_EDGE");
    if (!e) return 0;
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (!end || *end != 0 || v < 1 || v > (1ll << 20)) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "COLLAPSE_PAIR_TILE_EDGE=", e, " is not an edge in [1, 2^20]");
    return std::min<int64_t>((int64_t)v, std::max<int64_t>(K, 1));  // no tile beyond K
}

PairTiling pair_tiling(int64_t K, int64_t T, int rank, int P) {
    if (T < 1 || K < 0 || P < 1 || rank < 0 || rank >= P) fail(COLLAPSE_ERR_INTERNAL, "pair_tiling: K = ", K, ", edge ", T, ", rank ", rank, " of ", P);
    PairTiling pt;
    const int64_t nt = (K + T - 1) / T;
    std::vector<int64_t> before;  // pairs before each tile
    int64_t total = 0;
    for (int64_t bi = 0; bi < nt; ++bi)
        for (int64_t bj = bi; bj < nt; ++bj) {
            pt.tiles.emplace_back(bi, bj);
            before.push_back(total);
            const int64_t ni = std::min(T, K - bi * T), nj = std::min(T, K - bj * T);
            total += bi == bj ? ni * (ni - 1) / 2 : ni * nj;
        }
    auto first_of = [&](int r) {
        if (r >= P) return (int64_t)pt.tiles.size();
        int64_t t = 0;
        while (t < (int64_t)pt.tiles.size() && (double)before[(size_t)t] * (double)P < (double)r * (double)total) ++t;
        return t;
    };
    pt.begin = first_of(rank), pt.end = first_of(rank + 1);
    return pt;
}

void write_pair_inputs(StateWriter& w, const double* m, const double* var, int64_t K, int64_t d, int64_t T) {
    w.add("pair_m", COLLAPSE_F64, {K, d}, m, (size_t)(K * d) * 8);
    w.add("pair_var", COLLAPSE_F64, {K}, var, (size_t)K * 8);
    w.add("pair_tile", COLLAPSE_I64, {1}, &T, 8);
}

PairInputs read_pair_inputs(const StateReader& r, int64_t d) {
    const std::string what = r.description();
    const StateSection v = r.section("pair_var"), mm = r.section("pair_m"), t = r.section("pair_tile");
    if (v.dtype_code != (uint32_t)COLLAPSE_F64 || v.shape.size() != 1 || v.shape[0] < 1)
        fail(COLLAPSE_ERR_IO, what, ": section pair_var is not float64 [K] with K >= 1");
    const int64_t K = v.shape[0];
    if (mm.dtype_code != (uint32_t)COLLAPSE_F64 || mm.shape != std::vector<int64_t>{K, d})
        fail(COLLAPSE_ERR_IO, what, ": section pair_m is not float64 [K, d] = [", K, ", ", d, "]");
    if (t.dtype_code != (uint32_t)COLLAPSE_I64 || t.shape != std::vector<int64_t>{1} || *static_cast<const int64_t*>(t.data) < 1)
        fail(COLLAPSE_ERR_IO, what, ": section pair_tile is not an int64 edge >= 1");
    PairInputs in;
    in.m = static_cast<const double*>(mm.data), in.var = static_cast<const double*>(v.data);
    in.K = K, in.T = *static_cast<const int64_t*>(t.data);
    return in;
}

void write_pair_share(StateWriter& w, const PairTotals& a, const int64_t range[3]) {
    const double f[kPairF] = {a.l.n, a.l.mean, a.l.m2, a.c.n, a.c.mean, a.c.m2, a.dist.n, a.dist.mean, a.dist.m2,
                              a.s_etf, a.max_etf, a.n_cdnv, a.s_cdnv};
    const int64_t i[kPairI] = {a.pairs, a.skip_l, a.skip_cdnv};
    w.add("pair_totals_f", COLLAPSE_F64, {kPairF}, f, sizeof f);
    w.add("pair_totals_i", COLLAPSE_I64, {kPairI}, i, sizeof i);
    w.add("pair_tiles", COLLAPSE_I64, {3}, range, 3 * 8);
}

void PairSpread::merge(const KeptSet& kept, const StateReader& r) {
    const std::string what = r.description();
    if (ids != kept.ids || rows != kept.rows) fail(COLLAPSE_ERR_STATE, "pair_merge: the pair inputs were not written for this kept set");
    const StateSection f = r.section("pair_totals_f"), i = r.section("pair_totals_i");
    if (f.dtype_code != (uint32_t)COLLAPSE_F64 || f.shape != std::vector<int64_t>{kPairF} || i.dtype_code != (uint32_t)COLLAPSE_I64 ||
        i.shape != std::vector<int64_t>{kPairI})
        fail(COLLAPSE_ERR_IO, what, ": sections pair_totals_f/_i are not float64 [", kPairF, "] and int64 [", kPairI, "]");
    const double* x = static_cast<const double*>(f.data);
    const int64_t* n = static_cast<const int64_t*>(i.data);
    for (int k = 0; k < kPairF; ++k)
        if (std::isnan(x[k])) fail(COLLAPSE_ERR_IO, what, ": section pair_totals_f holds NaN at ", k);
    if (n[0] < 0 || n[1] < 0 || n[2] < 0 || n[1] > n[0] || n[2] > n[0])
        fail(COLLAPSE_ERR_IO, what, ": section pair_totals_i holds ", n[0], " pairs, ", n[1], " and ", n[2], " skipped");
    PairTotals a;
    a.l = {x[0], x[1], x[2]}, a.c = {x[3], x[4], x[5]}, a.dist = {x[6], x[7], x[8]};
    a.s_etf = x[9], a.max_etf = x[10], a.n_cdnv = x[11], a.s_cdnv = x[12];
    a.pairs = n[0], a.skip_l = n[1], a.skip_cdnv = n[2];
    const int64_t K = (int64_t)kept.ids.size();
    if (all.pairs + a.pairs > K * (K - 1) / 2) fail(COLLAPSE_ERR_IO, what, ": more pairs than K = ", K, " classes have");
    all.merge(a);
    ++parts;
}

const PairTotals* PairSpread::totals_for(const KeptSet& kept, int64_t rows_seen) const {
    if (parts == 0 || ids != kept.ids || rows != kept.rows || (seen >= 0 && seen != rows_seen)) return nullptr;
    const int64_t K = (int64_t)kept.ids.size();
    if (all.pairs != K * (K - 1) / 2) fail(COLLAPSE_ERR_INTERNAL, "the ranks' pair-metric shares hold ", all.pairs, " pairs of K = ", K, " kept classes");
    return &all;
}

}  // namespace collapse::internal
