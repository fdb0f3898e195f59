// Generation-time windows: tag validation, the tracker's bookkeeping and checkpoints, and the
// per-sequence and summary math of docs/METRICS.md (core/windows.hpp says how rows become windows).
#include "core/windows.hpp"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <numeric>
#include <string>

#include "base/dtype.hpp"
#include "base/error.hpp"
#include "core/batch.hpp"
#include "core/metric_math.hpp"

namespace collapse::internal {

namespace {

// What the bookkeeping costs, as counted in host_memory_limit: a sequence's record and its hash
// entry, a pending row's map node, a seen position's set node, a window's id and entropy.
constexpr int64_t kSeqBytes = 256;
constexpr int64_t kPendingBytes = 96;
constexpr int64_t kAboveBytes = 64;
constexpr int64_t kWindowBytes = 16;

std::string row_name(int64_t r, int64_t offset) {
    if (offset == 0) return std::to_string(r) + " of the batch";
    return std::to_string(offset + r) + " of the input (" + std::to_string(r) + " of this batch)";
}

void check_tag_buffer(const collapse_buffer* b, const char* what, int64_t rows) {
    const int memory = raw_enum(b->memory);
    if (memory == COLLAPSE_MEMORY_DEVICE)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what,
             ": must be in host memory, got a device buffer (sequence ids and positions are read on the host, "
             "without a stream sync, even when the features are on the device)");
    if (memory != COLLAPSE_MEMORY_HOST) fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": unknown memory kind ", memory);
    const int dt = raw_enum(b->dtype);
    if (dt != COLLAPSE_I32 && dt != COLLAPSE_I64)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": dtype ", dtype_is_valid(dt) ? dtype_name(b->dtype) : "unknown",
             " is not int32 or int64");
    if (b->rows != rows || b->cols != 1)
        fail(COLLAPSE_ERR_SHAPE, what, ": shape [", b->rows, ", ", b->cols, "] does not match ", rows, " rows (expected [", rows,
             ", 1])");
    if (b->row_stride != 0 && b->row_stride < b->cols)
        fail(COLLAPSE_ERR_SHAPE, what, ": row_stride ", b->row_stride, " is smaller than cols ", b->cols);
    if (rows > 0 && !b->data) fail(COLLAPSE_ERR_INVALID_ARGUMENT, what, ": data is NULL for ", rows, " rows");
    check_extent(b, what);
}

// Population std / mean and the least-squares slope against 0..k-1 (docs/METRICS.md).
void sequence_values(SequenceWindows& s) {
    std::vector<double> e;
    for (double v : s.entropies)
        if (v > 0) e.push_back(v);
    s.avg = s.cv = s.slope = 0;
    const size_t k = e.size();
    if (k == 0) return;
    double sum = 0;
    for (double v : e) sum += v;
    const double mean = sum / (double)k;
    double ss = 0;
    for (double v : e) ss += (v - mean) * (v - mean);
    s.avg = mean;
    s.cv = mean > 0 ? std::sqrt(ss / (double)k) / mean : 0.0;
    if (k >= 2) {
        const double ibar = (double)(k - 1) / 2.0;
        double sxy = 0, sxx = 0;
        for (size_t i = 0; i < k; ++i) {
            sxy += ((double)i - ibar) * (e[i] - mean);
            sxx += ((double)i - ibar) * ((double)i - ibar);
        }
        s.slope = sxy / sxx;
    }
}

// A section of the checkpoint with the expected dtype and shape, or COLLAPSE_ERR_IO naming it.
StateSection need(const StateReader& r, const char* name, collapse_dtype dt, const std::vector<int64_t>& shape) {
    const StateSection s = r.section(name);
    std::string want;
    for (int64_t v : shape) want += (want.empty() ? "" : ", ") + std::to_string(v);
    if (s.dtype_code != (uint32_t)dt || s.shape != shape)
        fail(COLLAPSE_ERR_IO, r.description(), ": section ", name, " is not ", dtype_name(dt), " [", want, "]");
    if (s.bytes > 0 && !s.data) fail(COLLAPSE_ERR_IO, r.description(), ": section ", name, " has no data");
    return s;
}

int64_t first_dim(const StateReader& r, const char* name) {
    const StateSection s = r.section(name);
    if (s.shape.empty() || s.shape[0] < 0) fail(COLLAPSE_ERR_IO, r.description(), ": section ", name, " has no valid first dimension");
    return s.shape[0];
}

template <class... A>
[[noreturn]] void bad_state(const StateReader& r, const A&... parts) {
    fail(COLLAPSE_ERR_IO, r.description(), ": window state: ", parts...);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
int64_t RowTags::sequence(int64_t r) const {
    if (implicit) return first_seq + r / per_seq;
    return load_as_int(seq, seq_dtype, r * seq_stride);
}

int64_t RowTags::position(int64_t r) const {
    if (implicit) return r % per_seq;
    return pos ? load_as_int(pos, pos_dtype, r * pos_stride) : -1;
}

RowTags describe_tags(const collapse_buffer* sequence_ids, const collapse_buffer* positions, int64_t rows, int64_t row_offset) {
    if (!sequence_ids) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "sequence_ids: buffer is NULL (tagged rows need a sequence id per row)");
    check_tag_buffer(sequence_ids, "sequence_ids", rows);
    RowTags t;
    t.rows = rows;
    t.seq = sequence_ids->data;
    t.seq_dtype = sequence_ids->dtype;
    t.seq_stride = sequence_ids->row_stride ? sequence_ids->row_stride : 1;
    if (positions) {
        check_tag_buffer(positions, "positions", rows);
        t.pos = positions->data;
        t.pos_dtype = positions->dtype;
        t.pos_stride = positions->row_stride ? positions->row_stride : 1;
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = t.position(r);
            if (p < 0 || p == INT64_MAX)
                fail(COLLAPSE_ERR_BAD_INPUT, "positions: row ", row_name(r, row_offset), " has position ", p,
                     "; positions must be >= 0 (and below 2^63 - 1)");
        }
    }
    return t;
}

RowTags implicit_tags(int64_t first_sequence, int64_t batch, int64_t rows_per_sequence) {
    RowTags t;
    t.implicit = true;
    t.first_seq = first_sequence;
    t.per_seq = rows_per_sequence;
    t.rows = batch * rows_per_sequence;
    return t;
}

double window_entropy_from_eigen(const double* eig, int64_t M) {
    if (M <= 0) return 0.0;
    const double tau = (double)M * DBL_EPSILON * std::max(eig[M - 1], 0.0);
    double sum = 0;
    for (int64_t k = 0; k < M; ++k)
        if (eig[k] > tau) sum += eig[k];
    if (!(sum > 0)) return 0.0;
    double h = 0;
    for (int64_t k = 0; k < M; ++k)
        if (eig[k] > tau) h += entropy_term(eig[k], sum);
    return h;
}

void finish_window_result(WindowResult& r) {
    r.total_samples = (int64_t)r.sequences.size();
    r.valid_samples = 0;
    r.chunk_avg.clear();
    r.chunk_count.clear();
    double a = 0, c = 0, s = 0;
    for (SequenceWindows& q : r.sequences) {
        sequence_values(q);
        if (q.entropies.empty()) continue;
        ++r.valid_samples;
        a += q.avg, c += q.cv, s += q.slope;
        if (q.entropies.size() > r.chunk_avg.size()) r.chunk_avg.resize(q.entropies.size(), 0.0), r.chunk_count.resize(q.entropies.size(), 0);
        for (size_t i = 0; i < q.entropies.size(); ++i) r.chunk_avg[i] += q.entropies[i], ++r.chunk_count[i];
    }
    for (size_t i = 0; i < r.chunk_avg.size(); ++i) r.chunk_avg[i] /= (double)r.chunk_count[i];
    if (r.valid_samples > 0) {
        r.overall_avg = a / (double)r.valid_samples;
        r.overall_cv = c / (double)r.valid_samples;
        r.overall_slope = s / (double)r.valid_samples;
    } else {
        r.overall_avg.reset(), r.overall_cv.reset(), r.overall_slope.reset();
    }
}

// ---------------------------------------------------------------------------------------------
WindowTracker::WindowTracker(int64_t window_size, std::shared_ptr<HostBudget> budget)
    : W_(window_size), budget_(std::move(budget)), lease_(budget_->lease()) {}

WindowTracker::Plan WindowTracker::plan(const RowTags& t, int64_t row_offset) const {
    Plan p;
    const int64_t n = t.rows;
    p.rows = n;
    p.close = t.implicit;
    p.seq.resize((size_t)n);
    p.pos.resize((size_t)n);
    std::unordered_map<int64_t, int64_t> fresh;     // new id -> index
    std::unordered_map<int64_t, int64_t> in_batch;  // index -> rows of it so far in this batch
    const int64_t S = (int64_t)seqs_.size();
    for (int64_t r = 0; r < n; ++r) {
        const int64_t id = t.sequence(r);
        int64_t s;
        const auto it = index_.find(id);
        if (it != index_.end()) {
            s = it->second;
        } else {
            const auto f = fresh.find(id);
            if (f != fresh.end()) {
                s = f->second;
            } else {
                s = S + (int64_t)p.new_ids.size();
                fresh.emplace(id, s);
                p.new_ids.push_back(id);
            }
        }
        int64_t& k = in_batch[s];
        int64_t pos = t.position(r);
        if (pos < 0) pos = (s < S ? seqs_[(size_t)s].seen : 0) + k;
        ++k;
        if (s < S) {
            const Seq& q = seqs_[(size_t)s];
            if (q.closed || t.implicit)
                fail(COLLAPSE_ERR_BAD_INPUT, "row ", row_name(r, row_offset), ": sequence ", id,
                     q.closed ? " came whole through the sequences layout and takes no more rows"
                              : " already has tagged rows; a sequence of the sequences layout must be new (its id is its input index)");
            if (pos < q.max_reduced)
                fail(COLLAPSE_ERR_BAD_INPUT, "row ", row_name(r, row_offset), ": sequence ", id, ", position ", pos,
                     " comes after window ", (int64_t)q.windows.size() - 1, " of that sequence was reduced (its rows reach position ",
                     q.max_reduced, "); a repeated or late position must not precede a reduced window (docs/METRICS.md, "
                     "Generation-time window entropy); the batch is refused");
        }
        p.seq[(size_t)r] = s;
        p.pos[(size_t)r] = pos;
    }
    p.growth_bytes = add_bytes(mul_bytes((int64_t)p.new_ids.size(), kSeqBytes), mul_bytes(n, kPendingBytes + kAboveBytes + 16));
    return p;
}

int64_t WindowTracker::new_slot() {
    if (!free_.empty()) {
        const int64_t s = free_.back();
        free_.pop_back();
        return s;
    }
    return slot_capacity_++;
}

void WindowTracker::account() {
    int64_t b = mul_bytes((int64_t)seqs_.size(), kSeqBytes);
    b = add_bytes(b, mul_bytes(pending_total_, kPendingBytes));
    b = add_bytes(b, mul_bytes(above_total_, kAboveBytes));
    b = add_bytes(b, mul_bytes(next_window_, kWindowBytes));
    b = add_bytes(b, mul_bytes((int64_t)free_.capacity() + unknown_ * 4, 8));
    lease_.update(b);
}

std::vector<int64_t> WindowTracker::commit(const Plan& p, const uint8_t* kept) {
    for (int64_t id : p.new_ids) {
        index_.emplace(id, (int64_t)seqs_.size());
        seqs_.emplace_back();
        seqs_.back().id = id;
    }
    std::vector<int64_t> slots((size_t)p.rows, -1);
    for (int64_t r = 0; r < p.rows; ++r) {
        const int64_t s = p.seq[(size_t)r], pos = p.pos[(size_t)r], arrival = next_arrival_++;
        Seq& q = seqs_[(size_t)s];
        ++q.seen;
        mark(s);
        if (pos == q.frontier) {
            ++q.frontier;
            while (!q.above.empty() && *q.above.begin() == q.frontier) {
                q.above.erase(q.above.begin());
                --above_total_;
                ++q.frontier;
            }
        } else if (pos > q.frontier && q.above.insert(pos).second) {
            ++above_total_;
        }
        if (kept && !kept[r]) continue;
        const int64_t slot = new_slot();
        slots[(size_t)r] = slot;
        q.pending.emplace(std::make_pair(pos, arrival), Pending{slot, kept != nullptr});
        ++pending_total_;
        if (kept) {
            ++q.tokens;
        } else {
            slot_row_.emplace(slot, RowKey{s, pos, arrival});
            ++unknown_;
        }
    }
    if (p.close)
        for (int64_t r = 0; r < p.rows; ++r) seqs_[(size_t)p.seq[(size_t)r]].closed = true;
    account();
    return slots;
}

void WindowTracker::verdicts(const int64_t* slots, const uint8_t* kept, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const auto it = slot_row_.find(slots[i]);
        if (it == slot_row_.end()) continue;  // not a row of the tracker (any more)
        const RowKey k = it->second;
        slot_row_.erase(it);
        --unknown_;
        Seq& q = seqs_[(size_t)k.seq];
        const auto pit = q.pending.find({k.pos, k.arrival});
        if (pit == q.pending.end()) continue;
        if (kept[i]) {
            pit->second.known = true;
            ++q.tokens;
        } else {
            free_slot(pit->second.slot);
            q.pending.erase(pit);
            --pending_total_;
        }
        mark(k.seq);
    }
    account();
}

std::vector<int64_t> WindowTracker::take_ready() {
    std::vector<int64_t> out;
    for (int64_t s : dirty_) {
        Seq& q = seqs_[(size_t)s];
        while ((int64_t)q.pending.size() >= W_) {
            int64_t ready = 0;
            for (auto it = q.pending.begin(); it != q.pending.end() && ready < W_; ++it) {
                if ((!q.closed && it->first.first >= q.frontier) || !it->second.known) break;
                ++ready;
            }
            if (ready < W_) break;
            for (int64_t k = 0; k < W_; ++k) {
                const auto it = q.pending.begin();
                out.push_back(it->second.slot);
                free_slot(it->second.slot);
                q.max_reduced = std::max(q.max_reduced, it->first.first);
                q.pending.erase(it);
            }
            pending_total_ -= W_;
            q.windows.push_back(next_window_++);
        }
        // A closed sequence's trailing partial window is dropped once every verdict is in.
        if (q.closed && std::all_of(q.pending.begin(), q.pending.end(), [](const auto& e) { return e.second.known; })) {
            for (const auto& e : q.pending) free_slot(e.second.slot);
            pending_total_ -= (int64_t)q.pending.size();
            q.pending.clear();
        }
    }
    dirty_.clear();
    account();
    return out;
}

void WindowTracker::add_entropies(const std::vector<double>& e) {
    entropy_.insert(entropy_.end(), e.begin(), e.end());
    if ((int64_t)entropy_.size() > next_window_)
        fail(COLLAPSE_ERR_INTERNAL, "window tracker: ", entropy_.size(), " entropies for ", next_window_, " reduced windows");
}

int64_t WindowTracker::pending_rows() const { return pending_total_; }

std::vector<int64_t> WindowTracker::rest_windows() const {
    if (unknown_ > 0) fail(COLLAPSE_ERR_INTERNAL, "window tracker: ", unknown_, " row verdicts still unknown at compute");
    std::vector<int64_t> out;
    for (const Seq& q : seqs_) {
        const int64_t full = (int64_t)q.pending.size() / W_ * W_;
        int64_t k = 0;
        for (auto it = q.pending.begin(); k < full; ++it, ++k) out.push_back(it->second.slot);
    }
    return out;
}

WindowResult WindowTracker::result(const std::vector<double>& rest) const {
    if ((int64_t)entropy_.size() != next_window_)
        fail(COLLAPSE_ERR_INTERNAL, "window tracker: ", entropy_.size(), " entropies for ", next_window_, " reduced windows");
    WindowResult r;
    r.present = true;
    r.window_size = W_;
    r.sequences.reserve(seqs_.size());
    size_t at = 0;
    for (const Seq& q : seqs_) {
        SequenceWindows w;
        w.id = q.id;
        w.tokens = q.tokens;
        for (int64_t id : q.windows) w.entropies.push_back(entropy_[(size_t)id]);
        const size_t more = q.pending.size() / (size_t)W_;
        if (at + more > rest.size()) fail(COLLAPSE_ERR_INTERNAL, "window tracker: too few entropies of the remaining windows");
        w.entropies.insert(w.entropies.end(), rest.begin() + (ptrdiff_t)at, rest.begin() + (ptrdiff_t)(at + more));
        at += more;
        r.sequences.push_back(std::move(w));
    }
    std::sort(r.sequences.begin(), r.sequences.end(), [](const SequenceWindows& a, const SequenceWindows& b) { return a.id < b.id; });
    finish_window_result(r);
    return r;
}

// ---------------------------------------------------------------------------------------------
// Checkpoints:
//   window_meta          i64 [2]     W, arrivals so far
//   window_sequences     i64 [S, 8]  id, tokens, frontier, rows seen, largest reduced position (-1),
//                                    reduced windows, closed (0/1), seen positions above the frontier
//   window_above         i64 [A]     those positions, sequence after sequence, ascending
//   window_pending       i64 [P, 3]  sequence (row of window_sequences), position, arrival; in
//                                    (sequence, position, arrival) order
//   window_pending_rows  f32 [P, d]  their features
//   window_entropies     f64 [E]     the reduced windows' entropies, sequence after sequence
std::vector<int64_t> WindowTracker::pending_slots() const {
    std::vector<int64_t> out;
    out.reserve((size_t)pending_total_);
    for (const Seq& q : seqs_)
        for (const auto& e : q.pending) out.push_back(e.second.slot);
    return out;
}

void WindowTracker::save(StateWriter& w, int64_t d, const std::vector<float>& rows) const {
    if (unknown_ > 0 || !dirty_.empty() || (int64_t)entropy_.size() != next_window_)
        fail(COLLAPSE_ERR_INTERNAL, "window tracker: saved with work outstanding");
    const int64_t S = (int64_t)seqs_.size(), P = pending_total_;
    if ((int64_t)rows.size() != P * d) fail(COLLAPSE_ERR_INTERNAL, "window tracker: ", rows.size(), " row values for ", P, " pending rows");
    const int64_t meta[2] = {W_, next_arrival_};
    w.add("window_meta", COLLAPSE_I64, {2}, meta, sizeof meta);
    std::vector<int64_t> seq, above, pend;
    std::vector<double> ent;
    seq.reserve((size_t)S * 8);
    for (int64_t s = 0; s < S; ++s) {
        const Seq& q = seqs_[(size_t)s];
        for (int64_t v : {q.id, q.tokens, q.frontier, q.seen, q.max_reduced, (int64_t)q.windows.size(), (int64_t)q.closed,
                          (int64_t)q.above.size()})
            seq.push_back(v);
        above.insert(above.end(), q.above.begin(), q.above.end());
        for (const auto& e : q.pending)
            for (int64_t v : {s, e.first.first, e.first.second}) pend.push_back(v);
        for (int64_t id : q.windows) ent.push_back(entropy_[(size_t)id]);
    }
    w.add("window_sequences", COLLAPSE_I64, {S, 8}, seq.data(), seq.size() * 8);
    w.add("window_above", COLLAPSE_I64, {(int64_t)above.size()}, above.data(), above.size() * 8);
    w.add("window_pending", COLLAPSE_I64, {P, 3}, pend.data(), pend.size() * 8);
    w.add("window_pending_rows", COLLAPSE_F32, {P, d}, rows.data(), rows.size() * 4);
    w.add("window_entropies", COLLAPSE_F64, {(int64_t)ent.size()}, ent.data(), ent.size() * 8);
}

bool WindowTracker::in_state(const StateReader& r) { return r.has("window_meta"); }

const float* WindowTracker::state_rows(const StateReader& r) {
    return static_cast<const float*>(r.section("window_pending_rows").data);
}

std::vector<WindowTracker::Seq> WindowTracker::read_state(const StateReader& r, int64_t d, bool merge) const {
    if (!merge && !seqs_.empty()) fail(COLLAPSE_ERR_STATE, "load_checkpoint: the window tracker already holds sequences");
    const int64_t* meta = static_cast<const int64_t*>(need(r, "window_meta", COLLAPSE_I64, {2}).data);
    if (meta[0] != W_)
        fail(COLLAPSE_ERR_CONFIG, r.description(), " was made with window_size = ", meta[0], ", this session has window_size = ", W_);
    if (meta[1] < 0) bad_state(r, "arrivals ", meta[1], " < 0");
    const int64_t S = first_dim(r, "window_sequences"), A = first_dim(r, "window_above"), P = first_dim(r, "window_pending"),
                  E = first_dim(r, "window_entropies");
    const int64_t* sq = static_cast<const int64_t*>(need(r, "window_sequences", COLLAPSE_I64, {S, 8}).data);
    const int64_t* ab = static_cast<const int64_t*>(need(r, "window_above", COLLAPSE_I64, {A}).data);
    const int64_t* pe = static_cast<const int64_t*>(need(r, "window_pending", COLLAPSE_I64, {P, 3}).data);
    const float* rows = static_cast<const float*>(need(r, "window_pending_rows", COLLAPSE_F32, {P, d}).data);
    const double* en = static_cast<const double*>(need(r, "window_entropies", COLLAPSE_F64, {E}).data);
    // The bookkeeping the state adds, before any of it exists.
    budget_->check(add_bytes(add_bytes(mul_bytes(S, kSeqBytes), mul_bytes(P, kPendingBytes + 8)), add_bytes(mul_bytes(A, kAboveBytes), mul_bytes(E, kWindowBytes))),
                   "the checkpoint's window state (" + std::to_string(S) + " sequences, " + std::to_string(P) + " pending rows)");

    // Every value checked; the sequences are built aside.
    std::vector<Seq> in((size_t)S);
    std::unordered_map<int64_t, int64_t> ids;
    int64_t a_at = 0, e_total = 0;
    const double h_max = std::log((double)std::max(W_, d)) + 1e-6;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t* v = sq + s * 8;
        Seq& q = in[(size_t)s];
        q.id = v[0], q.tokens = v[1], q.frontier = v[2], q.seen = v[3], q.max_reduced = v[4];
        const int64_t windows = v[5], closed = v[6], above = v[7];
        if (!ids.emplace(q.id, s).second) bad_state(r, "sequence id ", q.id, " appears twice");
        if (merge && index_.count(q.id))
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, r.description(), " has sequence id ", q.id,
                 ", which this session has too; shards to merge must hold disjoint sequences (a sequence's windows cannot be joined)");
        if (q.tokens < 0 || q.frontier < 0 || q.seen < 0 || windows < 0 || above < 0 || (closed != 0 && closed != 1) ||
            q.max_reduced < -1 || windows > q.tokens / W_ || (windows > 0) != (q.max_reduced >= 0) ||
            (q.max_reduced >= 0 && q.max_reduced >= q.frontier) || above > A - a_at || q.seen < q.frontier + above ||
            q.tokens > q.seen)
            bad_state(r, "sequence ", q.id, " has inconsistent counts (tokens ", q.tokens, ", frontier ", q.frontier, ", seen ", q.seen,
                      ", largest reduced position ", q.max_reduced, ", windows ", windows, ", closed ", closed, ", positions above ", above, ")");
        q.closed = closed != 0;
        int64_t prev = q.frontier;
        for (int64_t k = 0; k < above; ++k, ++a_at) {
            if (ab[a_at] <= prev) bad_state(r, "sequence ", q.id, "'s seen positions above its frontier ", q.frontier, " are not ascending and above it");
            prev = ab[a_at];
            q.above.insert(ab[a_at]);
        }
        if (windows > E - e_total) bad_state(r, "more windows than entropies (", E, ")");
        e_total += windows;
        q.windows.assign((size_t)windows, -1);
    }
    if (a_at != A) bad_state(r, "window_above has ", A, " positions, the sequences name ", a_at);
    if (e_total != E) bad_state(r, "window_entropies has ", E, " values, the sequences name ", e_total, " windows");
    for (int64_t i = 0; i < E; ++i)
        if (!std::isfinite(en[i]) || en[i] < -1e-6 || en[i] > h_max) bad_state(r, "window entropy ", i, " = ", en[i], " is not in [0, ln max(W, d)]");
    for (int64_t i = 0; i < P; ++i) {
        const int64_t s = pe[i * 3], pos = pe[i * 3 + 1], arrival = pe[i * 3 + 2];
        if (s < 0 || s >= S) bad_state(r, "pending row ", i, " names sequence row ", s, " of ", S);
        Seq& q = in[(size_t)s];
        if (pos < 0 || pos < q.max_reduced || arrival < 0 || arrival >= meta[1] || q.closed)
            bad_state(r, "pending row ", i, " (sequence ", q.id, ", position ", pos, ", arrival ", arrival, ") does not fit its sequence");
        if (!q.pending.emplace(std::make_pair(pos, arrival), Pending{-1, true}).second)
            bad_state(r, "pending row ", i, " repeats sequence ", q.id, "'s position ", pos, " and arrival ", arrival);
        for (int64_t k = 0; k < d; ++k)
            if (!std::isfinite(rows[i * d + k])) bad_state(r, "pending row ", i, " has a non-finite value at column ", k);
    }
    for (const Seq& q : in) {
        // Canonical: every window that was complete and final is reduced; the kept rows add up.
        int64_t final_rows = 0;
        for (const auto& e : q.pending) final_rows += e.first.first < q.frontier ? 1 : 0;
        const int64_t open = (int64_t)q.pending.size(), windows = (int64_t)q.windows.size();
        const bool counts_ok = q.closed ? q.tokens - windows * W_ >= 0 && q.tokens - windows * W_ < W_ : q.tokens == windows * W_ + open;
        if (!counts_ok || final_rows >= W_)
            bad_state(r, "sequence ", q.id, " has ", q.tokens, " kept rows but ", windows, " windows of ", W_, " and ", open,
                      " pending rows (", final_rows, " of them final)");
    }

    return in;
}

std::vector<int64_t> WindowTracker::load(const StateReader& r, int64_t d, bool merge) {
    if (unknown_ > 0 || (int64_t)entropy_.size() != next_window_)
        fail(COLLAPSE_ERR_INTERNAL, "window tracker: loaded into with work outstanding");
    std::vector<Seq> in = read_state(r, d, merge);
    // Nothing below throws but bad_alloc.
    const int64_t* meta = static_cast<const int64_t*>(r.section("window_meta").data);
    const int64_t S = (int64_t)in.size(), P = first_dim(r, "window_pending");
    const int64_t* pe = static_cast<const int64_t*>(r.section("window_pending").data);
    const double* en = static_cast<const double*>(r.section("window_entropies").data);
    std::vector<int64_t> slots;
    slots.reserve((size_t)P);
    int64_t e_at = 0;
    for (Seq& q : in) {
        for (int64_t& id : q.windows) {
            id = next_window_++;
            entropy_.push_back(en[e_at++]);
        }
    }
    const int64_t arrival_base = merge ? next_arrival_ : 0;
    for (Seq& q : in) {
        std::map<std::pair<int64_t, int64_t>, Pending> moved;
        for (const auto& e : q.pending) moved.emplace(std::make_pair(e.first.first, e.first.second + arrival_base), Pending{-1, true});
        q.pending.swap(moved);
    }
    // Slots in file order: pending rows are listed sequence by sequence in key order.
    std::vector<std::pair<int64_t, std::pair<int64_t, int64_t>>> order((size_t)P);
    for (int64_t i = 0; i < P; ++i) order[(size_t)i] = {pe[i * 3], {pe[i * 3 + 1], pe[i * 3 + 2] + arrival_base}};
    const int64_t S0 = (int64_t)seqs_.size();
    for (int64_t s = 0; s < S; ++s) {
        Seq& q = in[(size_t)s];
        index_.emplace(q.id, S0 + s);
        pending_total_ += (int64_t)q.pending.size();
        above_total_ += (int64_t)q.above.size();
        seqs_.push_back(std::move(q));
    }
    for (const auto& o : order) {
        const int64_t slot = new_slot();
        seqs_[(size_t)(S0 + o.first)].pending.at(o.second).slot = slot;
        slots.push_back(slot);
    }
    next_arrival_ = arrival_base + meta[1];
    account();
    return slots;
}

}  // namespace collapse::internal
