/* An outside program of the installed library (tests/install/run_install_test.sh builds it with
 * find_package(collapse) and with pkg-config): creates a CPU session, ingests rows, computes, and
 * checks nc2_equinorm_cov against the same number computed here from docs/METRICS.md:
 * std_unbiased(||m_c||) / mean(||m_c||), m_c = mu_c - mu_G, mu_G = mean of the class means. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <collapse/collapse.h>

#define N 60
#define D 3
#define V 4

static int check(collapse_status st, const char* what) {
    if (st != COLLAPSE_OK) fprintf(stderr, "consumer: %s: %s: %s\n", what, collapse_status_string(st), collapse_last_error());
    return st == COLLAPSE_OK;
}

/* With argument "fake": backend cuda is tests/unit/fake_cuda_module (COLLAPSE_CUDA_MODULE), whose
 * ingest throws collapse::internal::Error(COLLAPSE_ERR_BAD_INPUT) inside the module: the library's
 * C API must return that status and message. */
static int fake_module_error_reaches_the_c_api(void) {
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = 4;
    o.dim = 2;
    o.backend = COLLAPSE_BACKEND_CUDA;
    collapse_session* s = NULL;
    if (!check(collapse_session_create(&o, &s), "session_create (fake cuda module)")) return 1;
    const float x[4] = {1, 2, 3, 4};
    const int32_t y[2] = {0, 1};
    collapse_buffer xb = {x, COLLAPSE_F32, COLLAPSE_MEMORY_HOST, 2, 2, 0};
    collapse_buffer yb = {y, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 2, 1, 0};
    const collapse_status st = collapse_session_ingest_rows(s, &xb, &yb, NULL, NULL);
    const int ok = st == COLLAPSE_ERR_BAD_INPUT && strstr(collapse_last_error(), "fake cuda module: refused a batch of 2 rows");
    printf("fake cuda module: status %d, \"%s\"\n", (int)st, collapse_last_error());
    collapse_session_destroy(s);
    return ok ? 0 : 1;
}

int main(int argc, char** argv) {
    if (argc > 1 && strcmp(argv[1], "fake") == 0) return fake_module_error_reaches_the_c_api();

    double x[N * D];
    int32_t y[N];
    unsigned state = 12345u;
    for (int i = 0; i < N; ++i) {
        y[i] = i % V;
        for (int k = 0; k < D; ++k) {
            state = state * 1103515245u + 12345u; /* deterministic noise in [-0.5, 0.5) */
            x[i * D + k] = (double)((state >> 8) % 1000u) / 1000.0 - 0.5 + (k == y[i] % D ? 1.0 + y[i] : 0.0);
        }
    }

    /* The expected value, straight from the definition. */
    double mu[V][D], count[V], mu_g[D], norm[V], mean = 0, var = 0;
    memset(mu, 0, sizeof mu);
    memset(count, 0, sizeof count);
    memset(mu_g, 0, sizeof mu_g);
    for (int i = 0; i < N; ++i) {
        count[y[i]] += 1;
        for (int k = 0; k < D; ++k) mu[y[i]][k] += x[i * D + k];
    }
    for (int c = 0; c < V; ++c)
        for (int k = 0; k < D; ++k) {
            mu[c][k] /= count[c];
            mu_g[k] += mu[c][k] / V;
        }
    for (int c = 0; c < V; ++c) {
        double s = 0;
        for (int k = 0; k < D; ++k) s += (mu[c][k] - mu_g[k]) * (mu[c][k] - mu_g[k]);
        norm[c] = sqrt(s);
        mean += norm[c] / V;
    }
    for (int c = 0; c < V; ++c) var += (norm[c] - mean) * (norm[c] - mean) / (V - 1);
    const double expected = sqrt(var) / mean;

    collapse_options o;
    if (!check(collapse_options_default(&o), "options_default")) return 1;
    o.num_classes = V;
    o.svd_mode = COLLAPSE_SVD_OFF;
    collapse_session* s = NULL;
    if (!check(collapse_session_create(&o, &s), "session_create")) return 1;
    /* Two batches, to go through the streaming path. */
    for (int b = 0; b < 2; ++b) {
        const int rows = N / 2;
        collapse_buffer xb = {x + b * rows * D, COLLAPSE_F64, COLLAPSE_MEMORY_HOST, rows, D, 0};
        collapse_buffer yb = {y + b * rows, COLLAPSE_I32, COLLAPSE_MEMORY_HOST, rows, 1, 0};
        if (!check(collapse_session_ingest_rows(s, &xb, &yb, NULL, NULL), "ingest_rows")) return 1;
    }
    collapse_report* r = NULL;
    if (!check(collapse_session_compute(s, &r), "compute")) return 1;
    double got = 0;
    int is_null = 1;
    if (!check(collapse_report_get_scalar(r, "nc2_equinorm_cov", &got, &is_null), "get_scalar")) return 1;
    collapse_report_destroy(r);
    collapse_session_destroy(s);

    printf("collapse %s: nc2_equinorm_cov %.12f, expected %.12f\n", collapse_version_string(), got, expected);
    if (is_null || !(fabs(got - expected) <= 1e-9 * fabs(expected))) {
        fprintf(stderr, "consumer: nc2_equinorm_cov %.17g (null %d) differs from %.17g\n", got, is_null, expected);
        return 1;
    }
    /* The CUDA backend is opened on demand; whatever this machine has, the answer is a status. */
    o.backend = COLLAPSE_BACKEND_CUDA;
    const collapse_status cuda = collapse_session_create(&o, &s);
    if (cuda == COLLAPSE_OK) collapse_session_destroy(s);
    else if (cuda != COLLAPSE_ERR_NO_CUDA || strlen(collapse_last_error()) == 0) {
        fprintf(stderr, "consumer: backend cuda gave %d: %s\n", (int)cuda, collapse_last_error());
        return 1;
    }
    printf("backend cuda: %s\n", cuda == COLLAPSE_OK ? "available" : collapse_last_error());
    return 0;
}
