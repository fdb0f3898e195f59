// The CUDA backend's class, shared by its translation units (the layout of src/cpu/):
//   cuda_backend.cu     construction, sync, class counts, the backend's factory
//   resources.{cuh,cu}  the session's stream, cuBLAS/cuSOLVER handles, budget and workspace pool
//   cuda_ingest.cu      first and second pass: staging, validation, grouping, accumulation
//   row_transport.cu    exact mode: device row buffer -> pinned -> host RowStore (the spill path),
//                       and back at the end
//   token_svd_device.cu exact mode: per-token SVD of the rows still in the device row buffer
//   cuda_metrics.cu     compute(): every metric of the kept set
//   eigen_solvers.cu    eigenvalues of the overall Gram and of per-class Grams (solver by size)
//   cuda_checkpoint.cu  checkpoints in the shared layout
//   cuda_windows.cu     generation-time windows: slot store, verdicts, window entropies
//   ingest_kernels.cu, finalize_kernels.cu (launchers: kernels.cuh)  the kernels
//
// Where each metric is computed (src/core/backend.hpp for the whole engine):
//   class sums, sums of squares about reference rows, counts, Gram, Sigma_W's scatter, rows -> ingest (cuda_ingest.cu; kernels in ingest_kernels.cu)
//   means, centring; equinorm; UNC3, NC3 duality    -> compute (cuda_metrics.cu; launch_means, _center, _duality,
//                                                      _self_duality; host summary: finish_class_metrics)
//   GNC2, equiangularity, CDNV (pair metrics)       -> compute: tiles of cublasDsyrk/Dgemm + launch_pair_reduce (pair_tiles;
//                                                      under MPI each rank's share of the tiles, cuda_ranks.cu)
//   overall SVD entropy                             -> compute: streamed (or second-pass) Gram -> eigenvalues_sym
//   anchor metrics (nc1_*, nc2_etf_err, nc3_dual_err, -> compute: anchor_metrics (d x d products by cublasDsyrk;
//     nc3u, nc5; the pair ones in launch_pair_reduce)   Sigma_W streamed at ingest (add_centered_scatter), else from
//                                                      the exact rows or the second pass; host: finish_anchor_metrics)
//   per-token SVD entropies                         -> compute -> per_token: rows in the device buffer ->
//                                                      DeviceClassRows (token_svd_device.cu); spilled rows or
//                                                      sampled -> class_spectra (eigen_solvers.cu)
//   NC4                                             -> ingest_second_pass (GEMM chunks + launch_nc4_compare),
//                                                      reported by compute; every row still in the device
//                                                      buffer: compute -> nc4_from_device (no second pass)
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <array>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/metric_summary.hpp"
#include "core/pair_part.hpp"
#include "core/reservoir_picks.hpp"
#include "core/row_store.hpp"
#include "core/second_pass_part.hpp"
#include "cuda_check.hpp"
#include "device_memory.hpp"
#include "kernels.cuh"
#include "resources.cuh"
#include "token_svd_device.cuh"

namespace collapse::internal {
namespace cuda {

constexpr int kStatusSlots = 8;
// Rows of Sigma_W's float64 workspaces: about 32 MiB (the dsyrk of a chunk is still large).
inline int64_t within_chunk_rows(int64_t d) { return std::max<int64_t>(1, (int64_t(32) << 20) / (8 * std::max<int64_t>(d, 1))); }
// NC4's two products for nr float64 rows xd [nr, d]: logits = W xd^T (V x nr, column-major) and
// dots = mu xd^T (K x nr), which launch_nc4_compare reads (compute's blocks and the second pass).
void nc4_products(cublasHandle_t h, const double* W, int64_t V, const double* mu, int64_t K, const double* xd, int64_t nr, int64_t d,
                  double* logits, double* dots);

class CudaBackend final : public Backend {
public:
    // host: the session's host budget (null: one made from cfg), as for the CPU backend.
    CudaBackend(const Config& cfg, int64_t V, int64_t d, std::shared_ptr<HostBudget> host = nullptr);
    ~CudaBackend() override;
    const char* name() const override { return "cuda"; }
    // Allocation calls made for this session so far (tests: none after the first batch and compute
    // of a shape). Inline, so that a test reads it through a Backend* without the module's symbols.
    AllocationCalls allocation_calls() const { return res_.budget().allocation_calls(); }
    void ingest(const BatchDesc& b, void* stream) override;
    Counts row_counts() override {
        sync();
        return totals_;
    }
    std::vector<int64_t> class_counts() override;
    void sync() override;
    // NC4 and the Gram of a cut kept set come from a second pass on this backend; the row store
    // serves the per-token entropies.
    bool has_row_store() const override { return false; }
    // NC4 from the device row buffer while it holds every row (nc4_from_device): no second pass.
    // Rows spread over ranks: NC4 is in the owners' parts (cuda_ranks.cu).
    bool nc4_from_rows() const override { return rows_on_device() || (exact_store_ && spread_phase_ == SpreadPhase::Spread); }
    void begin_second_pass(const KeptSet& kept, const Classifier& clf, bool nc4, bool gram) override;
    void ingest_second_pass(const BatchDesc& b, void* stream) override;
    MetricValues compute(const KeptSet& kept, const Classifier& clf) override;
    // Checkpoints in the shared layout (cuda_checkpoint.cu).
    void save_state(StateWriter& w) override;
    void load_state(const StateReader& r, bool merge) override;
    // Generation-time windows (cuda_windows.cu): a float32 slot store on the device; verdicts come
    // back with the batch (window_verdicts); each window's entropy from its centred float64 Gram.
    bool supports_windows() const override { return true; }
    void window_verdicts(std::vector<int64_t>& slots, std::vector<uint8_t>& kept) override;
    // The store is device memory (device_memory_limit); its host side is the pinned verdict
    // buffers, counted as they grow.
    int64_t window_store_bytes(int64_t capacity) const override { return 0; }
    void window_stash(const BatchDesc& b, const int64_t* slot, int64_t capacity, void* stream) override;
    void window_put(const int64_t* slots, int64_t n, const float* rows, int64_t capacity) override;
    void window_get(const int64_t* slots, int64_t n, float* rows) override;
    void window_reduce(const int64_t* slots, int64_t windows, int64_t W) override;
    std::vector<double> window_results() override;
    std::vector<double> window_evaluate(const int64_t* slots, int64_t windows, int64_t W) override;
    // The exact row store spread over MPI ranks by class (cuda_ranks.cu): the device buffer's rows
    // go to the host store first, then move as on the CPU; an owner's part is its classes' per-token
    // SVDs (per_token) and NC4 over its rows (the second pass's kernels). Sampled reservoirs: the
    // root's merged samples (core/reservoir_picks.hpp) say which rows go where; the owner's part is
    // the per-token SVDs of its classes' merged samples, put back into their device reservoirs.
    bool can_spread_rows() const override;
    void begin_rows_spread() override;
    bool rows_spread() const override { return spread_phase_ == SpreadPhase::Spread; }
    void write_class_sums(StateWriter& w) override;
    void adopt_class_sums(const int64_t* counts, const double* sums) override;
    // A rank's second-pass results (core/second_pass_part.hpp), through host memory (cuda_ranks.cu).
    void save_second_pass(StateWriter& w) override;
    void merge_second_pass(const StateReader& r) override;
    SecondPassSizes second_pass_sizes() const;  // what this second pass makes
    void spread_read(const std::vector<int32_t>& ids, int64_t max_rows, const RowsFn& fn) override;
    void spread_open(const std::vector<int32_t>& owned) override;
    void spread_append(int32_t c, const double* rows, int64_t n, const int64_t* slots) override;
    void spread_close() override;
    bool spread_samples() const override { return sampled_; }
    void spread_write_picks(int source, const std::vector<int32_t>& ids, StateWriter& w) override;
    void spread_take_picks(const StateReader& r) override;
    void spread_part(const KeptSet& kept, const Classifier& clf, StateWriter& w) override;
    void spread_merge(const KeptSet& kept, const Classifier& clf, const StateReader& r) override;
    // Pair-metric tiles spread over ranks (cuda_ranks.cu; the tiling and layout of core/pair_part.hpp):
    // the root's centred means through host memory, each rank's share of the tiles on its device.
    bool can_spread_pairs() const override { return true; }
    bool pair_inputs(const KeptSet& kept, StateWriter& w) override;
    void pair_part(const StateReader& inputs, int rank, int P, StateWriter& w) override;
    void pair_merge(const KeptSet& kept, const StateReader& part) override;

private:
    struct Scratch {
        DeviceBuffer<int32_t> keys, vals, keys_sorted, vals_sorted;
        DeviceBuffer<uint8_t> cub_temp;
        DeviceBuffer<float> gram_rows;
        DeviceBuffer<double> within_rows;  // Sigma_W's rows less their reference rows (or means), a chunk at a time
        int64_t rows = 0;
    };
    // Host batches travel through two pinned + device staging slots (double buffering): the rows
    // are copied into the pinned slot on host threads, then to the device slot on copy_stream_, so
    // that batch k + 1's host copy and upload overlap batch k's kernels.
    struct Staging {
        PinnedBuffer<uint8_t> host;
        DeviceBuffer<uint8_t> dev;
        cudaEvent_t copied = nullptr;    // its upload is done (the pinned slot may be refilled)
        cudaEvent_t consumed = nullptr;  // the kernels that read the device slot are done
    };

    void init();
    void release() noexcept;
    cudaStream_t pick_stream(void* s);
    DeviceBatch device_view(const BatchDesc& b, cudaStream_t s);
    void ensure_scratch(int64_t rows);
    void process_slot(int k, bool wait);
    void raise_pending();
    int begin_batch(const BatchDesc& b, cudaStream_t s, bool check_store, DeviceBatch* db);
    void end_batch(int k, const BatchDesc& b, cudaStream_t s, bool first_pass);
    void group_batch(const DeviceBatch& db, const IngestParams& ip, BatchStatus* st, cudaStream_t s);
    void per_token(const KeptSet& kept, const double* mu, MetricValues& out);
    // compute()'s kept means on the device (cuda_metrics.cu): ids, mu [K, d], var, weight [K], the
    // global mean's sums [d], the centred means m [K, d], their squared norms q and scales a [K].
    struct KeptMeans {
        Lease<int32_t> ids;
        Lease<double> mu, var, weight, mug, m, q, a;
    };
    KeptMeans kept_means(const KeptSet& kept);
    // The pair tiles' edge for K kept classes, and the merged moments of rank `rank`'s share of P
    // of the tiles (P = 1: every tile) from device m, q, a, var (cuda_metrics.cu); range: the
    // share's first tile, its end and the number of tiles.
    int64_t pair_tile_edge(int64_t K) const;
    PairTotals pair_tiles(const double* m, const double* q, const double* a, const double* var, int64_t K, int64_t T, int rank, int P,
                          int64_t* range = nullptr);
    // NC4 of the rows in the device row buffer (rows_on_device), in blocks of rows (cuda_metrics.cu).
    void nc4_from_device(const KeptSet& kept, const Classifier& clf, const double* mu, const int32_t* ids, MetricValues& out);
    // The anchor metrics (cuda_metrics.cu) and Sigma_W's scatter (empty with *note when not available).
    void anchor_metrics(const KeptSet& kept, const Classifier& clf, const double* mu, const double* m, const int32_t* ids,
                        const ClassVectors& v, MetricValues& out);
    std::vector<double> within_scatter(const KeptSet& kept, const double* mu, std::string* note);
    // The streamed scatter as a checkpoint has it (row-major upper; rows of classes with
    // min_samples_per_token rows): within_ less the held rows of the classes below (counts: n_c).
    // With `kept`, less sum_c n_c (mu_c - s_c)(mu_c - s_c)^T over its classes: the scatter about the means.
    std::vector<double> streamed_within(const std::vector<int64_t>& counts, const KeptSet* kept);
    // The hold-area index (c * hold_rows + r) of every row of the classes below min_samples_per_token.
    std::vector<int32_t> held_index(const std::vector<int64_t>& counts) const;
    // g (column-major upper d x d) -= X^T X of the held rows `index` (less their reference rows
    // shift_ when `shifted`), a bounded chunk of rows at a time; synchronises the stream.
    void subtract_held_rows(const std::vector<int32_t>& index, bool shifted, double* g);
    // x_i - center of rows p0.. of the sorted batch into scratch_.within_rows, added to acc (column-major
    // upper d x d) by cublasDsyrk a chunk at a time (cuda_ingest.cu).
    void add_centered_scatter(const DeviceBatch& db, const float* shift, const double* mean, const int32_t* kept_slot, const BatchStatus* st,
                              double* acc, cudaStream_t s);
    void move_store_to_host();
    // Exact mode: every stored row is still in the device buffer (none went to the host store), and
    // the buffer's rows as the kernels read them.
    bool rows_on_device() const { return exact_store_ && host_store_ && host_store_->total_rows() == 0 && spread_phase_ == SpreadPhase::None; }
    DeviceRows device_rows();
    // The dtype the device buffer keeps the next batch's rows in: moves the rows to the host store
    // first when it changes (a float16 buffer meeting a bfloat16 or float32 batch becomes float32).
    void set_store_dtype(collapse_dtype input);
    // Checkpoint: the device buffer's rows in the shared store layout, left on the device
    // (cuda_checkpoint.cu); false when its grouping does not fit (then they move to the host store).
    bool save_device_store(StateWriter& w, const std::vector<int64_t>& counts);
    void hold_store_rows(int64_t growth);
    void upload_store(const KeptSet& kept, std::vector<int64_t>& offset, std::vector<int64_t>& nrows,
                      const std::function<void(const std::vector<int64_t>&)>& solve_group);
    // src is float32 unless `dtype` says otherwise (the row buffer: store_dtype_).
    void download_rows(const void* src, const std::vector<int32_t>& index, const std::function<void(const double*, int64_t, int64_t)>& sink,
                       collapse_dtype dtype = COLLAPSE_F32);
    // Into a host vector, counted in `lease` (grown to hold it) under `what`.
    std::vector<double> download_rows(const float* src, const std::vector<int32_t>& index, HostBudget::Lease& lease, const std::string& what);
    // Bytes the exact mode may bring back from the spilled host store at once: a sixth of what is free.
    int64_t load_budget() const;
    void upload_rows(const double* rows, const std::vector<int64_t>& slot, float* dst, DeviceBuffer<float>& buf, DeviceBuffer<int64_t>& idx);

    // Declared first, so destroyed last: release() makes the session's device current, the
    // members' buffers and handles are freed on it, and this puts the caller's device back after
    // them (freeing with another device current could create a context there).
    struct RestoreDevice {
        int device = -1;
        ~RestoreDevice() {
            if (device >= 0) (void)cudaSetDevice(device);
        }
    } restore_device_;
    Config cfg_;
    int64_t V_, d_;
    // Before every buffer below: it outlives them (they give their bytes back to its budget).
    Resources res_;
    Budget& budget_;             // res_.budget()
    HostBudget& host_;           // res_.host(): host_memory_limit
    const cudaStream_t stream_;  // res_.stream()
    cudaStream_t last_stream_ = nullptr;
    cudaEvent_t last_done_ = nullptr;

    DeviceBuffer<unsigned long long> count_;
    DeviceBuffer<double> sum_, sqdev_;  // sqdev_: sum ||x - s_c||^2 per class (core/shifted_sums.hpp)
    // Each class's reference row s_c (compute_class_metrics): var_c about it, and with a streamed Gram
    // Sigma_W's scatter of every accepted row less s_c (column-major upper, as gram_), as on the CPU.
    DeviceBuffer<float> shift_;
    bool within_streaming_ = false;
    bool within_valid_ = true;  // false after loading a checkpoint without within_scatter
    DeviceBuffer<double> within_;
    DeviceBuffer<uint8_t> excluded_;
    bool gram_streaming_ = false;
    DeviceBuffer<double> gram_;
    DeviceBuffer<float> gram32_;
    int64_t hold_rows_ = 0;
    DeviceBuffer<float> hold_;
    bool exact_store_ = false, sampled_ = false;
    // The exact mode's device row buffer: rows in store_dtype_ (row_buffer_dtype of the batches:
    // float16/bfloat16 as they came, else float32), its bytes sized at creation for 2-byte rows.
    DeviceBuffer<uint8_t> store_;
    collapse_dtype store_dtype_ = COLLAPSE_F32;
    bool store_dtype_set_ = false;  // by the first batch (set_store_dtype)
    DeviceBuffer<int32_t> store_labels_;
    DeviceBuffer<unsigned long long> store_count_;
    unsigned long long store_capacity_ = 0;  // rows of store_dtype_ the buffer holds
    // During compute: the device rows grouped by kept class (per-token SVD, Sigma_W), or null.
    DeviceClassRows* grouped_ = nullptr;
    unsigned long long store_bound_ = 0;  // rows the device buffer may hold now (host-side bound)
    // Exact mode: the rows that left the device buffer, in host memory and beyond it on disk.
    std::unique_ptr<RowStore> host_store_;
    HostBudget::Lease store_held_;  // host_store_'s rows in memory (its index it counts itself)
    PinnedBuffer<double> pinned_;  // rows on their way to the host
    PinnedBuffer<float> upload_stage_;  // rows on their way back at finalisation (grow-only)
    DeviceBuffer<int32_t> dl_index_;
    DeviceBuffer<double> dl_rows_;
    void ensure_download_buffers(const std::string& hint);
    DeviceBuffer<float> reservoir_;
    DeviceBuffer<long long> winner_;

    // Rows spread over ranks (cuda_ranks.cu). Gathering: states leave the row store out; Spread:
    // host_store_ holds every row of the kept classes this rank owns and nothing else.
    enum class SpreadPhase { None, Gathering, Spread };
    SpreadPhase spread_phase_ = SpreadPhase::None;
    std::unique_ptr<RowStore> spread_store_;  // being filled (spread_open .. spread_close)
    std::vector<uint8_t> spread_owned_;       // [V] while it is
    std::vector<int64_t> spread_counts_;      // [V] the combined n_c, on the host while it is
    HostBudget::Lease spread_lease_;          // its rows in memory, the flags and the counts
    // Reservoirs: the slots filled so far [V] (spread_open .. spread_close); this session's own
    // counts before the merge (its reservoirs' rows); the root's merged samples and this rank's
    // picks (core/reservoir_picks.hpp; merge_picks is load_state's part while gathering them).
    std::vector<int64_t> spread_filled_, spread_own_counts_;
    HostBudget::Lease spread_own_lease_;
    std::unique_ptr<ReservoirPicks> picks_;
    ReservoirPicks::RowsOf own_reservoir_rows() const;
    void merge_picks(const int64_t* theirs, const std::vector<int64_t>& before);
    // The root's sum of the ranks' parts: per kept slot, its per-token results (spread_merge).
    std::vector<int32_t> spread_ids_;
    std::vector<uint8_t> spread_seen_;
    std::vector<TokenMetrics> spread_tokens_;
    HostBudget::Lease spread_results_lease_;
    // NC4 summed over the parts (spread_merge): agreements and rows, and per kept slot (per_class_arrays).
    bool spread_nc4_ = false;
    int64_t spread_nc4_agree_ = 0, spread_nc4_rows_ = 0;
    std::vector<int64_t> spread_nc4_hits_, spread_nc4_class_rows_;
    // The ranks' pair-metric shares merged on the root (pair_merge), for this kept set and rows seen.
    std::unique_ptr<PairSpread> pair_spread_;
    // compute()'s per-token results from the ranks' parts (rows spread), in place of per_token's.
    void spread_tokens(const KeptSet& kept, MetricValues& out) const;
    // compute()'s NC4 from the ranks' parts; false when there are none.
    bool spread_nc4(const KeptSet& kept, MetricValues& out) const;
    // NC4 of the rows in the host store (this owner's classes) against every kept mean, by the
    // second pass's kernels: (agreements, rows), and per kept slot when per_class_arrays.
    void spread_part_nc4(const KeptSet& kept, const Classifier& clf, int64_t n[2], std::vector<int64_t>& hits, std::vector<int64_t>& rows);

    Scratch scratch_;
    std::array<Staging, 2> staging_;
    int staging_next_ = 0;
    int batch_staging_ = -1;  // the staging slot of the last batch (-1: a device batch)
    cudaStream_t copy_stream_ = nullptr;  // uploads of host batches
    // Marks the end (so far, on stream s) of the work reading the last batch's staging slot.
    void mark_staging_consumed(cudaStream_t s);

    DeviceBuffer<BatchStatus> status_;
    PinnedBuffer<BatchStatus> status_host_;
    // The batch behind each status slot, for counting and for naming its rows in errors.
    struct Slot {
        cudaEvent_t event = nullptr;
        bool pending = false, first_pass = false, sequences = false;
        int64_t rows = 0, offset = 0, seq_len = 0;
    };
    std::array<Slot, kStatusSlots> slots_{};
    int status_next_ = 0;
    Counts totals_;
    std::deque<std::pair<collapse_status, std::string>> errors_;  // device-side errors, oldest first

    // Second pass
    bool pass2_ = false, pass2_nc4_ = false, pass2_gram_ = false;
    KeptSet kept2_;
    HostBudget::Lease kept2_lease_;  // kept2_'s host memory
    bool bias2_ = false;             // the classifier has a bias (the second pass needs no host copy of it)
    DeviceBuffer<double> w2_, b2_, mu2_, mu2_sq_, gram2_, xd2_, logits2_, dots2_;
    DeviceBuffer<double> within2_;  // Sigma_W's scatter about the kept means (a cut kept set)
    DeviceBuffer<int32_t> ids2_, slot2_;
    DeviceBuffer<unsigned long long> agree_, pass2_rows_dev_;
    DeviceBuffer<unsigned long long> nc4_slot_hits_, nc4_slot_rows_;  // [K] each (per_class_arrays)
    int64_t nc4_chunk_ = 0;

    // Generation-time windows (cuda_windows.cu).
    void window_grow(int64_t capacity, cudaStream_t s);
    // Stash i's verdicts appended to the ready lists (its copy has completed).
    void take_verdicts(int i, std::vector<int64_t>& slots, std::vector<uint8_t>& kept);
    // Entropies of windows whose rows are src[slots[w W + i]] (host slots), or, slots null, rows
    // w W .. w W + W - 1 of src; computed now on the session's stream (synchronises it).
    std::vector<double> window_entropies(const float* src, const int64_t* slots, int64_t windows, int64_t W);
    // The queued windows' entropies onto win_out_; the queue is empty after.
    void window_flush();
    // One stashed batch whose verdicts are on their way: (batch row, slot) pairs and kept flags.
    struct WindowStash {
        cudaEvent_t done = nullptr;
        bool pending = false;
        int64_t rows = 0;
        PinnedBuffer<int64_t> pairs;
        PinnedBuffer<uint8_t> kept;
        DeviceBuffer<int64_t> pairs_dev;
        DeviceBuffer<uint8_t> kept_dev;
    };
    std::array<WindowStash, kStatusSlots> win_stash_;
    int win_next_ = 0;
    DeviceBuffer<float> win_store_;  // [win_slots_, d]
    int64_t win_slots_ = 0;
    // The last first-pass batch, for window_stash: its device view and status slot.
    bool win_batch_ = false;
    DeviceBatch win_db_;
    int win_status_ = 0;
    // Verdicts taken from a reused stash before the session asked for them.
    std::vector<int64_t> win_ready_slots_;
    std::vector<uint8_t> win_ready_kept_;
    HostBudget::Lease win_ready_lease_;
    // window_reduce's windows: their rows copied (stream-ordered with the stashes, no host sync)
    // into a queue of win_queue_cap_ windows, reduced when it is full or at window_results. The
    // slots travel through their own stretch of the pinned buffer, reused only after a flush.
    DeviceBuffer<float> win_queue_;         // [win_queue_cap_, W, d]
    DeviceBuffer<int64_t> win_queue_slots_;  // [win_queue_cap_ * W]
    PinnedBuffer<int64_t> win_queue_host_;   // [win_queue_cap_ * W]
    int64_t win_queue_cap_ = 0, win_queued_ = 0, win_W_ = 0;
    // Entropies of reduced windows, until window_results.
    std::vector<double> win_out_;
    HostBudget::Lease win_out_lease_;
};

}  // namespace cuda
}  // namespace collapse::internal
