// Per-class sums about a reference row, shared by every backend, their checkpoints and the MPI
// combine (which merges checkpoint sections): the class's reference row s_c is its first row, in
// float32 (a row of the data, so x - s_c is small for a tight class: any shift makes the identities
// below exact, this one keeps the digits). Kept with compute_class_metrics:
//   within_shift    f32 [V, d]   s_c (rows of classes without rows: anything finite)
//   class_sqdev     f64 [V]      sum ||x - s_c||^2 per class (var_c = q/n - ||mu_c - s_c||^2)
//   within_scatter  f64 [d, d]   with Sigma_W streaming: sum over rows of classes that reached
//                                min_samples_per_token of (x - s_c)(x - s_c)^T, row-major upper
// class_sqnorms (sum ||x||^2) is still written, derived from these, so that a build without them
// reads the file; a file without class_sqdev is read as sums about the zero row.
#pragma once
#include <cstdint>
#include <vector>

#include "core/host_budget.hpp"
#include "core/metrics.hpp"
#include "core/state_io.hpp"
#include "core/state_sections.hpp"

namespace collapse::internal {

// The reference row's value of x: float32 of it, or 0 where that is not finite (the row of a batch
// about to be refused; any finite shift keeps the identities exact).
inline float shift_value(double x) {
    const float f = (float)x;
    return f - f == 0.0f ? f : 0.0f;
}

// ||S - n s||^2 (s null: the zero row), in float64.
double shifted_mean_norm2(int64_t n, const double* sum, const float* shift, int64_t d);

// var_c = E||x - mu_c||^2 from q = sum ||x - s||^2 about s (null: the zero row): metric_math.hpp's
// shifted_variance.
double class_variance(double q, int64_t n, const double* sum, const float* shift, int64_t d);

// sum ||x - a||^2 from q = sum ||x - b||^2 (b = from, a = to; null: the zero row), exactly:
// sum ||x - a||^2 = sum ||x - b||^2 + 2 (b - a).(S - n b) + n ||b - a||^2.
double move_sqdev(double q, int64_t n, const double* sum, const float* from, const float* to, int64_t d);

// The optional sections above, checked (shape, type, finite, non-negative) against V and d; null
// where absent (within_scatter is taken only with within_shift).
struct ShiftedSections {
    const float* shift = nullptr;
    const double* sqdev = nullptr;
    const double* scatter = nullptr;
};
ShiftedSections read_shifted_sections(const StateReader& r, int64_t V, int64_t d);

// write_state_core with class_sqnorms derived from (counts, sums, shift, sqdev), then within_shift
// and class_sqdev (shift null: none, sqdev is then sum ||x||^2) and within_scatter (null: none).
void write_shifted_state(StateWriter& w, HostBudget& budget, const Counts& rows, int64_t V, int64_t d, const int64_t* counts,
                         const double* sums, const float* shift, const double* sqdev, const double* scatter);

// Another state's (v, t) per-class sums of squares merged into this one's, before its counts and
// sums are added: before[c] = this state's n_c. shift: this state's [V, d] reference rows (null: it
// keeps none, its sqdev is about the zero row); a class new here takes the other state's reference
// row. scatter (null: not merged): this state's shifted scatter (row-major upper); the other's,
// t.scatter (required then), is moved to this state's rows, class by class, with
// sum (x - a)(x - a)^T = sum (x - b)(x - b)^T + D t^T + t D^T + n t t^T, t = b - a, D = S - n b,
// for classes with min_samples rows there (the others' rows are held back and enter later).
// Its scratch (counted in `budget` by it): for callers that check before they change anything.
int64_t merge_shifted_bytes(int64_t V, int64_t d, bool scatter);
void merge_shifted_state(HostBudget& budget, int64_t V, int64_t d, int64_t min_samples, const int64_t* before, const StateView& v,
                         const ShiftedSections& t, float* shift, double* sqdev, double* scatter);

// The shifted scatter w (row-major upper, sum over kept rows of (x - s_c)(x - s_c)^T) made Sigma_W's
// scatter about the class means: minus sum_c n_c (mu_c - s_c)(mu_c - s_c)^T over the kept classes
// (e_c = (S_c - n_c s_c) / sqrt(n_c), one dsyrk). sums/shift: rows of class ids[k] at ids[k] * d.
void unshift_scatter(HostBudget& budget, double* w, int64_t d, const std::vector<int32_t>& ids, const int64_t* counts,
                     const double* sums, const float* shift);

}  // namespace collapse::internal
