// Bad input through the C API: every refusal has the right status, a message that names what was
// wrong, and leaves the session as it was. "As it was" is proven, not assumed: after the refused
// call the session ingests good batches and its final report (minus engine.timings_seconds) must
// equal the report of a session that only ever saw the good batches.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"
#include "base/dtype.hpp"

#include "common/capi_helpers.hpp"
#include "common/file_helpers.hpp"
#include "core/config.hpp"
#include "io/tensor_file.hpp"

#include "common/compare.hpp"

namespace test_bad_input {
namespace {

using nlohmann::json;

// ------------------------------------------------------------------------------------ helpers

using testutil::ReportPtr;
using testutil::SessionPtr;
using testutil::make_session;
using testutil::buf;

collapse_options opts(int64_t V) {
    collapse_options o;
    EXPECT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = V;
    // The sequence and rows layouts are compared on the other metrics here (only the first has
    // window sections); windows have their own bad-input tests (test_windows.cpp).
    o.compute_window_metrics = 0;
    return o;
}

// A batch of rows in float32 (and, on demand, converted to the other float types).
struct Batch {
    int64_t n = 0, d = 0;
    std::vector<float> x;
    std::vector<int32_t> y;
    std::vector<uint8_t> valid;  // empty: no mask

    collapse_buffer features() const { return buf(x.data(), COLLAPSE_F32, n, d); }
    collapse_buffer labels() const { return buf(y.data(), COLLAPSE_I32, n); }
};

// Values are multiples of 1/8 in [-4, 4]: exact in float16 and bfloat16 as well.
Batch make_batch(int64_t n, int64_t d, int64_t V, uint32_t seed) {
    Batch b;
    b.n = n;
    b.d = d;
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> v(-32, 32);
    std::uniform_int_distribution<int32_t> lab(0, (int32_t)V - 1);
    b.x.resize((size_t)(n * d));
    b.y.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        b.y[(size_t)i] = lab(rng);
        for (int64_t k = 0; k < d; ++k)
            b.x[(size_t)(i * d + k)] = (float)v(rng) / 8.0f + (float)((b.y[(size_t)i] * 3 + k) % 5) * 0.5f;
    }
    return b;
}

void ingest_ok(collapse_session* s, const Batch& b) {
    const collapse_buffer f = b.features(), l = b.labels();
    const collapse_buffer m = buf(b.valid.data(), COLLAPSE_U8, b.n);
    ASSERT_EQ(collapse_session_ingest_rows(s, &f, &l, b.valid.empty() ? nullptr : &m, nullptr), COLLAPSE_OK)
        << collapse_last_error();
    EXPECT_STREQ(collapse_last_error(), "") << "the last error must be cleared on success";
}

using testutil::final_report;
json report_of(collapse_report* r) { return testutil::report_json(r); }

// Structural equality; numbers within 1e-12 relative (absolute near zero): the same batches in the
// same order give the same numbers, so this forgives nothing but formatting.
void expect_same_json(const json& a, const json& b) { testutil::expect_same_json(a, b, 1e-12, 1.0); }

// The status, and a message holding every needle. A session names rows from the input once it
// has taken a batch ("row 43 of the input (3 of this batch)"), from the batch before ("row 3 of
// the batch"): needles like "3 of th" hold for both.
void expect_error(collapse_status got, collapse_status want, const std::vector<std::string>& needles) {
    const std::string msg = collapse_last_error();
    EXPECT_EQ(got, want) << "status " << collapse_status_string(got) << ", message: " << msg;
    EXPECT_FALSE(msg.empty()) << "a failing call must leave a message";
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
}

// The core scenario. A session sees good batch A, then the bad call (which must fail as expected),
// then good batch B. A second session sees A and B only. The two reports must match.
// With bad_first, the bad call comes before A (the session has not fixed its width yet).
void refused_and_unchanged(const collapse_options& o, const Batch& A, const Batch& B,
                           const std::function<collapse_status(collapse_session*)>& bad, collapse_status want,
                           const std::vector<std::string>& needles, bool bad_first = false) {
    SessionPtr s = make_session(o);
    ASSERT_TRUE(s);
    if (!bad_first) ingest_ok(s.get(), A);
    expect_error(bad(s.get()), want, needles);
    if (bad_first) {
        ASSERT_NO_FATAL_FAILURE(ingest_ok(s.get(), A)) << "the good batch after the refused one";
    }
    ASSERT_NO_FATAL_FAILURE(ingest_ok(s.get(), B)) << "the good batch after the refused one";
    const json got = final_report(s.get());

    SessionPtr ref = make_session(o);
    ingest_ok(ref.get(), A);
    ingest_ok(ref.get(), B);
    const json want_doc = final_report(ref.get());
    expect_same_json(got, want_doc);
}

constexpr int64_t kV = 6, kD = 4;

class BadInput : public ::testing::Test {
protected:
    Batch A = make_batch(40, kD, kV, 11);
    Batch B = make_batch(30, kD, kV, 12);
    collapse_options o = opts(kV);

    // Both orders: the bad call after a good batch, and as the very first call.
    void check(const std::function<collapse_status(collapse_session*)>& bad, collapse_status want,
               const std::vector<std::string>& needles) {
        {
            SCOPED_TRACE("bad call after a good batch");
            refused_and_unchanged(o, A, B, bad, want, needles, false);
        }
        {
            SCOPED_TRACE("bad call first");
            refused_and_unchanged(o, A, B, bad, want, needles, true);
        }
    }
};

// ------------------------------------------------------------------------------------ labels

TEST_F(BadInput, LabelNegativeRows) {
    Batch bad = make_batch(10, kD, kV, 13);
    bad.y[3] = -1;
    check([&](collapse_session* s) {
        const auto f = bad.features(), l = bad.labels();
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }, COLLAPSE_ERR_BAD_INPUT, {"label -1", "row ", "3 of th"});
}

TEST_F(BadInput, LabelTooLargeRowsInt64) {
    Batch bad = make_batch(10, kD, kV, 14);
    std::vector<int64_t> y64(bad.y.begin(), bad.y.end());
    y64[7] = kV;
    check([&](collapse_session* s) {
        const auto f = bad.features();
        const auto l = buf(y64.data(), COLLAPSE_I64, bad.n);
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }, COLLAPSE_ERR_BAD_INPUT, {"label 6", "row ", "7 of th", "[0, 6)"});
}

TEST_F(BadInput, LabelOutOfRangeLastRowOfOtherwiseGoodBatch) {
    // The bad label is the last row: the rows before it must not have been accumulated.
    Batch bad = make_batch(25, kD, kV, 15);
    bad.y[24] = 1000;
    check([&](collapse_session* s) {
        const auto f = bad.features(), l = bad.labels();
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }, COLLAPSE_ERR_BAD_INPUT, {"label 1000", "row ", "24 of th"});
}

// Sequences [Bs, T]: the label of row (b, t) is input_ids[b, t+1].
struct Seq {
    int64_t Bs = 0, T = 0, d = 0;
    std::vector<float> h;      // [Bs*T, d]
    std::vector<int32_t> ids;  // [Bs, T]
    std::vector<uint8_t> mask; // [Bs, T] or empty
};

Seq make_seq(int64_t Bs, int64_t T, int64_t d, int64_t V, uint32_t seed) {
    const Batch r = make_batch(Bs * T, d, V, seed);
    Seq s{Bs, T, d, r.x, r.y, {}};
    return s;
}

// The rows-layout batch equivalent to a sequence batch (rows b*T+t, t < T-1).
Batch rows_of(const Seq& s) {
    Batch b;
    b.d = s.d;
    for (int64_t bi = 0; bi < s.Bs; ++bi)
        for (int64_t t = 0; t + 1 < s.T; ++t) {
            if (!s.mask.empty() && s.mask[(size_t)(bi * s.T + t + 1)] == 0) continue;
            b.x.insert(b.x.end(), s.h.begin() + (bi * s.T + t) * s.d, s.h.begin() + (bi * s.T + t + 1) * s.d);
            b.y.push_back(s.ids[(size_t)(bi * s.T + t + 1)]);
            ++b.n;
        }
    return b;
}

collapse_status ingest_seq(collapse_session* s, const Seq& q) {
    const auto h = buf(q.h.data(), COLLAPSE_F32, q.Bs * q.T, q.d);
    const auto ids = buf(q.ids.data(), COLLAPSE_I32, q.Bs, q.T);
    const auto m = buf(q.mask.data(), COLLAPSE_U8, q.Bs, q.T);
    return collapse_session_ingest_sequences(s, &h, &ids, q.mask.empty() ? nullptr : &m, q.Bs, q.T, nullptr);
}

TEST_F(BadInput, LabelOutOfRangeSequencesNamesSequenceAndPosition) {
    Seq bad = make_seq(3, 5, kD, kV, 16);
    bad.ids[1 * 5 + 2] = kV + 3;  // sequence 1, position 2
    check([&](collapse_session* s) { return ingest_seq(s, bad); }, COLLAPSE_ERR_BAD_INPUT,
          {"label 9", "sequence ", "1 of th", "position 2"});
    Seq neg = make_seq(2, 4, kD, kV, 17);
    neg.ids[1 * 4 + 3] = -7;  // sequence 1, last position
    check([&](collapse_session* s) { return ingest_seq(s, neg); }, COLLAPSE_ERR_BAD_INPUT,
          {"label -7", "sequence ", "1 of th", "position 3"});
}

TEST_F(BadInput, SequencePositionZeroIsNoLabel) {
    // input_ids[:, 0] is the target of no row (y = I[:, 1:]): any value there is fine.
    Seq q = make_seq(3, 4, kD, kV, 18);
    q.ids[0] = -100;
    q.ids[4] = 99999;
    SessionPtr s = make_session(o);
    ASSERT_EQ(ingest_seq(s.get(), q), COLLAPSE_OK) << collapse_last_error();
    SessionPtr ref = make_session(o);
    ingest_ok(ref.get(), rows_of(q));
    json a = final_report(s.get()), b = final_report(ref.get());
    expect_same_json(a["overall_analysis"], b["overall_analysis"]);
    expect_same_json(a["token_analysis"], b["token_analysis"]);
    expect_same_json(a["counts"], b["counts"]);
}

// ------------------------------------------------------------------------------------ masks

TEST_F(BadInput, MaskedRowsWithOutOfRangeLabelsAreNotErrors) {
    Batch b = make_batch(20, kD, kV, 19);
    b.valid.assign((size_t)b.n, 1);
    for (int i : {2, 5, 11, 19}) {
        b.y[(size_t)i] = -100;  // padding
        b.valid[(size_t)i] = 0;
    }
    b.y[5] = kV + 1;
    SessionPtr s = make_session(o);
    ingest_ok(s.get(), b);
    // The same rows without the masked ones.
    Batch kept;
    kept.d = kD;
    for (int64_t i = 0; i < b.n; ++i)
        if (b.valid[(size_t)i]) {
            kept.x.insert(kept.x.end(), b.x.begin() + i * kD, b.x.begin() + (i + 1) * kD);
            kept.y.push_back(b.y[(size_t)i]);
            ++kept.n;
        }
    SessionPtr ref = make_session(o);
    ingest_ok(ref.get(), kept);
    json got = final_report(s.get()), want = final_report(ref.get());
    EXPECT_EQ(got["counts"]["rows_masked"], 4);
    EXPECT_EQ(got["counts"]["rows_seen"], 20);
    expect_same_json(got["overall_analysis"], want["overall_analysis"]);
    expect_same_json(got["token_analysis"], want["token_analysis"]);
    expect_same_json(got["summary"], want["summary"]);
}

TEST_F(BadInput, MaskedSequencePositionsWithPaddingIdsAreNotErrors) {
    Seq q = make_seq(3, 5, kD, kV, 20);
    q.mask.assign((size_t)(q.Bs * q.T), 1);
    // Sequence 2 is right-padded from position 3 with id -100.
    for (int t = 3; t < 5; ++t) {
        q.ids[(size_t)(2 * 5 + t)] = -100;
        q.mask[(size_t)(2 * 5 + t)] = 0;
    }
    q.mask[(size_t)(0 * 5 + 1)] = 0;  // and one masked position with an in-range id
    SessionPtr s = make_session(o);
    ASSERT_EQ(ingest_seq(s.get(), q), COLLAPSE_OK) << collapse_last_error();
    SessionPtr ref = make_session(o);
    ingest_ok(ref.get(), rows_of(q));
    json got = final_report(s.get()), want = final_report(ref.get());
    EXPECT_EQ(got["counts"]["rows_masked"], 3);
    EXPECT_EQ(got["counts"]["rows_seen"], 3 * 4);
    expect_same_json(got["overall_analysis"], want["overall_analysis"]);
    expect_same_json(got["token_analysis"], want["token_analysis"]);
}

// ------------------------------------------------------------------------------------ non-finite

struct FloatCase {
    collapse_dtype dtype;
    const char* name;
};
const FloatCase kFloatTypes[] = {{COLLAPSE_F32, "float32"}, {COLLAPSE_F16, "float16"}, {COLLAPSE_BF16, "bfloat16"},
                                 {COLLAPSE_F64, "float64"}};
const double kNonFinite[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                             -std::numeric_limits<double>::infinity()};

// b's features in dtype t (exact: the values are multiples of 1/8), with `special` written at
// (row, col) for every pair in at.
std::vector<uint8_t> encode(const Batch& b, collapse_dtype t, const std::vector<std::pair<int64_t, int64_t>>& at,
                            double special) {
    const size_t es = collapse::internal::dtype_size(t);
    std::vector<uint8_t> out((size_t)(b.n * b.d) * es);
    auto put = [&](size_t i, double v) {
        switch (t) {
            case COLLAPSE_F32: {
                const float f = (float)v;
                std::memcpy(out.data() + i * 4, &f, 4);
                break;
            }
            case COLLAPSE_F64: std::memcpy(out.data() + i * 8, &v, 8); break;
            case COLLAPSE_F16: {
                const uint16_t h = collapse::internal::float_to_half((float)v);
                std::memcpy(out.data() + i * 2, &h, 2);
                break;
            }
            case COLLAPSE_BF16: {
                const uint16_t h = collapse::internal::float_to_bf16((float)v);
                std::memcpy(out.data() + i * 2, &h, 2);
                break;
            }
            default: break;
        }
    };
    for (size_t i = 0; i < b.x.size(); ++i) put(i, b.x[i]);
    for (const auto& rc : at) put((size_t)(rc.first * b.d + rc.second), special);
    return out;
}

std::string special_text(double v) { return std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf"; }

TEST_F(BadInput, NonFiniteFeaturesRefusedUnderPolicyError) {
    for (const auto& ft : kFloatTypes) {
        for (double special : kNonFinite) {
            SCOPED_TRACE(std::string(ft.name) + " " + special_text(special));
            const Batch bad = make_batch(12, kD, kV, 21);
            const std::vector<uint8_t> bytes = encode(bad, ft.dtype, {{5, 2}}, special);
            // Good batches in the same dtype as well.
            const std::vector<uint8_t> a = encode(A, ft.dtype, {}, 0), bb = encode(B, ft.dtype, {}, 0);
            auto ingest_typed = [&](collapse_session* s, const std::vector<uint8_t>& x, const Batch& lb) {
                const auto f = buf(x.data(), ft.dtype, lb.n, lb.d);
                const auto l = lb.labels();
                return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
            };
            SessionPtr s = make_session(o);
            ASSERT_EQ(ingest_typed(s.get(), a, A), COLLAPSE_OK) << collapse_last_error();
            expect_error(ingest_typed(s.get(), bytes, bad), COLLAPSE_ERR_BAD_INPUT,
                         {"non-finite", "row ", "5 of th", "column 2", special_text(special)});
            ASSERT_EQ(ingest_typed(s.get(), bb, B), COLLAPSE_OK) << collapse_last_error();
            SessionPtr ref = make_session(o);
            ASSERT_EQ(ingest_typed(ref.get(), a, A), COLLAPSE_OK);
            ASSERT_EQ(ingest_typed(ref.get(), bb, B), COLLAPSE_OK);
            expect_same_json(final_report(s.get()), final_report(ref.get()));
        }
    }
}

TEST_F(BadInput, NonFiniteRowsSkippedAndCountedUnderSkipRow) {
    o.nonfinite_policy = COLLAPSE_NONFINITE_SKIP_ROW;
    for (const auto& ft : kFloatTypes) {
        for (double special : kNonFinite) {
            SCOPED_TRACE(std::string(ft.name) + " " + special_text(special));
            const Batch b = make_batch(30, kD, kV, 22);
            const std::vector<std::pair<int64_t, int64_t>> bad_at = {{0, 0}, {7, 3}, {7, 1}, {29, 2}};
            const std::vector<uint8_t> bytes = encode(b, ft.dtype, bad_at, special);
            Batch fin;  // the finite rows only
            fin.d = kD;
            for (int64_t i = 0; i < b.n; ++i) {
                if (i == 0 || i == 7 || i == 29) continue;
                fin.x.insert(fin.x.end(), b.x.begin() + i * kD, b.x.begin() + (i + 1) * kD);
                fin.y.push_back(b.y[(size_t)i]);
                ++fin.n;
            }
            const std::vector<uint8_t> fin_bytes = encode(fin, ft.dtype, {}, 0);
            SessionPtr s = make_session(o);
            const auto f = buf(bytes.data(), ft.dtype, b.n, kD);
            const auto l = b.labels();
            ASSERT_EQ(collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
            SessionPtr ref = make_session(o);
            const auto f2 = buf(fin_bytes.data(), ft.dtype, fin.n, kD);
            const auto l2 = fin.labels();
            ASSERT_EQ(collapse_session_ingest_rows(ref.get(), &f2, &l2, nullptr, nullptr), COLLAPSE_OK);
            json got = final_report(s.get()), want = final_report(ref.get());
            EXPECT_EQ(got["counts"]["rows_nonfinite"], 3);
            EXPECT_EQ(got["counts"]["rows_seen"], 30);
            EXPECT_EQ(got["counts"]["rows_kept"], want["counts"]["rows_kept"]);
            expect_same_json(got["overall_analysis"], want["overall_analysis"]);
            expect_same_json(got["token_analysis"], want["token_analysis"]);
            expect_same_json(got["summary"], want["summary"]);
        }
    }
}

TEST_F(BadInput, NonFiniteInMaskedOrExcludedRowIsIgnored) {
    Batch b = make_batch(10, kD, kV, 23);
    b.x[(size_t)(4 * kD + 1)] = std::numeric_limits<float>::quiet_NaN();
    b.valid.assign((size_t)b.n, 1);
    b.valid[4] = 0;
    SessionPtr s = make_session(o);
    ingest_ok(s.get(), b);
    // Excluded class: rows are dropped before anything else.
    Batch e = make_batch(10, kD, kV, 24);
    int64_t excl[] = {e.y[6]};
    e.x[(size_t)(6 * kD)] = std::numeric_limits<float>::infinity();
    collapse_options oe = o;
    oe.exclude_token_ids = excl;
    oe.num_exclude_token_ids = 1;
    SessionPtr s2 = make_session(oe);
    ingest_ok(s2.get(), e);
}

// ------------------------------------------------------------------------------------ shapes

TEST_F(BadInput, WidthDiffersFromFirstBatch) {
    const Batch wide = make_batch(10, kD + 1, kV, 25);
    refused_and_unchanged(o, A, B, [&](collapse_session* s) {
        const auto f = wide.features(), l = wide.labels();
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }, COLLAPSE_ERR_SHAPE, {"width 5", "4"});
}

TEST_F(BadInput, WidthFixedByOptionsDim) {
    o.dim = kD;
    const Batch wide = make_batch(10, kD + 2, kV, 26);
    check([&](collapse_session* s) {
        const auto f = wide.features(), l = wide.labels();
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }, COLLAPSE_ERR_SHAPE, {"width 6", "4"});
}

// ENGINE BUG (src/core/session.cpp, Session::ingest, the line `if (b.features.rows > 0)
// ensure_backend(b.features.cols);`): the backend, and with it the session's feature width, is
// created from the batch BEFORE the batch is validated. A refused first batch (here a label out of
// range, width 5) therefore fixes d = 5, and the good batch of width 4 that follows is refused
// with "width 4 differs from the session's feature width 5". README/collapse.h: "a call that
// fails changes nothing".
TEST_F(BadInput, RefusedFirstBatchDoesNotFixTheWidth) {
    Batch bad = make_batch(10, kD + 1, kV, 27);
    bad.y[2] = -1;
    refused_and_unchanged(o, A, B, [&](collapse_session* s) {
        const auto f = bad.features(), l = bad.labels();
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }, COLLAPSE_ERR_BAD_INPUT, {"label -1", "row 2"}, /*bad_first=*/true);
}

// Same bug, other causes: a first batch in device memory, or with a non-finite value.
TEST_F(BadInput, RefusedFirstBatchDoesNotFixTheWidthOtherCauses) {
    const Batch wide = make_batch(10, kD + 2, kV, 41);
    {
        SCOPED_TRACE("device memory");
        refused_and_unchanged(o, A, B, [&](collapse_session* s) {
            const auto f = buf(wide.x.data(), COLLAPSE_F32, wide.n, wide.d, 0, COLLAPSE_MEMORY_DEVICE);
            const auto l = buf(wide.y.data(), COLLAPSE_I32, wide.n, 1, 0, COLLAPSE_MEMORY_DEVICE);
            return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
        }, COLLAPSE_ERR_INVALID_ARGUMENT, {"device memory"}, /*bad_first=*/true);
    }
    {
        SCOPED_TRACE("non-finite");
        Batch nan = wide;
        nan.x[3] = std::numeric_limits<float>::quiet_NaN();
        refused_and_unchanged(o, A, B, [&](collapse_session* s) {
            const auto f = nan.features(), l = nan.labels();
            return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
        }, COLLAPSE_ERR_BAD_INPUT, {"non-finite", "row 0", "column 3"}, /*bad_first=*/true);
    }
}

// ENGINE BUG (src/cpu/cpu_backend.cpp, CpuBackend::ingest: "double cannot overflow on sums of float
// squares"; src/cpu/cpu_metrics.cpp singular_from_gram): a FINITE float64 feature value such as
// 1e200 passes ingest under nonfinite_policy: error, but its square overflows the float64 Gram and
// its float32 copy in the row store is inf, so collapse_session_compute fails with
// COLLAPSE_ERR_INTERNAL "LAPACKE_dsyevd failed with info = 2 (n = 3)". (With 1e100 compute succeeds
// but the row-store copy is inf and that class is counted in svd_zero_matrices with entropy 0.)
// Expected: the batch is refused at ingest (COLLAPSE_ERR_BAD_INPUT naming row and column, session
// unchanged), or compute succeeds; never an internal error at the end of a long run.
TEST_F(BadInput, HugeFiniteFloat64ValueDoesNotBreakCompute) {
    const int64_t n = 12, d = 3, V = 3;
    std::vector<double> x((size_t)(n * d));
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = (int32_t)(i % V);
        for (int64_t k = 0; k < d; ++k) x[(size_t)(i * d + k)] = std::sin((double)(i * 7 + k));
    }
    x[(size_t)(1 * d + 1)] = 1e200;  // row 1, column 1
    collapse_options oo = opts(V);
    SessionPtr s = make_session(oo);
    const auto f = buf(x.data(), COLLAPSE_F64, n, d), l = buf(y.data(), COLLAPSE_I32, n);
    const collapse_status st = collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr);
    if (st != COLLAPSE_OK) {
        expect_error(st, COLLAPSE_ERR_BAD_INPUT, {"row 1", "column 1"});
        return;
    }
    collapse_report* r = nullptr;
    const collapse_status cs = collapse_session_compute(s.get(), &r);
    ReportPtr hold(r);
    EXPECT_EQ(cs, COLLAPSE_OK) << "a batch the engine accepted must not make compute fail: " << collapse_last_error();
}

TEST_F(BadInput, ClassifierShapeMismatchAndNonFinite) {
    std::vector<float> w((size_t)(kV * kD)), w_bad_v((size_t)((kV + 1) * kD)), w_bad_d((size_t)(kV * (kD + 1)));
    for (size_t i = 0; i < w.size(); ++i) w[i] = (float)std::cos((double)i);
    std::vector<float> w_nan = w, w_inf = w;
    w_nan[(size_t)(2 * kD + 1)] = std::numeric_limits<float>::quiet_NaN();
    w_inf[(size_t)(5 * kD + 3)] = -std::numeric_limits<float>::infinity();
    std::vector<float> bias((size_t)kV, 0.5f), bias_nan = bias, bias_short((size_t)kV - 1, 0.f);
    bias_nan[4] = std::numeric_limits<float>::quiet_NaN();

    auto set = [&](const std::vector<float>& ww, int64_t rows, int64_t cols, const std::vector<float>* b) {
        return [&ww, rows, cols, b](collapse_session* s) {
            const auto wb = buf(ww.data(), COLLAPSE_F32, rows, cols);
            const auto bb = b ? buf(b->data(), COLLAPSE_F32, (int64_t)b->size()) : collapse_buffer{};
            return collapse_session_set_classifier(s, &wb, b ? &bb : nullptr);
        };
    };
    struct Case {
        std::function<collapse_status(collapse_session*)> call;
        collapse_status want;
        std::vector<std::string> needles;
    };
    const Case cases[] = {
        {set(w_bad_v, kV + 1, kD, nullptr), COLLAPSE_ERR_SHAPE, {"classifier", "[7, 4]", "[V, d] = [6, 4]"}},
        {set(w_bad_d, kV, kD + 1, nullptr), COLLAPSE_ERR_SHAPE, {"classifier", "[6, 5]", "[V, d] = [6, 4]"}},
        {set(w_nan, kV, kD, nullptr), COLLAPSE_ERR_BAD_INPUT, {"classifier", "non-finite", "row 2", "column 1"}},
        {set(w_inf, kV, kD, nullptr), COLLAPSE_ERR_BAD_INPUT, {"classifier", "non-finite", "row 5", "column 3"}},
        {set(w, kV, kD, &bias_nan), COLLAPSE_ERR_BAD_INPUT, {"bias", "non-finite", "4"}},
        {set(w, kV, kD, &bias_short), COLLAPSE_ERR_SHAPE, {"bias", "5 elements", "V = 6"}},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
        SCOPED_TRACE("classifier case " + std::to_string(i));
        const Case& c = cases[i];
        // A good classifier is set at the end of both sessions; the bad one must not replace it
        // nor leave a trace.
        SessionPtr s = make_session(o);
        ingest_ok(s.get(), A);
        expect_error(c.call(s.get()), c.want, c.needles);
        ingest_ok(s.get(), B);
        ASSERT_EQ(set(w, kV, kD, &bias)(s.get()), COLLAPSE_OK) << collapse_last_error();
        SessionPtr ref = make_session(o);
        ingest_ok(ref.get(), A);
        ingest_ok(ref.get(), B);
        ASSERT_EQ(set(w, kV, kD, &bias)(ref.get()), COLLAPSE_OK);
        expect_same_json(final_report(s.get()), final_report(ref.get()));
    }
    // A refused classifier after a good one keeps the good one.
    {
        SessionPtr s = make_session(o);
        ASSERT_EQ(set(w, kV, kD, &bias)(s.get()), COLLAPSE_OK);
        expect_error(set(w_nan, kV, kD, nullptr)(s.get()), COLLAPSE_ERR_BAD_INPUT, {"non-finite"});
        ingest_ok(s.get(), A);
        SessionPtr ref = make_session(o);
        ASSERT_EQ(set(w, kV, kD, &bias)(ref.get()), COLLAPSE_OK);
        ingest_ok(ref.get(), A);
        const json got = final_report(s.get()), want = final_report(ref.get());
        EXPECT_TRUE(got["engine"]["classifier"].get<bool>());
        expect_same_json(got, want);
    }
    // A refused classifier of another width before any data does not fix the width either.
    {
        SessionPtr s = make_session(o);
        expect_error(set(w_nan, kV, kD, nullptr)(s.get()), COLLAPSE_ERR_BAD_INPUT, {"non-finite"});
        const Batch other = make_batch(10, kD + 3, kV, 28);
        ingest_ok(s.get(), other);
    }
}

// ------------------------------------------------------------------------------------ arguments

TEST_F(BadInput, NullBuffersAndData) {
    const Batch b = make_batch(8, kD, kV, 29);
    const auto f = b.features(), l = b.labels();
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, nullptr, &l, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"features", "NULL"});
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, nullptr, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"labels", "NULL"});
    const auto f0 = buf(nullptr, COLLAPSE_F32, b.n, kD);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f0, &l, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"features", "data is NULL", "8 rows"});
    const auto l0 = buf(nullptr, COLLAPSE_I32, b.n);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &l0, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"labels", "data is NULL"});
    const auto m0 = buf(nullptr, COLLAPSE_U8, b.n);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &l, &m0, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"mask", "data is NULL"});
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"classifier", "NULL"});
    std::vector<int32_t> ids((size_t)(2 * 4), 1);
    const auto h = buf(b.x.data(), COLLAPSE_F32, 8, kD);
    const auto idb = buf(ids.data(), COLLAPSE_I32, 2, 4);
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h, nullptr, nullptr, 2, 4, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"input_ids", "NULL"});
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, nullptr, &idb, nullptr, 2, 4, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"hidden", "NULL"});
    // A NULL session is an error, not a crash.
    expect_error(collapse_session_ingest_rows(nullptr, &f, &l, nullptr, nullptr), COLLAPSE_ERR_INVALID_ARGUMENT, {"session"});
    collapse_report* r = nullptr;
    expect_error(collapse_session_compute(nullptr, &r), COLLAPSE_ERR_INVALID_ARGUMENT, {"session"});
}

TEST_F(BadInput, WrongDtypes) {
    const Batch b = make_batch(8, kD, kV, 30);
    std::vector<int32_t> xi(b.x.size(), 1);
    std::vector<float> yf(b.y.begin(), b.y.end());
    std::vector<float> mf((size_t)b.n, 1.f);
    const auto f = b.features(), l = b.labels();
    const auto fi = buf(xi.data(), COLLAPSE_I32, b.n, kD);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fi, &l, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"features", "int32", "not a float type"});
    const auto lf = buf(yf.data(), COLLAPSE_F32, b.n);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &lf, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"labels", "float32", "int32 or int64"});
    const auto lu8 = buf(mf.data(), COLLAPSE_U8, b.n);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &lu8, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"labels", "int32 or int64"});
    const auto mfb = buf(mf.data(), COLLAPSE_F32, b.n);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &l, &mfb, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"mask", "float32"});
    const auto fbogus = buf(b.x.data(), (collapse_dtype)42, b.n, kD);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fbogus, &l, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"features", "dtype 42"});
    const auto wi = buf(xi.data(), COLLAPSE_I32, kV, kD);
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &wi, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"classifier", "dtype"});
}

TEST_F(BadInput, BadShapesAndStrides) {
    const Batch b = make_batch(8, kD, kV, 31);
    const auto f = b.features(), l = b.labels();
    const auto fneg = buf(b.x.data(), COLLAPSE_F32, -3, kD);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fneg, &l, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"features", "[-3, 4]"});
    const auto fzero_cols = buf(b.x.data(), COLLAPSE_F32, b.n, 0);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fzero_cols, &l, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"features", "[8, 0]"});
    const auto fstride = buf(b.x.data(), COLLAPSE_F32, b.n, kD, kD - 1);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fstride, &l, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"features", "row_stride 3", "cols 4"});
    const auto lshort = buf(b.y.data(), COLLAPSE_I32, b.n - 1);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &lshort, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"labels", "[7, 1]", "8 feature rows"});
    const auto l2d = buf(b.y.data(), COLLAPSE_I32, b.n / 2, 2);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &l2d, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"labels", "[4, 2]"});
    std::vector<uint8_t> mask((size_t)b.n + 2, 1);
    const auto mlong = buf(mask.data(), COLLAPSE_U8, b.n + 2);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &l, &mlong, nullptr); },
          COLLAPSE_ERR_SHAPE, {"valid mask", "[10, 1]", "8 feature rows"});
    // Sequences: hidden rows != B*T, ids shape, mask shape, bad B / T.
    std::vector<int32_t> ids((size_t)(2 * 4), 1);
    std::vector<uint8_t> smask((size_t)(2 * 3), 1);
    const auto h = buf(b.x.data(), COLLAPSE_F32, 8, kD);
    const auto idb = buf(ids.data(), COLLAPSE_I32, 2, 4);
    const auto idb_wrong = buf(ids.data(), COLLAPSE_I32, 4, 2);
    const auto mb_wrong = buf(smask.data(), COLLAPSE_U8, 2, 3);
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h, &idb, nullptr, 2, 3, nullptr); },
          COLLAPSE_ERR_SHAPE, {"hidden", "8 rows", "6"});
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h, &idb_wrong, nullptr, 2, 4, nullptr); },
          COLLAPSE_ERR_SHAPE, {"input_ids", "[4, 2]", "[2, 4]"});
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h, &idb, &mb_wrong, 2, 4, nullptr); },
          COLLAPSE_ERR_SHAPE, {"attention_mask", "[2, 3]", "[2, 4]"});
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h, &idb, nullptr, -2, -4, nullptr); },
          COLLAPSE_ERR_SHAPE, {"batch -2", "seq_len -4"});
}

// Size products that overflow int64 used to wrap and be accepted (COLLAPSE_OK, then garbage or a
// crash); each is refused with the numbers that overflow.
TEST_F(BadInput, SizeProductsThatOverflowAreRefused) {
    const int64_t huge = int64_t(1) << 62;
    const Batch b = make_batch(8, kD, kV, 33);
    const auto f = b.features(), l = b.labels();
    const auto fstride = buf(b.x.data(), COLLAPSE_F32, b.n, kD, huge);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fstride, &l, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"features", "8 rows", "row_stride 4611686018427387904", "overflows int64"});
    const auto lstride = buf(b.y.data(), COLLAPSE_I32, b.n, 1, huge);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &lstride, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"labels", "row_stride 4611686018427387904"});
    std::vector<uint8_t> mask((size_t)b.n, 1);
    const auto mstride = buf(mask.data(), COLLAPSE_U8, b.n, 1, huge);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &f, &l, &mstride, nullptr); },
          COLLAPSE_ERR_SHAPE, {"valid mask", "row_stride 4611686018427387904"});
    const auto frows = buf(b.x.data(), COLLAPSE_F32, huge, kD);
    const auto lrows = buf(b.y.data(), COLLAPSE_I32, huge);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &frows, &lrows, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"features", "4611686018427387904 rows", "overflows int64"});
    // A buffer whose last byte would lie past the top of the address space.
    const void* top = reinterpret_cast<const void*>(~uintptr_t(0) - 15);
    const auto ftop = buf(top, COLLAPSE_F32, 2, kD);
    const auto l2 = buf(b.y.data(), COLLAPSE_I32, 2);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &ftop, &l2, nullptr, nullptr); },
          COLLAPSE_ERR_SHAPE, {"features", "address space"});

    // Sequences: batch * seq_len wrapped to 0 and matched an empty hidden buffer.
    std::vector<int32_t> ids((size_t)(2 * 4), 1);
    const auto h0 = buf(b.x.data(), COLLAPSE_F32, 0, kD);
    const auto idhuge = buf(ids.data(), COLLAPSE_I32, huge, 4);
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h0, &idhuge, nullptr, huge, 4, nullptr); },
          COLLAPSE_ERR_SHAPE, {"batch 4611686018427387904", "seq_len 4", "overflows int64"});
    const auto h = buf(b.x.data(), COLLAPSE_F32, 8, kD);
    const auto idstride = buf(ids.data(), COLLAPSE_I32, 2, 4, huge);
    check([&](collapse_session* s) { return collapse_session_ingest_sequences(s, &h, &idstride, nullptr, 2, 4, nullptr); },
          COLLAPSE_ERR_SHAPE, {"input_ids", "row_stride 4611686018427387904"});

    // The classifier and its bias.
    std::vector<float> w((size_t)(kV * kD), 0.25f), bias((size_t)kV, 0.f);
    const auto wstride = buf(w.data(), COLLAPSE_F32, kV, kD, huge);
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &wstride, nullptr); }, COLLAPSE_ERR_SHAPE,
          {"classifier: weight", "row_stride 4611686018427387904", "overflows int64"});
    const auto wb = buf(w.data(), COLLAPSE_F32, kV, kD);
    const auto bsquare = buf(bias.data(), COLLAPSE_F32, int64_t(1) << 32, (int64_t(1) << 32) + kV);
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &wb, &bsquare); }, COLLAPSE_ERR_SHAPE,
          {"bias shape [4294967296, 4294967302]", "overflows"});
}

TEST_F(BadInput, TransposedClassifierIsNamedAsSuch) {
    // [d, V] used to be taken as [V, d'] and the features were blamed for the width later.
    std::vector<float> wt((size_t)(kD * kV), 0.5f);
    const auto w = buf(wt.data(), COLLAPSE_F32, kD, kV);
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &w, nullptr); }, COLLAPSE_ERR_SHAPE,
          {"classifier", "[4, 6]", "looks transposed"});
    // A classifier set first fixes d; a batch of another width then says where d came from.
    std::vector<float> wide((size_t)(kV * (kD + 3)), 0.5f);
    const auto ww = buf(wide.data(), COLLAPSE_F32, kV, kD + 3);
    SessionPtr s = make_session(o);
    ASSERT_EQ(collapse_session_set_classifier(s.get(), &ww, nullptr), COLLAPSE_OK) << collapse_last_error();
    const auto f = A.features(), l = A.labels();
    expect_error(collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr), COLLAPSE_ERR_SHAPE,
                 {"features: width 4", "feature width 7", "the classifier's columns"});
}

TEST_F(BadInput, ClassifierTooLargeForFloat64Sums) {
    std::vector<double> w((size_t)(kV * kD));
    for (size_t i = 0; i < w.size(); ++i) w[i] = std::cos((double)i);
    std::vector<double> w_huge = w, w_sum = w;
    w_huge[(size_t)(2 * kD + 1)] = 1e200;  // its square alone is infinite
    for (double& v : w_sum) v = 1e150;      // each square is finite, two of them pass 1e300
    const auto wh = buf(w_huge.data(), COLLAPSE_F64, kV, kD), ws = buf(w_sum.data(), COLLAPSE_F64, kV, kD);
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &wh, nullptr); }, COLLAPSE_ERR_BAD_INPUT,
          {"classifier", "1e+200", "row 2", "column 1", "overflow"});
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &ws, nullptr); }, COLLAPSE_ERR_BAD_INPUT,
          {"classifier", "1e+150", "row 0", "column 1"});
    // Large but measurable weights are accepted and give a finite self-duality.
    std::vector<double> w_big = w;
    for (double& v : w_big) v *= 1e100;
    SessionPtr s = make_session(o);
    ingest_ok(s.get(), A);
    const auto wbig = buf(w_big.data(), COLLAPSE_F64, kV, kD);
    ASSERT_EQ(collapse_session_set_classifier(s.get(), &wbig, nullptr), COLLAPSE_OK) << collapse_last_error();
    const json doc = final_report(s.get());
    ASSERT_TRUE(doc["overall_analysis"]["nc3_self_duality"].is_number()) << doc["overall_analysis"].dump();
    EXPECT_TRUE(std::isfinite(doc["overall_analysis"]["nc3_self_duality"].get<double>()));
}

TEST_F(BadInput, ClassifierBiasHonoursItsRowStride) {
    // Bias [V, 1] with row_stride 2: every other element. It used to be read as if contiguous.
    collapse_options on = o;
    on.compute_nc4 = 1;
    std::vector<float> w((size_t)(kV * kD));
    for (size_t i = 0; i < w.size(); ++i) w[i] = (float)std::cos((double)i);
    // The gaps hold -1e6 but +1e6 at element 1: read flat, class 1 would win every NC4 argmax.
    std::vector<float> bias = {0.5f, -1.f, 2.f, 0.f, -3.f, 1.f}, strided((size_t)(2 * kV), -1e6f);
    strided[1] = 1e6f;
    for (int64_t i = 0; i < kV; ++i) strided[(size_t)(2 * i)] = bias[(size_t)i];
    const auto wb = buf(w.data(), COLLAPSE_F32, kV, kD);
    auto report = [&](const collapse_buffer& bb) {
        SessionPtr s = make_session(on);
        ingest_ok(s.get(), A);
        EXPECT_EQ(collapse_session_set_classifier(s.get(), &wb, &bb), COLLAPSE_OK) << collapse_last_error();
        return final_report(s.get());
    };
    const json want = report(buf(bias.data(), COLLAPSE_F32, kV));
    expect_same_json(report(buf(strided.data(), COLLAPSE_F32, kV, 1, 2)), want);
    // The flat reading of the same buffer is a different classifier: the comparison above can fail.
    EXPECT_NE(report(buf(strided.data(), COLLAPSE_F32, kV)).dump(), want.dump());
}

TEST_F(BadInput, DeviceMemoryOnTheCpuBackend) {
    const Batch b = make_batch(8, kD, kV, 32);
    const auto fd = buf(b.x.data(), COLLAPSE_F32, b.n, kD, 0, COLLAPSE_MEMORY_DEVICE);
    const auto ld = buf(b.y.data(), COLLAPSE_I32, b.n, 1, 0, COLLAPSE_MEMORY_DEVICE);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fd, &ld, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"cpu backend", "device memory"});
    // Mixed memory kinds in one batch.
    const auto l = b.labels();
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &fd, &l, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"labels", "memory kind"});
    const auto bogus = buf(b.x.data(), COLLAPSE_F32, b.n, kD, 0, (collapse_memory)5);
    check([&](collapse_session* s) { return collapse_session_ingest_rows(s, &bogus, &l, nullptr, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"features", "memory kind 5"});
    // The classifier must be host memory.
    std::vector<float> w((size_t)(kV * kD), 1.f);
    const auto wd = buf(w.data(), COLLAPSE_F32, kV, kD, 0, COLLAPSE_MEMORY_DEVICE);
    check([&](collapse_session* s) { return collapse_session_set_classifier(s, &wd, nullptr); },
          COLLAPSE_ERR_INVALID_ARGUMENT, {"classifier", "host memory"});
}

// ------------------------------------------------------------------------------------ empty input

TEST_F(BadInput, NoRowsAtAll) {
    SessionPtr s = make_session(o);
    const auto f = buf(nullptr, COLLAPSE_F32, 0, kD);
    const auto l = buf(nullptr, COLLAPSE_I32, 0);
    ASSERT_EQ(collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    const json doc = final_report(s.get());
    EXPECT_EQ(doc["counts"]["rows_seen"], 0);
    EXPECT_EQ(doc["counts"]["rows_kept"], 0);
    EXPECT_TRUE(doc["overall_analysis"]["overall_gnc2"].is_null());
    EXPECT_TRUE(doc["overall_analysis"]["overall_svd_entropy"].is_null());
    EXPECT_TRUE(doc["summary"]["avg_svd_entropy"].is_null());
    EXPECT_FALSE(doc["overall_analysis"]["notes"].empty()) << "a null report must say why";
    EXPECT_TRUE(doc["token_analysis"].empty());

    // And a session that never saw a batch.
    SessionPtr s2 = make_session(o);
    const json doc2 = final_report(s2.get());
    EXPECT_TRUE(doc2["overall_analysis"]["overall_gnc2"].is_null());
    EXPECT_FALSE(doc2["overall_analysis"]["notes"].empty());
}

TEST_F(BadInput, OnlyMaskedRows) {
    Batch b = make_batch(15, kD, kV, 33);
    b.valid.assign((size_t)b.n, 0);
    b.y[3] = -100;
    SessionPtr s = make_session(o);
    ingest_ok(s.get(), b);
    const json doc = final_report(s.get());
    EXPECT_EQ(doc["counts"]["rows_seen"], 15);
    EXPECT_EQ(doc["counts"]["rows_masked"], 15);
    EXPECT_EQ(doc["counts"]["rows_kept"], 0);
    EXPECT_EQ(doc["counts"]["classes_kept"], 0);
    for (const char* k : {"overall_gnc2", "overall_svd_entropy", "nc1_cdnv", "overall_unc3", "nc2_equinorm_cov"})
        EXPECT_TRUE(doc["overall_analysis"][k].is_null()) << k;
    EXPECT_FALSE(doc["overall_analysis"]["notes"].empty()) << doc["overall_analysis"].dump(1);

    // Sequences whose mask keeps nothing.
    Seq q = make_seq(2, 3, kD, kV, 34);
    q.mask.assign((size_t)(q.Bs * q.T), 0);
    SessionPtr s2 = make_session(o);
    ASSERT_EQ(ingest_seq(s2.get(), q), COLLAPSE_OK) << collapse_last_error();
    const json doc2 = final_report(s2.get());
    EXPECT_EQ(doc2["counts"]["rows_masked"], 4);
    EXPECT_TRUE(doc2["overall_analysis"]["overall_gnc2"].is_null());
    EXPECT_FALSE(doc2["overall_analysis"]["notes"].empty());
}

// ------------------------------------------------------------------------------------ call order

TEST_F(BadInput, ComputeTwice) {
    SessionPtr s = make_session(o);
    ingest_ok(s.get(), A);
    collapse_report* r1 = nullptr;
    ASSERT_EQ(collapse_session_compute(s.get(), &r1), COLLAPSE_OK);
    ReportPtr hold(r1);
    const json first = report_of(r1);
    collapse_report* r2 = nullptr;
    expect_error(collapse_session_compute(s.get(), &r2), COLLAPSE_ERR_STATE, {"compute", "already been computed"});
    EXPECT_EQ(r2, nullptr);
    // The first report is still whole and usable.
    double v = 0;
    int is_null = 1;
    ASSERT_EQ(collapse_report_get_scalar(r1, "counts.rows_seen", &v, &is_null), COLLAPSE_OK);
    EXPECT_EQ(v, 40);
    EXPECT_EQ(is_null, 0);
    expect_same_json(report_of(r1), first);
    int64_t ntok = 0;
    EXPECT_EQ(collapse_report_num_tokens(r1, &ntok), COLLAPSE_OK);
    EXPECT_EQ(ntok, (int64_t)first["token_analysis"].size());
}

TEST_F(BadInput, BeginSecondPassWhenNoneIsNeeded) {
    check([&](collapse_session* s) { return collapse_session_begin_second_pass(s); }, COLLAPSE_ERR_STATE,
          {"begin_second_pass", "no requested metric needs a second pass"});
}

TEST_F(BadInput, CallsAfterCompute) {
    SessionPtr s = make_session(o);
    ingest_ok(s.get(), A);
    const json first = final_report(s.get());
    const auto f = B.features(), l = B.labels();
    expect_error(collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr), COLLAPSE_ERR_STATE,
                 {"ingest_rows", "already been computed"});
    Seq q = make_seq(2, 3, kD, kV, 35);
    expect_error(ingest_seq(s.get(), q), COLLAPSE_ERR_STATE, {"ingest_sequences", "already been computed"});
    std::vector<float> w((size_t)(kV * kD), 1.f);
    const auto wb = buf(w.data(), COLLAPSE_F32, kV, kD);
    expect_error(collapse_session_set_classifier(s.get(), &wb, nullptr), COLLAPSE_ERR_STATE, {"set_classifier"});
    expect_error(collapse_session_begin_second_pass(s.get()), COLLAPSE_ERR_STATE, {"begin_second_pass"});
}

// ------------------------------------------------------------------------------------ options

TEST_F(BadInput, ExcludedIdOutOfRangeAtCreation) {
    int64_t excl[] = {1, kV + 4};
    o.exclude_token_ids = excl;
    o.num_exclude_token_ids = 2;
    collapse_session* s = nullptr;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT, {"exclude_token_ids", "10"});
    EXPECT_EQ(s, nullptr);
    int64_t neg[] = {-2};
    o.exclude_token_ids = neg;
    o.num_exclude_token_ids = 1;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT, {"exclude_token_ids", "-2"});
    o.exclude_token_ids = nullptr;
    o.num_exclude_token_ids = 3;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT, {"exclude_token_ids"});
    EXPECT_EQ(s, nullptr);
}

TEST_F(BadInput, StructSizeWrong) {
    o.struct_size = sizeof(collapse_options) - 8;
    collapse_session* s = nullptr;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT,
                 {"struct_size", std::to_string(sizeof(collapse_options) - 8), std::to_string(sizeof(collapse_options))});
    EXPECT_EQ(s, nullptr);
    o.struct_size = 0;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT, {"struct_size"});
    expect_error(collapse_session_create(nullptr, &s), COLLAPSE_ERR_INVALID_ARGUMENT, {"options"});
    o = opts(kV);
    expect_error(collapse_session_create(&o, nullptr), COLLAPSE_ERR_INVALID_ARGUMENT, {"out"});
    o.num_classes = 0;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT, {"num_classes"});
}

TEST_F(BadInput, CudaBackendOnThisBuild) {
    if (collapse_backend_available("cuda")) GTEST_SKIP() << "a usable CUDA device is present";
    o.backend = COLLAPSE_BACKEND_CUDA;
    collapse_session* s = nullptr;
    expect_error(collapse_session_create(&o, &s), COLLAPSE_ERR_NO_CUDA, {"cuda"});
    EXPECT_EQ(s, nullptr);
}

// ------------------------------------------------------------------------------------ memory limits

TEST_F(BadInput, HostMemoryLimitTooSmallForAccumulators) {
    // V x d float64 sums alone are 1024 * 256 * 8 = 2 MiB; the limit is 1 MiB (the minimum).
    collapse_options big = opts(1024);
    big.dim = 256;
    big.host_memory_limit = int64_t(1) << 20;
    collapse_session* s = nullptr;
    expect_error(collapse_session_create(&big, &s), COLLAPSE_ERR_OUT_OF_MEMORY, {"host_memory_limit", "1 MiB", "MiB", "V = 1024", "d = 256"});
    EXPECT_EQ(s, nullptr);

    // Width unknown at creation: the first batch finds out, and is refused without a crash.
    big.dim = 0;
    SessionPtr lazy = make_session(big);
    const Batch b = make_batch(4, 256, 1024, 36);
    const auto f = b.features(), l = b.labels();
    expect_error(collapse_session_ingest_rows(lazy.get(), &f, &l, nullptr, nullptr), COLLAPSE_ERR_OUT_OF_MEMORY,
                 {"host_memory_limit", "1 MiB"});
    // A narrower batch still fits: the refused one fixed nothing.
    const Batch narrow = make_batch(50, 8, 1024, 37);
    ingest_ok(lazy.get(), narrow);
    const json doc = final_report(lazy.get());
    EXPECT_EQ(doc["engine"]["dim"], 8);
    EXPECT_EQ(doc["counts"]["rows_seen"], 50);
}

// The exact row store spills beyond its share of host_memory_limit (tests/cpu/test_row_store.cpp
// checks the spill itself); only a single batch larger than the whole limit is refused.
TEST_F(BadInput, HostMemoryLimitTooSmallForOneBatch) {
    // Accumulators ~35 KiB; each stored row is d * 8 = 512 bytes (float64), so 1 MiB holds about 1950 rows.
    const int64_t V = 4, d = 64;
    collapse_options m = opts(V);
    m.host_memory_limit = int64_t(1) << 20;
    const std::string dir = testing::TempDir() + "/bad_input_spill";
    std::snprintf(m.intermediate_save_dir, sizeof m.intermediate_save_dir, "%s", dir.c_str());
    const Batch first = make_batch(1000, d, V, 38);
    const Batch big = make_batch(1500, d, V, 39);
    const Batch too_big = make_batch(2500, d, V, 41);
    const Batch small = make_batch(250, d, V, 40);
    SessionPtr s = make_session(m);
    ingest_ok(s.get(), first);
    ingest_ok(s.get(), big);  // more than the store's memory share: spilled
    const auto f = too_big.features(), l = too_big.labels();
    expect_error(collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr), COLLAPSE_ERR_OUT_OF_MEMORY,
                 {"would need", "host_memory_limit = 1 MiB"});
    // The session keeps working: a smaller batch fits, and the report equals an unlimited run's.
    ingest_ok(s.get(), small);
    json got = final_report(s.get());
    collapse_options unlimited = opts(V);
    SessionPtr ref = make_session(unlimited);
    ingest_ok(ref.get(), first);
    ingest_ok(ref.get(), big);
    ingest_ok(ref.get(), small);
    json want = final_report(ref.get());
    EXPECT_GT(got["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0);
    EXPECT_EQ(want["engine"]["row_store"]["spilled_bytes"], 0);
    for (json* j : {&got, &want}) j->erase("config"), (*j)["engine"].erase("row_store");  // the limits differ, nothing else may
    expect_same_json(got, want);
    EXPECT_EQ(got["counts"]["rows_seen"], 2750);

    // Sampled mode with the same limit takes all of it.
    m.svd_mode = COLLAPSE_SVD_SAMPLED;
    m.svd_max_rows_per_token = 64;
    SessionPtr s3 = make_session(m);
    ingest_ok(s3.get(), first);
    ingest_ok(s3.get(), too_big);
    ingest_ok(s3.get(), small);
    EXPECT_EQ(final_report(s3.get())["counts"]["rows_seen"], 3750);
}

// ------------------------------------------------------------------------------------ config files

class BadConfigFile : public testutil::TempDirTest {};

TEST_F(BadConfigFile, FifoIsRefusedWithoutBlocking) {
    // Before the fix fopen() waited forever for a writer.
    const std::string p = path("config.yaml");
    ASSERT_EQ(::mkfifo(p.c_str(), 0600), 0);
    testutil::expect_error([&] { collapse::internal::load_yaml_file(p); }, {"config file", p, "FIFO"});
}

TEST_F(BadConfigFile, DevZeroIsRefusedNotReadForever) {
    testutil::expect_error([&] { collapse::internal::load_yaml_file("/dev/zero"); },
                           {"config file", "/dev/zero", "character device"});
}

TEST_F(BadConfigFile, OversizedFileIsRefused) {
    const std::string p = path("big.yaml");
    testutil::write_file(p, "batch_rows: 1024\n");
    ASSERT_EQ(::truncate(p.c_str(), (off_t)(17u << 20)), 0);  // sparse: costs no disk
    testutil::expect_error([&] { collapse::internal::load_yaml_file(p); }, {"config file", p, "17825792 bytes", "16 MiB"});
    testutil::write_file(p, "batch_rows: 1024\n");
    EXPECT_EQ(collapse::internal::load_yaml_file(p).batch_rows, 1024);
}

}  // namespace
}  // namespace test_bad_input

// Text that is not UTF-8 (legal in POSIX paths) made every JSON of the report fail with
// COLLAPSE_ERR_INTERNAL, after the compute had used the session up: input paths and the command are
// now written with U+FFFD for such bytes; a spill directory, which checkpoints record and a resume
// reads back, is refused when the session is created.
TEST(BadInputText, TextThatIsNotUtf8) {
    collapse_options o;
    ASSERT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = 3;
    std::snprintf(o.intermediate_save_dir, sizeof o.intermediate_save_dir, "%s", (::testing::TempDir() + "caf\xe9").c_str());
    collapse_session* s = nullptr;
    EXPECT_NE(collapse_session_create(&o, &s), COLLAPSE_OK);
    EXPECT_EQ(s, nullptr);
    EXPECT_NE(std::string(collapse_last_error()).find("intermediate_save_dir"), std::string::npos) << collapse_last_error();

    const std::string dir = ::testing::TempDir();
    const std::string features = dir + "caf\xe9_features.npy", labels = dir + "caf\xe9_labels.npy";
    const float x[6] = {1, 2, 3, 4, 5, 7};
    const int64_t y[3] = {0, 1, 1};
    collapse::internal::io::write_npy(features, COLLAPSE_F32, {3, 2}, x);
    collapse::internal::io::write_npy(labels, COLLAPSE_I64, {3}, y);
    collapse_analysis a;
    std::memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.features = features.c_str();
    a.labels = labels.c_str();
    a.command = "caf\xe9 --run";
    collapse_report* r = nullptr;
    ASSERT_EQ(collapse_analyze_files(&a, &r), COLLAPSE_OK) << collapse_last_error();
    const char* text = nullptr;
    ASSERT_EQ(collapse_report_json(r, &text), COLLAPSE_OK) << collapse_last_error();
    const nlohmann::json doc = nlohmann::json::parse(text);
    EXPECT_NE(doc.dump().find("caf\xEF\xBF\xBD_features.npy"), std::string::npos);  // the byte became U+FFFD
    EXPECT_EQ(doc["counts"]["rows_seen"], 3);
    collapse_report_destroy(r);
    std::remove(features.c_str());
    std::remove(labels.c_str());
}
