// Session checkpoints through the C API (collapse_session_save / load / merge), CPU backend.
//
//  1. Round trips: a session ingests some batches, saves; a NEW session loads, ingests the rest and
//     computes. Its report (minus engine.timings_seconds) must equal, bit for bit, the report of one
//     session over all batches: the state is restored exactly and ingest continues where it
//     stopped (reservoir decisions depend on the per-class row index, which is restored too).
//  2. Merges: rows split into 2 and 5 uneven shards (classes spread over shards, some classes below
//     min_samples_per_token in every shard but above it overall: the held-back Gram rows path).
//     Counts are exact; metrics within 1e-12 relative, because the float64 class sums and the Gram
//     are added in a different order (shard totals added together instead of one running sum).
//     Sampled mode: reservoirs are merged by weighted re-sampling, so per-token entropies of
//     sampled classes differ from one run; everything that comes from the sums and the Gram must
//     still agree, the reservoir size is bounded, and the merge is deterministic.
//  3. Refusals: status code, a message naming the difference, and the session unchanged (proven:
//     the refused session goes on and its report equals that of a session that never tried).
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"
#include "common/file_helpers.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "io/checkpoint_file.hpp"

#include "common/capi_helpers.hpp"

#include "common/compare.hpp"

namespace test_checkpoint_session {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// ------------------------------------------------------------------------------------ helpers

using testutil::ReportPtr;
using testutil::SessionPtr;

constexpr int64_t kV = 64;
constexpr int64_t kD = 10;
constexpr int64_t kMinSamples = 6;
// Batch sizes (rows) of the data set; shards are runs of whole batches, so a single session can
// ingest exactly the same batches (and engine.batches agrees).
const std::vector<int64_t> kBatchRows = {250, 410, 90, 380, 300, 520, 170, 330, 200, 350};  // 3000 rows
// Rare classes: 8 rows each, spread evenly over the rows: below min_samples_per_token (6) in every
// shard used below, above it overall.
constexpr int32_t kRareFirst = 40, kRareLast = 47;
// Classes with 3 rows in all: below min_samples_per_token overall.
constexpr int32_t kTinyFirst = 48, kTinyLast = 51;
const std::vector<int64_t> kExclude = {3, 41};

struct Data {
    int64_t n = 0, d = 0;
    std::vector<float> x;
    std::vector<int32_t> y;
    std::vector<int64_t> batch_start;  // kBatchRows.size() + 1 offsets
};

Data make_data(int64_t d, uint32_t seed) {
    Data D;
    D.d = d;
    for (int64_t r : kBatchRows) D.n += r;
    D.batch_start.push_back(0);
    for (int64_t r : kBatchRows) D.batch_start.push_back(D.batch_start.back() + r);
    const int64_t N = D.n;
    std::mt19937 rng(seed);
    // Frequent classes 0..39 with Zipf-like weights.
    std::vector<double> w;
    for (int c = 0; c < 40; ++c) w.push_back(1.0 / std::pow(c + 1.0, 0.8));
    std::discrete_distribution<int32_t> freq(w.begin(), w.end());
    D.y.resize((size_t)N);
    for (auto& v : D.y) v = freq(rng);
    std::vector<uint8_t> taken((size_t)N, 0);
    auto place = [&](int32_t c, int64_t count, int64_t phase) {
        for (int64_t k = 0; k < count; ++k) {
            int64_t p = (int64_t)(((double)k + 0.5) * (double)N / (double)count) + phase;
            while (taken[(size_t)(p % N)]) ++p;
            p %= N;
            taken[(size_t)p] = 1;
            D.y[(size_t)p] = c;
        }
    };
    for (int32_t c = kRareFirst; c <= kRareLast; ++c) place(c, 8, 7 * (c - kRareFirst));
    for (int32_t c = kTinyFirst; c <= kTinyLast; ++c) place(c, 3, 11 * (c - kTinyFirst) + 3);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<double> mean((size_t)(kV * d));
    for (auto& m : mean) m = 2.0 * nd(rng);
    D.x.resize((size_t)(N * d));
    for (int64_t i = 0; i < N; ++i)
        for (int64_t k = 0; k < d; ++k)
            D.x[(size_t)(i * d + k)] = (float)(mean[(size_t)(D.y[(size_t)i] * d + k)] + nd(rng));
    return D;
}

struct Classifier {
    std::vector<float> w, b;
};

Classifier make_classifier(int64_t d, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    Classifier c;
    c.w.resize((size_t)(kV * d));
    c.b.resize((size_t)kV);
    for (auto& v : c.w) v = nd(rng);
    for (auto& v : c.b) v = 0.1f * nd(rng);
    return c;
}

collapse_options base_options() {
    collapse_options o;
    EXPECT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = kV;
    o.exclude_token_ids = kExclude.data();
    o.num_exclude_token_ids = (int64_t)kExclude.size();
    o.min_samples_per_token = kMinSamples;
    o.svd_mode = COLLAPSE_SVD_EXACT;
    return o;
}

collapse_options sampled_options() {
    collapse_options o = base_options();
    o.svd_mode = COLLAPSE_SVD_SAMPLED;
    o.svd_max_rows_per_token = 16;
    o.seed = 12345;
    return o;
}

SessionPtr make_session(const collapse_options& o, const Classifier* clf) {
    collapse_session* s = nullptr;
    const collapse_status st = collapse_session_create(&o, &s);
    EXPECT_EQ(st, COLLAPSE_OK) << collapse_last_error();
    SessionPtr p(s);
    if (p && clf) {
        const int64_t d = (int64_t)clf->w.size() / kV;
        const collapse_buffer w{clf->w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, d, 0};
        const collapse_buffer b{clf->b.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, 1, 0};
        EXPECT_EQ(collapse_session_set_classifier(p.get(), &w, &b), COLLAPSE_OK) << collapse_last_error();
    }
    return p;
}

// Ingests batches [b0, b1) of D.
void ingest(collapse_session* s, const Data& D, size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; ++b) {
        const int64_t r0 = D.batch_start[b], n = D.batch_start[b + 1] - r0;
        const collapse_buffer f{D.x.data() + r0 * D.d, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, D.d, 0};
        const collapse_buffer l{D.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
        ASSERT_EQ(collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    }
}

using testutil::final_report;  // the report minus engine.timings_seconds

// rel = 0: every number bit-identical; rel > 0: integers still exact, floats within rel relative.
void expect_same(const json& a, const json& b, double rel, const std::string& at = "") {
    testutil::expect_same_json(a, b, rel, 0.0, at);
}

using testutil::TempDirTest;

// The single-session reference over every batch.
json single_run(const collapse_options& o, const Classifier* clf, const Data& D) {
    SessionPtr s = make_session(o, clf);
    ingest(s.get(), D, 0, kBatchRows.size());
    return final_report(s.get());
}

// ------------------------------------------------------------------------------------ 1. round trips

struct RoundTripCase {
    const char* name;
    std::function<collapse_options()> options;
    bool classifier;
};

class CheckpointRoundTrip : public TempDirTest, public ::testing::WithParamInterface<RoundTripCase> {};

TEST_P(CheckpointRoundTrip, SaveLoadContinueEqualsOneSession) {
    const RoundTripCase& tc = GetParam();
    const Data D = make_data(kD, 1);
    const Classifier C = make_classifier(kD, 2);
    const Classifier* clf = tc.classifier ? &C : nullptr;
    const collapse_options o = tc.options();
    const json want = single_run(o, clf, D);
    ASSERT_FALSE(want.is_null());
    ASSERT_EQ(want["counts"]["rows_seen"], D.n);

    for (size_t split : {size_t(1), size_t(4), size_t(9)}) {
        SCOPED_TRACE("saved after batch " + std::to_string(split));
        const std::string ck = path("rt_" + std::to_string(split) + ".ckpt");
        {
            SessionPtr a = make_session(o, clf);
            ingest(a.get(), D, 0, split);
            ASSERT_EQ(collapse_session_save(a.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        }
        // The saved file is a valid container with the session's sections, no temp file left.
        {
            collapse::internal::io::CheckpointReader r(ck);
            EXPECT_TRUE(r.has("meta"));
            EXPECT_TRUE(r.has("class_sums"));
            EXPECT_EQ(r.has("gram"), o.compute_overall_metrics && o.max_tokens_to_analyze == 0);
            EXPECT_EQ(r.has("store_rows"), o.svd_mode != COLLAPSE_SVD_OFF);
        }
        for (const auto& e : fs::directory_iterator(dir_))
            EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
        // Classifier before the load (checked against the checkpoint's) for even splits, after it otherwise.
        SessionPtr b = make_session(o, split % 2 == 0 ? clf : nullptr);
        ASSERT_EQ(collapse_session_load(b.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        if (clf && split % 2 != 0) {
            const collapse_buffer w{clf->w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, kD, 0};
            const collapse_buffer bb{clf->b.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, 1, 0};
            ASSERT_EQ(collapse_session_set_classifier(b.get(), &w, &bb), COLLAPSE_OK) << collapse_last_error();
        }
        ingest(b.get(), D, split, kBatchRows.size());
        expect_same(final_report(b.get()), want, 0.0);
    }

    // Saved after every batch: load and compute gives the same report.
    {
        const std::string ck = path("all.ckpt");
        SessionPtr a = make_session(o, clf);
        ingest(a.get(), D, 0, kBatchRows.size());
        ASSERT_EQ(collapse_session_save(a.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        // Saving does not disturb the session that saved.
        expect_same(final_report(a.get()), want, 0.0);
        SessionPtr b = make_session(o, clf);
        ASSERT_EQ(collapse_session_load(b.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        expect_same(final_report(b.get()), want, 0.0);
        // Saving twice over the same path replaces the file; a chain save -> load -> save -> load holds.
        SessionPtr c = make_session(o, clf);
        ASSERT_EQ(collapse_session_load(c.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        ASSERT_EQ(collapse_session_save(c.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        SessionPtr e = make_session(o, clf);
        ASSERT_EQ(collapse_session_load(e.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        expect_same(final_report(e.get()), want, 0.0);
    }
}

collapse_options exact_with_nc4() {
    collapse_options o = base_options();
    o.compute_nc4 = 1;  // the exact row store serves NC4 without a second pass
    return o;
}
collapse_options no_overall() {
    collapse_options o = base_options();
    o.compute_overall_metrics = 0;
    return o;
}
collapse_options max_tokens() {
    collapse_options o = base_options();
    o.max_tokens_to_analyze = 20;  // no streamed Gram: the row store serves it
    return o;
}

collapse_options svd_off() {
    collapse_options o = base_options();
    o.svd_mode = COLLAPSE_SVD_OFF;  // no row store: only sums, counts, the Gram and held-back rows
    return o;
}

INSTANTIATE_TEST_SUITE_P(Modes, CheckpointRoundTrip,
                         ::testing::Values(RoundTripCase{"exact_classifier_bias_exclude_nc4", exact_with_nc4, true},
                                           RoundTripCase{"sampled", sampled_options, true},
                                           RoundTripCase{"no_overall_metrics", no_overall, true},
                                           RoundTripCase{"max_tokens_no_classifier", max_tokens, false},
                                           RoundTripCase{"svd_off", svd_off, true}),
                         [](const ::testing::TestParamInfo<RoundTripCase>& i) { return std::string(i.param.name); });

// ------------------------------------------------------------------------------------ 2. merges

// Shards as runs of batches: {first batch of each shard..., end}.
const std::vector<size_t> kTwoShards = {0, 4, 10};          // 1130 and 1870 rows
const std::vector<size_t> kFiveShards = {0, 1, 3, 6, 7, 10};  // 250, 500, 1200, 170, 880 rows

// One session per shard saves; a fresh session loads shard 1 and merges the rest.
json merged_run(const std::string& dir, const std::string& tag, const collapse_options& o, const Classifier* clf, const Data& D,
                const std::vector<size_t>& shards, std::vector<std::string>* files = nullptr) {
    std::vector<std::string> paths;
    for (size_t k = 0; k + 1 < shards.size(); ++k) {
        const std::string p = (fs::path(dir) / (tag + "_shard" + std::to_string(k) + ".ckpt")).string();
        SessionPtr s = make_session(o, clf);
        ingest(s.get(), D, shards[k], shards[k + 1]);
        EXPECT_EQ(collapse_session_save(s.get(), p.c_str()), COLLAPSE_OK) << collapse_last_error();
        paths.push_back(p);
    }
    SessionPtr m = make_session(o, clf);
    EXPECT_EQ(collapse_session_load(m.get(), paths[0].c_str()), COLLAPSE_OK) << collapse_last_error();
    for (size_t k = 1; k < paths.size(); ++k)
        EXPECT_EQ(collapse_session_merge(m.get(), paths[k].c_str()), COLLAPSE_OK) << collapse_last_error();
    if (files) *files = paths;
    return final_report(m.get());
}

// Per shard, how many rows of class c it holds.
int64_t count_in(const Data& D, int64_t r0, int64_t r1, int32_t c) {
    return std::count(D.y.begin() + r0, D.y.begin() + r1, c);
}

class CheckpointMerge : public TempDirTest {};

TEST_F(CheckpointMerge, ExactShardsEqualOneSession) {
    const Data D = make_data(kD, 3);
    const Classifier C = make_classifier(kD, 4);
    const collapse_options o = exact_with_nc4();
    const json want = single_run(o, &C, D);
    // The held-back path is really exercised: every rare class is below min_samples_per_token in
    // every shard, above it overall, and analysed in the single run.
    for (const auto* shards : {&kTwoShards, &kFiveShards})
        for (size_t k = 0; k + 1 < shards->size(); ++k)
            for (int32_t c = kRareFirst; c <= kRareLast; ++c) {
                const int64_t n = count_in(D, D.batch_start[(*shards)[k]], D.batch_start[(*shards)[k + 1]], c);
                ASSERT_LT(n, kMinSamples) << "class " << c << " shard " << k;
            }
    for (int32_t c = kRareFirst; c <= kRareLast; ++c) {
        if (c == 41) {
            EXPECT_FALSE(want["token_analysis"].contains("41")) << "excluded";
            continue;
        }
        EXPECT_TRUE(want["token_analysis"].contains(std::to_string(c))) << c;
    }
    EXPECT_EQ(want["counts"]["classes_below_min"], kTinyLast - kTinyFirst + 1);

    for (const auto* shards : {&kTwoShards, &kFiveShards}) {
        SCOPED_TRACE(std::to_string(shards->size() - 1) + " shards");
        std::vector<std::string> files;
        const json got = merged_run(dir_, "exact" + std::to_string(shards->size()), o, &C, D, *shards, &files);
        ASSERT_FALSE(got.is_null());
        // Counts: exactly.
        expect_same(got["counts"], want["counts"], 0.0, "counts");
        expect_same(got["engine"], want["engine"], 0.0, "engine");
        expect_same(got["config"], want["config"], 0.0, "config");
        // Metrics: float64 sums and the Gram are added in another order.
        expect_same(got, want, 1e-12);
        // Each shard's checkpoint holds rows of the rare classes in its held-back section.
        collapse::internal::io::CheckpointReader r(files[0]);
        ASSERT_TRUE(r.has("holdback_rows"));
        EXPECT_GT(r.section("holdback_rows").bytes, 0u);
    }
}

TEST_F(CheckpointMerge, SampledShardsBoundedDeterministicSameGeometry) {
    const Data D = make_data(kD, 5);
    const Classifier C = make_classifier(kD, 6);
    const collapse_options o = sampled_options();
    const int64_t cap = o.svd_max_rows_per_token;
    const json want = single_run(o, &C, D);
    for (const auto* shards : {&kTwoShards, &kFiveShards}) {
        SCOPED_TRACE(std::to_string(shards->size() - 1) + " shards");
        const json got = merged_run(dir_, "s" + std::to_string(shards->size()), o, &C, D, *shards);
        ASSERT_FALSE(got.is_null());
        expect_same(got["counts"], want["counts"], 0.0, "counts");
        expect_same(got["engine"], want["engine"], 0.0, "engine");
        // Everything from the class sums and the Gram.
        for (const char* k : {"overall_svd_entropy", "overall_effective_rank", "overall_gnc2", "gnc2_var", "gnc2_cov", "gnc2_pairs",
                              "gnc2_skipped_pairs", "overall_unc3", "unc3_mean_cos", "unc3_std_cos", "nc1_cdnv", "cdnv_skipped_pairs",
                              "nc2_equinorm_cov", "nc2_log_norm_std", "nc2_equiangular_mean", "nc2_equiangular_std",
                              "nc2_equiangular_ideal", "nc3_self_duality", "nc4_agreement", "nc4_rows"}) {
            ASSERT_TRUE(got["overall_analysis"].contains(k)) << k;
            expect_same(got["overall_analysis"][k], want["overall_analysis"][k], 1e-12, k);
        }
        for (const char* k : {"total_tokens_analyzed", "avg_samples_per_token", "min_samples", "max_samples"})
            expect_same(got["summary"][k], want["summary"][k], 0.0, k);
        // Tokens: the same set and counts; reservoirs bounded; classes that fit the reservoir
        // whole keep every row in order, so their entropies agree.
        ASSERT_EQ(got["token_analysis"].size(), want["token_analysis"].size());
        int sampled = 0, whole = 0;
        for (auto it = want["token_analysis"].begin(); it != want["token_analysis"].end(); ++it) {
            ASSERT_TRUE(got["token_analysis"].contains(it.key())) << it.key();
            const json& g = got["token_analysis"][it.key()];
            const json& w = it.value();
            EXPECT_EQ(g["num_samples"], w["num_samples"]) << it.key();
            const int64_t n = w["num_samples"].get<int64_t>();
            EXPECT_LE(g["svd_rows"].get<int64_t>(), cap) << it.key();
            EXPECT_EQ(g["svd_rows"].get<int64_t>(), std::min(n, cap)) << it.key();
            if (n <= cap) {
                ++whole;
                expect_same(g, w, 1e-12, "token " + it.key());
            } else {
                ++sampled;
                EXPECT_FALSE(g["svd_entropy"].is_null()) << it.key();
            }
        }
        EXPECT_GT(sampled, 3);
        EXPECT_GT(whole, 3);
        // Deterministic: the same merge again gives the same report, bit for bit.
        const json again = merged_run(dir_, "s2" + std::to_string(shards->size()), o, &C, D, *shards);
        expect_same(again, got, 0.0);
    }
}

// Merging into a session that has itself ingested rows (its shard) equals one session.
TEST_F(CheckpointMerge, MergeIntoIngestingSession) {
    const Data D = make_data(kD, 7);
    const Classifier C = make_classifier(kD, 8);
    const collapse_options o = base_options();
    const json want = single_run(o, &C, D);
    const std::string p = path("tail.ckpt");
    {
        SessionPtr s = make_session(o, &C);
        ingest(s.get(), D, 6, kBatchRows.size());
        ASSERT_EQ(collapse_session_save(s.get(), p.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    SessionPtr m = make_session(o, &C);
    ingest(m.get(), D, 0, 6);
    ASSERT_EQ(collapse_session_merge(m.get(), p.c_str()), COLLAPSE_OK) << collapse_last_error();
    expect_same(final_report(m.get()), want, 1e-12);
}

// ------------------------------------------------------------------------------------ 3. refusals

class CheckpointRefusal : public TempDirTest {
protected:
    void SetUp() override {
        TempDirTest::SetUp();
        D_ = make_data(kD, 9);
        C_ = make_classifier(kD, 10);
        ck_ = path("good.ckpt");
        SessionPtr s = make_session(base_options(), &C_);
        ingest(s.get(), D_, 0, 3);
        ASSERT_EQ(collapse_session_save(s.get(), ck_.c_str()), COLLAPSE_OK) << collapse_last_error();
        good_ = testutil::read_file(ck_);
        ASSERT_GT(good_.size(), 64u);
    }

    // A refused load or merge: status, message pieces, and the session unchanged: after it, the
    // session ingests `after` batches (from batch `from`) and its report equals the report of a
    // session with the same options that only ingested `from`.. batches and `before` ones.
    void expect_refused(const collapse_options& o, const Classifier* clf, bool merge, const std::string& file,
                        collapse_status status, const std::vector<std::string>& pieces, bool ingest_first = true) {
        SessionPtr s = make_session(o, clf);
        if (ingest_first) ingest(s.get(), D_, 0, 2);
        const collapse_status st =
            merge ? collapse_session_merge(s.get(), file.c_str()) : collapse_session_load(s.get(), file.c_str());
        const std::string msg = collapse_last_error();
        EXPECT_EQ(st, status) << msg;
        for (const auto& p : pieces) EXPECT_NE(msg.find(p), std::string::npos) << "message \"" << msg << "\" lacks \"" << p << "\"";
        ingest(s.get(), D_, ingest_first ? 2 : 0, kBatchRows.size());
        SessionPtr ref = make_session(o, clf);
        ingest(ref.get(), D_, 0, kBatchRows.size());
        expect_same(final_report(s.get()), final_report(ref.get()), 0.0);
    }

    // The good checkpoint rewritten through the container writer, each section's bytes passed
    // through `edit` first: valid checksums, whatever the content (a crafted file).
    // `retype` gives sections another element type; a one-dimensional section takes the length
    // its new bytes give.
    using Edit = std::function<void(const std::string& name, std::vector<char>& bytes)>;
    void rewrite(const std::string& out, const Edit& edit, const std::map<std::string, collapse_dtype>& retype = {},
                 const std::string& from = "") const {
        collapse::internal::io::CheckpointReader r(from.empty() ? ck_ : from);
        collapse::internal::io::CheckpointWriter w(out);
        for (const std::string& name : r.names()) {
            const auto sec = r.section(name);
            std::vector<char> bytes(static_cast<const char*>(sec.data), static_cast<const char*>(sec.data) + sec.bytes);
            edit(name, bytes);
            const collapse_dtype t = retype.count(name) ? retype.at(name) : (collapse_dtype)sec.dtype_code;
            std::vector<int64_t> shape = sec.shape;
            if (shape.size() == 1) shape = {(int64_t)(bytes.size() / collapse::internal::dtype_size(t))};
            w.add(name, t, shape, bytes.data(), bytes.size());
        }
        w.commit();
    }

    Data D_;
    Classifier C_;
    std::string ck_, good_;
};

TEST_F(CheckpointRefusal, DifferentV) {
    // V = 65: another data set is not needed, the labels fit.
    collapse_options o = base_options();
    o.num_classes = kV + 1;
    for (bool merge : {false, true}) {
        SCOPED_TRACE(merge ? "merge" : "load");
        expect_refused(o, nullptr, merge, ck_, COLLAPSE_ERR_INVALID_ARGUMENT, {"V = 64", "V = 65", ck_}, merge);
    }
}

TEST_F(CheckpointRefusal, DifferentDim) {
    // A session of width d + 1 (fixed by the options): refused before anything changes.
    collapse_options o = base_options();
    o.dim = kD + 1;
    for (bool merge : {false, true}) {
        SCOPED_TRACE(merge ? "merge" : "load");
        SessionPtr s = make_session(o, nullptr);
        const collapse_status st = merge ? collapse_session_merge(s.get(), ck_.c_str()) : collapse_session_load(s.get(), ck_.c_str());
        const std::string msg = collapse_last_error();
        EXPECT_EQ(st, COLLAPSE_ERR_SHAPE) << msg;
        EXPECT_NE(msg.find("d = 10"), std::string::npos) << msg;
        EXPECT_NE(msg.find("d = 11"), std::string::npos) << msg;
        // Unchanged: still width 11, and empty.
        const Data D11 = make_data(kD + 1, 11);
        ingest(s.get(), D11, 0, kBatchRows.size());
        SessionPtr ref = make_session(o, nullptr);
        ingest(ref.get(), D11, 0, kBatchRows.size());
        expect_same(final_report(s.get()), final_report(ref.get()), 0.0);
    }
    // After rows of width 11 (d from the first batch).
    collapse_options o2 = base_options();
    SessionPtr s = make_session(o2, nullptr);
    const Data D11 = make_data(kD + 1, 11);
    ingest(s.get(), D11, 0, 1);
    EXPECT_EQ(collapse_session_merge(s.get(), ck_.c_str()), COLLAPSE_ERR_SHAPE) << collapse_last_error();
}

TEST_F(CheckpointRefusal, DifferentStateAffectingKeys) {
    {
        collapse_options o = base_options();
        o.min_samples_per_token = kMinSamples + 1;
        for (bool merge : {false, true})
            expect_refused(o, &C_, merge, ck_, COLLAPSE_ERR_CONFIG, {"min_samples_per_token", "6", "7"}, merge);
    }
    {
        collapse_options o = base_options();
        o.svd_mode = COLLAPSE_SVD_SAMPLED;
        for (bool merge : {false, true}) expect_refused(o, &C_, merge, ck_, COLLAPSE_ERR_CONFIG, {"svd_mode", "exact", "sampled"}, merge);
    }
    {
        collapse_options o = base_options();
        const std::vector<int64_t> other = {3, 42};
        o.exclude_token_ids = other.data();
        o.num_exclude_token_ids = (int64_t)other.size();
        for (bool merge : {false, true}) expect_refused(o, &C_, merge, ck_, COLLAPSE_ERR_CONFIG, {"exclude_token_ids"}, merge);
    }
    {
        collapse_options o = base_options();
        o.compute_overall_metrics = 0;
        for (bool merge : {false, true}) expect_refused(o, &C_, merge, ck_, COLLAPSE_ERR_CONFIG, {"compute_overall_metrics"}, merge);
    }
    // A finalisation-only option (cdnv_power) may differ.
    {
        collapse_options o = base_options();
        o.cdnv_power = 2.0;
        SessionPtr s = make_session(o, &C_);
        EXPECT_EQ(collapse_session_load(s.get(), ck_.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
}

TEST_F(CheckpointRefusal, DifferentClassifier) {
    const Classifier other = make_classifier(kD, 99);
    for (bool merge : {false, true})
        expect_refused(base_options(), &other, merge, ck_, COLLAPSE_ERR_INVALID_ARGUMENT, {"classifier"}, merge);
    // The same weights with another bias are another classifier too.
    Classifier bias = C_;
    bias.b[5] += 1.0f;
    expect_refused(base_options(), &bias, false, ck_, COLLAPSE_ERR_INVALID_ARGUMENT, {"classifier"}, false);
}

// Regression (found by this test): a session without a classifier that loads shard A (made with
// classifier W1) must refuse to merge shard B (made with W2): the checkpoints' hashes are compared
// with each other, not only with the session's own classifier (`collapse merge` has none).
TEST_F(CheckpointRefusal, MergeOfShardsWithDifferentClassifiers) {
    const Classifier other = make_classifier(kD, 99);
    const std::string b = path("other_clf.ckpt");
    {
        SessionPtr s = make_session(base_options(), &other);
        ingest(s.get(), D_, 3, 6);
        ASSERT_EQ(collapse_session_save(s.get(), b.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    SessionPtr m = make_session(base_options(), nullptr);
    ASSERT_EQ(collapse_session_load(m.get(), ck_.c_str()), COLLAPSE_OK) << collapse_last_error();
    const collapse_status st = collapse_session_merge(m.get(), b.c_str());
    EXPECT_EQ(st, COLLAPSE_ERR_INVALID_ARGUMENT) << "merging shards made with different classifiers must be refused; got "
                                                 << st << " " << collapse_last_error();
    EXPECT_NE(std::string(collapse_last_error()).find("classifier"), std::string::npos) << collapse_last_error();
}

// Regression (same root cause): a session without a classifier that loads a checkpoint made with
// classifier C and saves it again must keep C's hash, so that a session with ANOTHER classifier
// refuses the re-saved checkpoint (this is what `collapse merge` produces).
TEST_F(CheckpointRefusal, ResavedCheckpointKeepsClassifierIdentity) {
    const std::string resaved = path("resaved.ckpt");
    {
        SessionPtr s = make_session(base_options(), nullptr);
        ASSERT_EQ(collapse_session_load(s.get(), ck_.c_str()), COLLAPSE_OK) << collapse_last_error();
        ASSERT_EQ(collapse_session_save(s.get(), resaved.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    const Classifier other = make_classifier(kD, 99);
    SessionPtr t = make_session(base_options(), &other);
    const collapse_status st = collapse_session_load(t.get(), resaved.c_str());
    EXPECT_EQ(st, COLLAPSE_ERR_INVALID_ARGUMENT) << "a checkpoint made with classifier C, re-saved by a session without one, "
                                                    "was accepted by a session with another classifier";
}

TEST_F(CheckpointRefusal, LoadIntoSessionWithRows) {
    SessionPtr s = make_session(base_options(), &C_);
    ingest(s.get(), D_, 0, 2);
    EXPECT_EQ(collapse_session_load(s.get(), ck_.c_str()), COLLAPSE_ERR_STATE) << collapse_last_error();
    EXPECT_NE(std::string(collapse_last_error()).find("already ingested"), std::string::npos) << collapse_last_error();
    ingest(s.get(), D_, 2, kBatchRows.size());
    expect_same(final_report(s.get()), single_run(base_options(), &C_, D_), 0.0);
    // After compute: save, load and merge are refused with COLLAPSE_ERR_STATE.
    EXPECT_EQ(collapse_session_save(s.get(), path("late.ckpt").c_str()), COLLAPSE_ERR_STATE);
    EXPECT_EQ(collapse_session_load(s.get(), ck_.c_str()), COLLAPSE_ERR_STATE);
    EXPECT_EQ(collapse_session_merge(s.get(), ck_.c_str()), COLLAPSE_ERR_STATE);
    EXPECT_FALSE(testutil::exists(path("late.ckpt")));
    // Save before any row: the width is unknown.
    SessionPtr e = make_session(base_options(), nullptr);
    EXPECT_EQ(collapse_session_save(e.get(), path("empty.ckpt").c_str()), COLLAPSE_ERR_STATE);
    EXPECT_FALSE(testutil::exists(path("empty.ckpt")));
}

TEST_F(CheckpointRefusal, NotACheckpoint) {
    const std::string p = path("text.ckpt");
    testutil::write_file(p, "this is not a checkpoint at all, just some text\n");
    for (bool merge : {false, true}) expect_refused(base_options(), &C_, merge, p, COLLAPSE_ERR_IO, {"not a collapse checkpoint", p}, merge);
    expect_refused(base_options(), &C_, false, path("missing.ckpt"), COLLAPSE_ERR_IO, {"missing.ckpt"}, false);
    // A valid container that is not a session checkpoint.
    const std::string q = path("foreign.ckpt");
    {
        collapse::internal::io::CheckpointWriter w(q);
        const std::string meta = R"({"format": "something-else"})";
        w.add("meta", COLLAPSE_U8, {(int64_t)meta.size()}, meta.data(), meta.size());
        w.commit();
    }
    expect_refused(base_options(), &C_, false, q, COLLAPSE_ERR_IO, {"not a collapse session checkpoint"}, false);
}

struct SectionSpan {
    std::string name;
    uint64_t offset, bytes;
};

// The section table, read from the raw bytes (layout in io/checkpoint_file.hpp).
std::vector<SectionSpan> sections_of(const std::string& bytes) {
    uint32_t count = 0;
    std::memcpy(&count, bytes.data() + 16, 4);
    std::vector<SectionSpan> out;
    for (uint32_t i = 0; i < count; ++i) {
        const char* t = bytes.data() + 64 + 96 * i;
        SectionSpan s;
        s.name.assign(t, strnlen(t, 32));
        std::memcpy(&s.offset, t + 72, 8);
        std::memcpy(&s.bytes, t + 80, 8);
        out.push_back(s);
    }
    return out;
}

TEST_F(CheckpointRefusal, CorruptSectionPayloads) {
    const std::vector<SectionSpan> secs = sections_of(good_);
    // Cross-check with the reader: same names, and section().data points at the offset.
    {
        collapse::internal::io::CheckpointReader r(ck_);
        std::vector<std::string> names;
        for (const auto& s : secs) names.push_back(s.name);
        ASSERT_EQ(r.names(), names);
        const auto meta = r.section(secs[0].name);
        const char* base = static_cast<const char*>(meta.data) - secs[0].offset;
        for (const auto& s : secs)
            if (s.bytes) EXPECT_EQ(static_cast<const char*>(r.section(s.name).data) - base, (ptrdiff_t)s.offset) << s.name;
    }
    std::set<std::string> expected = {"meta", "rows", "class_counts", "class_sums", "class_sqnorms", "gram",
                                      "holdback_ids", "holdback_counts", "holdback_rows", "store_offsets", "store_rows",
                                      "within_scatter", "within_shift", "class_sqdev"};  // Sigma_W, var_c about reference rows
    std::set<std::string> got;
    for (const auto& s : secs) got.insert(s.name);
    EXPECT_EQ(got, expected);
    const std::string bad = path("bad.ckpt");
    int flipped = 0;
    for (const auto& s : secs) {
        if (s.bytes == 0) continue;
        for (uint64_t at : {s.offset, s.offset + s.bytes / 2, s.offset + s.bytes - 1}) {
            SCOPED_TRACE(s.name + " byte " + std::to_string(at));
            std::string b = good_;
            b[at] ^= 0x10;
            testutil::write_file(bad, b);
            expect_refused(base_options(), &C_, at % 2 == 1, bad, COLLAPSE_ERR_IO, {"corrupt section " + s.name, "checksum", bad},
                           at % 2 == 1);
            ++flipped;
        }
    }
    EXPECT_GE(flipped, 30);
}

// Sections that are each well formed (valid checksums) but disagree with each other: rewritten
// through the container writer, every refusal names the sections.
TEST_F(CheckpointRefusal, InconsistentSections) {
    const std::string bad = path("inconsistent.ckpt");
    // A row moved from one class's store range to another's: totals agree, classes do not.
    rewrite(bad, [](const std::string& name, std::vector<char>& b) {
        if (name != "store_offsets") return;
        int64_t* off = reinterpret_cast<int64_t*>(b.data());
        int c = 0;
        while (off[c + 1] == off[c]) ++c;  // the first class with rows
        off[c + 1] -= 1;
    });
    expect_refused(base_options(), &C_, true, bad, COLLAPSE_ERR_IO, {"store_offsets", "class_counts", bad});
    // A held-back class id out of range.
    rewrite(bad, [](const std::string& name, std::vector<char>& b) {
        if (name == "holdback_ids" && !b.empty()) reinterpret_cast<int64_t*>(b.data())[0] = kV + 5;
    });
    expect_refused(base_options(), &C_, false, bad, COLLAPSE_ERR_IO, {"holdback_ids", "inconsistent", bad}, false);
    // A negative class count.
    rewrite(bad, [](const std::string& name, std::vector<char>& b) {
        if (name == "class_counts") reinterpret_cast<int64_t*>(b.data())[0] = -1;
    });
    expect_refused(base_options(), &C_, true, bad, COLLAPSE_ERR_IO, {"class_counts is negative", bad});
}

// Issue 15: checkpoints whose checksums are valid but whose content is not (crafted, or written by
// a bug) are refused naming the check, for load and merge alike, and change nothing; before these
// checks some of them overflowed the heap (holdback counts, store offsets) or read before the
// input (a negative position).
TEST_F(CheckpointRefusal, CraftedContentIsRefusedNamingTheCheck) {
    const std::string bad = path("crafted.ckpt");
    struct Case {
        std::string name;
        Edit edit;
        collapse_status status;
        std::vector<std::string> pieces;
        int modes = 3;  // 1: load into a new session, 2: merge into one with rows, 3: both
        std::map<std::string, collapse_dtype> retype = {};
        bool classifier = true;  // without one, a new session's width is still open
    };
    auto section = [](const std::string& which, std::function<void(std::vector<char>&)> f) -> Edit {
        return [which, f](const std::string& name, std::vector<char>& b) {
            if (name == which) f(b);
        };
    };
    auto meta = [](std::function<void(json&)> f) -> Edit {
        return [f](const std::string& name, std::vector<char>& b) {
            if (name != "meta") return;
            json j = json::parse(std::string(b.begin(), b.end()));
            f(j);
            const std::string t = j.dump();
            b.assign(t.begin(), t.end());
        };
    };
    auto i64 = [](std::vector<char>& b) { return reinterpret_cast<int64_t*>(b.data()); };
    auto f64 = [](std::vector<char>& b) { return reinterpret_cast<double*>(b.data()); };
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const int64_t big = std::numeric_limits<int64_t>::max();
    const std::vector<Case> cases = {
        {"negative rows", section("rows", [&](auto& b) { i64(b)[0] = -1; }), COLLAPSE_ERR_IO, {"rows seen is negative"}},
        {"masked beyond seen", section("rows", [&](auto& b) { i64(b)[1] = i64(b)[0] + 1; }), COLLAPSE_ERR_IO, {"exceed"}},
        {"counts disagree with rows", section("class_counts", [&](auto& b) { i64(b)[0] += 1; }), COLLAPSE_ERR_IO,
         {"class_counts adds up to"}},
        {"rows in an excluded class", section("class_counts", [&](auto& b) { i64(b)[0] -= 1, i64(b)[3] += 1; }), COLLAPSE_ERR_IO,
         {"excluded class 3"}},
        {"non-finite class sum", section("class_sums", [&](auto& b) { f64(b)[5] = nan; }), COLLAPSE_ERR_IO, {"class_sums", "non-finite"}},
        {"negative sum of squares", section("class_sqnorms", [&](auto& b) { f64(b)[0] = -1; }), COLLAPSE_ERR_IO, {"class_sqnorms"}},
        {"negative shifted sum of squares", section("class_sqdev", [&](auto& b) { f64(b)[0] = -1; }), COLLAPSE_ERR_IO, {"class_sqdev", "negative"}},
        {"non-finite reference row", section("within_shift", [&](auto& b) { reinterpret_cast<float*>(b.data())[2] = NAN; }), COLLAPSE_ERR_IO,
         {"within_shift", "non-finite"}},
        {"non-finite Gram", section("gram", [&](auto& b) { f64(b)[1] = INFINITY; }), COLLAPSE_ERR_IO, {"gram", "non-finite"}},
        {"held-back count", section("holdback_counts", [&](auto& b) { i64(b)[0] -= 1; }), COLLAPSE_ERR_IO,
         {"holdback_ids / holdback_counts", "inconsistent"}},
        {"held-back ids out of order", section("holdback_ids", [&](auto& b) { std::swap(i64(b)[0], i64(b)[1]); }), COLLAPSE_ERR_IO,
         {"holdback_ids", "inconsistent"}},
        {"non-finite held-back row", section("holdback_rows", [&](auto& b) { f64(b)[3] = nan; }), COLLAPSE_ERR_IO,
         {"holdback_rows", "non-finite"}},
        {"store offsets not from 0", section("store_offsets", [&](auto& b) { for (size_t k = 0; k < b.size() / 8; ++k) i64(b)[k] += 1; }),
         COLLAPSE_ERR_IO, {"store_offsets starts at 1"}},
        {"store offsets descending", section("store_offsets", [&](auto& b) { i64(b)[1] = -7; }), COLLAPSE_ERR_IO,
         {"store_offsets is not ascending"}},
        // Found only while the rows are copied in: the merge must roll the row store back.
        {"non-finite stored row", section("store_rows", [&](auto& b) { f64(b)[b.size() / 8 - 1] = nan; }), COLLAPSE_ERR_IO,
         {"store_rows", "non-finite"}},
        {"counts of another type", section("class_counts", [](auto&) {}), COLLAPSE_ERR_IO, {"class_counts has shape [64] and type float64"},
         3, {{"class_counts", COLLAPSE_F64}}},
        {"a shorter array", section("class_sqnorms", [](auto& b) { b.resize(b.size() - 8); }), COLLAPSE_ERR_IO,
         {"class_sqnorms has shape [63]"}},
        {"meta of another type", meta([](json& j) {
             for (j["pad"] = ""; j.dump().size() % 8 != 0;) j["pad"] = j["pad"].get<std::string>() + " ";
         }), COLLAPSE_ERR_IO,
         {"meta is not a byte string"}, 3, {{"meta", COLLAPSE_I64}}},
        {"negative input position", meta([](json& j) { j["input_position"] = -5; }), COLLAPSE_ERR_IO, {"input_position = -5", "negative"}},
        {"negative batches", meta([](json& j) { j["batches"] = -1; }), COLLAPSE_ERR_IO, {"batches = -1"}},
        {"negative skipped rows", meta([](json& j) { j["rows_skipped"] = -3; }), COLLAPSE_ERR_IO, {"rows_skipped"}},
        {"missing field", meta([](json& j) { j.erase("batches"); }), COLLAPSE_ERR_IO, {"\"batches\" is missing"}},
        {"field of another type", meta([](json& j) { j["batches"] = "7"; }), COLLAPSE_ERR_IO, {"batches", "not a 64-bit integer"}},
        {"field beyond int64", meta([](json& j) { j["input_position"] = UINT64_MAX; }), COLLAPSE_ERR_IO, {"not a 64-bit integer"}},
        {"newer meta version", meta([](json& j) { j["version"] = 2; }), COLLAPSE_ERR_IO, {"newer collapse", "version 2"}},
        {"not an object", meta([](json& j) { j = json::array({1, 2}); }), COLLAPSE_ERR_IO, {"not a collapse session checkpoint"}},
        {"not JSON", [](const std::string& name, std::vector<char>& b) { if (name == "meta") b.resize(b.size() / 2); }, COLLAPSE_ERR_IO,
         {"not JSON"}},
        // A width far beyond the arrays': refused before a backend of that size is made.
        {"huge width", meta([](json& j) { j["dim"] = int64_t(1) << 40; }), COLLAPSE_ERR_IO, {"class_sums has shape [64, 10]"}, 1, {}, false},
        {"zero width", meta([](json& j) { j["dim"] = 0; }), COLLAPSE_ERR_IO, {"d = 0"}},
        {"invalid config value", meta([](json& j) { j["config"]["svd_mode"] = "bogus"; }), COLLAPSE_ERR_CONFIG, {"svd_mode", "meta config"}},
        {"unknown config key", meta([](json& j) { j["config"]["no_such_key"] = 1; }), COLLAPSE_ERR_CONFIG, {"no_such_key"}},
        {"config disagrees with its V", meta([](json& j) { j["config"]["num_classes"] = 65; }), COLLAPSE_ERR_IO,
         {"state_config", "num_classes"}},
        {"state config disagrees", meta([](json& j) { j["state_config"]["seed"] = 99; }), COLLAPSE_ERR_IO, {"state_config", "seed"}},
        {"classifier hash not a hash", meta([](json& j) { j["classifier_hash"] = "abc"; }), COLLAPSE_ERR_IO, {"classifier_hash"}},
        {"skipped range reversed", meta([](json& j) { j["skipped_ranges"] = json::array({json::array({5, 2})}); }), COLLAPSE_ERR_IO,
         {"skipped range 0 [5, 2)"}},
        {"skipped range not a pair", meta([](json& j) { j["skipped_ranges"] = json::array({json::array({1})}); }), COLLAPSE_ERR_IO,
         {"skipped_ranges", "[1]"}},
        // Self-consistent shards whose totals do not fit together.
        {"rows overflow a merge", section("rows", [&](auto& b) { i64(b)[0] = big - 5, i64(b)[1] = big - 5 - 750; }), COLLAPSE_ERR_IO,
         {"rows seen", "overflows"}, 2},
        {"batches overflow a merge", meta([&](json& j) { j["batches"] = big; }), COLLAPSE_ERR_IO, {"batches", "overflows"}, 2},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.name);
        rewrite(bad, c.edit, c.retype);
        for (int mode : {1, 2}) {
            if (!(c.modes & mode)) continue;
            SCOPED_TRACE(mode == 1 ? "load" : "merge");
            std::vector<std::string> pieces = c.pieces;
            pieces.push_back(bad);
            expect_refused(base_options(), c.classifier ? &C_ : nullptr, mode == 2, bad, c.status, pieces, mode == 2);
        }
    }
    // The unedited rewrite loads: the refusals above come from the edits alone.
    rewrite(bad, [](const std::string&, std::vector<char>&) {});
    SessionPtr s = make_session(base_options(), &C_);
    EXPECT_EQ(collapse_session_load(s.get(), bad.c_str()), COLLAPSE_OK) << collapse_last_error();
}

// Issue 15: every byte of a checkpoint is covered by a check (header CRC, table CRC, section CRCs,
// zero padding, the meta inside a checksummed section): a small checkpoint with any one byte
// changed is refused, and the session that refused all of them is unchanged (it still loads the
// intact file and gives the same report as a session that only loaded that).
TEST_F(CheckpointRefusal, AnyByteChangedIsRefusedAndChangesNothing) {
    const std::string small = path("small.ckpt"), flip = path("flip.ckpt");
    {
        SessionPtr s = make_session(base_options(), &C_);
        ingest(s.get(), D_, 0, 1);
        ASSERT_EQ(collapse_session_save(s.get(), small.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    const std::string bytes = testutil::read_file(small);
    testutil::write_file(flip, bytes);
    const int fd = ::open(flip.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    SessionPtr s = make_session(base_options(), &C_);
    size_t accepted = 0, other_status = 0;
    for (size_t i = 0; i < bytes.size(); ++i) {
        const char changed = (char)(bytes[i] ^ (i % 2 ? 0x01 : 0xFF));
        ASSERT_EQ(::pwrite(fd, &changed, 1, (off_t)i), 1);
        const collapse_status st = i % 3 ? collapse_session_load(s.get(), flip.c_str()) : collapse_session_merge(s.get(), flip.c_str());
        if (st == COLLAPSE_OK && accepted++ < 5) ADD_FAILURE() << "byte " << i << " changed, and the checkpoint was accepted";
        if (st != COLLAPSE_OK && st != COLLAPSE_ERR_IO && other_status++ < 5)
            ADD_FAILURE() << "byte " << i << ": status " << st << " " << collapse_last_error();
        ASSERT_EQ(::pwrite(fd, &bytes[i], 1, (off_t)i), 1);
    }
    ::close(fd);
    EXPECT_EQ(accepted, 0u) << "of " << bytes.size() << " bytes";
    ASSERT_EQ(collapse_session_load(s.get(), flip.c_str()), COLLAPSE_OK) << collapse_last_error();
    SessionPtr ref = make_session(base_options(), &C_);
    ASSERT_EQ(collapse_session_load(ref.get(), small.c_str()), COLLAPSE_OK) << collapse_last_error();
    expect_same(final_report(s.get()), final_report(ref.get()), 0.0);
    RecordProperty("bytes_changed", (int)bytes.size());
}

TEST_F(CheckpointRefusal, CorruptHeaderTableAndMagic) {
    const std::string bad = path("bad.ckpt");
    auto try_bytes = [&](const std::string& b, const std::vector<std::string>& pieces, bool merge) {
        testutil::write_file(bad, b);
        expect_refused(base_options(), &C_, merge, bad, COLLAPSE_ERR_IO, pieces, merge);
    };
    {
        std::string b = good_;
        b[0] = 'X';
        try_bytes(b, {"not a collapse checkpoint"}, false);
    }
    {
        std::string b = good_;
        b[17] ^= 1;  // section count
        try_bytes(b, {"corrupt header"}, true);
    }
    {
        std::string b = good_;
        b[64 + 96 + 40] ^= 1;  // the second entry's shape
        try_bytes(b, {"corrupt section table"}, false);
    }
    // A newer version with nothing else fixed: the header CRC fails first.
    {
        std::string b = good_;
        const uint32_t v = 2;
        std::memcpy(&b[8], &v, 4);
        testutil::write_file(bad, b);
        SessionPtr s = make_session(base_options(), &C_);
        EXPECT_EQ(collapse_session_load(s.get(), bad.c_str()), COLLAPSE_ERR_IO);
        const std::string msg = collapse_last_error();
        EXPECT_TRUE(msg.find("corrupt header") != std::string::npos || msg.find("newer") != std::string::npos) << msg;
        // With the header CRC fixed up: a real newer file.
        const uint32_t crc = collapse::internal::crc32c(b.data(), 60);
        std::memcpy(&b[60], &crc, 4);
        try_bytes(b, {"newer collapse", "v2"}, false);
    }
    // Trailing bytes.
    try_bytes(good_ + std::string(64, '\0'), {"trailing bytes"}, false);
}

TEST_F(CheckpointRefusal, Truncated) {
    const std::vector<SectionSpan> secs = sections_of(good_);
    const std::string bad = path("trunc.ckpt");
    auto try_size = [&](size_t n, const std::vector<std::string>& pieces, bool merge) {
        SCOPED_TRACE("truncated to " + std::to_string(n) + " bytes");
        testutil::write_file(bad, good_.substr(0, n));
        expect_refused(base_options(), &C_, merge, bad, COLLAPSE_ERR_IO, pieces, merge);
    };
    try_size(0, {"truncated at header"}, false);
    try_size(5, {"truncated at header"}, true);
    try_size(40, {"truncated at header"}, false);
    try_size(64 + 50, {"truncated at section table"}, true);
    for (const auto& s : secs) {
        if (s.bytes == 0) continue;
        try_size(s.offset + s.bytes / 2, {"truncated at section " + s.name}, s.bytes % 2 == 0);
    }
    try_size(good_.size() - 1, {"truncated at section " + secs.back().name}, false);
}

TEST_F(CheckpointRefusal, UnwritableSavePath) {
    const std::string file = path("regular_file");
    testutil::write_file(file, "x");
    SessionPtr s = make_session(base_options(), &C_);
    ingest(s.get(), D_, 0, 2);
    for (const std::string& p : {file + "/ck.ckpt", path("no_such_dir/ck.ckpt")}) {
        EXPECT_EQ(collapse_session_save(s.get(), p.c_str()), COLLAPSE_ERR_IO) << p;
        EXPECT_NE(std::string(collapse_last_error()).find(p), std::string::npos) << collapse_last_error();
    }
    // A failed save over an existing checkpoint leaves it as it was; no temp file is left.
    if (::geteuid() != 0) {
        const std::string sub = path("ro");
        fs::create_directory(sub);
        const std::string kept = sub + "/kept.ckpt";
        testutil::write_file(kept, good_);
        ::chmod(sub.c_str(), 0500);
        EXPECT_EQ(collapse_session_save(s.get(), kept.c_str()), COLLAPSE_ERR_IO);
        ::chmod(sub.c_str(), 0700);
        EXPECT_EQ(testutil::read_file(kept), good_);
        for (const auto& e : fs::directory_iterator(sub)) EXPECT_EQ(e.path().filename(), "kept.ckpt");
    }
    // The session is still usable and unchanged.
    ingest(s.get(), D_, 2, kBatchRows.size());
    expect_same(final_report(s.get()), single_run(base_options(), &C_, D_), 0.0);
}

// ------------------------------------------------------------------------------------ 4. spill

// The exact row store beyond host_memory_limit (src/core/row_store.hpp): the report of a run that
// spilled equals the in-memory run's. Classes that fit finalisation's load budget come back whole
// and give bit-identical numbers; a class larger than it is reduced through its d x d Gram, so the
// comparison allows 1e-12 relative.
constexpr int64_t kSpillD = 64;  // 3000 rows x 64 x 8 bytes = 1.5 MiB of stored rows
constexpr double kSpillRel = 1e-12;

class Spill : public TempDirTest {
protected:
    void SetUp() override {
        TempDirTest::SetUp();
        D_ = make_data(kSpillD, 31);
        C_ = make_classifier(kSpillD, 32);
    }
    collapse_options limited(collapse_options o, int64_t limit) const {
        o.host_memory_limit = limit;
        std::snprintf(o.intermediate_save_dir, sizeof o.intermediate_save_dir, "%s", path("spill").c_str());
        return o;
    }
    // Report minus what legitimately differs between the runs compared (limits, spill statistics).
    static json comparable(json j) {
        j.erase("config");
        j["engine"].erase("row_store");
        return j;
    }
    static int64_t spilled(const json& j) { return j["engine"]["row_store"]["spilled_bytes"].get<int64_t>(); }
    bool spill_dir_empty() const { return !fs::exists(path("spill")) || fs::is_empty(path("spill")); }
    Data D_;
    Classifier C_;
};

TEST_F(Spill, ReportEqualsInMemoryRunForSeveralLimits) {
    struct Mode {
        const char* name;
        collapse_options o;
    };
    collapse_options center = exact_with_nc4();
    center.svd_center = 1;
    for (const Mode& m : {Mode{"nc4", exact_with_nc4()}, Mode{"max_tokens", max_tokens()}, Mode{"center", center}}) {
        const json want = single_run(m.o, &C_, D_);
        EXPECT_EQ(spilled(want), 0);
        for (int64_t limit : {int64_t(1) << 20, int64_t(3) << 19, int64_t(2) << 20}) {
            SCOPED_TRACE(std::string(m.name) + ", host_memory_limit " + std::to_string(limit));
            const json got = single_run(limited(m.o, limit), &C_, D_);
            EXPECT_GT(spilled(got), 0);
            EXPECT_GT(got["engine"]["row_store"]["spill_flushes"].get<int64_t>(), 0);
            expect_same(comparable(got), comparable(want), kSpillRel);
            EXPECT_TRUE(spill_dir_empty()) << "spill files left behind";
        }
    }
}

TEST_F(Spill, CheckpointsOfSpilledStoresRoundTripAndMerge) {
    const collapse_options mem = exact_with_nc4();
    const collapse_options o = limited(mem, int64_t(1) << 20);
    const json want = single_run(mem, &C_, D_);
    // Saved while spilled, loaded by a session that must spill to take it.
    const std::string ck = path("spilled.ckpt");
    {
        SessionPtr a = make_session(o, &C_);
        ingest(a.get(), D_, 0, 7);
        ASSERT_EQ(collapse_session_save(a.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    SessionPtr b = make_session(o, &C_);
    ASSERT_EQ(collapse_session_load(b.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
    ingest(b.get(), D_, 7, kBatchRows.size());
    const json got = final_report(b.get());
    EXPECT_GT(spilled(got), 0);
    expect_same(comparable(got), comparable(want), kSpillRel);
    // The checkpoint stands alone: a session without a limit loads it too.
    SessionPtr c = make_session(mem, &C_);
    ASSERT_EQ(collapse_session_load(c.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
    ingest(c.get(), D_, 7, kBatchRows.size());
    expect_same(comparable(final_report(c.get())), comparable(want), kSpillRel);
    // Five spilled shards merged by a spilling session.
    expect_same(comparable(merged_run(dir_, "spill5", o, &C_, D_, kFiveShards)), comparable(want), 1e-12);
}

// A real write error while spilling (a file-size limit: EFBIG, as a full disk gives ENOSPC):
// the batch is refused whole, nothing is lost, and once the disk takes writes again the same
// batch goes in and the report is the full run's.
TEST_F(Spill, DiskErrorRefusesTheBatchAndLosesNothing) {
    if (!testutil::FileSizeLimit::usable()) GTEST_SKIP() << "file size already limited";
    const collapse_options o = limited(exact_with_nc4(), int64_t(1) << 20);
    const json want = single_run(exact_with_nc4(), &C_, D_);
    SessionPtr s = make_session(o, &C_);
    ingest(s.get(), D_, 0, 3);
    size_t failed_at = kBatchRows.size();
    std::string msg;
    {
        testutil::FileSizeLimit limit(4096);
        for (size_t b = 3; b < kBatchRows.size(); ++b) {
            const int64_t r0 = D_.batch_start[b], n = D_.batch_start[b + 1] - r0;
            const collapse_buffer f{D_.x.data() + r0 * D_.d, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, D_.d, 0};
            const collapse_buffer l{D_.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
            if (collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr) != COLLAPSE_OK) {
                failed_at = b;
                msg = collapse_last_error();
                break;
            }
        }
    }
    ASSERT_LT(failed_at, kBatchRows.size()) << "no batch needed to spill";
    EXPECT_NE(msg.find(std::strerror(EFBIG)), std::string::npos) << msg;
    EXPECT_NE(msg.find(path("spill")), std::string::npos) << msg;
    ingest(s.get(), D_, failed_at, kBatchRows.size());
    expect_same(comparable(final_report(s.get())), comparable(want), kSpillRel);
}

TEST_F(Spill, UnwritableDirectoryIsAClearErrorAndTheSessionGoesOn) {
    testutil::write_file(path("plain"), "x");
    collapse_options o = limited(exact_with_nc4(), int64_t(1) << 20);
    const std::string bad = path("plain") + "/spill";
    std::snprintf(o.intermediate_save_dir, sizeof o.intermediate_save_dir, "%s", bad.c_str());
    SessionPtr s = make_session(o, &C_);
    size_t accepted = 0;
    std::string msg;
    for (size_t b = 0; b < kBatchRows.size(); ++b) {
        const int64_t r0 = D_.batch_start[b], n = D_.batch_start[b + 1] - r0;
        const collapse_buffer f{D_.x.data() + r0 * D_.d, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, D_.d, 0};
        const collapse_buffer l{D_.y.data() + r0, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
        const collapse_status st = collapse_session_ingest_rows(s.get(), &f, &l, nullptr, nullptr);
        if (st != COLLAPSE_OK) {
            EXPECT_EQ(st, COLLAPSE_ERR_IO);
            msg = collapse_last_error();
            break;
        }
        accepted = b + 1;
    }
    ASSERT_LT(accepted, kBatchRows.size());
    for (const char* piece : {"cannot create a spill directory", "intermediate_save_dir", "Not a directory"})
        EXPECT_NE(msg.find(piece), std::string::npos) << msg;
    EXPECT_NE(msg.find(bad), std::string::npos) << msg;
    // What was accepted is all there.
    SessionPtr ref = make_session(exact_with_nc4(), &C_);
    ingest(ref.get(), D_, 0, accepted);
    expect_same(comparable(final_report(s.get())), comparable(final_report(ref.get())), 0.0);
}

// A checkpoint that cannot be taken in (the disk refuses the spill) is rolled back: the merging
// session's report is what it was.
TEST_F(Spill, RefusedMergeRollsBack) {
    if (!testutil::FileSizeLimit::usable()) GTEST_SKIP() << "file size already limited";
    const collapse_options o = limited(exact_with_nc4(), int64_t(1) << 20);
    const std::string ck = path("other.ckpt");
    {
        SessionPtr a = make_session(o, &C_);
        ingest(a.get(), D_, 4, kBatchRows.size());
        ASSERT_EQ(collapse_session_save(a.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    SessionPtr s = make_session(o, &C_);
    ingest(s.get(), D_, 0, 4);
    const json before = final_report(s.get());
    SessionPtr t = make_session(o, &C_);
    ingest(t.get(), D_, 0, 4);
    collapse_status st;
    std::string msg;
    {
        testutil::FileSizeLimit limit(4096);
        st = collapse_session_merge(t.get(), ck.c_str());
        msg = collapse_last_error();
    }
    EXPECT_EQ(st, COLLAPSE_ERR_IO) << msg;
    EXPECT_NE(msg.find(std::strerror(EFBIG)), std::string::npos) << msg;
    json after = final_report(t.get());
    expect_same(comparable(after), comparable(before), 0.0);
    EXPECT_EQ(after["counts"], before["counts"]);
}

}  // namespace
}  // namespace test_checkpoint_session
