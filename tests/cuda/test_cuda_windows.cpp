// Generation-time windows on the CUDA backend. The backend does not compute them yet
// (core/backend.hpp's window hooks keep their refusing defaults there): a request for windows is
// refused clearly and changes nothing, and the sequences layout under compute_window_metrics: auto
// runs without them, saying so in the report. Skips without a device.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"

namespace {

using nlohmann::json;

bool have_device() { return collapse_backend_available("cuda") != 0; }

collapse_options cuda_opts() {
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = 4;
    o.backend = COLLAPSE_BACKEND_CUDA;
    o.window_size = 2;
    return o;
}

json report(collapse_session* s) {
    collapse_report* r = nullptr;
    EXPECT_EQ(collapse_session_compute(s, &r), COLLAPSE_OK) << collapse_last_error();
    const char* text = nullptr;
    EXPECT_EQ(collapse_report_json(r, &text), COLLAPSE_OK);
    json doc = json::parse(text);
    collapse_report_destroy(r);
    return doc;
}

const std::string kNotYet = "window metrics are not implemented on the cuda backend yet";

TEST(CudaWindows, ExplicitRequestIsRefusedAtCreation) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    collapse_options o = cuda_opts();
    o.compute_window_metrics = 1;
    collapse_session* s = nullptr;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find(kNotYet), std::string::npos) << collapse_last_error();
}

TEST(CudaWindows, TaggedRowsAreRefusedAndTheSessionUnchanged) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    const collapse_options o = cuda_opts();
    collapse_session* s = nullptr;
    ASSERT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    std::vector<float> x{1, 2, 3, 4, 5, 7};
    std::vector<int32_t> y{0, 1, 2};
    std::vector<int64_t> seq{0, 0, 0};
    const collapse_buffer f{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 3, 2, 0}, l{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 3, 1, 0},
                          q{seq.data(), COLLAPSE_I64, COLLAPSE_MEMORY_HOST, 3, 1, 0};
    EXPECT_EQ(collapse_session_ingest_tagged_rows(s, &f, &l, nullptr, &q, nullptr, nullptr), COLLAPSE_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(collapse_last_error()).find(kNotYet), std::string::npos) << collapse_last_error();
    const json doc = report(s);
    EXPECT_EQ(doc["counts"]["rows_seen"], 0);
    collapse_session_destroy(s);
}

TEST(CudaWindows, SequencesLayoutRunsWithoutWindowsAndSaysSo) {
    if (!have_device()) GTEST_SKIP() << "no usable CUDA device";
    const collapse_options o = cuda_opts();
    collapse_session* s = nullptr;
    ASSERT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    const int64_t B = 2, T = 5, d = 3;
    std::vector<float> h((size_t)(B * T * d));
    for (size_t i = 0; i < h.size(); ++i) h[i] = (float)((i * 7) % 11);
    std::vector<int32_t> ids((size_t)(B * T));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = (int32_t)(i % 4);
    const collapse_buffer hb{h.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, B * T, d, 0}, ib{ids.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, B, T, 0};
    ASSERT_EQ(collapse_session_ingest_sequences(s, &hb, &ib, nullptr, B, T, nullptr), COLLAPSE_OK) << collapse_last_error();
    const json doc = report(s);
    EXPECT_TRUE(doc["sequence_analysis"].is_null());
    EXPECT_EQ(doc["overall_analysis"]["notes"]["window_summary"], kNotYet);
    collapse_session_destroy(s);
}

}  // namespace
