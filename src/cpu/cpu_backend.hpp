// The CPU backend (reference): float64 per-class accumulators, a streaming float64 Gram,
// and the row store (exact SVD) or reservoirs (sampled SVD). Ingest is in cpu_backend.cpp,
// every metric in cpu_metrics.cpp.
#pragma once
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "core/backend.hpp"
#include "core/host_budget.hpp"
#include "core/metric_summary.hpp"
#include "core/pair_part.hpp"
#include "core/reservoir_picks.hpp"
#include "core/row_store.hpp"
#include "core/second_pass_part.hpp"

namespace collapse::internal {

class WindowWorker;  // cpu_windows.cpp
struct WindowWorkerStop {  // defined where WindowWorker is complete
    void operator()(WindowWorker* w) const;
};

class CpuBackend final : public Backend {
public:
    // budget: the session's account of host memory (null: one of its own from cfg). Everything
    // this backend allocates that grows with V, K, d or rows is counted there first.
    CpuBackend(const Config& cfg, int64_t num_classes, int64_t dim, std::shared_ptr<HostBudget> budget = nullptr);
    const char* name() const override { return "cpu"; }
    void ingest(const BatchDesc& batch, void* stream) override;
    Counts row_counts() override { return rows_; }
    std::vector<int64_t> class_counts() override { return count_; }
    bool has_row_store() const override { return cfg_.svd_mode == COLLAPSE_SVD_EXACT && store_ != nullptr; }
    void begin_second_pass(const KeptSet& kept, const Classifier& clf, bool nc4, bool gram) override;
    void ingest_second_pass(const BatchDesc& batch, void* stream) override;
    MetricValues compute(const KeptSet& kept, const Classifier& clf) override;
    void save_state(StateWriter& w) override;
    void load_state(const StateReader& r, bool merge) override;
    void write_class_sums(StateWriter& w) override;
    void adopt_class_sums(const int64_t* counts, const double* sums) override;
    void save_second_pass(StateWriter& w) override;
    void merge_second_pass(const StateReader& r) override;
    SecondPassSizes second_pass_sizes() const;  // what this second pass makes (core/second_pass_part.hpp)
    // The exact row store, or the sampled reservoirs, spread over ranks by class (cpu_ranks.cpp).
    bool can_spread_rows() const override { return store_ != nullptr && spread_phase_ == SpreadPhase::None; }
    void begin_rows_spread() override;
    bool rows_spread() const override { return spread_phase_ == SpreadPhase::Spread; }
    void spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const RowsFn& fn) override;
    void spread_open(const std::vector<int32_t>& owned) override;
    void spread_append(int32_t c, const double* rows, int64_t n, const int64_t* slots) override;
    void spread_close() override;
    bool spread_samples() const override { return store_ != nullptr && !has_row_store(); }
    void spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w) override;
    void spread_take_picks(const StateReader& r) override;
    void spread_part(const KeptSet& kept, const Classifier& clf, StateWriter& w) override;
    void spread_merge(const KeptSet& kept, const Classifier& clf, const StateReader& r) override;
    // Pair-metric tiles spread over ranks (cpu_ranks.cpp).
    bool can_spread_pairs() const override { return true; }
    bool pair_inputs(const KeptSet& kept, StateWriter& w) override;
    void pair_part(const StateReader& inputs, int rank, int P, StateWriter& w) override;
    void pair_merge(const KeptSet& kept, const StateReader& part) override;

    // Generation-time windows (cpu_windows.cpp): float32 slots in chunks; window_reduce hands the
    // windows to a background thread, window_evaluate answers at once.
    bool supports_windows() const override { return true; }
    bool last_batch_kept(std::vector<uint8_t>& kept) override;
    int64_t window_store_bytes(int64_t capacity) const override;
    void window_stash(const BatchDesc& batch, const int64_t* slot, int64_t capacity, void* stream) override;
    void window_put(const int64_t* slots, int64_t n, const float* rows, int64_t capacity) override;
    void window_get(const int64_t* slots, int64_t n, float* rows) override;
    void window_reduce(const int64_t* slots, int64_t windows, int64_t W) override;
    std::vector<double> window_results() override;
    std::vector<double> window_evaluate(const int64_t* slots, int64_t windows, int64_t W) override;

    // Bytes this backend holds now (accumulators, Gram, row store, reservoirs, scratch).
    int64_t resident_bytes() const;
    const HostBudget& budget() const { return *budget_; }
    // The held-back rows' bytes: the running count, and the same walked from the map (tests).
    int64_t holdback_bytes() const { return holdback_bytes_; }
    int64_t holdback_bytes_walked() const;
    const RowStore* row_store() const { return store_.get(); }

private:
    // --- ingest helpers (cpu_backend.cpp) ---
    void stage(const BatchDesc& b, const AcceptedRows& rows);
    void commit(const BatchDesc& b, const AcceptedRows& rows);
    // A row of class c enters the overall Gram, and shifted by c's reference row the within scatter.
    void gram_add(int32_t c, const double* x);
    void gram_flush();
    // Class c's rows of a batch (len) for the Gram: room for those held back, then row by row.
    void gram_reserve(int32_t c, int64_t len);
    void gram_row(int32_t c, int64_t i, const double* x);
    // Sigma_W's sum over kept rows (full d x d) for the anchor metrics, or empty with *note.
    std::vector<double> within_scatter(const KeptSet& kept, const std::vector<double>& mu, std::string* note) const;
    int64_t growth() const;
    int64_t fixed_bytes() const;
    int64_t held_rows_bytes() const;
    int64_t load_budget() const;

    // --- metric helpers (cpu_metrics.cpp) ---
    void class_metrics(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu,
                       const std::vector<double>& m, const std::vector<double>& var, MetricValues& out) const;
    void pair_metrics(const KeptSet& kept, const std::vector<double>& m, const std::vector<double>& var,
                      MetricValues& out) const;
    // The kept means mu, within-class variances var and centred means m [K, d] as compute() takes them.
    void class_means(const KeptSet& kept, std::vector<double>& mu, std::vector<double>& var, std::vector<double>& m) const;
    // The pair tiles' edge for K kept classes, and the merged moments of the contiguous share of
    // rank `rank` of P of the tiles (by pair count, in tile order; P = 1: every tile): the one pair
    // reduction of the single process and of the ranks. m [K, d], var [K]; range: the share's first
    // tile, its end and the number of tiles.
    int64_t pair_tile_edge(int64_t K) const;
    PairTotals pair_tiles(const double* m, const double* var, int64_t K, int64_t T, int rank, int P, int64_t* range = nullptr) const;
    void anchor_metrics(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu, const std::vector<double>& m,
                        const ClassVectors& v, MetricValues& out) const;
    void token_metrics(const KeptSet& kept, const std::vector<double>& mu, MetricValues& out) const;
    void overall_entropy(const KeptSet& kept, MetricValues& out) const;
    // The row-store passes of compute() that spread_part runs on a rank's own classes too:
    // within-class variances about the means mu (by kept.slot), the Gram of the rows of `ids`
    // (upper triangle, added to g [d, d]), and the scatter about the means (added to w [d, d]).
    void store_variances(const KeptSet& kept, const std::vector<double>& mu, std::vector<double>& var) const;
    void store_gram(const std::vector<int32_t>& ids, std::vector<double>& g) const;
    void store_scatter(const KeptSet& kept, const std::vector<double>& mu, std::vector<double>& w) const;
    // compute()'s parts from the ranks' sums (spread_merge) in place of the row store.
    bool spread_ready() const { return spread_ != nullptr; }
    void spread_results(const KeptSet& kept, std::vector<double>* var, MetricValues* tokens_out) const;
    void nc4_from_store(const KeptSet& kept, const Classifier& clf, const std::vector<double>& mu,
                        MetricValues& out) const;

    Config cfg_;
    // Declared before everything it counts, so that it outlives their leases (the row store's too).
    std::shared_ptr<HostBudget> budget_;
    HostBudget::Lease fixed_;    // accumulators, Gram, the batch index: fixed_bytes()
    HostBudget::Lease held_;     // rows held: the row store's memory and the held-back Gram rows
    HostBudget::Lease scratch_;  // per-batch scratch, as large as the largest batch so far
    HostBudget::Lease stage_sums_;  // stage_sum_'s capacity
    HostBudget::Lease pass2_lease_;  // the second pass's kept set and means
    int64_t V_, d_;
    std::vector<uint8_t> excluded_;  // [V]

    Counts rows_;                   // row counts of the first pass
    std::vector<int64_t> count_;    // n_c
    std::vector<double> sum_;       // [V, d] sum of rows
    std::vector<double> sqdev_;     // [V] sum of ||x - s_c||^2 (s_c: shift_, or 0 without it; core/shifted_sums.hpp)

    // Overall Gram of rows of qualifying classes (upper triangle, row-major d x d). Rows of a class
    // below min_samples_per_token wait in holdback_ until it qualifies.
    bool gram_streaming_ = false;
    std::vector<double> gram_;
    std::unordered_map<int32_t, std::vector<double>> holdback_;
    // Bytes of holdback_ (each entry's capacity and kHoldbackEntryBytes), kept exact by the helpers
    // below, the only places that change it: held_rows_bytes() runs every batch and must not walk V.
    int64_t holdback_bytes_ = 0;
    std::vector<double>& holdback_entry(int32_t c);
    void holdback_reserve(int32_t c, size_t capacity);
    void holdback_append(int32_t c, const double* x, int64_t values);
    void holdback_erase(std::unordered_map<int32_t, std::vector<double>>::iterator it);
    void holdback_clear();
    std::vector<double> gram_block_;  // rows waiting for the next dsyrk
    std::vector<int32_t> gram_block_class_;  // and their classes
    int64_t gram_block_rows_ = 0;

    // Each class's reference row s_c (its first row, as float32: any shift is exact, this one makes
    // x - s_c exact for float32 inputs), kept with the class metrics: var_c comes from sqdev_ and
    // the within-class scatter for Sigma_W (docs/METRICS.md, "Anchor metrics") streams with the
    // Gram, rows shifted by s_c, so that tight classes lose no digits; compute() subtracts
    // sum_c n_c (mu_c - s_c)(mu_c - s_c)^T. Same kept-row rules as the Gram.
    bool shifted_ = false;
    bool within_streaming_ = false;
    bool within_valid_ = true;        // false after loading a checkpoint without the within sections
    std::vector<float> shift_;        // [V, d] s_c (shifted_)
    std::vector<double> within_;      // [d, d] upper: sum (x - s_c)(x - s_c)^T

    // Exact mode: every accepted row, by class, spilled to disk beyond its memory budget; sampled
    // mode: reservoirs of at most svd_max_rows_per_token rows. Null when no rows are kept. Kept in
    // float64 so that float64 inputs lose nothing.
    std::unique_ptr<RowStore> store_;

    // Per-batch scratch (reused): rows grouped by class and their partial sums.
    std::vector<int64_t> order_;
    std::vector<int32_t> run_label_;
    std::vector<int64_t> run_begin_;
    std::vector<double> stage_sum_;    // [staged runs, d] sums of classes seen more than once
    std::vector<double> stage_sq_;     // [runs] sum of ||x - s_c||^2
    std::vector<int64_t> stage_slot_;  // [runs] row in stage_sum_, -1 for a single row
    std::vector<int64_t> bucket_;
    std::vector<int32_t> run_of_label_;  // [V], -1 outside stage()

    // Second pass.
    bool pass2_ = false, pass2_nc4_ = false, pass2_gram_ = false;
    KeptSet kept2_;
    std::vector<double> mu2_;      // kept means [K, d]
    std::vector<double> mu2_sq_;   // ||mu||^2
    // The session's classifier, not a copy ([V, d] in float64 can be gigabytes): set_classifier is
    // refused during the second pass, so it cannot change under it.
    const Classifier* clf2_ = nullptr;
    std::vector<double> gram2_;
    std::vector<double> within2_;  // second pass: sum (x - mu_c)(x - mu_c)^T of kept rows (upper)
    int64_t pass2_rows_ = 0, nc4_agree_ = 0;
    std::vector<int64_t> nc4_hits2_, nc4_rows2_;  // per kept slot (per_class_arrays)

    // Windows: the last first-pass batch's kept feature rows (its accepted list), the slot store
    // (chunks of kWindowChunk rows of d floats) and the entropies not yet taken.
    std::vector<int64_t> last_rows_;
    int64_t last_n_ = 0, last_seq_len_ = 0;
    bool last_sequences_ = false;
    std::vector<std::vector<float>> window_chunks_;
    HostBudget::Lease window_lease_;
    std::vector<double> window_out_;
    void window_grow(int64_t capacity);
    float* window_row(int64_t slot) const;

    // Rows spread over ranks (cpu_ranks.cpp). Gathering: states leave the row store out; Spread:
    // store_ holds every row of the kept classes this rank owns and nothing else.
    enum class SpreadPhase { None, Gathering, Spread };
    SpreadPhase spread_phase_ = SpreadPhase::None;
    std::unique_ptr<RowStore> spread_store_;  // being filled (spread_open .. spread_close)
    std::vector<uint8_t> spread_owned_;       // [V] while it is
    std::vector<int64_t> spread_filled_;      // [V] reservoirs: the slots filled so far
    HostBudget::Lease spread_lease_;          // its rows in memory, the flags and the filled counts
    // Reservoirs: the root's merged samples and this rank's picks (core/reservoir_picks.hpp), from
    // begin_rows_spread to spread_close; merge_picks is load_state's part while gathering them (the
    // shard's counts `theirs`, this session's being `before`).
    std::unique_ptr<ReservoirPicks> picks_;
    ReservoirPicks::RowsOf own_reservoir_rows() const;
    void merge_picks(const int64_t* theirs, const std::vector<int64_t>& before);
    // The root's sum of every rank's part, per kept slot.
    struct SpreadResults {
        std::vector<int32_t> ids;  // the kept set they are of
        std::vector<uint8_t> seen;  // [K] a part has given the slot
        std::vector<double> var;    // [K]
        std::vector<TokenMetrics> tokens;  // [K] with per-token metrics
        bool nc4 = false;
        int64_t nc4_agree = 0, nc4_rows = 0;
        std::vector<int64_t> nc4_hits, nc4_class_rows;  // [K] (per_class_arrays)
        std::vector<double> gram, within;  // [d, d] upper, when made
    };
    std::unique_ptr<SpreadResults> spread_;
    // Once the rows have moved, the state is no longer one process's: no checkpoint, no more rows.
    void refuse_if_spread(const char* what) const;
    HostBudget::Lease spread_results_lease_;
    // The ranks' pair-metric shares merged on the root (pair_merge, core/pair_part.hpp), for this kept set and rows.
    std::unique_ptr<PairSpread> pair_spread_;
    // Declared last, so that it stops (and its jobs give their leases back) before anything else goes.
    std::unique_ptr<WindowWorker, WindowWorkerStop> window_worker_;
};

// NC4 over rows gathered from many classes: rows are copied into a block of up to block_rows()
// rows, cut into tiles of rows on the threads; a tile is multiplied by W (and by the kept means) a
// cache-sized chunk at a time, each chunk's argmax taken while it is in cache (W is read once per
// tile of many classes' rows, never once per class; the logits never go through memory). The
// row-store path and the second pass both go through it. The block and the tiles are counted in
// `budget` when it is made (on the calling thread).
// A running first argmax: the largest value seen so far and its index (cpu_metrics.cpp's scan_argmax).
struct ArgBest {
    double v;
    int64_t i;
};

class Nc4Blocks {
public:
    // rows_hint: at most how many rows will come (bounds the block). slot_hits (may be null): the
    // agreements by kept slot, for rows added with their slots. max_block: the largest block (tests
    // make it small to put block boundaries inside classes).
    Nc4Blocks(HostBudget& budget, int64_t d, const Classifier& clf, int64_t V, const std::vector<double>& mu_kept,
              const std::vector<double>& mu_sq, const std::vector<int32_t>& kept_ids, int64_t rows_hint, int64_t* slot_hits = nullptr,
              int64_t max_block = 4096);
    // n rows (row-major, d wide): all of kept slot `slot`, or row i of slots[i] (slots may be null).
    void add(const double* x, int64_t n, int32_t slot);
    void add(const double* x, int64_t n, const int32_t* slots);
    // Runs the rows still waiting; the agreements of every row added.
    int64_t finish();
    int64_t block_rows() const { return B_; }

private:
    void run(const double* x, int64_t n, const int32_t* slots);
    int64_t d_, V_, K_, B_ = 0, waiting_ = 0, agree_ = 0, R_ = 0, Cv_ = 0, Ck_ = 0;
    int threads_ = 1;
    const Classifier& clf_;
    const std::vector<double>& mu_;
    const std::vector<int32_t>& ids_;
    int64_t* slot_hits_;
    HostBudget::Lease lease_;
    std::vector<double> block_, tiles_, neg_mu_sq_;
    std::vector<ArgBest> best_;  // per thread: each tile row's best logit, then its nearest mean
    std::vector<int32_t> slot_;
    std::vector<uint8_t> hit_;
};

// NC4 on rows of one array (an Nc4Blocks of them). With row_slot (each row's kept slot),
// slot_hits[slot] counts the agreements by class.
int64_t nc4_agreements(HostBudget& budget, const double* x, int64_t rows, int64_t d, const Classifier& clf, int64_t V,
                       const std::vector<double>& mu_kept, const std::vector<double>& mu_sq,
                       const std::vector<int32_t>& kept_ids, const int32_t* row_slot = nullptr, int64_t* slot_hits = nullptr);

// Eigenvalues (ascending) of the symmetric n x n matrix g (upper triangle, row-major; destroyed) into
// w[n], by LAPACK dsyevd without vectors. `what` names the matrix in the error of a failed solve.
void symmetric_eigenvalues(double* g, int64_t n, double* w, const char* what);

// All min(n, d) singular values of one class's rows (n x d row-major, minus `center` per row when
// not null), descending: CholeskyQR2 for tall classes (n >= 2d), dgesdd otherwise and whenever
// CholeskyQR2's check fails (cpu_metrics.cpp says why that keeps the accuracy contract). `a` is
// scratch; *cholqr (may be null) says which route gave the values. Touches no budget (the caller
// counts token_svd_bytes); the per-token threads call it.
std::vector<double> class_singular_values(const double* x, int64_t n, int64_t d, const double* center, std::vector<double>& a,
                                          bool* cholqr = nullptr);
int64_t token_svd_bytes(int64_t n, int64_t d);

}  // namespace collapse::internal
