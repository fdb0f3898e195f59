// `collapse analyze --ood-features F.npy`: nc5_ood_dev (docs/METRICS.md "Anchor metrics", the
// neural_collapse library's orthogonality_deviation) from the plain mean of a second input's rows,
// read in pieces; the same number as the C API's collapse_session_set_ood_mean with that mean;
// errors name the flag and the file.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "collapse/collapse.hpp"
#include "common/cli_fixture.hpp"
#include "io/tensor_file.hpp"

namespace test_cli_ood {
namespace {

class CliOod : public testutil::CliTest {};

TEST_F(CliOod, OodFeaturesGiveOrthogonalityDeviation) {
    const int64_t n = 600, d = 6, V = 5, m = 300;
    std::mt19937_64 g(3);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::vector<float> x((size_t)(n * d)), ood((size_t)(m * d));
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = (int32_t)(i % V);
        for (int64_t j = 0; j < d; ++j) x[(size_t)(i * d + j)] = (float)(2.0 * (j == y[(size_t)i]) + nd(g));
    }
    for (auto& v : ood) v = (float)(1.0 + nd(g));
    collapse::internal::io::write_npy(path("x.npy"), COLLAPSE_F32, {n, d}, x.data());
    collapse::internal::io::write_npy(path("y.npy"), COLLAPSE_I32, {n}, y.data());
    collapse::internal::io::write_npy(path("ood.npy"), COLLAPSE_F32, {m, d}, ood.data());
    run_ok("analyze --features x.npy --labels y.npy --ood-features ood.npy --quiet --output r.json");
    const nlohmann::json r = report("r.json");
    ASSERT_TRUE(r["overall_analysis"]["nc5_ood_dev"].is_number()) << r["overall_analysis"]["notes"].dump();
    EXPECT_EQ(r["input"]["ood_features"], "ood.npy");
    // The same through the C++ API with the mean of the OoD rows.
    std::vector<double> mean((size_t)d, 0.0);
    for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < d; ++j) mean[(size_t)j] += (double)ood[(size_t)(i * d + j)];
    for (double& v : mean) v /= (double)m;
    collapse_options o = collapse::default_options();
    o.num_classes = V;
    collapse::Session s(o);
    s.set_ood_mean(mean);
    s.ingest_rows(collapse::host_buffer(x.data(), n, d), collapse::host_buffer(y.data(), n));
    const double want = s.compute().value("nc5_ood_dev");
    EXPECT_NEAR(r["overall_analysis"]["nc5_ood_dev"].get<double>(), want, 1e-12 * std::fabs(want));
    // Without the flag: null with a note.
    run_ok("analyze --features x.npy --labels y.npy --quiet --output plain.json");
    EXPECT_TRUE(report("plain.json")["overall_analysis"]["nc5_ood_dev"].is_null());
    EXPECT_TRUE(report("plain.json")["overall_analysis"]["notes"].contains("nc5_ood_dev"));
    // A file of another width, and a 1-D file, are refused naming the flag and the file.
    collapse::internal::io::write_npy(path("wide.npy"), COLLAPSE_F32, {m / 2, d * 2}, ood.data());
    expect_error("analyze --features x.npy --labels y.npy --ood-features wide.npy --output bad.json", {"--ood-features", "wide.npy", "width 12"});
    collapse::internal::io::write_npy(path("flat.npy"), COLLAPSE_F32, {m}, ood.data());
    expect_error("analyze --features x.npy --labels y.npy --ood-features flat.npy --output bad.json", {"--ood-features", "flat.npy", "2-D"});
}

}  // namespace
}  // namespace test_cli_ood
