#include "core/second_pass_part.hpp"

#include <cmath>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace collapse::internal {

void write_second_pass_part(StateWriter& w, const SecondPassPart& p, const SecondPassSizes& n, int64_t d) {
    const int64_t counts[2] = {p.rows, p.agree};
    w.add("pass2_counts", COLLAPSE_I64, {2}, counts, sizeof counts);
    if (n.gram) w.add("pass2_gram", COLLAPSE_F64, {d, d}, p.gram, n.gram * 8);
    if (n.within) w.add("pass2_within", COLLAPSE_F64, {d, d}, p.within, n.within * 8);
    if (n.hits) {
        w.add("pass2_nc4_hits", COLLAPSE_I64, {(int64_t)n.hits}, p.hits, n.hits * 8);
        w.add("pass2_nc4_rows", COLLAPSE_I64, {(int64_t)n.hit_rows}, p.hit_rows, n.hit_rows * 8);
    }
}

SecondPassPart read_second_pass_part(const StateReader& r, const SecondPassSizes& n, int64_t rows_now, int64_t agree_now) {
    const std::string what = r.description();
    const StateSection c = r.section("pass2_counts");
    if (c.dtype_code != (uint32_t)COLLAPSE_I64 || c.shape != std::vector<int64_t>{2})
        fail(COLLAPSE_ERR_IO, what, ": section pass2_counts is not int64 [2]");
    const int64_t* k = static_cast<const int64_t*>(c.data);
    SecondPassPart p;
    int64_t rows = 0, agree = 0;
    if (k[0] < 0 || k[1] < 0 || k[1] > k[0] || __builtin_add_overflow(rows_now, k[0], &rows) || __builtin_add_overflow(agree_now, k[1], &agree))
        fail(COLLAPSE_ERR_IO, what, ": section pass2_counts holds ", k[0], " rows and ", k[1], " agreements, not counts that add up");
    p.rows = k[0], p.agree = k[1];
    struct Array {
        const char* name;
        uint32_t dtype;
        size_t size;
        const void** out;
    };
    const void* out[4] = {};
    const Array arrays[] = {{"pass2_gram", COLLAPSE_F64, n.gram, &out[0]},
                            {"pass2_within", COLLAPSE_F64, n.within, &out[1]},
                            {"pass2_nc4_hits", COLLAPSE_I64, n.hits, &out[2]},
                            {"pass2_nc4_rows", COLLAPSE_I64, n.hit_rows, &out[3]}};
    for (const Array& a : arrays) {
        if ((a.size > 0) != r.has(a.name))
            fail(COLLAPSE_ERR_IO, what, a.size > 0 ? " lacks section " : " has section ", a.name, ", which this session's second pass ",
                 a.size > 0 ? "makes" : "does not make");
        if (a.size == 0) continue;
        const StateSection s = r.section(a.name);
        if (s.dtype_code != a.dtype || s.bytes != a.size * 8)
            fail(COLLAPSE_ERR_IO, what, ": section ", a.name, " has ", s.bytes, " bytes, this session's has ", a.size * 8);
        if (a.dtype == COLLAPSE_F64)
            for (size_t i = 0; i < a.size; ++i)
                if (!std::isfinite(static_cast<const double*>(s.data)[i])) fail(COLLAPSE_ERR_IO, what, ": section ", a.name, " holds a non-finite value at ", i);
        *a.out = s.data;
    }
    p.gram = static_cast<const double*>(out[0]);
    p.within = static_cast<const double*>(out[1]);
    p.hits = static_cast<const int64_t*>(out[2]);
    p.hit_rows = static_cast<const int64_t*>(out[3]);
    return p;
}

}  // namespace collapse::internal
