#include "driver/ood_mean.hpp"

#include <algorithm>
#include <cmath>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "io/tensor_file.hpp"

namespace collapse::internal::driver {

std::vector<double> ood_mean_of_npy(const std::string& path, HostBudget& budget, const std::string& flag) {
    if (path.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, flag, " is an empty path");
    const io::Tensor t = io::open_npy(path);
    if (t.shape.size() != 2 || t.shape[0] < 1 || t.shape[1] < 1)
        fail(COLLAPSE_ERR_SHAPE, flag, " ", path, " must be a 2-D [N, d] array of at least one row");
    if (t.dtype != COLLAPSE_F32 && t.dtype != COLLAPSE_F64 && t.dtype != COLLAPSE_F16 && t.dtype != COLLAPSE_BF16)
        fail(COLLAPSE_ERR_BAD_INPUT, flag, " ", path, " holds ", dtype_name(t.dtype), ", not floating-point features");
    const int64_t n = t.shape[0], d = t.shape[1];
    const int64_t chunk = std::min(n, std::max<int64_t>(1, (int64_t(4) << 20) / (int64_t)t.row_bytes()));
    const HostBudget::Lease lease = budget.reserve(add_bytes(mul_bytes(chunk, (int64_t)t.row_bytes()), mul_bytes(d, 8)),
                                                   flag + " " + path + ": the read buffer of " + std::to_string(chunk) + " rows and the sums of width d = " +
                                                       std::to_string(d),
                                                   "raise host_memory_limit, or leave out " + flag);
    std::vector<double> sum((size_t)d, 0.0);
    std::vector<uint8_t> buf;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const int64_t nr = std::min(chunk, n - r0);
        const void* rows = t.read_rows(r0, nr, buf);
        for (int64_t i = 0; i < nr; ++i)
            for (int64_t j = 0; j < d; ++j) {
                const double v = load_as_double(rows, t.dtype, i * d + j);
                if (!std::isfinite(v)) fail(COLLAPSE_ERR_BAD_INPUT, flag, " ", path, ": value ", v, " at row ", r0 + i, ", column ", j, " is not finite");
                sum[(size_t)j] += v;
            }
    }
    for (double& v : sum) v /= (double)n;
    return sum;
}

}  // namespace collapse::internal::driver
