/* The C API used from plain C: a session on host buffers, the classifier, a report, the error
 * paths (status, message, session still usable). Exit status 0 when every check passes. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "collapse/collapse.h"

static int failures = 0;
#define CHECK(cond)                                                                \
    do {                                                                           \
        if (!(cond)) {                                                             \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__, \
                    __LINE__, #cond, collapse_last_error());                       \
            ++failures;                                                            \
        }                                                                          \
    } while (0)

static collapse_buffer buf(const void* p, collapse_dtype t, int64_t rows, int64_t cols) {
    collapse_buffer b;
    b.data = p;
    b.dtype = t;
    b.memory = COLLAPSE_MEMORY_HOST;
    b.rows = rows;
    b.cols = cols;
    b.row_stride = 0;
    return b;
}

int main(void) {
    enum { N = 6, D = 3, V = 4 };
    /* Three classes at the corners of a triangle (class 3 never occurs), two rows each. */
    const float x[N * D] = {1, 0, 0, 1.2f, 0, 0, 0, 1, 0, 0, 1.1f, 0, 0, 0, 1, 0, 0, 0.9f};
    const int32_t y[N] = {0, 0, 1, 1, 2, 2};
    const float w[V * D] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1};
    collapse_options o;
    collapse_session* s = NULL;
    collapse_report* r = NULL;
    collapse_buffer fb = buf(x, COLLAPSE_F32, N, D), lb = buf(y, COLLAPSE_I32, N, 1), wb = buf(w, COLLAPSE_F32, V, D);
    double v = 0;
    int is_null = 0;
    int64_t ntok = 0, ids[8];
    double ent[8];
    const char* json = NULL;

    CHECK(strlen(collapse_version_string()) > 0);
    CHECK(strcmp(collapse_status_string(COLLAPSE_OK), "success") == 0);
    CHECK(collapse_backend_available("cpu") == 1);
    CHECK(collapse_options_default(&o) == COLLAPSE_OK);
    CHECK(o.struct_size == sizeof(collapse_options));
    CHECK(o.min_samples_per_token == 2);

    /* A session without V is refused with a message. */
    CHECK(collapse_session_create(&o, &s) == COLLAPSE_ERR_INVALID_ARGUMENT);
    CHECK(strstr(collapse_last_error(), "num_classes") != NULL);
    o.num_classes = V;
    o.compute_nc4 = 1;
    CHECK(collapse_session_create(&o, &s) == COLLAPSE_OK);
    CHECK(strcmp(collapse_last_error(), "") == 0); /* cleared on success */

    /* Bad label: error names row and value, session unchanged. */
    {
        const int32_t bad[N] = {0, 0, 1, 7, 2, 2};
        collapse_buffer bb = buf(bad, COLLAPSE_I32, N, 1);
        CHECK(collapse_session_ingest_rows(s, &fb, &bb, NULL, NULL) == COLLAPSE_ERR_BAD_INPUT);
        CHECK(strstr(collapse_last_error(), "label 7 at row 3") != NULL);
    }
    /* Classifier with the wrong shape. */
    {
        collapse_buffer wbad = buf(w, COLLAPSE_F32, V - 1, D);
        CHECK(collapse_session_set_classifier(s, &wbad, NULL) == COLLAPSE_ERR_SHAPE);
    }
    CHECK(collapse_session_set_classifier(s, &wb, NULL) == COLLAPSE_OK);
    CHECK(collapse_session_ingest_rows(s, &fb, &lb, NULL, NULL) == COLLAPSE_OK);
    CHECK(collapse_session_sync(s) == COLLAPSE_OK);
    /* A live snapshot of the rows so far; the session goes on and the final report sees them too. */
    {
        collapse_report* snap = NULL;
        CHECK(collapse_session_snapshot(s, &snap) == COLLAPSE_OK && snap != NULL);
        CHECK(collapse_report_get_scalar(snap, "counts.rows_kept", &v, &is_null) == COLLAPSE_OK && v == N);
        CHECK(collapse_report_get_scalar(snap, "nc4_agreement", &v, &is_null) == COLLAPSE_OK && !is_null && v == 1.0);
        CHECK(collapse_session_snapshot(s, NULL) == COLLAPSE_ERR_INVALID_ARGUMENT);
        collapse_report_destroy(snap);
    }
    CHECK(collapse_session_compute(s, &r) == COLLAPSE_OK);
    /* compute twice is refused, and so is a snapshot after compute */
    {
        collapse_report* r2 = NULL;
        CHECK(collapse_session_compute(s, &r2) == COLLAPSE_ERR_STATE);
        CHECK(r2 == NULL);
        CHECK(collapse_session_snapshot(s, &r2) == COLLAPSE_ERR_STATE);
        CHECK(strstr(collapse_last_error(), "snapshot") != NULL);
        CHECK(r2 == NULL);
    }

    CHECK(collapse_report_get_scalar(r, "counts.rows_kept", &v, &is_null) == COLLAPSE_OK && v == N && !is_null);
    CHECK(collapse_report_get_scalar(r, "classes_kept", &v, &is_null) == COLLAPSE_OK && v == 3);
    /* Three centred means of a symmetric triangle-ish layout: equiangular mean near -1/2. */
    CHECK(collapse_report_get_scalar(r, "nc2_equiangular_mean", &v, &is_null) == COLLAPSE_OK && !is_null);
    CHECK(v < -0.4 && v > -0.6);
    CHECK(collapse_report_get_scalar(r, "nc4_agreement", &v, &is_null) == COLLAPSE_OK && !is_null && v == 1.0);
    CHECK(collapse_report_get_scalar(r, "no_such_metric", &v, &is_null) == COLLAPSE_ERR_NOT_FOUND);
    CHECK(strstr(collapse_last_error(), "no_such_metric") != NULL);
    CHECK(collapse_report_num_tokens(r, &ntok) == COLLAPSE_OK && ntok == 3);
    CHECK(collapse_report_token_ids(r, ids, 8) == COLLAPSE_OK && ids[0] == 0 && ids[1] == 1 && ids[2] == 2);
    CHECK(collapse_report_token_array(r, "svd_entropy", ent, 8) == COLLAPSE_OK);
    /* Two parallel rows per class: rank 1, entropy 0 (up to the 1e-10 of the formula). */
    CHECK(fabs(ent[0]) < 1e-8 && fabs(ent[1]) < 1e-8 && fabs(ent[2]) < 1e-8);
    CHECK(collapse_report_token_array(r, "bogus", ent, 8) == COLLAPSE_ERR_NOT_FOUND);
    CHECK(collapse_report_json(r, &json) == COLLAPSE_OK && strstr(json, "\"overall_analysis\"") != NULL);
    CHECK(collapse_report_write_json(r, "/nonexistent-dir/report.json") == COLLAPSE_ERR_IO);
    CHECK(strstr(collapse_last_error(), "/nonexistent-dir/report.json") != NULL);

    /* A program built against collapse 0.1.0 calls the functions of the macros' names with its
     * smaller struct: they fill the 0.1.0 fields and write nothing past them, and a session takes
     * that struct (the later fields, here garbage, take their defaults). A size the library does not
     * know is refused, naming it. */
    {
        const size_t size010 = offsetof(collapse_options, max_buffer_size) + sizeof(int64_t);
        collapse_options old[2];
        const unsigned char* bytes = (const unsigned char*)old;
        size_t i, past = 0;
        collapse_session* s010 = NULL;
        memset(old, 0xAB, sizeof old);
        CHECK((collapse_options_default)(&old[0]) == COLLAPSE_OK);
        for (i = size010; i < sizeof old; ++i) past += bytes[i] != 0xAB;
        CHECK(past == 0);
        CHECK(old[0].struct_size == size010 && old[0].min_samples_per_token == 2);
        old[0].num_classes = V;
        CHECK(collapse_session_create(&old[0], &s010) == COLLAPSE_OK);
        CHECK(collapse_session_ingest_rows(s010, &fb, &lb, NULL, NULL) == COLLAPSE_OK);
        collapse_session_destroy(s010);
        memset(old, 0xAB, sizeof old);
        CHECK(collapse_options_init(&old[0], 5) == COLLAPSE_ERR_INVALID_ARGUMENT);
        CHECK(strstr(collapse_last_error(), "struct_size is 5") != NULL);
        CHECK(bytes[0] == 0xAB); /* refused before writing */
    }

    /* Appended entries: options from YAML text (the file reader's checks and messages), and the
     * offline analysis of .npy paths (its results: tests/python/test_api.py against the CLI). */
    {
        collapse_options y;
        collapse_analysis a;
        collapse_report* ar = NULL;
        CHECK(collapse_options_from_yaml_string("min_samples_per_token: 3\nexclude_token_ids: [1]\n", "t.yaml", &y) == COLLAPSE_OK);
        CHECK(y.min_samples_per_token == 3 && y.num_exclude_token_ids == 1 && y.exclude_token_ids[0] == 1);
        CHECK(collapse_options_from_yaml_string("min_samples_per_tokn: 3\n", "t.yaml", &y) == COLLAPSE_ERR_CONFIG);
        CHECK(strstr(collapse_last_error(), "t.yaml:1: unknown key 'min_samples_per_tokn'") != NULL);
        CHECK(collapse_options_from_yaml_string(NULL, NULL, &y) == COLLAPSE_ERR_INVALID_ARGUMENT);
        memset(&a, 0, sizeof a);
        a.struct_size = sizeof a;
        CHECK(collapse_analyze_files(&a, &ar) == COLLAPSE_ERR_INVALID_ARGUMENT && ar == NULL);
        CHECK(strstr(collapse_last_error(), "no input") != NULL);
        a.features = "/nonexistent-dir/f.npy";
        a.labels = "/nonexistent-dir/l.npy";
        CHECK(collapse_analyze_files(&a, &ar) == COLLAPSE_ERR_IO && ar == NULL);
        CHECK(strstr(collapse_last_error(), "/nonexistent-dir/") != NULL);
        a.hidden = "/nonexistent-dir/h.npy";
        CHECK(collapse_analyze_files(&a, &ar) == COLLAPSE_ERR_INVALID_ARGUMENT && ar == NULL);
        CHECK(strstr(collapse_last_error(), "choose one") != NULL);
        a.struct_size = 8;
        CHECK(collapse_analyze_files(&a, &ar) == COLLAPSE_ERR_INVALID_ARGUMENT && ar == NULL);
        CHECK(collapse_analyze_files(NULL, &ar) == COLLAPSE_ERR_INVALID_ARGUMENT);
    }

    /* NULL arguments are errors, not crashes. */
    CHECK(collapse_session_ingest_rows(NULL, &fb, &lb, NULL, NULL) == COLLAPSE_ERR_INVALID_ARGUMENT);
    CHECK(collapse_report_get_scalar(r, NULL, &v, &is_null) == COLLAPSE_ERR_INVALID_ARGUMENT);
    CHECK((collapse_options_default)(NULL) == COLLAPSE_ERR_INVALID_ARGUMENT);
    CHECK(collapse_options_init(NULL, sizeof(collapse_options)) == COLLAPSE_ERR_INVALID_ARGUMENT);

    collapse_report_destroy(r);
    collapse_session_destroy(s);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("c_api: all checks passed\n");
    return 0;
}
