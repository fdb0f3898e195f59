/*
 * collapse: neural-collapse metrics of last-layer hidden states.
 *
 * The C API. This is the only header an inference server needs; it includes no CUDA header
 * (streams travel as void*). Conventions:
 *  - every call returns a collapse_status, 0 (COLLAPSE_OK) on success;
 *  - on failure collapse_last_error() gives a message for the calling thread; it is cleared by
 *    the next successful call on that thread;
 *  - no exception and no abort() crosses this boundary;
 *  - a call that fails changes nothing: the session stays usable.
 * Metric definitions: docs/METRICS.md of the project.
 *
 * Threads:
 *  - different sessions may be used from different threads at the same time, with no locking;
 *  - one session may move between threads, but its calls must not overlap. A session call made
 *    while another thread's call on the same session runs is refused, without waiting and without
 *    changing the session, with COLLAPSE_ERR_STATE ("in use by another thread"); serialise the calls
 *    (a mutex per session) to share a session;
 *  - collapse_session_destroy must not overlap any call on that session (the caller's error). When
 *    it sees a call still running it frees nothing (the session leaks rather than crashes) and sets
 *    collapse_last_error(); call it again once the other thread's call has returned;
 *  - collapse_last_error() is per thread: it describes the calling thread's last call only;
 *  - a report is read-only once collapse_session_compute or collapse_session_snapshot has
 *    returned it: any number of threads may call the collapse_report_* getters on it at once (not
 *    collapse_report_destroy, which must come after the last of them). A report does not depend on
 *    its session; either may be destroyed first, and a snapshot's report stays as it was while the
 *    session goes on;
 *  - collapse_session_snapshot is a session call like the others: it does not run concurrently
 *    with any other call on the same session (ingest included); one that overlaps it is refused
 *    with COLLAPSE_ERR_STATE by the rule above, without waiting. Other sessions, and readers of
 *    reports (earlier snapshots too), are not affected. With the CUDA backend it first waits, on the
 *    host, for the session's queued work: cudaStreamSynchronize of the stream of the last ingest
 *    call (the caller's stream, or the session's own when that call passed NULL), which by the
 *    session's stream ordering covers every earlier batch but also waits for whatever else the
 *    caller queued on that stream before the snapshot; then it computes on the session's own
 *    stream (a blocking stream) and waits for that. Its small synchronous copies (class counts;
 *    in exact mode the row buffer's move to host memory) run on the legacy default stream, so they
 *    also wait for work queued before them on the caller's blocking streams; work on the caller's
 *    other streams created with cudaStreamNonBlocking is not waited for (a model running there
 *    goes on).
 *    The first snapshot (or one larger than all before it) may allocate its workspace; in exact
 *    mode that includes a pinned host buffer, and a pinned allocation waits for the whole device;
 *    later ones reuse it. A batch ingested after a snapshot, on any stream, is ordered after its
 *    work. A deferred device-side error of an earlier batch is reported by the snapshot (as by
 *    collapse_session_sync);
 *  - collapse_options_from_yaml_file's (and _from_yaml_string's) exclude_token_ids storage is per
 *    thread (see below);
 *    the other functions without a session or report are safe from any thread.
 */
#ifndef COLLAPSE_COLLAPSE_H
#define COLLAPSE_COLLAPSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define COLLAPSE_VERSION_MAJOR 0
#define COLLAPSE_VERSION_MINOR 1
#define COLLAPSE_VERSION_PATCH 0

typedef enum collapse_status {
    COLLAPSE_OK = 0,
    COLLAPSE_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a bad enum, a bad option value */
    COLLAPSE_ERR_CONFIG = 2,           /* YAML config: unknown key, wrong type, out of range */
    COLLAPSE_ERR_IO = 3,               /* a file could not be read or written, or is corrupt */
    COLLAPSE_ERR_BAD_INPUT = 4,        /* label out of range, non-finite feature */
    COLLAPSE_ERR_SHAPE = 5,            /* feature width or classifier shape mismatch */
    COLLAPSE_ERR_STATE = 6,            /* call out of order, e.g. compute called twice */
    COLLAPSE_ERR_OUT_OF_MEMORY = 7,    /* a memory limit would be exceeded */
    COLLAPSE_ERR_NO_CUDA = 8,          /* CUDA requested on a build or machine without it */
    COLLAPSE_ERR_NOT_FOUND = 9,        /* unknown report key or token */
    COLLAPSE_ERR_INTERNAL = 10
} collapse_status;

typedef enum collapse_dtype {
    COLLAPSE_F32 = 0,
    COLLAPSE_F16 = 1,
    COLLAPSE_BF16 = 2,
    COLLAPSE_F64 = 3,
    COLLAPSE_I32 = 4,
    COLLAPSE_I64 = 5,
    COLLAPSE_U8 = 6, /* masks only */
    COLLAPSE_BOOL = 7 /* masks only, one byte per element */
} collapse_dtype;

typedef enum collapse_memory {
    COLLAPSE_MEMORY_HOST = 0,
    COLLAPSE_MEMORY_DEVICE = 1 /* with the CUDA backend */
} collapse_memory;

/* A self-describing 1-D or 2-D buffer. For 1-D buffers cols = 1.
 * row_stride is in ELEMENTS between the starts of consecutive rows; 0 means cols (packed). */
typedef struct collapse_buffer {
    const void* data;
    collapse_dtype dtype;
    collapse_memory memory;
    int64_t rows;
    int64_t cols;
    int64_t row_stride;
} collapse_buffer;

typedef enum collapse_svd_mode { COLLAPSE_SVD_EXACT = 0, COLLAPSE_SVD_SAMPLED = 1, COLLAPSE_SVD_OFF = 2 } collapse_svd_mode;
typedef enum collapse_global_mean { COLLAPSE_MEAN_CLASS_BALANCED = 0, COLLAPSE_MEAN_TOKEN_WEIGHTED = 1 } collapse_global_mean;
typedef enum collapse_unc3_classifier { COLLAPSE_UNC3_WEIGHTS = 0, COLLAPSE_UNC3_CLASS_MEANS = 1 } collapse_unc3_classifier;
typedef enum collapse_nonfinite_policy { COLLAPSE_NONFINITE_ERROR = 0, COLLAPSE_NONFINITE_SKIP_ROW = 1 } collapse_nonfinite_policy;
typedef enum collapse_backend { COLLAPSE_BACKEND_CPU = 0, COLLAPSE_BACKEND_CUDA = 1 } collapse_backend;

/* Options. Set struct_size = sizeof(collapse_options) (collapse_options_default does), so that a
 * later library version can tell which fields an older caller knows: collapse_session_create takes
 * the struct_size of an earlier version too, and the fields beyond it take their defaults.
 * The functions that fill the struct write only the caller's struct_size bytes (see "Options"). */
typedef struct collapse_options {
    uint32_t struct_size;
    int64_t num_classes;             /* V: labels must lie in [0, V) (or equal ignore_index). Required (> 0). */
    int64_t dim;                     /* d; 0 = taken from the first batch */
    const int64_t* exclude_token_ids;/* copied at session creation; may be NULL */
    int64_t num_exclude_token_ids;
    int64_t min_samples_per_token;   /* default 2 */
    int64_t max_tokens_to_analyze;   /* 0 = no limit */
    int compute_token_metrics;       /* per-token SVD entropy (default 1) */
    int compute_overall_metrics;     /* overall SVD entropy from the Gram (default 1) */
    int compute_class_metrics;       /* GNC2, UNC3, CDNV, NC2, NC3 (default 1) */
    int64_t min_classes_for_gnc2;    /* default 2 */
    int64_t min_classes_for_unc3;    /* default 2 */
    collapse_svd_mode svd_mode;      /* default exact */
    int64_t svd_max_rows_per_token;  /* sampled mode reservoir size, default 1024 */
    int svd_center;                  /* default 0 */
    collapse_global_mean global_mean;
    double cdnv_power;               /* default 1 */
    collapse_unc3_classifier unc3_classifier;
    int compute_nc4;                 /* default 0 */
    uint64_t seed;                   /* reservoir sampling seed, default 0 */
    int64_t host_memory_limit;       /* bytes, default 8 GiB */
    int64_t device_memory_limit;     /* bytes, default 0 = 90% of the device */
    collapse_backend backend;        /* default CPU */
    int device;                      /* CUDA device ordinal */
    collapse_nonfinite_policy nonfinite_policy; /* default error */
    int allow_tf32;                  /* CUDA GEMMs only, default 0 */
    /* Exact row store: rows beyond the memory limits spill to segment files in a private
     * subdirectory of this directory (created when needed, removed with the session). */
    char intermediate_save_dir[1024];/* NUL-terminated, default "collapse_intermediate" */
    int64_t max_buffer_size;         /* CUDA, exact SVD: rows held on the device before they move to host memory, default 10000 */
    /* Fields appended after collapse 0.1.0 (a caller built against 0.1.0 passes its smaller
     * struct_size, and these take their defaults). */
    int64_t ignore_index;            /* label of rows that have no target: dropped and counted in rows_ignored (default -100) */
    int use_ignore_index;            /* 0: ignore_index off, such a label is refused like any outside [0, V) (default 1) */
    /* Generation-time window entropy (docs/METRICS.md; see collapse_session_ingest_tagged_rows). */
    int64_t window_size;             /* W, rows per window (default 64, >= 2) */
    int compute_window_metrics;      /* -1 = auto (default): on when rows carry sequence ids; 0 off; 1 on */
    /* Per-class arrays (docs/METRICS.md "Anchor metrics") in token_analysis and through
     * collapse_report_token_array: mean_norm, within_variance, duality_cos, duality_dot, nc4_hit_rate. */
    int per_class_arrays;            /* default 0 */
} collapse_options;

typedef struct collapse_session collapse_session;
typedef struct collapse_report collapse_report;

/* Library information */
const char* collapse_version_string(void);
const char* collapse_status_string(collapse_status status);
/* The last error message of the calling thread ("" when the last call succeeded). */
const char* collapse_last_error(void);
/* 1 when the named backend ("cpu", "cuda") is compiled in and usable on this machine. */
int collapse_backend_available(const char* name);

/* Options. collapse_options_default(&o) and collapse_options_from_yaml_file(path, &o) are macros
 * that pass sizeof(o) of the header the caller was built with, so that a library newer than that
 * header never writes past the caller's struct; they set o.struct_size to it. The functions of the
 * same names are what programs built against collapse 0.1.0 call: they fill the 0.1.0 struct. */
collapse_status collapse_options_init(collapse_options* options, size_t struct_size);
/* Reads a YAML config file (configs/default.yaml documents every key) into *options.
 * Keys that are not options of a session (log_level, batch_rows, ...) are validated and ignored.
 * exclude_token_ids then points into storage owned by the library that stays valid until the next
 * call of a YAML reader (_from_yaml_file, _from_yaml_string) on the same thread, also after that
 * thread has exited (options read on a start-up thread may create sessions on others).
 * exclude_special_tokens: true is refused (COLLAPSE_ERR_CONFIG): the special ids come from a
 * tokenizer, which only the command line reads; list them in exclude_token_ids. */
collapse_status collapse_options_from_yaml_file_sized(const char* path, collapse_options* options, size_t struct_size);
collapse_status collapse_options_default(collapse_options* options);
collapse_status collapse_options_from_yaml_file(const char* path, collapse_options* options);
#define collapse_options_default(options) collapse_options_init((options), sizeof(*(options)))
#define collapse_options_from_yaml_file(path, options) \
    collapse_options_from_yaml_file_sized((path), (options), sizeof(*(options)))

/* Sessions */
collapse_status collapse_session_create(const collapse_options* options, collapse_session** out);
void collapse_session_destroy(collapse_session* session);

/* Rows: features [N, d], labels [N] (int32|int64), valid [N] (u8|bool|i32|i64, nonzero = keep) or NULL. */
collapse_status collapse_session_ingest_rows(collapse_session* session, const collapse_buffer* features,
                                             const collapse_buffer* labels, const collapse_buffer* valid,
                                             void* stream);
/* Tagged rows (generation-time window entropy, docs/METRICS.md): as ingest_rows, and each row's
 * sequence id sequence_ids [N] (int32|int64, any value; required) and position positions [N]
 * (int32|int64, >= 0) or NULL (then a row's position is its arrival order within its sequence).
 * sequence_ids and positions are HOST memory even when the features are device buffers (a device
 * buffer there is refused). Per sequence, the kept rows (those passing the mask, ignore_index,
 * exclude_token_ids and the non-finite policy) ordered by position (ties: input order) form windows
 * of window_size rows; a trailing partial window is dropped. Filtered rows still count as seen
 * positions. Streaming: a window is reduced once its rows are final (every position below them
 * seen), so rows may come in any order and across batches; rows after a gap wait until the gap is
 * filled or compute. A repeated (sequence, position) is accepted after the rows it ties with
 * unless a window reaching past its position was already reduced: then the batch is refused,
 * naming the row. The sequences layout tags its rows itself: row (b, t) is sequence
 * row_offset + b (the i-th sequence a session ingests is sequence i), position t. */
collapse_status collapse_session_ingest_tagged_rows(collapse_session* session, const collapse_buffer* features,
                                                    const collapse_buffer* labels, const collapse_buffer* valid,
                                                    const collapse_buffer* sequence_ids,
                                                    const collapse_buffer* positions, void* stream);
/* Sequences: hidden [B*T, d] (row b*T+t), input_ids [B, T], attention_mask [B, T] or NULL.
 * Rows x = hidden[:, :-1], labels y = input_ids[:, 1:], kept where attention_mask[:, 1:] != 0. */
collapse_status collapse_session_ingest_sequences(collapse_session* session, const collapse_buffer* hidden,
                                                  const collapse_buffer* input_ids,
                                                  const collapse_buffer* attention_mask, int64_t batch,
                                                  int64_t seq_len, void* stream);
/* Classifier W [V, d] and optional bias [V] (may be NULL). Copied; may be set at any time before compute. */
collapse_status collapse_session_set_classifier(collapse_session* session, const collapse_buffer* weight,
                                                const collapse_buffer* bias);
/* Waits for outstanding device work and reports a deferred (device-side) error. A no-op on the CPU. */
collapse_status collapse_session_sync(collapse_session* session);

/* Two-pass offline analysis. After the first pass over the input, *needed is 1 when some requested
 * metric needs the rows again (NC4 without a row store, or the Gram when max_tokens_to_analyze cuts
 * the kept set and no row store is kept). Then call begin_second_pass and ingest the same rows again. */
collapse_status collapse_session_needs_second_pass(collapse_session* session, int* needed);
collapse_status collapse_session_begin_second_pass(collapse_session* session);

/* Checkpoints of the first pass (CPU backend): a crash-safe, checksummed file (written to a
 * temporary name, fsync'ed and renamed). save: the accumulated state and the input position.
 * load: into a session that has ingested nothing. merge: adds another shard's state (sums, counts,
 * Gram and row stores exactly; reservoirs by weighted re-sampling). Refused, naming the difference,
 * when V, d, a state-affecting config key or the classifier differ; a corrupt, truncated or
 * newer-version file is refused naming the check that failed. */
collapse_status collapse_session_save(collapse_session* session, const char* path);
collapse_status collapse_session_load(collapse_session* session, const char* path);
collapse_status collapse_session_merge(collapse_session* session, const char* path);

/* Finalise and compute every metric. Allowed once per session. */
collapse_status collapse_session_compute(collapse_session* session, collapse_report** out);

/* A live snapshot: a report of every first-pass metric on the rows ingested so far, while the
 * session goes on ingesting (a later snapshot or the final compute sees every row; nothing is
 * consumed). Allowed any number of times during the first pass; COLLAPSE_ERR_STATE after
 * begin_second_pass or after compute. It starts no second pass: a metric that needs one (NC4
 * without a row store, the overall Gram when max_tokens_to_analyze cuts the kept set without a row
 * store; see collapse_session_needs_second_pass) is null, with the note "needs the second pass; not
 * in a snapshot" in overall_analysis.notes. Window metrics are those compute would give had the
 * input ended there (windows still open are evaluated, and stay open). Costs a compute over the
 * rows so far (the exact row store is read back); see Threads above for what it waits for on CUDA. */
collapse_status collapse_session_snapshot(collapse_session* session, collapse_report** out);

/* Reports */
void collapse_report_destroy(collapse_report* report);
/* A scalar by key: a docs/METRICS.md key of overall_analysis ("overall_gnc2"), of summary or of counts,
 * or a section-qualified key ("counts.rows_kept", "window_summary.overall_avg_svd_entropy"). A null metric gives *is_null = 1 and NaN. */
collapse_status collapse_report_get_scalar(const collapse_report* report, const char* key, double* value,
                                           int* is_null);
/* Number of tokens (kept classes) in token_analysis. */
collapse_status collapse_report_num_tokens(const collapse_report* report, int64_t* count);
/* Token ids of token_analysis, ascending; capacity is the length of out. */
collapse_status collapse_report_token_ids(const collapse_report* report, int64_t* out, int64_t capacity);
/* A per-token array in the order of collapse_report_token_ids: "svd_entropy", "effective_rank",
 * "normalized_entropy", "num_samples", "svd_rows", and with options.per_class_arrays the per-class
 * arrays "mean_norm" (||m_c||), "within_variance" (Tr(Sigma_c)), "duality_cos" (cos(w_c, m_c)),
 * "duality_dot" (w_c . m_c), "nc4_hit_rate", "nc4_rows" (docs/METRICS.md "Anchor metrics";
 * COLLAPSE_ERR_NOT_FOUND without them). Null entries are NaN. */
collapse_status collapse_report_token_array(const collapse_report* report, const char* key, double* out,
                                            int64_t capacity);
collapse_status collapse_report_write_json(const collapse_report* report, const char* path);
/* The report as JSON text; the string is owned by the report. */
collapse_status collapse_report_json(const collapse_report* report, const char** json);


/* ---- Appended after collapse 0.1.0 (the Python package's needs; older entries unchanged) ---- */

/* As collapse_options_from_yaml_file, from YAML text in memory: the same keys, validation and
 * messages; `source` names the text in messages ("<source>:<line>: ..."; NULL: "config").
 * exclude_token_ids points into storage owned by the library, valid until the next call of a YAML
 * reader on the same thread (also after the thread exits). A macro passes the caller's sizeof, as for the options above (the
 * function of its name fills the 0.1.0 struct too). */
collapse_status collapse_options_from_yaml_string_sized(const char* text, const char* source, collapse_options* options,
                                                       size_t struct_size);
collapse_status collapse_options_from_yaml_string(const char* text, const char* source, collapse_options* options);
#define collapse_options_from_yaml_string(text, source, options) \
    collapse_options_from_yaml_string_sized((text), (source), (options), sizeof(*(options)))

/* The offline analysis of .npy files, what `collapse analyze` does with the same flags (the same
 * driver: batches of batch_rows read with pread, the second pass when a metric needs it, the
 * report's input provenance): give the rows layout (features + labels, optional valid,
 * sequence_ids, positions) or the sequence layout (hidden [B, T, d] + input_ids [B, T], optional
 * attention_mask). Every path not used is NULL. Set struct_size = sizeof(collapse_analysis). */
typedef struct collapse_analysis {
    uint32_t struct_size;
    const char* config_yaml;    /* config as YAML text (configs/default.yaml keys), NULL: defaults */
    const char* config_source;  /* names config_yaml in messages, NULL: "config" */
    const char* features;       /* rows layout, .npy [N, d] */
    const char* labels;         /* .npy [N] or [N, 1], int32|int64 */
    const char* valid;          /* .npy [N], nonzero = keep */
    const char* sequence_ids;   /* .npy [N]: generation-time windows */
    const char* positions;      /* .npy [N], needs sequence_ids */
    const char* hidden;         /* sequence layout, .npy [B, T, d] */
    const char* input_ids;      /* .npy [B, T] */
    const char* attention_mask; /* .npy [B, T] */
    const char* classifier;     /* .npy [V, d] */
    const char* bias;           /* .npy [V], needs classifier */
    int64_t num_classes;        /* V; 0: the config's, else the classifier's rows, else the largest label + 1 */
    int64_t batch_rows;         /* 0: the config's batch_rows */
    const char* command;        /* recorded as the report's run.command; NULL: none */
} collapse_analysis;
collapse_status collapse_analyze_files(const collapse_analysis* analysis, collapse_report** out);

/* nc5_ood_dev (docs/METRICS.md "Anchor metrics"): the global mean of a second, out-of-distribution
 * input, `dim` float64 values in host memory (the plain mean of its rows; no labels are needed, so
 * a caller with OoD rows anywhere reduces them itself). dim must be the session's width d (given
 * before the width is known, rows of another width are refused later); every value finite. Copied;
 * may be given at any
 * time before compute (a later call replaces it). Saved in checkpoints: load takes the file's,
 * merge refuses a file whose mean differs from the session's. Without it nc5_ood_dev is null. */
collapse_status collapse_session_set_ood_mean(collapse_session* session, const double* mean, int64_t dim);

#ifdef __cplusplus
}
#endif
#endif /* COLLAPSE_COLLAPSE_H */
