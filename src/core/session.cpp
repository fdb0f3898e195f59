#include "core/session.hpp"

#include "core/checkpoint_meta.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "base/dtype.hpp"
#include "base/error.hpp"

namespace collapse::internal {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace


KeptSet select_kept(const std::vector<int64_t>& counts, const Config& cfg, Counts* cc) {
    const int64_t V = (int64_t)counts.size();
    std::vector<uint8_t> excluded((size_t)V, 0);
    for (int64_t e : cfg.exclude_token_ids)
        if (e >= 0 && e < V) excluded[(size_t)e] = 1;
    std::vector<int32_t> ids;
    Counts local;
    for (int64_t c = 0; c < V; ++c) {
        if (excluded[(size_t)c] || counts[(size_t)c] == 0) continue;
        ++local.classes_seen;
        if (counts[(size_t)c] >= cfg.min_samples_per_token) ids.push_back((int32_t)c);
        else ++local.classes_below_min;
    }
    if (cfg.max_tokens_to_analyze > 0 && (int64_t)ids.size() > cfg.max_tokens_to_analyze) {
        std::stable_sort(ids.begin(), ids.end(),
                         [&](int32_t a, int32_t b) { return counts[(size_t)a] > counts[(size_t)b]; });
        local.classes_cut = (int64_t)ids.size() - cfg.max_tokens_to_analyze;
        ids.resize((size_t)cfg.max_tokens_to_analyze);
        std::sort(ids.begin(), ids.end());
    }
    KeptSet k;
    k.ids = ids;
    k.slot.assign((size_t)V, -1);
    for (size_t s = 0; s < ids.size(); ++s) {
        k.slot[(size_t)ids[s]] = (int32_t)s;
        k.counts.push_back(counts[(size_t)ids[s]]);
        k.rows += counts[(size_t)ids[s]];
    }
    local.classes_kept = (int64_t)ids.size();
    local.rows_kept = k.rows;
    if (cc) {
        cc->classes_seen = local.classes_seen;
        cc->classes_below_min = local.classes_below_min;
        cc->classes_cut = local.classes_cut;
        cc->classes_kept = local.classes_kept;
        cc->rows_kept = local.rows_kept;
    }
    return k;
}

// The backends' per-class vectors into the tokens (one per kept class, ascending id): a class
// without a per-token SVD (svd_mode: off) gets an entry with its count only.
static void attach_per_class_arrays(const KeptSet& kept, MetricValues& mv) {
    const size_t K = kept.ids.size();
    if (mv.tokens.size() != K) {
        mv.tokens.assign(K, TokenMetrics{});
        for (size_t s = 0; s < K; ++s) mv.tokens[s].id = kept.ids[s], mv.tokens[s].num_samples = kept.counts[s];
    }
    const PerClassArrays& p = mv.per_class;
    auto at = [K](const std::vector<double>& v, size_t s) { return v.size() == K ? std::optional<double>(v[s]) : std::nullopt; };
    for (size_t s = 0; s < K; ++s) {
        TokenMetrics& t = mv.tokens[s];
        if (t.id != kept.ids[s]) fail(COLLAPSE_ERR_INTERNAL, "per-class arrays: token ", s, " is ", t.id, ", expected ", kept.ids[s]);
        t.has_per_class = true;
        t.mean_norm = at(p.mean_norm, s);
        t.within_variance = at(p.within_variance, s);
        t.duality_cos = at(p.duality_cos, s);
        t.duality_dot = at(p.duality_dot, s);
        if (p.nc4_rows.size() == K) t.nc4_hits = p.nc4_hits[s], t.nc4_rows = p.nc4_rows[s];
    }
}

Session::Session(const Config& cfg) : cfg_(cfg), V_(cfg.num_classes), d_(cfg.dim), budget_(HostBudget::from_config(cfg)) {
    validate(cfg_);
    if (V_ <= 0) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "num_classes (V) must be given and > 0, got ", V_);
    if (V_ > INT32_MAX) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "num_classes ", V_, " exceeds 2^31 - 1");
    for (int64_t e : cfg_.exclude_token_ids)
        if (e >= V_) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "exclude_token_ids: ", e, " is not a class id in [0, ", V_, ")");
    if (cfg_.backend == COLLAPSE_BACKEND_CUDA) require_cuda_backend();  // names what is missing
    if (d_ > 0) ensure_backend(d_);
    if (cfg_.compute_window_metrics == 1 && backend_ && !backend_->supports_windows()) backend_->windows_unsupported();
}

Session::~Session() = default;

void Session::ensure_backend(int64_t d) {
    if (backend_) return;
    if (!ood_mean_.empty() && (int64_t)ood_mean_.size() != d)
        fail(COLLAPSE_ERR_SHAPE, "rows of width ", d, " do not match the out-of-distribution mean's ", ood_mean_.size(), " values (set_ood_mean)");
    backend_ = cfg_.backend == COLLAPSE_BACKEND_CUDA ? make_cuda_backend(cfg_, V_, d, budget_) : make_cpu_backend(cfg_, V_, d, budget_);
    d_ = d;
}

// select_kept under the budget: its V-long vectors (the copy of the counts, the exclusion flags,
// the slot table) are counted before they exist; the lease then holds the kept set.
KeptSet Session::kept_classes(Counts* class_counts, HostBudget::Lease& lease) {
    lease = budget_->reserve(mul_bytes(V_, 8 + 1 + 4), "selecting the kept classes of V = " + std::to_string(V_) + " (V-long counts, flags and slots)",
                             kFixNumClasses);
    KeptSet k = select_kept(backend_->class_counts(), cfg_, class_counts);
    lease.update(add_bytes(mul_bytes((int64_t)k.slot.capacity() + (int64_t)k.ids.capacity(), 4), mul_bytes((int64_t)k.counts.capacity(), 8)));
    return k;
}

void Session::check_state(const char* call) const {
    if (!unusable_.empty()) fail(COLLAPSE_ERR_STATE, call, ": the session is unusable since ", unusable_, " failed partway; destroy it");
    if (state_ == State::Done) fail(COLLAPSE_ERR_STATE, call, ": the session has already been computed; create a new session");
}

void Session::ingest(const BatchDesc& b, void* stream, const RowTags* tags) {
    const auto t0 = Clock::now();
    // The first batch fixes d; if it is refused, nothing is fixed.
    const bool first = !backend_ && b.features.rows > 0;
    if (first) ensure_backend(b.features.cols);
    if (!backend_) {  // an empty first batch of unknown width: nothing to do but count
        rows_before_backend_ += b.num_rows();
        return;
    }
    if (state_ == State::SecondPass) {
        backend_->ingest_second_pass(b, stream);
        second_pass_seconds_ += seconds_since(t0);
        row_offset_ = b.row_offset + (b.sequences ? b.batch : b.features.rows);
        return;
    }
    // Windows: the batch's tags are checked against the tracker's state, and what it may add is
    // counted, before the backend takes the batch.
    std::unique_ptr<WindowTracker> fresh;
    WindowTracker* tracker = windows_.get();
    WindowTracker::Plan plan;
    HostBudget::Lease reserve;
    bool windows = false;
    try {
        windows = tags && windows_for(!tags->implicit);
        if (windows) {
            if (!tracker) {
                fresh = std::make_unique<WindowTracker>(cfg_.window_size, budget_);
                tracker = fresh.get();
            }
            plan = tracker->plan(*tags, b.row_offset);
            const int64_t n = b.num_rows(), W = cfg_.window_size, cap = tracker->slot_capacity();
            const int64_t store = backend_->window_store_bytes(cap + n) - backend_->window_store_bytes(cap);
            // A window's entropy: its centred rows in float64, the smaller Gram, eigenvalues.
            const int64_t M = std::min(W, d_);
            const int64_t scratch = add_bytes(mul_bytes(W + 1, d_, 8), add_bytes(mul_bytes(M, M, 8), mul_bytes(4 * M + 8, 8)));
            reserve = budget_->reserve(add_bytes(add_bytes(plan.growth_bytes, store), add_bytes(scratch, n)),
                                       "the window bookkeeping and the rows of a batch of " + std::to_string(n) + " tagged rows",
                                       "lower batch_rows (--batch-rows) or window_size, set compute_window_metrics: false, or raise host_memory_limit");
        }
        backend_->ingest(b, stream);
    } catch (...) {
        if (first) {
            backend_.reset();
            d_ = 0;
        }
        throw;
    }
    ++batches_;
    position_ = b.row_offset + (b.sequences ? b.batch : b.features.rows);
    // A caller that does not set the offset gets consecutive ones: the i-th sequence of the
    // sequences layout is sequence i, and messages name input rows.
    row_offset_ = position_;
    if (windows) {
        if (fresh) windows_ = std::move(fresh);
        reserve.reset();
        std::vector<uint8_t> kept;
        const bool known = backend_->last_batch_kept(kept);
        const std::vector<int64_t> slots = windows_->commit(plan, known ? kept.data() : nullptr);
        backend_->window_stash(b, slots.data(), windows_->slot_capacity(), stream);
        pump_windows();
    }
    ingest_seconds_ += seconds_since(t0);
}

bool Session::windows_for(bool explicit_tags) {
    if (cfg_.compute_window_metrics == 0) return false;
    if (!backend_->supports_windows()) {
        if (explicit_tags || cfg_.compute_window_metrics == 1) backend_->windows_unsupported();
        windows_note_ = std::string("window metrics are not implemented on the ") + backend_->name() + " backend yet";
        return false;  // auto with the sequences layout: off, and the report says why
    }
    return true;
}

// Verdicts that came in, then the windows that became complete.
void Session::pump_windows() {
    std::vector<int64_t> slots;
    std::vector<uint8_t> kept;
    backend_->window_verdicts(slots, kept);
    if (!slots.empty()) windows_->verdicts(slots.data(), kept.data(), (int64_t)slots.size());
    const std::vector<int64_t> ready = windows_->take_ready();
    const int64_t W = windows_->window_size();
    if (!ready.empty()) backend_->window_reduce(ready.data(), (int64_t)ready.size() / W, W);
}

WindowResult Session::window_result() {
    WindowResult w;
    if (cfg_.compute_window_metrics == 0) {
        w.note = "compute_window_metrics is false";
        return w;
    }
    if (!windows_) {
        w.note = !windows_note_.empty() ? windows_note_
                                        : "no rows carried sequence ids (collapse_session_ingest_tagged_rows, the sequences layout or "
                                          "--sequence-ids)";
        return w;
    }
    backend_->sync();
    pump_windows();
    windows_->add_entropies(backend_->window_results());
    // The windows still open, as if the input ended here; the tracker keeps them.
    const std::vector<int64_t> rest = windows_->rest_windows();
    const int64_t W = windows_->window_size();
    const std::vector<double> e = backend_->window_evaluate(rest.data(), (int64_t)rest.size() / W, W);
    w = windows_->result(e);
    int64_t windows = 0;
    for (const SequenceWindows& s : w.sequences) windows += (int64_t)s.entropies.size();
    budget_->check(add_bytes(mul_bytes((int64_t)w.sequences.size(), 1024), mul_bytes(windows, 64)),
                   "the report's sequence_analysis of " + std::to_string(w.sequences.size()) + " sequences (an estimate)",
                   "set compute_window_metrics: false, or raise host_memory_limit");
    return w;
}

void Session::ingest_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid,
                          void* stream) {
    check_state("ingest_rows");
    BatchDesc b = describe_rows(features, labels, valid, d_);
    b.row_offset = row_offset_;
    ingest(b, stream);
}

void Session::ingest_tagged_rows(const collapse_buffer* features, const collapse_buffer* labels, const collapse_buffer* valid,
                                 const collapse_buffer* sequence_ids, const collapse_buffer* positions, void* stream) {
    check_state("ingest_tagged_rows");
    BatchDesc b = describe_rows(features, labels, valid, d_);
    b.row_offset = row_offset_;
    const RowTags tags = describe_tags(sequence_ids, positions, b.num_rows(), b.row_offset);
    ingest(b, stream, &tags);
}

void Session::ingest_sequences(const collapse_buffer* hidden, const collapse_buffer* ids, const collapse_buffer* mask,
                               int64_t batch, int64_t seq_len, void* stream) {
    check_state("ingest_sequences");
    BatchDesc b = describe_sequences(hidden, ids, mask, batch, seq_len, d_);
    b.row_offset = row_offset_;
    // Row (s, t) is sequence row_offset + s at position t (docs/METRICS.md, windows).
    const RowTags tags = implicit_tags(b.row_offset, batch, seq_len - 1);
    ingest(b, stream, seq_len > 1 ? &tags : nullptr);
}

void Session::set_classifier(const collapse_buffer* weight, const collapse_buffer* bias) {
    check_state("set_classifier");
    if (state_ == State::SecondPass) fail(COLLAPSE_ERR_STATE, "set_classifier: not allowed during the second pass");
    if (!weight) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "classifier: weight buffer is NULL");
    if (!dtype_is_valid(raw_enum(weight->dtype)) || !dtype_is_float(weight->dtype))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "classifier: weight dtype must be float32, float16, bfloat16 or float64");
    if (raw_enum(weight->memory) != COLLAPSE_MEMORY_HOST)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "classifier: weight must be in host memory");
    if (weight->rows != V_ || (d_ > 0 && weight->cols != d_) || weight->cols < 1) {
        // W.T ([d, V]) is the common mistake: say so rather than let the width blame the features later.
        const bool transposed = weight->cols == V_ && weight->rows != V_ && (d_ == 0 || weight->rows == d_);
        fail(COLLAPSE_ERR_SHAPE, "classifier: weight shape [", weight->rows, ", ", weight->cols, "] does not match [V, d] = [",
             V_, ", ", d_ > 0 ? std::to_string(d_) : std::string("d"), "]",
             transposed ? "; it looks transposed ([d, V]): pass W with one row per class, not W.T" : "");
    }
    const int64_t stride = weight->row_stride ? weight->row_stride : weight->cols;
    if (stride < weight->cols) fail(COLLAPSE_ERR_SHAPE, "classifier: row_stride ", stride, " < cols ", weight->cols);
    if (!weight->data) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "classifier: weight data is NULL");
    check_extent(weight, "classifier: weight");
    const int64_t d = weight->cols;
    int64_t numel = 0;
    if (__builtin_mul_overflow(V_, d, &numel))
        fail(COLLAPSE_ERR_SHAPE, "classifier: weight shape [", V_, ", ", d, "] has more than 2^63 elements");
    int64_t bias_stride = 0;
    if (bias) {
        if (!dtype_is_valid(raw_enum(bias->dtype)) || !dtype_is_float(bias->dtype) ||
            raw_enum(bias->memory) != COLLAPSE_MEMORY_HOST || !bias->data)
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, "classifier: bias must be a host float buffer");
        int64_t n = 0;
        if (bias->rows < 0 || bias->cols < 1 || __builtin_mul_overflow(bias->rows, bias->cols, &n))
            fail(COLLAPSE_ERR_SHAPE, "classifier: bias shape [", bias->rows, ", ", bias->cols, "] is invalid or overflows");
        if (n != V_) fail(COLLAPSE_ERR_SHAPE, "classifier: bias has ", n, " elements, expected V = ", V_);
        bias_stride = bias->row_stride ? bias->row_stride : bias->cols;
        if (bias_stride < bias->cols)
            fail(COLLAPSE_ERR_SHAPE, "classifier: bias row_stride ", bias_stride, " < cols ", bias->cols);
        check_extent(bias, "classifier: bias");
    }
    // Held until the session ends; the old classifier's lease goes when this one replaces it.
    HostBudget::Lease lease = budget_->reserve(add_bytes(mul_bytes(numel, 8), bias ? mul_bytes(V_, 8) : 0),
                                               "the classifier [V, d] = [" + std::to_string(V_) + ", " + std::to_string(d) + "] in float64",
                                               kFixNumClasses);
    Classifier c;
    c.weight.resize((size_t)numel);
    // Norms, Grams and self-duality sum squared weights in float64; a bound well below DBL_MAX
    // (1.8e308) leaves room for those sums, and the first weight that crosses it is named.
    constexpr double kMaxSumSquares = 1e300;
    double sum_sq = 0.0;
    for (int64_t r = 0; r < V_; ++r) {
        const void* row = static_cast<const uint8_t*>(weight->data) + (size_t)(r * stride) * dtype_size(weight->dtype);
        for (int64_t k = 0; k < d; ++k) {
            const double v = load_as_double(row, weight->dtype, k);
            if (!std::isfinite(v)) fail(COLLAPSE_ERR_BAD_INPUT, "classifier: non-finite weight ", v, " at row ", r, ", column ", k);
            sum_sq += v * v;
            if (!(sum_sq <= kMaxSumSquares))
                fail(COLLAPSE_ERR_BAD_INPUT, "classifier: weight ", v, " at row ", r, ", column ", k,
                     " is too large: the sum of squared weights passes ", kMaxSumSquares,
                     " there and would overflow float64 (rescale the classifier)");
            c.weight[(size_t)(r * d + k)] = v;
        }
    }
    if (bias) {
        c.bias.resize((size_t)V_);
        for (int64_t i = 0; i < V_; ++i) {
            // Element i of the [rows, cols] bias, honouring its row stride.
            const int64_t at = (i / bias->cols) * bias_stride + i % bias->cols;
            c.bias[(size_t)i] = load_as_double(bias->data, bias->dtype, at);
            if (!std::isfinite(c.bias[(size_t)i])) fail(COLLAPSE_ERR_BAD_INPUT, "classifier: non-finite bias at ", i);
        }
    }
    if (!checkpoint_classifier_.empty() && std::to_string(classifier_hash(c)) != checkpoint_classifier_)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "classifier: differs from the one the loaded checkpoint was made with (hash ",
             checkpoint_classifier_, ", this one ", classifier_hash(c), ")");
    ensure_backend(d);
    clf_ = std::move(c);
    clf_lease_ = std::move(lease);
}

void Session::sync() {
    if (backend_) backend_->sync();
}

void Session::skip_batch(int64_t first, int64_t end, int64_t rows) {
    check_state("skip_batch");
    if (state_ != State::Ingest) return;  // the second pass meets the same batches again
    if (first < 0 || end < first) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "skip_batch: bad range [", first, ", ", end, ")");
    ++batches_failed_;
    rows_skipped_ += rows;
    skipped_.emplace_back(first, end);
    position_ = std::max(position_, end);
    row_offset_ = position_;
}

Counts Session::row_counts() const {
    Counts c;
    if (backend_) c = backend_->row_counts();
    c.rows_seen += rows_before_backend_;
    return c;
}

// What the second pass is for: NC4 without the rows at hand (Backend::nc4_from_rows), and the Gram
// of a kept set that is only known at the end (max_tokens_to_analyze) without a row store.
// Held-out NC4 (nc4_held_out) always takes its rows from the second pass.
bool Session::second_pass_nc4() const {
    return cfg_.compute_nc4 && clf_.present() && (!backend_->nc4_from_rows() || cfg_.nc4_held_out);
}
bool Session::second_pass_gram() const {
    return cfg_.compute_overall_metrics && cfg_.max_tokens_to_analyze > 0 && !backend_->has_row_store();
}

bool Session::needs_second_pass() const {
    if (!backend_ || state_ != State::Ingest) return false;
    return second_pass_nc4() || second_pass_gram();
}

void Session::begin_second_pass() {
    check_state("begin_second_pass");
    if (state_ == State::SecondPass) fail(COLLAPSE_ERR_STATE, "begin_second_pass: the second pass has already begun");
    if (!needs_second_pass()) fail(COLLAPSE_ERR_STATE, "begin_second_pass: no requested metric needs a second pass");
    HostBudget::Lease kept_lease;
    backend_->begin_second_pass(kept_classes(nullptr, kept_lease), clf_, second_pass_nc4(), second_pass_gram());
    state_ = State::SecondPass;
}

Result Session::snapshot() {
    check_state("snapshot");
    if (state_ == State::SecondPass)
        fail(COLLAPSE_ERR_STATE, "snapshot: not allowed during the second pass (a snapshot is of the first pass; "
                                 "compute gives the report once the second pass is done)");
    return compute(false);
}

void Session::set_ood_mean(const double* mean, int64_t dim) {
    check_state("set_ood_mean");
    if (!mean) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "set_ood_mean: the mean is null");
    if (dim <= 0) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "set_ood_mean: dim = ", dim, ", must be the rows' width d > 0");
    if (d_ > 0 && dim != d_) fail(COLLAPSE_ERR_SHAPE, "set_ood_mean: the out-of-distribution mean has ", dim, " values, the rows have width d = ", d_);
    for (int64_t j = 0; j < dim; ++j)
        if (!std::isfinite(mean[j])) fail(COLLAPSE_ERR_BAD_INPUT, "set_ood_mean: value ", j, " of the out-of-distribution mean is not finite (", mean[j], ")");
    ood_mean_.assign(mean, mean + dim);
}

Result Session::compute(bool final) {
    check_state("compute");
    const auto t0 = Clock::now();
    Result r;
    r.counts = row_counts();
    if (backend_) {
        // The counts do not change in the second pass: the kept set is the one it was given.
        HostBudget::Lease kept_lease;
        const KeptSet kept = kept_classes(&r.counts, kept_lease);
        // The report is built from the result (src/report/): its token_analysis (an entry per kept
        // class with per-token metrics or per-class arrays) must fit beside what the session
        // holds. Checked before the backend computes anything for those classes.
        const bool entries = cfg_.per_class_arrays || (cfg_.compute_token_metrics && cfg_.svd_mode != COLLAPSE_SVD_OFF);
        const int64_t entry_count = entries ? (int64_t)kept.ids.size() : 0;
        budget_->check(report_bytes_estimate(entry_count),
                       "the report's token_analysis of K = " + std::to_string(entry_count) + " kept classes (an estimate)", kFixKeptClasses);
        backend_->ood_mean = ood_mean_;
        r.metrics = backend_->compute(kept, clf_);
        if (cfg_.per_class_arrays) attach_per_class_arrays(kept, r.metrics);
        // A first-pass compute that is not the last (a snapshot): what only the second pass can
        // give is null for that reason, whatever the backend's note says of the full protocol.
        if (!final && state_ == State::Ingest && r.counts.classes_kept > 0) {
            if (second_pass_nc4()) r.metrics.notes["nc4_agreement"] = kSnapshotNote;
            if (second_pass_gram()) r.metrics.notes["overall_svd_entropy"] = kSnapshotNote;
            if (second_pass_gram() && cfg_.compute_class_metrics && !r.metrics.nc1_pinv)  // Sigma_W of the cut kept set
                for (const char* k : {"nc1_pinv", "nc1_svd", "nc1_quot"}) r.metrics.notes[k] = kSnapshotNote;
        }
    } else {
        r.metrics.notes["overall"] = "no rows were ingested: every metric is null";
    }
    EngineInfo& info = r.engine;
    info.backend = backend_ ? backend_->name() : (cfg_.backend == COLLAPSE_BACKEND_CUDA ? "cuda" : "cpu");
    info.dim = d_;
    info.num_classes = V_;
    info.batches = batches_;
    info.batches_failed = batches_failed_;
    info.rows_skipped = rows_skipped_;
    info.classifier = clf_.present();
    info.timings = r.metrics.timings;
    info.row_store = r.metrics.row_store;
    info.timings["ingest"] = ingest_seconds_;
    if (second_pass_seconds_ > 0) info.timings["second_pass"] = second_pass_seconds_;
    if (backend_) r.windows = window_result();
    else r.windows.note = cfg_.compute_window_metrics == 0 ? "compute_window_metrics is false" : "no rows were ingested";
    info.timings["finalize"] = seconds_since(t0);
    if (final) state_ = State::Done;
    return r;
}

}  // namespace collapse::internal
