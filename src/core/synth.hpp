// Deterministic synthetic rows with a controlled amount of neural collapse, for tests, benchmarks
// and `collapse synth`.
//
// Every random number is a pure function of (seed, stream, index): row r's label and features
// depend only on (seed, r), so any chunking of the rows, in any order or on any machine, gives the
// same bytes. Memory is O(V*d) (the class means); nothing is proportional to the row count.
//
// The model:
//   label(r)   ~ Zipf(s) over ranks 1..V, rank k -> token id perm[k] (a seeded permutation, so the
//                frequent ids are spread over the vocabulary rather than being 0, 1, 2, ...)
//   mean_c     = mean_norm * normalise(collapse * etf_c + (1 - collapse) * g_c)
//   x_r        = mean_{label(r)} + noise * (1 - collapse) * N(0, I_d)
//   W_c        = mean_c / ||mean_c|| + classifier_noise * N(0, I_d)
// g_c are random unit directions. etf_c are the directions of a simplex ETF when V <= d (unit
// vectors with pairwise cosine -1/(V-1), summing to zero). An exact simplex ETF of V vectors needs
// V <= d+1; this generator builds it for V <= d and uses random unit directions for etf_c when
// V > d (random high-dimensional directions are then nearly orthogonal, the best that fits).
#pragma once
#include <cstdint>
#include <vector>

#include "collapse/collapse.h"

namespace collapse::internal {

struct SynthSpec {
    int64_t rows = 200000, dim = 256, classes = 2048;  // N, d, V
    double zipf_s = 1.1;             // label frequencies ~ rank^-s (0 = uniform)
    double collapse = 0.5;           // in [0,1]: 1 = means on a simplex ETF and no within-class noise
    double noise = 1.0;              // within-class std per coordinate at collapse = 0
    double mean_norm = 8.0;          // norm of every class mean
    double classifier_noise = 0.1;   // W = normalised means + this much noise per coordinate
    uint64_t seed = 1;
    collapse_dtype dtype = COLLAPSE_F32;  // features: F32, F16, BF16 or F64
};

class SynthGenerator {
public:
    // Validates the spec: Error(COLLAPSE_ERR_INVALID_ARGUMENT) naming the offending field.
    explicit SynthGenerator(const SynthSpec& spec);

    const SynthSpec& spec() const { return spec_; }

    // Labels of rows [first_row, first_row + count), which must lie inside [0, rows).
    void labels(int64_t first_row, int64_t count, int32_t* out) const;

    // Features of rows [first_row, first_row + count) given their labels, in spec().dtype, packed
    // [count, dim]. Computed in double and rounded once to float (F32), then F16/BF16 are the F32
    // values rounded to nearest even; F64 is the double value.
    void features(int64_t first_row, int64_t count, const int32_t* labels, void* out) const;

    // The classifier W, [classes, dim] float32.
    void classifier(float* out) const;

    // The true class means, [classes, dim].
    const std::vector<double>& class_means() const { return means_; }

    // Token id of Zipf rank k (0-based: rank 0 is the most frequent id).
    int32_t token_of_rank(int64_t rank) const { return rank_to_token_[(size_t)rank]; }

private:
    SynthSpec spec_;
    std::vector<double> cdf_;             // [V] cumulative Zipf probabilities over ranks, cdf_.back() == 1
    std::vector<int32_t> rank_to_token_;  // [V] the seeded permutation
    std::vector<double> means_;           // [V, d]
};

}  // namespace collapse::internal
