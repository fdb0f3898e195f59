#include "core/synth.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "base/dtype.hpp"
#include "base/error.hpp"

namespace collapse::internal {
namespace {

// ---- counter-based random numbers -------------------------------------------------------------
// splitmix64's finaliser is a bijective 64-bit mixer. A "key" names a sequence; element j of that
// sequence is mix(key + (j+1)*golden), exactly the splitmix64 stream started at `key`. Keys are
// derived the same way from (seed, stream, index), so every number depends only on its coordinates.

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

inline uint64_t element(uint64_t key, uint64_t j) { return mix64(key + (j + 1) * kGolden); }

// Independent streams: one per kind of quantity, so changing e.g. the noise never moves the labels.
enum Stream : uint64_t {
    kLabels = 1,
    kPermutation = 2,
    kDirections = 3,   // g_c
    kRotation = 4,     // Householder vectors of the ETF rotation
    kEtfFallback = 5,  // etf_c when V > d
    kRowNoise = 6,
    kClassifierNoise = 7,
};

inline uint64_t stream_key(uint64_t seed, Stream s) { return element(mix64(seed) ^ mix64(s * kGolden), 0); }
inline uint64_t sub_key(uint64_t key, uint64_t index) { return element(key ^ 0x5bd1e9955bd1e995ull, index); }

// Uniform in the open interval (0, 1): 53 random bits, centred in their cell, so log() is safe.
inline double uniform(uint64_t bits) { return ((double)(bits >> 11) + 0.5) * 0x1p-53; }

// out[j] = N(0,1) number j of the sequence `key`, j in [0, n). Box-Muller on pairs (2p, 2p+1), so
// out[j] does not depend on n.
void fill_normals(uint64_t key, int64_t n, double* out) {
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    for (int64_t p = 0; 2 * p < n; ++p) {
        const double r = std::sqrt(-2.0 * std::log(uniform(element(key, 2 * (uint64_t)p))));
        const double t = kTwoPi * uniform(element(key, 2 * (uint64_t)p + 1));
        out[2 * p] = r * std::cos(t);
        if (2 * p + 1 < n) out[2 * p + 1] = r * std::sin(t);
    }
}

double norm(const double* x, int64_t n) {
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
    return std::sqrt(s);
}

// A uniformly random unit vector: a normalised Gaussian.
void random_unit(uint64_t key, int64_t n, double* out) {
    fill_normals(key, n, out);
    const double r = norm(out, n);
    for (int64_t j = 0; j < n; ++j) out[j] /= r;
}

void check_finite(double v, double lo, double hi, const char* field, const char* range) {
    if (!(std::isfinite(v) && v >= lo && v <= hi))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: ", field, " = ", v, " must be ", range);
}

void validate(const SynthSpec& s) {
    const double inf = std::numeric_limits<double>::infinity();
    if (s.rows <= 0) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: rows = ", s.rows, " must be > 0");
    if (s.dim <= 0) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: dim = ", s.dim, " must be > 0");
    if (s.classes <= 0 || s.classes > std::numeric_limits<int32_t>::max())
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: classes = ", s.classes, " must be in [1, 2^31 - 1] (labels are int32)");
    // The means are V*d doubles held in memory; 2^31 of them is 16 GiB.
    if (s.classes > (int64_t(1) << 31) / s.dim)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: classes * dim = ", s.classes, " * ", s.dim,
             " exceeds 2^31 (the class means are held in memory as float64)");
    // Keeps every byte count of the features (rows * dim * 8) inside int64.
    if (s.rows > std::numeric_limits<int64_t>::max() / 8 / s.dim)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: rows * dim = ", s.rows, " * ", s.dim, " is too large");
    check_finite(s.zipf_s, 0.0, inf, "zipf_s", "finite and >= 0");
    check_finite(s.collapse, 0.0, 1.0, "collapse", "in [0, 1]");
    check_finite(s.noise, 0.0, inf, "noise", "finite and >= 0");
    if (!(std::isfinite(s.mean_norm) && s.mean_norm > 0))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: mean_norm = ", s.mean_norm, " must be finite and > 0");
    check_finite(s.classifier_noise, 0.0, inf, "classifier_noise", "finite and >= 0");
    if (s.dtype != COLLAPSE_F32 && s.dtype != COLLAPSE_F16 && s.dtype != COLLAPSE_BF16 && s.dtype != COLLAPSE_F64)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: dtype = ", dtype_is_valid((int)s.dtype) ? dtype_name(s.dtype) : "?",
             " (", (int)s.dtype, ") must be float32, float16, bfloat16 or float64");
}

void check_range(const SynthSpec& s, int64_t first_row, int64_t count, const void* out, const char* what) {
    if (first_row < 0 || count < 0 || count > s.rows - first_row)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: ", what, " rows [", first_row, ", ", first_row, " + ", count,
             ") outside [0, ", s.rows, ")");
    if (count > 0 && out == nullptr) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: ", what, ": null output buffer");
}

// Simplex-ETF directions for V <= d: the unit vectors sqrt(V/(V-1)) (e_c - 1/V) of R^V, placed in the
// first V coordinates of R^d and then rotated by R = H_k ... H_1, a product of seeded Householder
// reflections. R is orthogonal, so the cosines stay exactly -1/(V-1), and the directions are dense
// rather than axis-aligned. O(k*V*d) time, no d x d matrix.
void etf_directions(uint64_t seed, int64_t V, int64_t d, std::vector<double>& etf) {
    constexpr int kReflections = 4;
    const double scale = std::sqrt((double)V / (double)(V - 1));
    std::vector<double> h((size_t)(kReflections * d));
    const uint64_t rot = stream_key(seed, kRotation);
    for (int k = 0; k < kReflections; ++k) random_unit(sub_key(rot, (uint64_t)k), d, &h[(size_t)(k * d)]);
    for (int64_t c = 0; c < V; ++c) {
        double* x = &etf[(size_t)(c * d)];
        for (int64_t j = 0; j < V; ++j) x[j] = scale * ((j == c ? 1.0 : 0.0) - 1.0 / (double)V);
        for (int k = 0; k < kReflections; ++k) {
            const double* v = &h[(size_t)(k * d)];
            double dot = 0;
            for (int64_t j = 0; j < d; ++j) dot += v[j] * x[j];
            for (int64_t j = 0; j < d; ++j) x[j] -= 2.0 * dot * v[j];
        }
    }
}

}  // namespace

SynthGenerator::SynthGenerator(const SynthSpec& spec) : spec_(spec) {
    validate(spec_);
    const int64_t V = spec_.classes, d = spec_.dim;
    const uint64_t seed = spec_.seed;

    // Zipf table over ranks; the explicit 1.0 at the end makes every u < 1 land on a rank.
    cdf_.resize((size_t)V);
    double total = 0;
    for (int64_t k = 0; k < V; ++k) {
        total += std::pow((double)(k + 1), -spec_.zipf_s);
        cdf_[(size_t)k] = total;
    }
    for (double& c : cdf_) c /= total;
    cdf_.back() = 1.0;

    // Fisher-Yates with counter-based draws (modulo bias is below V / 2^64).
    rank_to_token_.resize((size_t)V);
    std::iota(rank_to_token_.begin(), rank_to_token_.end(), 0);
    const uint64_t perm = stream_key(seed, kPermutation);
    for (int64_t i = V - 1; i > 0; --i) {
        const int64_t j = (int64_t)(element(perm, (uint64_t)i) % (uint64_t)(i + 1));
        std::swap(rank_to_token_[(size_t)i], rank_to_token_[(size_t)j]);
    }

    // etf_c, then g_c mixed in, then renormalised to mean_norm.
    means_.assign((size_t)(V * d), 0.0);
    if (V >= 2 && V <= d) {
        etf_directions(seed, V, d, means_);
    } else {
        const uint64_t fb = stream_key(seed, kEtfFallback);
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < V; ++c) random_unit(sub_key(fb, (uint64_t)c), d, &means_[(size_t)(c * d)]);
    }
    // Every class draws from its own counter-based stream, so the classes can be built in any
    // order, on any number of threads, with the same bytes.
    const double a = spec_.collapse, b = 1.0 - spec_.collapse;
    const uint64_t dirs = stream_key(seed, kDirections);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < V; ++c) {
        std::vector<double> g((size_t)d), etf((size_t)d);
        double* m = &means_[(size_t)(c * d)];
        random_unit(sub_key(dirs, (uint64_t)c), d, g.data());
        std::copy(m, m + d, etf.begin());
        for (int64_t j = 0; j < d; ++j) m[j] = a * etf[(size_t)j] + b * g[(size_t)j];
        double r = norm(m, d);
        // The mix cancels only when g_c = -etf_c at collapse = 0.5 (probability zero); keep etf_c then.
        if (!(r > 1e-12)) {
            std::copy(etf.begin(), etf.end(), m);
            r = 1.0;
        }
        for (int64_t j = 0; j < d; ++j) m[j] *= spec_.mean_norm / r;
    }
}

void SynthGenerator::labels(int64_t first_row, int64_t count, int32_t* out) const {
    check_range(spec_, first_row, count, out, "labels");
    const uint64_t key = stream_key(spec_.seed, kLabels);
    for (int64_t i = 0; i < count; ++i) {
        const double u = uniform(element(key, (uint64_t)(first_row + i)));
        const auto rank = std::upper_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin();
        out[i] = rank_to_token_[(size_t)std::min<int64_t>(rank, spec_.classes - 1)];
    }
}

void SynthGenerator::features(int64_t first_row, int64_t count, const int32_t* labels, void* out) const {
    check_range(spec_, first_row, count, out, "features");
    if (count > 0 && labels == nullptr) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: features: null labels");
    const int64_t d = spec_.dim;
    const double sigma = spec_.noise * (1.0 - spec_.collapse);
    const uint64_t key = stream_key(spec_.seed, kRowNoise);
    for (int64_t i = 0; i < count; ++i)  // checked first: nothing may throw inside the parallel loop
        if (labels[i] < 0 || labels[i] >= spec_.classes)
            fail(COLLAPSE_ERR_BAD_INPUT, "synth: features: label ", labels[i], " of row ", first_row + i, " outside [0, ",
                 spec_.classes, ")");
    // Row r's noise is its own stream: any split over threads gives the same bytes.
#pragma omp parallel
    {
    std::vector<double> x((size_t)d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
        const int64_t r = first_row + i, c = labels[i];
        const double* m = &means_[(size_t)(c * d)];
        // sigma == 0 (collapse = 1 or noise = 0) leaves rows exactly at their means.
        if (sigma > 0) {
            fill_normals(sub_key(key, (uint64_t)r), d, x.data());
            for (int64_t j = 0; j < d; ++j) x[(size_t)j] = m[j] + sigma * x[(size_t)j];
        } else {
            std::copy(m, m + d, x.begin());
        }
        const size_t o = (size_t)(i * d);
        switch (spec_.dtype) {
            case COLLAPSE_F64: std::copy(x.begin(), x.end(), (double*)out + o); break;
            case COLLAPSE_F32:
                for (int64_t j = 0; j < d; ++j) ((float*)out)[o + (size_t)j] = (float)x[(size_t)j];
                break;
            case COLLAPSE_F16:
                for (int64_t j = 0; j < d; ++j) ((uint16_t*)out)[o + (size_t)j] = float_to_half((float)x[(size_t)j]);
                break;
            case COLLAPSE_BF16:
                for (int64_t j = 0; j < d; ++j) ((uint16_t*)out)[o + (size_t)j] = float_to_bf16((float)x[(size_t)j]);
                break;
            default: break;  // validate() admits only the four float dtypes
        }
    }
    }
}

void SynthGenerator::classifier(float* out) const {
    if (out == nullptr) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "synth: classifier: null output buffer");
    const int64_t V = spec_.classes, d = spec_.dim;
    const uint64_t key = stream_key(spec_.seed, kClassifierNoise);
    std::vector<double> z((size_t)d, 0.0);
    for (int64_t c = 0; c < V; ++c) {
        const double* m = &means_[(size_t)(c * d)];
        const double r = norm(m, d);
        if (spec_.classifier_noise > 0) fill_normals(sub_key(key, (uint64_t)c), d, z.data());
        for (int64_t j = 0; j < d; ++j)
            out[(size_t)(c * d + j)] = (float)(m[j] / r + spec_.classifier_noise * z[(size_t)j]);
    }
}

}  // namespace collapse::internal
