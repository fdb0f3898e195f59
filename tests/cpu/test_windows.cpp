// Generation-time window entropy (docs/METRICS.md, "Generation-time window entropy (per sequence)")
// through the C API, against this file's own float64 evaluation of the definition: rows grouped by
// sequence, kept rows stably sorted by position, windows of W, the covariance spectrum by Jacobi
// (tests/reference/brute_force.hpp), then the per-sequence values and the summary.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"
#include "base/dtype.hpp"
#include "common/capi_helpers.hpp"
#include "io/checkpoint_file.hpp"
#include "io/tensor_file.hpp"
#include "reference/brute_force.hpp"

namespace test_windows {
namespace {

using nlohmann::json;
using testutil::ReportPtr;
using testutil::SessionPtr;
using testutil::buf;
SessionPtr make(const collapse_options& o) { return testutil::make_session(o); }

// One input row: its tags, whether a filter keeps it, and its features (float32 values).
struct Row {
    int64_t seq = 0, pos = 0;
    bool valid = true;
    std::vector<float> x;
};

// ------------------------------------------------------------------ the reference

double ref_window_entropy(const std::vector<const Row*>& w, int64_t d) {
    const int64_t W = (int64_t)w.size();
    std::vector<double> mean((size_t)d, 0.0), a((size_t)(W * d));
    for (const Row* r : w)
        for (int64_t k = 0; k < d; ++k) mean[(size_t)k] += r->x[(size_t)k];
    for (double& m : mean) m /= (double)W;
    for (int64_t i = 0; i < W; ++i)
        for (int64_t k = 0; k < d; ++k) a[(size_t)(i * d + k)] = (double)w[(size_t)i]->x[(size_t)k] - mean[(size_t)k];
    const std::vector<double> s = ref::singular_values(a, W, d);
    // Covariance eigenvalues s^2 / (W - 1); rounding debris of zero ones (below 1e-13 of the
    // largest) left out, as the engine's noise floor does.
    std::vector<double> lam;
    double mx = 0;
    for (double v : s) mx = std::max(mx, v * v / (double)(W - 1));
    for (double v : s)
        if (v * v / (double)(W - 1) > 1e-13 * mx) lam.push_back(v * v / (double)(W - 1));
    long double sum = 0;
    for (double l : lam) sum += l;
    if (!(sum > 0)) return 0.0;
    long double h = 0;
    for (double l : lam) {
        const long double p = l / sum;
        h -= p * std::log(p + 1e-10L);
    }
    return (double)h;
}

struct RefSeq {
    int64_t tokens = 0;
    std::vector<double> e;
    double avg = 0, cv = 0, slope = 0;
};

std::map<int64_t, RefSeq> reference(const std::vector<Row>& rows, int64_t W, int64_t d) {
    std::map<int64_t, std::vector<const Row*>> by;
    for (const Row& r : rows) by[r.seq];  // every sequence seen appears
    for (const Row& r : rows)
        if (r.valid) by[r.seq].push_back(&r);
    std::map<int64_t, RefSeq> out;
    for (auto& [id, v] : by) {
        std::stable_sort(v.begin(), v.end(), [](const Row* a, const Row* b) { return a->pos < b->pos; });
        RefSeq q;
        q.tokens = (int64_t)v.size();
        for (size_t i = 0; i + (size_t)W <= v.size(); i += (size_t)W)
            q.e.push_back(ref_window_entropy(std::vector<const Row*>(v.begin() + (ptrdiff_t)i, v.begin() + (ptrdiff_t)(i + W)), d));
        std::vector<double> e;
        for (double x : q.e)
            if (x > 0) e.push_back(x);
        if (!e.empty()) {
            const double k = (double)e.size();
            double m = 0;
            for (double x : e) m += x;
            m /= k;
            double ss = 0;
            for (double x : e) ss += (x - m) * (x - m);
            q.avg = m;
            q.cv = m > 0 ? std::sqrt(ss / k) / m : 0;
            if (e.size() >= 2) {
                double num = 0, den = 0;
                const double ib = (k - 1) / 2;
                for (size_t i = 0; i < e.size(); ++i) num += ((double)i - ib) * (e[i] - m), den += ((double)i - ib) * ((double)i - ib);
                q.slope = num / den;
            }
        }
        out[id] = q;
    }
    return out;
}

void expect_close(double got, double want, const std::string& what) {
    EXPECT_LE(std::fabs(got - want), 1e-9 * std::fabs(want) + 1e-12) << what << ": got " << got << ", want " << want;
}

// The report's window sections against the reference.
void check_report(const json& doc, const std::vector<Row>& rows, int64_t W, int64_t d) {
    const auto want = reference(rows, W, d);
    ASSERT_TRUE(doc["sequence_analysis"].is_object()) << doc["overall_analysis"]["notes"].dump();
    const json& sa = doc["sequence_analysis"];
    ASSERT_EQ(sa.size(), want.size());
    double a = 0, c = 0, s = 0;
    int64_t valid = 0;
    std::vector<double> chunk_sum;
    std::vector<int64_t> chunk_n;
    for (const auto& [id, q] : want) {
        const std::string key = std::to_string(id);
        ASSERT_TRUE(sa.contains(key)) << "sequence " << key;
        const json& j = sa[key];
        EXPECT_EQ(j.size(), 7u) << j.dump();
        EXPECT_EQ(j["total_generated_tokens"].get<int64_t>(), q.tokens) << key;
        EXPECT_EQ(j["chunk_size"].get<int64_t>(), W);
        ASSERT_EQ(j["num_valid_chunks"].get<int64_t>(), (int64_t)q.e.size()) << key;
        const auto e = j["fixed_chunk_svd_entropies"].get<std::vector<double>>();
        ASSERT_EQ(e.size(), q.e.size());
        for (size_t i = 0; i < e.size(); ++i) expect_close(e[i], q.e[i], "sequence " + key + " window " + std::to_string(i));
        expect_close(j["avg_svd_entropy"].get<double>(), q.avg, key + " avg");
        expect_close(j["cv_svd_entropy"].get<double>(), q.cv, key + " cv");
        // The slope divides by sums of index deviations: absolute 1e-12 on values of order 1.
        EXPECT_NEAR(j["slope_svd_entropy"].get<double>(), q.slope, 1e-9 * std::fabs(q.slope) + 1e-11) << key;
        if (q.e.empty()) continue;
        ++valid, a += q.avg, c += q.cv, s += q.slope;
        if (q.e.size() > chunk_sum.size()) chunk_sum.resize(q.e.size()), chunk_n.resize(q.e.size());
        for (size_t i = 0; i < q.e.size(); ++i) chunk_sum[i] += q.e[i], ++chunk_n[i];
    }
    const json& ws = doc["window_summary"];
    ASSERT_TRUE(ws.is_object());
    EXPECT_EQ(ws["valid_samples_for_summary"].get<int64_t>(), valid);
    EXPECT_EQ(ws["total_processed_samples"].get<int64_t>(), (int64_t)want.size());
    if (valid == 0) {
        EXPECT_TRUE(ws["overall_avg_svd_entropy"].is_null());
        EXPECT_TRUE(doc["overall_analysis"]["notes"].contains("window_summary"));
    } else {
        expect_close(ws["overall_avg_svd_entropy"].get<double>(), a / valid, "overall avg");
        expect_close(ws["overall_avg_cv_svd_entropy"].get<double>(), c / valid, "overall cv");
        EXPECT_NEAR(ws["overall_avg_slope_svd_entropy"].get<double>(), s / valid, 1e-9 * std::fabs(s / valid) + 1e-11);
    }
    for (size_t i = 0; i < chunk_sum.size(); ++i) {
        const std::string k = "avg_chunk_idx_" + std::to_string(i) + "_svd_entropy";
        ASSERT_TRUE(ws.contains(k)) << k;
        expect_close(ws[k].get<double>(), chunk_sum[i] / (double)chunk_n[i], k);
        EXPECT_EQ(ws["chunk_idx_" + std::to_string(i) + "_count"].get<int64_t>(), chunk_n[i]);
    }
    EXPECT_FALSE(ws.contains("avg_chunk_idx_" + std::to_string(chunk_sum.size()) + "_svd_entropy"));
}

// ------------------------------------------------------------------ the engine

collapse_options opts(int64_t W, int64_t V = 5) {
    collapse_options o;
    EXPECT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = V;
    o.window_size = W;
    return o;
}


// Rows [first, first + n) of `rows` as one tagged batch (labels r % V; the mask from valid).
collapse_status ingest(collapse_session* s, const std::vector<Row>& rows, const std::vector<size_t>& which, int64_t d,
                       bool positions = true, bool mask = true) {
    const int64_t n = (int64_t)which.size();
    std::vector<float> x((size_t)(n * d));
    std::vector<int32_t> y((size_t)n);
    std::vector<int64_t> seq((size_t)n), pos((size_t)n);
    std::vector<uint8_t> valid((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        const Row& r = rows[which[(size_t)i]];
        std::copy(r.x.begin(), r.x.end(), x.begin() + i * d);
        y[(size_t)i] = (int32_t)(which[(size_t)i] % 5);
        seq[(size_t)i] = r.seq;
        pos[(size_t)i] = r.pos;
        valid[(size_t)i] = r.valid ? 1 : 0;
    }
    const collapse_buffer f = buf(x.data(), COLLAPSE_F32, n, d), l = buf(y.data(), COLLAPSE_I32, n), v = buf(valid.data(), COLLAPSE_U8, n),
                          sq = buf(seq.data(), COLLAPSE_I64, n), ps = buf(pos.data(), COLLAPSE_I64, n);
    return collapse_session_ingest_tagged_rows(s, &f, &l, mask ? &v : nullptr, &sq, positions ? &ps : nullptr, nullptr);
}

json report_of(collapse_session* s, bool snapshot = false) {
    collapse_report* r = nullptr;
    const collapse_status st = snapshot ? collapse_session_snapshot(s, &r) : collapse_session_compute(s, &r);
    EXPECT_EQ(st, COLLAPSE_OK) << collapse_last_error();
    ReportPtr p(r);
    return testutil::report_json(r);
}

// Random sequences: lengths in [0, max_len], positions 0..n-1 (or with gaps), features with a
// little structure (a per-sequence offset and a drift) so that windows differ.
std::vector<Row> make_rows(std::mt19937& rng, int64_t seqs, int64_t max_len, int64_t d, double mask_rate, bool gaps = false,
                           int64_t first_id = 0) {
    std::vector<Row> rows;
    std::normal_distribution<float> g(0.f, 1.f);
    std::uniform_real_distribution<double> u(0, 1);
    for (int64_t s = 0; s < seqs; ++s) {
        const int64_t n = std::uniform_int_distribution<int64_t>(0, max_len)(rng);
        int64_t p = 0;
        for (int64_t t = 0; t < n; ++t) {
            Row r;
            r.seq = first_id + s * 7 - 3;  // any int64 id (negative too)
            r.pos = p;
            p += gaps && u(rng) < 0.1 ? 1 + (int64_t)(u(rng) * 5) : 1;
            r.valid = u(rng) >= mask_rate;
            r.x.resize((size_t)d);
            for (int64_t k = 0; k < d; ++k) r.x[(size_t)k] = g(rng) + 0.05f * (float)t * (float)(k % 3);
            rows.push_back(std::move(r));
        }
    }
    return rows;
}

// An arrival order: sequences interleaved, and within a sequence positions shuffled locally.
std::vector<size_t> arrival(std::mt19937& rng, const std::vector<Row>& rows, int64_t jitter) {
    std::vector<size_t> idx(rows.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::vector<double> key(rows.size());
    std::uniform_real_distribution<double> u(0, 1);
    // Each row's time: its position plus noise of `jitter` positions; sequences run side by side.
    for (size_t i = 0; i < rows.size(); ++i) key[i] = (double)rows[i].pos + u(rng) * (double)jitter;
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return key[a] < key[b]; });
    return idx;
}

// Feeds `order` in batches of random sizes.
void feed(collapse_session* s, std::mt19937& rng, const std::vector<Row>& rows, const std::vector<size_t>& order, int64_t d,
          int64_t max_batch) {
    for (size_t i = 0; i < order.size();) {
        const size_t n = std::min(order.size() - i, (size_t)std::uniform_int_distribution<int64_t>(1, max_batch)(rng));
        ASSERT_EQ(ingest(s, rows, std::vector<size_t>(order.begin() + (ptrdiff_t)i, order.begin() + (ptrdiff_t)(i + n)), d), COLLAPSE_OK)
            << collapse_last_error();
        i += n;
    }
}

// ------------------------------------------------------------------ tests

TEST(Windows, RandomShapesBatchSplitsAndInterleavings) {
    struct Shape {
        int64_t W, d, seqs, max_len, jitter, max_batch;
        double mask;
    };
    const Shape shapes[] = {{4, 3, 6, 30, 3, 7, 0.2},   {8, 16, 5, 50, 10, 40, 0.1}, {2, 5, 4, 12, 1, 3, 0.3},
                            {16, 16, 3, 70, 20, 100, 0.0}, {5, 40, 4, 33, 6, 9, 0.15}};
    uint32_t seed = 1;
    for (const Shape& sh : shapes) {
        SCOPED_TRACE("W = " + std::to_string(sh.W) + ", d = " + std::to_string(sh.d));
        std::mt19937 rng(seed++);
        const std::vector<Row> rows = make_rows(rng, sh.seqs, sh.max_len, sh.d, sh.mask);
        const std::vector<size_t> order = arrival(rng, rows, sh.jitter);
        const SessionPtr s = make(opts(sh.W));
        feed(s.get(), rng, rows, order, sh.d, sh.max_batch);
        check_report(report_of(s.get()), rows, sh.W, sh.d);
    }
}

TEST(Windows, GapsWaitAndGiveTheDefinition) {
    std::mt19937 rng(11);
    const int64_t W = 4, d = 6;
    const std::vector<Row> rows = make_rows(rng, 4, 40, d, 0.1, /*gaps=*/true);
    const SessionPtr s = make(opts(W));
    feed(s.get(), rng, rows, arrival(rng, rows, 5), d, 11);
    check_report(report_of(s.get()), rows, W, d);
}

TEST(Windows, ShortSequencesExactMultiplesAndArrivalOrder) {
    std::mt19937 rng(3);
    const int64_t W = 5, d = 4;
    std::vector<Row> rows;
    for (int64_t len : {3, 5, 10, 0, 15, 4}) {
        for (int64_t t = 0; t < len; ++t) {
            Row r;
            r.seq = len;  // id = length (lengths are distinct)
            r.pos = t;
            r.x.resize((size_t)d);
            for (int64_t k = 0; k < d; ++k) r.x[(size_t)k] = std::normal_distribution<float>()(rng);
            rows.push_back(r);
        }
    }
    // Positions omitted: arrival order within each sequence is the position.
    const SessionPtr s = make(opts(W));
    std::vector<size_t> all(rows.size());
    std::iota(all.begin(), all.end(), 0);
    ASSERT_EQ(ingest(s.get(), rows, std::vector<size_t>(all.begin(), all.begin() + 7), d, /*positions=*/false), COLLAPSE_OK);
    ASSERT_EQ(ingest(s.get(), rows, std::vector<size_t>(all.begin() + 7, all.end()), d, /*positions=*/false), COLLAPSE_OK);
    const json doc = report_of(s.get());
    check_report(doc, rows, W, d);
    EXPECT_EQ(doc["sequence_analysis"]["3"]["num_valid_chunks"], 0);
    EXPECT_EQ(doc["sequence_analysis"]["10"]["num_valid_chunks"], 2);
    EXPECT_EQ(doc["sequence_analysis"]["15"]["num_valid_chunks"], 3);
    EXPECT_EQ(doc["sequence_analysis"]["4"]["num_valid_chunks"], 0);
}

TEST(Windows, ConstantRowsGiveZeroAndNoValidSample) {
    const int64_t W = 3, d = 4;
    std::vector<Row> rows;
    for (int64_t t = 0; t < 7; ++t) rows.push_back(Row{9, t, true, std::vector<float>((size_t)d, 0.1f)});
    const SessionPtr s = make(opts(W));
    std::vector<size_t> all(rows.size());
    std::iota(all.begin(), all.end(), 0);
    ASSERT_EQ(ingest(s.get(), rows, all, d), COLLAPSE_OK);
    const json doc = report_of(s.get());
    check_report(doc, rows, W, d);
    EXPECT_EQ(doc["sequence_analysis"]["9"]["fixed_chunk_svd_entropies"], json::array({0.0, 0.0}));
    EXPECT_EQ(doc["sequence_analysis"]["9"]["avg_svd_entropy"], 0.0);
    EXPECT_EQ(doc["window_summary"]["valid_samples_for_summary"], 1);  // it has windows, all of entropy 0
}

TEST(Windows, MaskedRowsCountAsSeenButDoNotEnter) {
    // Sequence 0: position 2 masked. The frontier passes it, so the window of W = 3 kept rows
    // {0, 1, 3} forms as soon as position 3 arrives, not at compute.
    const int64_t W = 3, d = 3;
    std::mt19937 rng(5);
    std::vector<Row> rows;
    for (int64_t t = 0; t < 7; ++t) {
        Row r{0, t, t != 2, std::vector<float>((size_t)d)};
        for (float& v : r.x) v = std::normal_distribution<float>()(rng);
        rows.push_back(r);
    }
    const SessionPtr s = make(opts(W));
    for (size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(ingest(s.get(), rows, {i}, d), COLLAPSE_OK) << collapse_last_error();
    check_report(report_of(s.get()), rows, W, d);
}

TEST(Windows, DuplicatesAcceptedInTheOpenPartRefusedBeforeAReducedWindow) {
    const int64_t W = 3, d = 4;
    std::mt19937 rng(8);
    std::vector<Row> rows;
    auto row = [&](int64_t seq, int64_t pos) {
        Row r{seq, pos, true, std::vector<float>((size_t)d)};
        for (float& v : r.x) v = std::normal_distribution<float>()(rng);
        return r;
    };
    // Positions 0 1 1 2 3 4 4 5: the duplicates are ties (input order).
    for (int64_t p : {0, 1, 1, 2, 3, 4, 4, 5}) rows.push_back(row(1, p));
    const SessionPtr s = make(opts(W));
    ASSERT_EQ(ingest(s.get(), rows, {0, 1}, d), COLLAPSE_OK);
    ASSERT_EQ(ingest(s.get(), rows, {2, 3}, d), COLLAPSE_OK);  // 0 1 1 reduced: window 0 reaches position 1
    ASSERT_EQ(ingest(s.get(), rows, {4, 5, 6, 7}, d), COLLAPSE_OK);
    // Windows 0 (positions 0 1 1) and 1 (2 3 4) are reduced. Position 4 again ties with window 1's
    // last row and is accepted after it; position 3 precedes it: the batch is refused whole, naming
    // the row, the sequence, the position and the window.
    std::vector<Row> more = rows;
    more.push_back(row(1, 4));
    more.push_back(row(2, 0));
    more.push_back(row(1, 3));
    json before = report_of(s.get(), /*snapshot=*/true);
    ASSERT_EQ(ingest(s.get(), more, {9, 10}, d), COLLAPSE_ERR_BAD_INPUT);
    const std::string msg = collapse_last_error();
    EXPECT_NE(msg.find("row 9 of the input (1 of this batch): sequence 1, position 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("window 1"), std::string::npos) << msg;
    json after = report_of(s.get(), true);
    EXPECT_EQ(after, before);
    ASSERT_EQ(ingest(s.get(), more, {8}, d), COLLAPSE_OK) << collapse_last_error();
    std::vector<Row> accepted(more.begin(), more.begin() + 9);
    check_report(report_of(s.get()), accepted, W, d);
}

TEST(Windows, SnapshotThenContinueEqualsOneRun) {
    std::mt19937 rng(21);
    const int64_t W = 4, d = 5;
    const std::vector<Row> rows = make_rows(rng, 5, 30, d, 0.1, true);
    const std::vector<size_t> order = arrival(rng, rows, 6);
    const SessionPtr s = make(opts(W));
    const size_t half = order.size() / 2;
    std::vector<size_t> a(order.begin(), order.begin() + (ptrdiff_t)half), b(order.begin() + (ptrdiff_t)half, order.end());
    ASSERT_EQ(ingest(s.get(), rows, a, d), COLLAPSE_OK);
    // The snapshot is the report of the rows so far, as if the input ended there.
    std::vector<Row> first;
    for (size_t i : a) first.push_back(rows[i]);
    check_report(report_of(s.get(), true), first, W, d);
    ASSERT_EQ(ingest(s.get(), rows, b, d), COLLAPSE_OK);
    check_report(report_of(s.get()), rows, W, d);
}

// The CPU backend hands reduced windows to a worker thread: hundreds of windows in flight, results
// taken in between by snapshots and a checkpoint save, must still come back in order.
TEST(Windows, ManyWindowsInFlightKeepTheirOrder) {
    std::mt19937 rng(41);
    const int64_t W = 3, d = 4;
    const std::vector<Row> rows = make_rows(rng, 40, 90, d, 0.05);
    const std::vector<size_t> order = arrival(rng, rows, 2);
    const SessionPtr s = make(opts(W));
    const std::string ckpt = testing::TempDir() + "collapse_windows_inflight_" + std::to_string(::getpid()) + ".ckpt";
    std::vector<Row> so_far;
    for (size_t i = 0, batch = 0; i < order.size(); ++batch) {
        const size_t n = std::min(order.size() - i, (size_t)17);
        const std::vector<size_t> part(order.begin() + (ptrdiff_t)i, order.begin() + (ptrdiff_t)(i + n));
        ASSERT_EQ(ingest(s.get(), rows, part, d), COLLAPSE_OK) << collapse_last_error();
        for (size_t k : part) so_far.push_back(rows[k]);
        i += n;
        if (batch % 37 == 36) check_report(report_of(s.get(), true), so_far, W, d);
        if (batch == 60) ASSERT_EQ(collapse_session_save(s.get(), ckpt.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    check_report(report_of(s.get()), rows, W, d);
    std::remove(ckpt.c_str());
}

TEST(Windows, SequencesLayoutEqualsTaggedRows) {
    std::mt19937 rng(4);
    const int64_t B = 5, T = 13, d = 6, W = 4, V = 7;
    std::vector<float> h((size_t)(B * T * d));
    std::vector<int32_t> ids((size_t)(B * T));
    std::vector<uint8_t> mask((size_t)(B * T), 1);
    for (float& v : h) v = std::normal_distribution<float>()(rng);
    for (int32_t& v : ids) v = std::uniform_int_distribution<int32_t>(0, V - 1)(rng);
    for (int64_t i = 0; i < B * T; i += 5) mask[(size_t)i] = 0;
    // Two calls (sequences 0..1, then 2..4): the session numbers them itself.
    const SessionPtr s = make(opts(W, V));
    for (int64_t b0 : {0, 2}) {
        const int64_t nb = b0 == 0 ? 2 : 3;
        const collapse_buffer hb = buf(h.data() + b0 * T * d, COLLAPSE_F32, nb * T, d), ib = buf(ids.data() + b0 * T, COLLAPSE_I32, nb, T),
                              mb = buf(mask.data() + b0 * T, COLLAPSE_U8, nb, T);
        ASSERT_EQ(collapse_session_ingest_sequences(s.get(), &hb, &ib, &mb, nb, T, nullptr), COLLAPSE_OK) << collapse_last_error();
    }
    json seq_doc = report_of(s.get());
    // The same rows tagged: row (b, t) for t < T - 1, label ids[b, t + 1], kept where mask[b, t + 1].
    std::vector<Row> rows;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t + 1 < T; ++t) {
            Row r{b, t, mask[(size_t)(b * T + t + 1)] != 0, std::vector<float>(h.begin() + (b * T + t) * d, h.begin() + (b * T + t + 1) * d)};
            rows.push_back(r);
        }
    check_report(seq_doc, rows, W, d);
    const SessionPtr t = make(opts(W, V));
    std::vector<size_t> all(rows.size());
    std::iota(all.begin(), all.end(), 0);
    ASSERT_EQ(ingest(t.get(), rows, all, d), COLLAPSE_OK);
    json tag_doc = report_of(t.get());
    EXPECT_EQ(seq_doc["sequence_analysis"], tag_doc["sequence_analysis"]);
    EXPECT_EQ(seq_doc["window_summary"], tag_doc["window_summary"]);
}

TEST(Windows, SequencesLayoutSequencesAreClosed) {
    const int64_t T = 4, d = 2;
    std::vector<float> h((size_t)(T * d), 1.f);
    std::vector<int32_t> ids((size_t)T, 0);
    const SessionPtr s = make(opts(2, 3));
    const collapse_buffer hb = buf(h.data(), COLLAPSE_F32, T, d), ib = buf(ids.data(), COLLAPSE_I32, 1, T);
    ASSERT_EQ(collapse_session_ingest_sequences(s.get(), &hb, &ib, nullptr, 1, T, nullptr), COLLAPSE_OK);
    std::vector<Row> rows{Row{0, 7, true, {1.f, 2.f}}};
    EXPECT_EQ(ingest(s.get(), rows, {0}, d), COLLAPSE_ERR_BAD_INPUT);
    EXPECT_NE(std::string(collapse_last_error()).find("sequence 0 came whole through the sequences layout"), std::string::npos)
        << collapse_last_error();
}

TEST(Windows, CheckpointRoundTripAndMerge) {
    std::mt19937 rng(31);
    const int64_t W = 4, d = 5;
    const std::vector<Row> rows = make_rows(rng, 6, 30, d, 0.1, true);
    const std::vector<size_t> order = arrival(rng, rows, 8);
    const std::string dir = testing::TempDir() + "collapse_windows_ckpt_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    const size_t half = order.size() / 2;
    std::vector<size_t> a(order.begin(), order.begin() + (ptrdiff_t)half), b(order.begin() + (ptrdiff_t)half, order.end());
    {
        const SessionPtr s = make(opts(W));
        ASSERT_EQ(ingest(s.get(), rows, a, d), COLLAPSE_OK);
        ASSERT_EQ(collapse_session_save(s.get(), (dir + "/a.ckpt").c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    const SessionPtr r = make(opts(W));
    ASSERT_EQ(collapse_session_load(r.get(), (dir + "/a.ckpt").c_str()), COLLAPSE_OK) << collapse_last_error();
    ASSERT_EQ(ingest(r.get(), rows, b, d), COLLAPSE_OK) << collapse_last_error();
    check_report(report_of(r.get()), rows, W, d);

    // Another window_size: refused naming the key.
    const SessionPtr w = make(opts(W + 1));
    EXPECT_EQ(collapse_session_load(w.get(), (dir + "/a.ckpt").c_str()), COLLAPSE_ERR_CONFIG);
    EXPECT_NE(std::string(collapse_last_error()).find("window_size"), std::string::npos) << collapse_last_error();

    // Shards: sequences split between two sessions merge; a shared sequence id is refused.
    std::vector<size_t> even, odd;
    for (size_t i : order) (((rows[i].seq + 3) / 7) % 2 == 0 ? even : odd).push_back(i);
    {
        const SessionPtr s = make(opts(W));
        ASSERT_EQ(ingest(s.get(), rows, odd, d), COLLAPSE_OK);
        ASSERT_EQ(collapse_session_save(s.get(), (dir + "/odd.ckpt").c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    const SessionPtr m = make(opts(W));
    ASSERT_EQ(ingest(m.get(), rows, even, d), COLLAPSE_OK);
    const SessionPtr m2 = make(opts(W));
    ASSERT_EQ(ingest(m2.get(), rows, odd, d), COLLAPSE_OK);
    const json before = report_of(m2.get(), true);
    EXPECT_EQ(collapse_session_merge(m2.get(), (dir + "/odd.ckpt").c_str()), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find("has sequence id"), std::string::npos) << collapse_last_error();
    json after = report_of(m2.get());
    EXPECT_EQ(after["sequence_analysis"], before["sequence_analysis"]);
    ASSERT_EQ(collapse_session_merge(m.get(), (dir + "/odd.ckpt").c_str()), COLLAPSE_OK) << collapse_last_error();
    check_report(report_of(m.get()), rows, W, d);
    std::filesystem::remove_all(dir);
}

// A checkpoint whose window sections have valid checksums but inconsistent content (a crafted or
// buggy file) is refused naming the check; a session refusing a merge of it is unchanged.
TEST(Windows, CraftedWindowStateIsRefused) {
    namespace io = collapse::internal::io;
    const int64_t W = 3, d = 2;
    const std::string dir = testing::TempDir() + "collapse_windows_craft_" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    const std::string good = dir + "/good.ckpt", bad = dir + "/bad.ckpt";
    // Sequence 10: positions 0..7 (windows 0 1 reduced, 6 7 open); sequence 20: 0 1 3 4 (a gap at 2).
    std::vector<Row> rows;
    std::mt19937 rng(9);
    for (int64_t p = 0; p < 8; ++p) rows.push_back(Row{10, p, true, {std::normal_distribution<float>()(rng), (float)p}});
    for (int64_t p : {0, 1, 3, 4}) rows.push_back(Row{20, p, true, {std::normal_distribution<float>()(rng), (float)-p}});
    std::vector<size_t> all(rows.size());
    std::iota(all.begin(), all.end(), 0);
    {
        const SessionPtr s = make(opts(W));
        ASSERT_EQ(ingest(s.get(), rows, all, d), COLLAPSE_OK);
        ASSERT_EQ(collapse_session_save(s.get(), good.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    using Edit = std::function<void(std::vector<char>&)>;
    auto rewrite = [&](const std::string& which, const Edit& edit) {
        io::CheckpointReader r(good);
        io::CheckpointWriter w(bad);
        for (const std::string& name : r.names()) {
            const auto sec = r.section(name);
            std::vector<char> b(static_cast<const char*>(sec.data), static_cast<const char*>(sec.data) + sec.bytes);
            if (name == which) edit(b);
            w.add(name, (collapse_dtype)sec.dtype_code, sec.shape, b.data(), b.size());
        }
        w.commit();
    };
    auto i64 = [](std::vector<char>& b) { return reinterpret_cast<int64_t*>(b.data()); };
    const double nan = std::numeric_limits<double>::quiet_NaN();
    struct Case {
        const char* name;
        const char* section;
        Edit edit;
        collapse_status status;
        const char* says;
    };
    const Case cases[] = {
        {"window size", "window_meta", [&](auto& b) { i64(b)[0] = 5; }, COLLAPSE_ERR_CONFIG, "window_size = 5"},
        {"kept rows", "window_sequences", [&](auto& b) { i64(b)[1] -= 1; }, COLLAPSE_ERR_IO, "sequence 10 has 7 kept rows"},
        {"more kept rows than seen", "window_sequences", [&](auto& b) { i64(b)[1] += 1; }, COLLAPSE_ERR_IO, "sequence 10 has inconsistent counts (tokens 9"},
        {"repeated id", "window_sequences", [&](auto& b) { i64(b)[8] = 10; }, COLLAPSE_ERR_IO, "sequence id 10 appears twice"},
        {"reduced beyond the frontier", "window_sequences", [&](auto& b) { i64(b)[4] = 9; }, COLLAPSE_ERR_IO, "inconsistent counts"},
        {"above not ascending", "window_above", [&](auto& b) { std::swap(i64(b)[0], i64(b)[1]); }, COLLAPSE_ERR_IO, "not ascending"},
        {"pending before a reduced window", "window_pending", [&](auto& b) { i64(b)[1] = 2; }, COLLAPSE_ERR_IO, "does not fit its sequence"},
        {"pending of no sequence", "window_pending", [&](auto& b) { i64(b)[0] = 7; }, COLLAPSE_ERR_IO, "names sequence row 7"},
        {"pending row not finite", "window_pending_rows", [&](auto& b) { reinterpret_cast<float*>(b.data())[3] = (float)nan; },
         COLLAPSE_ERR_IO, "pending row 1 has a non-finite value"},
        {"entropy not finite", "window_entropies", [&](auto& b) { reinterpret_cast<double*>(b.data())[1] = nan; }, COLLAPSE_ERR_IO,
         "window entropy 1"},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.name);
        rewrite(c.section, c.edit);
        const SessionPtr fresh = make(opts(W));
        EXPECT_EQ(collapse_session_load(fresh.get(), bad.c_str()), c.status);
        EXPECT_NE(std::string(collapse_last_error()).find(c.says), std::string::npos) << collapse_last_error();
        // Merged into a session with rows of its own: refused, and the session as it was.
        const SessionPtr s = make(opts(W));
        std::vector<Row> other{Row{30, 0, true, {1.f, 2.f}}, Row{30, 1, true, {0.f, 1.f}}, Row{30, 2, true, {3.f, 1.f}}};
        ASSERT_EQ(ingest(s.get(), other, {0, 1, 2}, d), COLLAPSE_OK);
        const json before = report_of(s.get(), true);
        EXPECT_EQ(collapse_session_merge(s.get(), bad.c_str()), c.status);
        EXPECT_EQ(report_of(s.get(), true), before);
    }
    // The unedited rewrite loads, and gives the one-run numbers.
    rewrite("", [](auto&) {});
    const SessionPtr s = make(opts(W));
    ASSERT_EQ(collapse_session_load(s.get(), bad.c_str()), COLLAPSE_OK) << collapse_last_error();
    check_report(report_of(s.get()), rows, W, d);
    std::filesystem::remove_all(dir);
}

TEST(Windows, OffOrUntaggedGivesNullSectionsWithANote) {
    std::mt19937 rng(2);
    const int64_t d = 3;
    const std::vector<Row> rows = make_rows(rng, 2, 20, d, 0);
    std::vector<size_t> all(rows.size());
    std::iota(all.begin(), all.end(), 0);
    collapse_options o = opts(4);
    o.compute_window_metrics = 0;
    const SessionPtr s = make(o);
    ASSERT_EQ(ingest(s.get(), rows, all, d), COLLAPSE_OK);
    collapse_report* rp = nullptr;
    ASSERT_EQ(collapse_session_compute(s.get(), &rp), COLLAPSE_OK);
    ReportPtr rep(rp);
    json doc = testutil::report_json(rp);
    EXPECT_TRUE(doc["sequence_analysis"].is_null());
    EXPECT_TRUE(doc["window_summary"].is_null());
    EXPECT_EQ(doc["overall_analysis"]["notes"]["window_summary"], "compute_window_metrics is false");
    double v = 0;
    int null = 0;
    EXPECT_EQ(collapse_report_get_scalar(rp, "window_summary.overall_avg_svd_entropy", &v, &null), COLLAPSE_OK);
    EXPECT_EQ(null, 1);

    // Auto, untagged rows.
    const SessionPtr u = make(opts(4));
    std::vector<float> x(rows.size() * d);
    std::vector<int32_t> y(rows.size(), 1);
    const collapse_buffer f = buf(x.data(), COLLAPSE_F32, (int64_t)rows.size(), d), l = buf(y.data(), COLLAPSE_I32, (int64_t)rows.size());
    ASSERT_EQ(collapse_session_ingest_rows(u.get(), &f, &l, nullptr, nullptr), COLLAPSE_OK);
    doc = report_of(u.get());
    EXPECT_TRUE(doc["window_summary"].is_null());
    EXPECT_NE(doc["overall_analysis"]["notes"]["window_summary"].get<std::string>().find("no rows carried sequence ids"), std::string::npos);
}

TEST(Windows, ScalarGetterReachesTheSummary) {
    std::mt19937 rng(6);
    const int64_t d = 4, W = 3;
    const std::vector<Row> rows = make_rows(rng, 3, 12, d, 0);
    std::vector<size_t> all(rows.size());
    std::iota(all.begin(), all.end(), 0);
    const SessionPtr s = make(opts(W));
    ASSERT_EQ(ingest(s.get(), rows, all, d), COLLAPSE_OK);
    collapse_report* rp = nullptr;
    ASSERT_EQ(collapse_session_compute(s.get(), &rp), COLLAPSE_OK);
    ReportPtr rep(rp);
    const json doc = testutil::report_json(rp);
    double v = 0;
    int null = 1;
    ASSERT_EQ(collapse_report_get_scalar(rp, "window_summary.total_processed_samples", &v, &null), COLLAPSE_OK);
    EXPECT_EQ(v, doc["window_summary"]["total_processed_samples"].get<double>());
    ASSERT_EQ(collapse_report_get_scalar(rp, "window_summary.avg_chunk_idx_0_svd_entropy", &v, &null), COLLAPSE_OK);
    EXPECT_EQ(null, 0);
}

// ------------------------------------------------------------------ bad input

TEST(WindowsBadInput, TagsAreCheckedAndTheSessionUnchanged) {
    const int64_t n = 6, d = 3;
    std::vector<float> x((size_t)(n * d), 0.5f);
    std::vector<int32_t> y((size_t)n, 1);
    std::vector<int64_t> seq((size_t)n, 0), pos{0, 1, 2, -4, 4, 5};
    std::vector<float> fseq((size_t)n, 0.f);
    const collapse_buffer f = buf(x.data(), COLLAPSE_F32, n, d), l = buf(y.data(), COLLAPSE_I32, n);
    const SessionPtr s = make(opts(2));
    struct Case {
        collapse_buffer seq;
        const collapse_buffer* pos;
        collapse_status status;
        const char* says;
    };
    const collapse_buffer good_seq = buf(seq.data(), COLLAPSE_I64, n), bad_pos = buf(pos.data(), COLLAPSE_I64, n);
    const collapse_buffer short_seq = buf(seq.data(), COLLAPSE_I64, n - 1), float_seq = buf(fseq.data(), COLLAPSE_F32, n);
    collapse_buffer dev_seq = good_seq;
    dev_seq.memory = COLLAPSE_MEMORY_DEVICE;
    const Case cases[] = {
        {float_seq, nullptr, COLLAPSE_ERR_INVALID_ARGUMENT, "sequence_ids: dtype float32 is not int32 or int64"},
        {short_seq, nullptr, COLLAPSE_ERR_SHAPE, "sequence_ids: shape [5, 1] does not match 6 rows"},
        {dev_seq, nullptr, COLLAPSE_ERR_INVALID_ARGUMENT, "sequence_ids: must be in host memory"},
        {good_seq, &bad_pos, COLLAPSE_ERR_BAD_INPUT, "positions: row 3 of the batch has position -4"},
        {good_seq, &short_seq, COLLAPSE_ERR_SHAPE, "positions: shape [5, 1]"},
    };
    for (const Case& c : cases) {
        EXPECT_EQ(collapse_session_ingest_tagged_rows(s.get(), &f, &l, nullptr, &c.seq, c.pos, nullptr), c.status) << c.says;
        EXPECT_NE(std::string(collapse_last_error()).find(c.says), std::string::npos) << collapse_last_error();
    }
    EXPECT_EQ(collapse_session_ingest_tagged_rows(s.get(), &f, &l, nullptr, nullptr, nullptr, nullptr), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find("sequence_ids: buffer is NULL"), std::string::npos);
    // Nothing was taken: the report is that of no rows.
    const json doc = report_of(s.get());
    EXPECT_EQ(doc["counts"]["rows_seen"], 0);
    EXPECT_TRUE(doc["sequence_analysis"].is_null());
}

TEST(WindowsBadInput, WindowSizeAndSwitchAreValidated) {
    collapse_options o = opts(1);
    collapse_session* s = nullptr;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find("window_size"), std::string::npos) << collapse_last_error();
    o = opts(4);
    o.compute_window_metrics = 2;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find("compute_window_metrics"), std::string::npos) << collapse_last_error();
    const std::string dir = testing::TempDir();
    for (const auto& [text, says] : std::vector<std::pair<std::string, std::string>>{
             {"window_size: 1\n", "key 'window_size' expects an integer >= 2, got 1"},
             {"compute_window_metrics: maybe\n", "key 'compute_window_metrics' expects true, false or auto"}}) {
        const std::string path = dir + "/win_" + std::to_string(::getpid()) + ".yaml";
        { std::ofstream(path) << text; }
        collapse_options y;
        EXPECT_EQ(collapse_options_from_yaml_file(path.c_str(), &y), COLLAPSE_ERR_CONFIG) << text;
        EXPECT_NE(std::string(collapse_last_error()).find(says), std::string::npos) << collapse_last_error();
        std::remove(path.c_str());
    }
    const std::string path = dir + "/win_ok_" + std::to_string(::getpid()) + ".yaml";
    { std::ofstream(path) << "window_size: 32\ncompute_window_metrics: auto\n"; }
    collapse_options y;
    ASSERT_EQ(collapse_options_from_yaml_file(path.c_str(), &y), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(y.window_size, 32);
    EXPECT_EQ(y.compute_window_metrics, -1);
    std::remove(path.c_str());
}

TEST(WindowsBadInput, OpenWindowsCountAgainstTheHostMemoryLimit) {
    // 2000 rows of d = 1024 float32 waiting in one batch (8 MB) under a 4 MiB limit: refused
    // before anything changes, naming the keys to change.
    const int64_t n = 2000, d = 1024;
    collapse_options o = opts(64);
    o.host_memory_limit = int64_t(4) << 20;
    o.svd_mode = COLLAPSE_SVD_OFF;
    o.compute_overall_metrics = 0;
    const SessionPtr s = make(o);
    std::vector<float> x((size_t)(n * d), 0.25f);
    std::vector<int32_t> y((size_t)n, 1);
    std::vector<int64_t> seq((size_t)n, 4);
    const collapse_buffer f = buf(x.data(), COLLAPSE_F32, n, d), l = buf(y.data(), COLLAPSE_I32, n), q = buf(seq.data(), COLLAPSE_I64, n);
    EXPECT_EQ(collapse_session_ingest_tagged_rows(s.get(), &f, &l, nullptr, &q, nullptr, nullptr), COLLAPSE_ERR_OUT_OF_MEMORY);
    const std::string msg = collapse_last_error();
    EXPECT_NE(msg.find("host_memory_limit"), std::string::npos) << msg;
    EXPECT_NE(msg.find("compute_window_metrics: false"), std::string::npos) << msg;
    // Smaller batches pass: a window's rows are freed once it is reduced.
    for (int64_t r0 = 0; r0 + 64 <= 448; r0 += 64) {
        const collapse_buffer fb = buf(x.data() + r0 * d, COLLAPSE_F32, 64, d), lb = buf(y.data(), COLLAPSE_I32, 64), qb = buf(seq.data(), COLLAPSE_I64, 64);
        ASSERT_EQ(collapse_session_ingest_tagged_rows(s.get(), &fb, &lb, nullptr, &qb, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    }
    const json doc = report_of(s.get());
    EXPECT_EQ(doc["counts"]["rows_seen"], 448);
    EXPECT_EQ(doc["sequence_analysis"]["4"]["num_valid_chunks"], 7);
}

// ------------------------------------------------------------------ real data

TEST(Windows, Stories260kAgainstTheReference) {
    const std::string dir = std::string(COLLAPSE_SHARED_DIR) + "/data/stories260k";
    if (!std::filesystem::exists(dir + "/seq.npy")) GTEST_SKIP() << "no " << dir;
    namespace io = collapse::internal::io;
    const auto f = io::open_npy(dir + "/features.npy");
    const auto sq = io::open_npy(dir + "/seq.npy");
    const auto ps = io::open_npy(dir + "/pos.npy");
    const int64_t d = f.shape[1], W = 64;
    // The first 16 stories (about 6k rows), in file order.
    std::vector<Row> rows;
    for (int64_t i = 0; i < f.shape[0]; ++i) {
        const int64_t s = collapse::internal::load_as_int(sq.data(), sq.dtype, i);
        if (s >= 16) break;
        Row r{s, collapse::internal::load_as_int(ps.data(), ps.dtype, i), true, std::vector<float>((size_t)d)};
        for (int64_t k = 0; k < d; ++k) r.x[(size_t)k] = (float)collapse::internal::load_as_double(f.data(), f.dtype, i * d + k);
        rows.push_back(std::move(r));
    }
    ASSERT_GT(rows.size(), 1000u);
    const SessionPtr s = make(opts(W, 512));
    std::mt19937 rng(1);
    std::vector<size_t> order(rows.size());
    std::iota(order.begin(), order.end(), 0);
    feed(s.get(), rng, rows, order, d, 4096);
    check_report(report_of(s.get()), rows, W, d);
}

}  // namespace
}  // namespace test_windows
