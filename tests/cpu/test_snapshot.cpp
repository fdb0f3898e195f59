// Live snapshots (collapse_session_snapshot, collapse::Session::snapshot), CPU backend.
//
//  1. A snapshot after N rows equals the compute of a fresh session given exactly those N rows
//     (every key of the report but timings, bit for bit), for several N; the session then goes on,
//     and its final compute equals that of one session given all rows: a snapshot consumes nothing
//     (row store, spilled segments, reservoirs, held-back Gram rows, the second pass after it).
//  2. Configurations whose metrics need the second pass: those are null in a snapshot with the note
//     "needs the second pass; not in a snapshot"; everything else is there.
//  3. Refusals (COLLAPSE_ERR_STATE with a message) in the second pass and after compute; the
//     session stays usable.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.hpp"
#include "common/capi_helpers.hpp"
#include "common/compare.hpp"
#include "common/file_helpers.hpp"

namespace test_snapshot {
namespace {

using nlohmann::json;
using testutil::ReportPtr;
using testutil::SessionPtr;

constexpr int64_t kV = 48;
constexpr int64_t kD = 8;
constexpr int64_t kSpillD = 64;  // 1600 rows x 64 x 8 bytes: beyond the row store's share of 1 MiB
constexpr const char* kNote = "needs the second pass; not in a snapshot";
const std::vector<int64_t> kBatchRows = {120, 310, 45, 260, 200, 380, 90, 195};  // 1600 rows
const std::vector<int64_t> kExclude = {5};

struct Data {
    int64_t n = 0, d = kD;
    std::vector<float> x;
    std::vector<int32_t> y;
    std::vector<int64_t> start;  // batch offsets, kBatchRows.size() + 1
    std::vector<float> w, b;     // classifier [V, d], bias [V]
};

// Zipf-like labels over classes 0..39 and a few rare classes (40..47, 7 rows each, spread out) that
// cross min_samples_per_token between snapshots: the held-back Gram rows are in play.
Data make_data(uint32_t seed, int64_t d = kD) {
    Data D;
    D.d = d;
    D.start.push_back(0);
    for (int64_t r : kBatchRows) D.start.push_back(D.start.back() + r);
    D.n = D.start.back();
    std::mt19937 rng(seed);
    std::vector<double> wts;
    for (int c = 0; c < 40; ++c) wts.push_back(1.0 / std::pow(c + 1.0, 0.9));
    std::discrete_distribution<int32_t> freq(wts.begin(), wts.end());
    D.y.resize((size_t)D.n);
    for (auto& v : D.y) v = freq(rng);
    for (int32_t c = 40; c < kV; ++c)
        for (int k = 0; k < 7; ++k) D.y[(size_t)((k * D.n / 7 + 13 * (c - 40) + 5) % D.n)] = c;
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> mean((size_t)(kV * d));
    for (auto& m : mean) m = 2.0 * nd(rng);
    D.x.resize((size_t)(D.n * d));
    for (int64_t i = 0; i < D.n; ++i)
        for (int64_t k = 0; k < d; ++k) D.x[(size_t)(i * d + k)] = (float)(mean[(size_t)(D.y[(size_t)i] * d + k)] + nd(rng));
    D.w.resize((size_t)(kV * d));
    D.b.resize((size_t)kV);
    for (size_t k = 0; k < D.w.size(); ++k) D.w[k] = (float)(mean[k] + 0.5 * nd(rng));
    for (auto& v : D.b) v = (float)(0.1 * nd(rng));
    return D;
}

collapse_options base_options() {
    collapse_options o = collapse::default_options();
    o.num_classes = kV;
    o.exclude_token_ids = kExclude.data();
    o.num_exclude_token_ids = (int64_t)kExclude.size();
    o.min_samples_per_token = 5;
    o.svd_mode = COLLAPSE_SVD_EXACT;
    return o;
}

SessionPtr make_session(const collapse_options& o, const Data& D, bool classifier) {
    collapse_session* s = nullptr;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    SessionPtr p(s);
    if (p && classifier) {
        const collapse_buffer w{D.w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, D.d, 0};
        const collapse_buffer b{D.b.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, 1, 0};
        EXPECT_EQ(collapse_session_set_classifier(p.get(), &w, &b), COLLAPSE_OK) << collapse_last_error();
    }
    return p;
}

void ingest(collapse_session* s, const Data& D, size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; ++b) {
        const int64_t r0 = D.start[b], n = D.start[b + 1] - r0;
        const collapse_buffer f{D.x.data() + r0 * D.d, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, D.d, 0};
        const collapse_buffer l{D.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
        ASSERT_EQ(collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    }
}

json snapshot(collapse_session* s) {
    collapse_report* r = nullptr;
    const collapse_status st = collapse_session_snapshot(s, &r);
    EXPECT_EQ(st, COLLAPSE_OK) << collapse_last_error();
    if (st != COLLAPSE_OK) return json();
    ReportPtr hold(r);
    return testutil::report_json(r);
}

// The two-pass protocol of the CLI: the second pass when the session asks for it, then compute.
json finish(collapse_session* s, const Data& D) {
    int needed = 0;
    EXPECT_EQ(collapse_session_needs_second_pass(s, &needed), COLLAPSE_OK);
    if (needed) {
        EXPECT_EQ(collapse_session_begin_second_pass(s), COLLAPSE_OK) << collapse_last_error();
        ingest(s, D, 0, kBatchRows.size());
    }
    return testutil::final_report(s);
}

// What legitimately differs between runs compared: the spill statistics when rows spilled.
json comparable(json j, bool spill) {
    if (spill) j["engine"].erase("row_store");
    return j;
}

struct Case {
    const char* name;
    std::function<collapse_options()> options;
    bool classifier;
    bool nc4_second_pass;   // NC4 only from a second pass: null in a snapshot
    bool gram_second_pass;  // the Gram of a cut kept set only from a second pass
    bool spill;             // rows spill to disk; compared to 1e-12 relative
};

class Snapshot : public testutil::TempDirTest, public ::testing::WithParamInterface<Case> {};

TEST_P(Snapshot, EqualsFreshSessionOnTheSameRowsAndConsumesNothing) {
    const Case& tc = GetParam();
    const Data D = make_data(3, tc.spill ? kSpillD : kD);
    collapse_options o = tc.options();
    if (tc.spill) {
        o.host_memory_limit = 1 << 20;
        std::snprintf(o.intermediate_save_dir, sizeof o.intermediate_save_dir, "%s", path("spill").c_str());
    }
    const double rel = tc.spill ? 1e-12 : 0.0;

    SessionPtr s = make_session(o, D, tc.classifier);
    size_t done = 0;
    for (size_t upto : {size_t(0), size_t(1), size_t(3), size_t(6)}) {
        SCOPED_TRACE("snapshot after batch " + std::to_string(upto));
        ingest(s.get(), D, done, upto);
        done = upto;
        const json got = snapshot(s.get());
        ASSERT_FALSE(got.is_null());
        EXPECT_EQ(got["counts"]["rows_seen"], D.start[upto]);
        // Twice in a row: the same report.
        testutil::expect_same_json(snapshot(s.get()), got, 0.0);
        // A fresh session given exactly those rows, computed without a second pass.
        SessionPtr f = make_session(o, D, tc.classifier);
        ingest(f.get(), D, 0, upto);
        json want = testutil::final_report(f.get());
        json snap = got;
        if (upto > 0) {
            const json& oa = snap["overall_analysis"];
            EXPECT_EQ(oa["nc4_agreement"].is_null() && oa["notes"].value("nc4_agreement", "") == kNote, tc.nc4_second_pass)
                << oa.dump(1);
            EXPECT_EQ(oa["overall_svd_entropy"].is_null() && oa["notes"].value("overall_svd_entropy", "") == kNote,
                      tc.gram_second_pass)
                << oa.dump(1);
            // The fresh compute names the second pass its own way; the rest must agree.
            for (json* j : {&snap, &want}) {
                auto& notes = (*j)["overall_analysis"]["notes"];
                if (tc.nc4_second_pass) notes.erase("nc4_agreement");
                if (tc.gram_second_pass) notes.erase("overall_svd_entropy"), notes.erase("overall_effective_rank");
                if (tc.gram_second_pass) notes.erase("nc1_pinv"), notes.erase("nc1_svd"), notes.erase("nc1_quot");  // Sigma_W of the cut kept set
            }
        }
        testutil::expect_same_json(comparable(snap, tc.spill), comparable(want, tc.spill), rel);
    }
    ingest(s.get(), D, done, kBatchRows.size());
    const json last = snapshot(s.get());
    EXPECT_EQ(last["counts"]["rows_seen"], D.n);

    // The session that took snapshots ends like one that never did.
    SessionPtr ref = make_session(o, D, tc.classifier);
    ingest(ref.get(), D, 0, kBatchRows.size());
    const json want = finish(ref.get(), D);
    const json got = finish(s.get(), D);
    ASSERT_FALSE(got.is_null());
    EXPECT_EQ(got["counts"]["rows_seen"], D.n);
    if (tc.nc4_second_pass) EXPECT_FALSE(got["overall_analysis"]["nc4_agreement"].is_null());
    if (tc.gram_second_pass) EXPECT_FALSE(got["overall_analysis"]["overall_svd_entropy"].is_null());
    if (tc.spill) EXPECT_GT(got["engine"]["row_store"]["spilled_bytes"].get<int64_t>(), 0);
    testutil::expect_same_json(comparable(got, tc.spill), comparable(want, tc.spill), rel);
}

collapse_options exact_nc4() {
    collapse_options o = base_options();
    o.compute_nc4 = 1;  // from the row store: no second pass
    return o;
}
collapse_options sampled() {
    collapse_options o = base_options();
    o.svd_mode = COLLAPSE_SVD_SAMPLED;
    o.svd_max_rows_per_token = 12;
    o.seed = 99;
    return o;
}
collapse_options exact_max_tokens() {
    collapse_options o = base_options();
    o.max_tokens_to_analyze = 15;  // the Gram from the row store
    return o;
}
collapse_options svd_off() {
    collapse_options o = base_options();
    o.svd_mode = COLLAPSE_SVD_OFF;
    return o;
}
collapse_options sampled_nc4() {
    collapse_options o = sampled();
    o.compute_nc4 = 1;
    return o;
}
collapse_options sampled_max_tokens_nc4() {
    collapse_options o = sampled_nc4();
    o.max_tokens_to_analyze = 15;
    return o;
}
collapse_options exact_center() {
    collapse_options o = exact_nc4();
    o.svd_center = 1;
    return o;
}

INSTANTIATE_TEST_SUITE_P(
    Modes, Snapshot,
    ::testing::Values(Case{"exact_nc4_classifier", exact_nc4, true, false, false, false},
                      Case{"sampled", sampled, true, false, false, false},
                      Case{"exact_max_tokens", exact_max_tokens, false, false, false, false},
                      Case{"svd_off", svd_off, true, false, false, false},
                      Case{"sampled_nc4_second_pass", sampled_nc4, true, true, false, false},
                      Case{"sampled_max_tokens_nc4_second_pass", sampled_max_tokens_nc4, true, true, true, false},
                      Case{"exact_spilled_centered", exact_center, true, false, false, true}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// The C++ wrapper, and the refusals: in the second pass and after compute, COLLAPSE_ERR_STATE with a
// message; the session stays usable and ends as if they had not been tried.
TEST(SnapshotRefusal, SecondPassAndAfterCompute) {
    const Data D = make_data(4);
    const collapse_options o = sampled_nc4();
    SessionPtr ref = make_session(o, D, true);
    ingest(ref.get(), D, 0, kBatchRows.size());
    const json want = finish(ref.get(), D);

    collapse::Session s(o);
    const collapse_buffer bias = collapse::host_buffer(D.b.data(), COLLAPSE_F32, kV, 1);
    s.set_classifier(collapse::host_buffer(D.w.data(), kV, D.d), &bias);
    ingest(s.get(), D, 0, 2);
    const collapse::Report early = s.snapshot();
    EXPECT_EQ(early.value("counts.rows_seen"), (double)D.start[2]);
    EXPECT_FALSE(early.scalar("nc4_agreement").has_value());
    ingest(s.get(), D, 2, kBatchRows.size());
    ASSERT_TRUE(s.needs_second_pass());
    s.begin_second_pass();
    try {
        (void)s.snapshot();
        ADD_FAILURE() << "snapshot in the second pass was accepted";
    } catch (const collapse::ApiError& e) {
        EXPECT_EQ(e.status(), COLLAPSE_ERR_STATE);
        EXPECT_NE(std::string(e.what()).find("second pass"), std::string::npos) << e.what();
    }
    // A report taken earlier is unaffected by the rest of the session.
    EXPECT_EQ(early.value("counts.rows_seen"), (double)D.start[2]);
    ingest(s.get(), D, 0, kBatchRows.size());
    const collapse::Report fin = s.compute();
    json got = json::parse(fin.json());
    got["engine"].erase("timings_seconds");
    testutil::expect_same_json(got, want, 0.0);
    try {
        (void)s.snapshot();
        ADD_FAILURE() << "snapshot after compute was accepted";
    } catch (const collapse::ApiError& e) {
        EXPECT_EQ(e.status(), COLLAPSE_ERR_STATE);
        EXPECT_NE(std::string(e.what()).find("already been computed"), std::string::npos) << e.what();
    }
}

TEST(SnapshotRefusal, NullArguments) {
    collapse_report* r = nullptr;
    EXPECT_EQ(collapse_session_snapshot(nullptr, &r), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(r, nullptr);
    const Data D = make_data(5);
    SessionPtr s = make_session(base_options(), D, false);
    ingest(s.get(), D, 0, 1);
    EXPECT_EQ(collapse_session_snapshot(s.get(), nullptr), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find("out"), std::string::npos);
    // Still usable: a snapshot, then the final compute.
    EXPECT_EQ(snapshot(s.get())["counts"]["rows_seen"], D.start[1]);
    EXPECT_EQ(testutil::final_report(s.get())["counts"]["rows_seen"], D.start[1]);
}

}  // namespace
}  // namespace test_snapshot
