// ignore_index (issue 15; the Hugging Face convention: a label of -100 means "no target"): such rows
// are dropped and counted in counts.rows_ignored instead of refusing the batch. Checked: the host
// validation's order (masked before ignored), the report's counts and metrics against a brute force
// of which rows are kept (docs/METRICS.md, "The summary block"), the sequences layout's shifted
// labels, the key's parsing and range check, the C options of an older caller (struct_size), and
// checkpoints (the rows section with and without the ignored count).
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "collapse/collapse.h"
#include "common/capi_helpers.hpp"
#include "common/compare.hpp"
#include "core/batch.hpp"
#include "core/config.hpp"
#include "io/checkpoint_file.hpp"
#include "reference/brute_force.hpp"

namespace test_ignore_index {
namespace {

using nlohmann::json;
using testutil::SessionPtr;
using testutil::buf;
SessionPtr make(const collapse_options& o) { return testutil::make_session(o); }
namespace ci = collapse::internal;

collapse_options options(int64_t V) {
    collapse_options o;
    EXPECT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = V;
    o.min_samples_per_token = 1;
    return o;
}


std::string error_of(collapse_status st, collapse_status want) {
    EXPECT_EQ(st, want) << collapse_last_error();
    return collapse_last_error();
}

#define EXPECT_HAS(text, piece) EXPECT_NE(std::string(text).find(piece), std::string::npos) << "message: " << (text)

// ------------------------------------------------------------------------- host validation

TEST(IgnoreIndex, AcceptRowsDropsAndCountsAfterTheMask) {
    const int64_t V = 5;
    const std::vector<float> x(8 * 2, 1.0f);
    const std::vector<int64_t> y = {0, -100, 4, -100, -100, 2, -1, 3};
    const std::vector<uint8_t> valid = {1, 1, 1, 0, 1, 1, 1, 1};  // row 3: masked AND -100
    const collapse_buffer fx = buf(x.data(), COLLAPSE_F32, 8, 2), fy = buf(y.data(), COLLAPSE_I64, 8),
                          fv = buf(valid.data(), COLLAPSE_U8, 8);
    std::vector<int64_t> yy = y;
    yy[6] = 1;  // the -1 is for the last case
    const collapse_buffer fy2 = buf(yy.data(), COLLAPSE_I64, 8);
    const ci::BatchDesc b = ci::describe_rows(&fx, &fy2, &fv, 2);
    const std::vector<uint8_t> excluded = {0, 0, 1, 0, 0};  // class 2 excluded
    const ci::AcceptedRows r = ci::accept_rows(b, V, excluded, -100, COLLAPSE_NONFINITE_ERROR, true);
    EXPECT_EQ(r.rows_seen, 8);
    EXPECT_EQ(r.rows_masked, 1);   // masked takes precedence over ignored
    EXPECT_EQ(r.rows_ignored, 2);  // rows 1 and 4
    EXPECT_EQ(r.rows_excluded, 1);
    EXPECT_EQ(r.label, (std::vector<int32_t>{0, 4, 1, 3}));
    EXPECT_EQ(r.feature_row, (std::vector<int64_t>{0, 2, 6, 7}));
    EXPECT_EQ(r.rows_seen, r.rows_masked + r.rows_ignored + r.rows_excluded + r.rows_nonfinite + (int64_t)r.label.size());
    // -1 is not the ignore_index: refused, naming the row, the value and the setting.
    const ci::BatchDesc b2 = ci::describe_rows(&fx, &fy, &fv, 2);
    try {
        (void)ci::accept_rows(b2, V, excluded, -100, COLLAPSE_NONFINITE_ERROR, true);
        ADD_FAILURE() << "label -1 accepted";
    } catch (const ci::Error& e) {
        EXPECT_EQ(e.status(), COLLAPSE_ERR_BAD_INPUT);
        EXPECT_HAS(e.what(), "label -1 at row 6 of the batch is outside [0, 5)");
        EXPECT_HAS(e.what(), "ignore_index is -100");
    }
    // Off: -100 is an ordinary label outside [0, V) again.
    try {
        (void)ci::accept_rows(b, V, excluded, std::nullopt, COLLAPSE_NONFINITE_ERROR, true);
        ADD_FAILURE() << "label -100 accepted with ignore_index off";
    } catch (const ci::Error& e) {
        EXPECT_HAS(e.what(), "label -100 at row 1 of the batch is outside [0, 5)");
        EXPECT_HAS(e.what(), "ignore_index is null");
    }
}

// ------------------------------------------------------------------------- report vs brute force

struct Shape {
    int64_t n, d, V, batch;
};

class IgnoreIndexReport : public ::testing::TestWithParam<Shape> {};

// Rows masked, ignored (-100), excluded, non-finite (skip_row) and kept, in random order: the report's
// counts are what a row-by-row brute force says, and its metrics are the float64 reference's on the
// kept rows alone.
TEST_P(IgnoreIndexReport, CountsAndMetricsMatchBruteForce) {
    const Shape sh = GetParam();
    std::mt19937_64 g(1234 + (uint64_t)sh.n);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const int64_t excluded_id = 1;
    std::vector<double> means((size_t)(sh.V * sh.d));
    for (double& m : means) m = 2.0 * nd(g);
    std::vector<float> x((size_t)(sh.n * sh.d));
    std::vector<int32_t> y((size_t)sh.n);
    std::vector<uint8_t> valid((size_t)sh.n, 1);
    int64_t masked = 0, ignored = 0, excluded = 0, nonfinite = 0;
    std::vector<double> kx;
    std::vector<int64_t> ky;
    for (int64_t i = 0; i < sh.n; ++i) {
        const int64_t c = (int64_t)(u(g) * (double)sh.V) % sh.V;
        for (int64_t j = 0; j < sh.d; ++j) x[(size_t)(i * sh.d + j)] = (float)(means[(size_t)(c * sh.d + j)] + nd(g));
        y[(size_t)i] = u(g) < 0.2 ? -100 : (int32_t)c;
        if (u(g) < 0.1) valid[(size_t)i] = 0;
        if (u(g) < 0.03) x[(size_t)(i * sh.d + sh.d / 2)] = std::numeric_limits<float>::quiet_NaN();
        // The brute force, in the documented order.
        if (!valid[(size_t)i]) ++masked;
        else if (y[(size_t)i] == -100) ++ignored;
        else if (y[(size_t)i] == excluded_id) ++excluded;
        else if (std::isnan(x[(size_t)(i * sh.d + sh.d / 2)])) ++nonfinite;
        else {
            kx.insert(kx.end(), x.begin() + i * sh.d, x.begin() + (i + 1) * sh.d);
            ky.push_back(y[(size_t)i]);
        }
    }
    ASSERT_GT(ignored, 0);
    collapse_options o = options(sh.V);
    const int64_t ex[1] = {excluded_id};
    o.exclude_token_ids = ex;
    o.num_exclude_token_ids = 1;
    o.nonfinite_policy = COLLAPSE_NONFINITE_SKIP_ROW;
    o.svd_mode = COLLAPSE_SVD_OFF;
    SessionPtr s = make(o);
    for (int64_t r0 = 0; r0 < sh.n; r0 += sh.batch) {
        const int64_t m = std::min(sh.batch, sh.n - r0);
        const collapse_buffer fx = buf(x.data() + r0 * sh.d, COLLAPSE_F32, m, sh.d), fy = buf(y.data() + r0, COLLAPSE_I32, m),
                              fv = buf(valid.data() + r0, COLLAPSE_U8, m);
        ASSERT_EQ(collapse_session_ingest_rows(s.get(), &fx, &fy, &fv, nullptr), COLLAPSE_OK) << collapse_last_error();
    }
    const json rep = testutil::final_report(s.get());
    const json& c = rep["counts"];
    EXPECT_EQ(c["rows_seen"], sh.n);
    EXPECT_EQ(c["rows_masked"], masked);
    EXPECT_EQ(c["rows_ignored"], ignored);
    EXPECT_EQ(c["rows_excluded"], excluded);
    EXPECT_EQ(c["rows_nonfinite"], nonfinite);
    // min_samples_per_token 1, no cut: every counted row is kept, so the identity is exact.
    EXPECT_EQ(c["rows_kept"], (int64_t)ky.size());
    EXPECT_EQ(sh.n, masked + ignored + excluded + nonfinite + c["rows_kept"].get<int64_t>());
    ref::Options ro;
    ro.num_classes = sh.V;
    ro.exclude = {excluded_id};
    ro.min_samples = 1;
    const ref::Result want = ref::compute(kx, ky, sh.d, nullptr, nullptr, ro);
    EXPECT_EQ(c["classes_kept"], want.classes_kept);
    const json& oa = rep["overall_analysis"];
    EXPECT_TRUE(testutil::close("overall_gnc2", oa["overall_gnc2"], want.overall_gnc2));
    EXPECT_TRUE(testutil::close("nc1_cdnv", oa["nc1_cdnv"], want.nc1_cdnv));
    EXPECT_TRUE(testutil::close("nc2_equiangular_mean", oa["nc2_equiangular_mean"], want.nc2_equiangular_mean));
    EXPECT_TRUE(testutil::close("overall_svd_entropy", oa["overall_svd_entropy"], want.overall_svd_entropy));
    EXPECT_EQ(rep["config"]["ignore_index"], -100);
}

INSTANTIATE_TEST_SUITE_P(Shapes, IgnoreIndexReport,
                         ::testing::Values(Shape{300, 3, 7, 64}, Shape{1500, 8, 40, 500}, Shape{997, 5, 120, 997}),
                         [](const auto& info) { return "n" + std::to_string(info.param.n) + "_d" + std::to_string(info.param.d); });

// Sequences: the label of row (b, t) is input_ids[b, t + 1]; an ignore_index there drops that row, one
// at position 0 is no row's label, and a masked one counts as masked.
TEST(IgnoreIndex, SequencesUseTheShiftedLabels) {
    const int64_t B = 3, T = 6, d = 2, V = 9;
    std::vector<float> h((size_t)(B * T * d), 0.5f);
    std::vector<int64_t> ids = {-100, 1, 2, -100, -100, 3,   // two ignored rows (positions 3, 4)
                                4, -100, 5, 6, 7, 8,         // one
                                1, 2, 3, 4, -100, -100};     // position 4 masked: one ignored, one masked
    std::vector<uint8_t> mask((size_t)(B * T), 1);
    mask[(size_t)(2 * T + 4)] = 0;
    const collapse_buffer fh = buf(h.data(), COLLAPSE_F32, B * T, d), fi = buf(ids.data(), COLLAPSE_I64, B, T),
                          fm = buf(mask.data(), COLLAPSE_U8, B, T);
    SessionPtr s = make(options(V));
    ASSERT_EQ(collapse_session_ingest_sequences(s.get(), &fh, &fi, &fm, B, T, nullptr), COLLAPSE_OK) << collapse_last_error();
    const json c = testutil::final_report(s.get())["counts"];
    EXPECT_EQ(c["rows_seen"], B * (T - 1));
    EXPECT_EQ(c["rows_ignored"], 4);
    EXPECT_EQ(c["rows_masked"], 1);
    EXPECT_EQ(c["rows_kept"], B * (T - 1) - 5);
}

// ------------------------------------------------------------------------- settings

TEST(IgnoreIndex, OffOrAnotherValueRefusesMinus100AndChangesNothing) {
    const std::vector<float> x(4 * 2, 1.0f);
    const std::vector<int32_t> y = {0, 1, -100, 2}, y_ok = {0, 1, 2, 2}, y_minus1 = {0, -1, 1, 2};
    const collapse_buffer fx = buf(x.data(), COLLAPSE_F32, 4, 2), fy = buf(y.data(), COLLAPSE_I32, 4), fok = buf(y_ok.data(), COLLAPSE_I32, 4),
                          fm1 = buf(y_minus1.data(), COLLAPSE_I32, 4);
    collapse_options o = options(3);
    o.use_ignore_index = 0;  // off: the error of any label outside [0, V)
    SessionPtr s = make(o);
    const std::string msg = error_of(collapse_session_ingest_rows(s.get(), &fx, &fy, nullptr, nullptr), COLLAPSE_ERR_BAD_INPUT);
    EXPECT_HAS(msg, "label -100 at row 2 of the batch is outside [0, 3)");
    EXPECT_HAS(msg, "ignore_index is null");
    ASSERT_EQ(collapse_session_ingest_rows(s.get(), &fx, &fok, nullptr, nullptr), COLLAPSE_OK);
    json c = testutil::final_report(s.get())["counts"];
    EXPECT_EQ(c["rows_seen"], 4);  // the refused batch left nothing
    EXPECT_EQ(c["rows_ignored"], 0);

    o = options(3);
    o.ignore_index = -1;
    s = make(o);
    EXPECT_HAS(error_of(collapse_session_ingest_rows(s.get(), &fx, &fy, nullptr, nullptr), COLLAPSE_ERR_BAD_INPUT), "ignore_index is -1");
    ASSERT_EQ(collapse_session_ingest_rows(s.get(), &fx, &fm1, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    c = testutil::final_report(s.get())["counts"];
    EXPECT_EQ(c["rows_ignored"], 1);
    EXPECT_EQ(c["rows_seen"], 4);
}

// A value that is a class id would drop that class's rows without a word: refused at session creation
// naming the key; V itself (not a class) is accepted.
TEST(IgnoreIndex, AValueInsideTheClassesIsRefusedAtCreation) {
    for (int64_t bad : {int64_t(0), int64_t(3), int64_t(6)}) {
        collapse_options o = options(7);
        o.ignore_index = bad;
        collapse_session* s = nullptr;
        const std::string msg = error_of(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(s, nullptr);
        EXPECT_HAS(msg, "ignore_index");
        EXPECT_HAS(msg, "is " + std::to_string(bad) + ", a class id in [0, num_classes = 7)");
    }
    collapse_options o = options(7);
    o.ignore_index = 7;
    SessionPtr s = make(o);
    const std::vector<float> x(3, 1.0f);
    const std::vector<int32_t> y = {7, 0, 7};
    const collapse_buffer fx = buf(x.data(), COLLAPSE_F32, 3, 1), fy = buf(y.data(), COLLAPSE_I32, 3);
    ASSERT_EQ(collapse_session_ingest_rows(s.get(), &fx, &fy, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(testutil::final_report(s.get())["counts"]["rows_ignored"], 2);
}

// A caller built against collapse 0.1.0 passes the struct it knows: its struct_size ends before
// ignore_index, whose default (-100, on) it gets. The library must not read past that size (ASan
// sees the buffer end there). A size of no version is refused.
TEST(IgnoreIndex, OlderCallersStructGetsTheDefault) {
    const size_t old_size = offsetof(collapse_options, max_buffer_size) + sizeof(int64_t);
    ASSERT_LT(old_size, sizeof(collapse_options));
    collapse_options full = options(4);
    full.ignore_index = 55;  // beyond the old struct: must not be read
    full.use_ignore_index = 0;
    std::vector<unsigned char> bytes(old_size);
    std::memcpy(bytes.data(), &full, old_size);
    auto* old = reinterpret_cast<collapse_options*>(bytes.data());
    old->struct_size = (uint32_t)old_size;
    EXPECT_EQ(ci::from_options(*old).ignore_index, std::optional<int64_t>(-100));
    collapse_session* raw = nullptr;
    ASSERT_EQ(collapse_session_create(old, &raw), COLLAPSE_OK) << collapse_last_error();
    SessionPtr s(raw);
    const std::vector<float> x(3, 1.0f);
    const std::vector<int32_t> y = {-100, 0, 3};
    const collapse_buffer fx = buf(x.data(), COLLAPSE_F32, 3, 1), fy = buf(y.data(), COLLAPSE_I32, 3);
    ASSERT_EQ(collapse_session_ingest_rows(s.get(), &fx, &fy, nullptr, nullptr), COLLAPSE_OK) << collapse_last_error();
    EXPECT_EQ(testutil::final_report(s.get())["counts"]["rows_ignored"], 1);
    // This version's struct reads both fields; a size between the two versions is refused.
    EXPECT_EQ(ci::from_options(full).ignore_index, std::nullopt);
    full.struct_size = (uint32_t)(old_size + 8);
    collapse_session* none = nullptr;
    const std::string msg = error_of(collapse_session_create(&full, &none), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_HAS(msg, "struct_size is " + std::to_string(old_size + 8));
    EXPECT_HAS(msg, std::to_string(old_size));
    EXPECT_HAS(msg, std::to_string(sizeof(collapse_options)));
}

TEST(IgnoreIndex, YamlKeyParsesAndItsErrorsNameKeyAndLine) {
    EXPECT_EQ(ci::parse_yaml("", "t.yaml").ignore_index, std::optional<int64_t>(-100));
    EXPECT_EQ(ci::parse_yaml("ignore_index: null\n", "t.yaml").ignore_index, std::nullopt);
    EXPECT_EQ(ci::parse_yaml("ignore_index: -1\n", "t.yaml").ignore_index, std::optional<int64_t>(-1));
    EXPECT_EQ(ci::parse_yaml("ignore_index: 50000\n", "t.yaml").ignore_index, std::optional<int64_t>(50000));  // checked against V later
    struct Bad {
        const char* text;
        const char* piece;
    };
    for (const Bad& b : {Bad{"dim: 3\nignore_index: 2.5\n", "t.yaml:2: key 'ignore_index' expects null (off) or an integer"},
                         Bad{"ignore_index: [1]\n", "t.yaml:1: key 'ignore_index' expects"},
                         Bad{"ignore_index: \"-100\"\n", "got the string \"-100\""},
                         Bad{"ignore_index: 99999999999999999999\n", "too large"},
                         Bad{"num_classes: 10\nseed: 1\nignore_index: 4\n", "t.yaml:3: key 'ignore_index' is 4, a class id in [0, num_classes = 10)"},
                         Bad{"ignore_indx: -100\n", "did you mean 'ignore_index'"}}) {
        SCOPED_TRACE(b.text);
        try {
            (void)ci::parse_yaml(b.text, "t.yaml");
            ADD_FAILURE() << "accepted";
        } catch (const ci::Error& e) {
            EXPECT_EQ(e.status(), COLLAPSE_ERR_CONFIG);
            EXPECT_HAS(e.what(), b.piece);
        }
    }
    // The config round trip of a checkpoint's meta: to_json, then the parser.
    ci::Config off;
    off.ignore_index.reset();
    EXPECT_EQ(ci::parse_yaml(ci::to_json(off).dump(), "meta").ignore_index, std::nullopt);
    EXPECT_EQ(ci::to_json(ci::Config{})["ignore_index"], -100);
}

TEST(IgnoreIndex, OptionsFromYamlFileFillBothFields) {
    const std::string dir = ::testing::TempDir();
    struct Case {
        const char* text;
        int64_t value;
        int use;
    };
    for (const Case& c : {Case{"ignore_index: null\n", -100, 0}, Case{"ignore_index: -5\n", -5, 1}, Case{"seed: 2\n", -100, 1}}) {
        SCOPED_TRACE(c.text);
        const std::string path = dir + "/ignore_index.yaml";
        std::ofstream(path) << c.text;
        collapse_options o{};
        ASSERT_EQ(collapse_options_from_yaml_file(path.c_str(), &o), COLLAPSE_OK) << collapse_last_error();
        EXPECT_EQ(o.ignore_index, c.value);
        EXPECT_EQ(o.use_ignore_index, c.use);
    }
}

// ------------------------------------------------------------------------- checkpoints

// rows_ignored goes through a checkpoint (load and merge); a checkpoint written before the count
// existed (section rows of four) loads with none ignored; an ignored count beyond the rows seen is
// refused naming the section.
TEST(IgnoreIndex, CheckpointsCarryTheCount) {
    const std::string dir = ::testing::TempDir();
    const int64_t V = 6, n = 40;
    std::vector<float> x((size_t)n * 2);
    std::vector<int32_t> y((size_t)n), y_plain((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        x[(size_t)(2 * i)] = (float)i, x[(size_t)(2 * i + 1)] = (float)(i % 7);
        y[(size_t)i] = i % 5 == 0 ? -100 : (int32_t)(i % V);
        y_plain[(size_t)i] = (int32_t)(i % V);
    }
    const collapse_buffer fx = buf(x.data(), COLLAPSE_F32, n, 2), fy = buf(y.data(), COLLAPSE_I32, n), fp = buf(y_plain.data(), COLLAPSE_I32, n);
    const collapse_options o = options(V);
    const std::string ck = dir + "/ignored.ckpt", plain = dir + "/plain.ckpt", old = dir + "/old_format.ckpt", bad = dir + "/bad_rows.ckpt";
    {
        SessionPtr s = make(o);
        ASSERT_EQ(collapse_session_ingest_rows(s.get(), &fx, &fy, nullptr, nullptr), COLLAPSE_OK);
        ASSERT_EQ(collapse_session_save(s.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
        SessionPtr p = make(o);
        ASSERT_EQ(collapse_session_ingest_rows(p.get(), &fx, &fp, nullptr, nullptr), COLLAPSE_OK);
        ASSERT_EQ(collapse_session_save(p.get(), plain.c_str()), COLLAPSE_OK) << collapse_last_error();
    }
    SessionPtr a = make(o);
    ASSERT_EQ(collapse_session_load(a.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
    ASSERT_EQ(collapse_session_merge(a.get(), ck.c_str()), COLLAPSE_OK) << collapse_last_error();
    const json c = testutil::final_report(a.get())["counts"];
    EXPECT_EQ(c["rows_ignored"], 2 * (n / 5));
    EXPECT_EQ(c["rows_seen"], 2 * n);

    // Rewrites of a checkpoint with the rows section edited.
    auto rewrite = [](const std::string& from, const std::string& to, int64_t keep, int64_t ignored) {
        ci::io::CheckpointReader r(from);
        ci::io::CheckpointWriter w(to);
        for (const std::string& name : r.names()) {
            const auto sec = r.section(name);
            if (name != "rows") {
                w.add(name, sec.dtype_code, sec.shape, sec.data, sec.bytes);
                continue;
            }
            std::vector<int64_t> rows(static_cast<const int64_t*>(sec.data), static_cast<const int64_t*>(sec.data) + sec.bytes / 8);
            ASSERT_EQ(rows.size(), 5u);
            rows[4] = ignored;
            rows.resize((size_t)keep);
            w.add(name, COLLAPSE_I64, {keep}, rows.data(), rows.size() * 8);
        }
        w.commit();
    };
    rewrite(plain, old, 4, 0);
    SessionPtr b = make(o);
    ASSERT_EQ(collapse_session_load(b.get(), old.c_str()), COLLAPSE_OK) << collapse_last_error();
    const json cb = testutil::final_report(b.get())["counts"];
    EXPECT_EQ(cb["rows_seen"], n);
    EXPECT_EQ(cb["rows_ignored"], 0);
    rewrite(ck, bad, 5, n + 1);
    SessionPtr z = make(o);
    const std::string msg = error_of(collapse_session_load(z.get(), bad.c_str()), COLLAPSE_ERR_IO);
    EXPECT_HAS(msg, "section rows");
    EXPECT_HAS(msg, "ignored rows exceed");
}

}  // namespace
}  // namespace test_ignore_index
