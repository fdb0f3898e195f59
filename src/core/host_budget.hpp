// The one account of a session's host memory against host_memory_limit. Every allocation that grows
// with V, K (kept classes), d or rows is counted here BEFORE it is made; a refusal is
// COLLAPSE_ERR_OUT_OF_MEMORY naming the bytes, what they are for, what is already held, the limit and
// the key to change. The session creates one from its Config and shares it with its backend (and
// the backend with its row store), so that all of them add up to one number.
//
// Not thread-safe, like the session: reservations are made on the calling thread (a parallel region
// reserves for all its threads before it starts).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace collapse::internal {

struct Config;

// a * b (* c), saturating at INT64_MAX: byte counts of absurd shapes must be refused, not wrap.
int64_t mul_bytes(int64_t a, int64_t b, int64_t c = 1);
int64_t add_bytes(int64_t a, int64_t b);

class HostBudget {
public:
    explicit HostBudget(int64_t limit) : limit_(limit) {}
    static std::shared_ptr<HostBudget> from_config(const Config& cfg);

    int64_t limit() const { return limit_; }
    int64_t held() const { return held_; }
    int64_t available() const { return held_ < limit_ ? limit_ - held_ : 0; }
    bool fits(int64_t bytes) const { return bytes <= available(); }

    // Bytes counted against the budget until the lease is destroyed or reset. Move-only.
    class Lease {
    public:
        Lease() = default;
        ~Lease() { reset(); }
        Lease(Lease&& o) noexcept : budget_(o.budget_), bytes_(o.bytes_) { o.budget_ = nullptr, o.bytes_ = 0; }
        Lease& operator=(Lease&& o) noexcept;
        Lease(const Lease&) = delete;
        Lease& operator=(const Lease&) = delete;

        int64_t bytes() const { return bytes_; }
        // Grows or shrinks the lease to `bytes`. Growing is checked like reserve(); a refused
        // resize leaves the lease as it was. A lease of no budget (default-constructed) counts nothing.
        void resize(int64_t bytes, const std::string& what, const std::string& fix = {});
        // Records what is held now, after the fact and unchecked: for memory whose growth was
        // checked (resize) before it was allocated, and for memory given back.
        void update(int64_t bytes);
        void reset() { update(0); }

    private:
        friend class HostBudget;
        Lease(HostBudget* b, int64_t bytes) : budget_(b), bytes_(bytes) {}
        HostBudget* budget_ = nullptr;
        int64_t bytes_ = 0;
    };

    // Counts `bytes` for `what` against the limit, or throws COLLAPSE_ERR_OUT_OF_MEMORY:
    //   "<what> would need <bytes>; with <held> already held that is <total>, more than
    //    host_memory_limit = <limit>; <fix>"
    // `fix` names the key to change; empty means "raise host_memory_limit".
    [[nodiscard]] Lease reserve(int64_t bytes, const std::string& what, const std::string& fix = {});
    // Throws like reserve() when `bytes` more would not fit; holds nothing.
    void check(int64_t bytes, const std::string& what, const std::string& fix = {}) const;
    // An empty lease on this budget, to resize() later.
    Lease lease() { return Lease(this, 0); }

private:
    [[noreturn]] void refuse(int64_t bytes, const std::string& what, const std::string& fix) const;
    int64_t limit_;
    int64_t held_ = 0;
};

// The keys to change, for the refusals of the places that grow with them.
inline const std::string kFixNumClasses =
    "V is the classifier's row count, else num_classes (--num-classes), else the largest label + 1: set num_classes to the "
    "real vocabulary size if a stray label made V this large, or raise host_memory_limit";
inline const std::string kFixKeptClasses = "max_tokens_to_analyze bounds the kept classes K; or raise host_memory_limit";
inline const std::string kFixTokenSvd =
    "svd_mode: sampled bounds the rows per token (svd_max_rows_per_token), svd_mode: off skips the per-token SVD; or raise "
    "host_memory_limit";
inline const std::string kFixBatchRows = "lower batch_rows (--batch-rows); or raise host_memory_limit";

// What the JSON report costs per kept class (its token_analysis entry: about seven keys as a
// nlohmann::json object, ~800 bytes, and as text, ~200), and the report's fixed part: an estimate.
constexpr int64_t kReportBytesPerToken = 1024;
constexpr int64_t kReportFixedBytes = int64_t(16) << 10;
inline int64_t report_bytes_estimate(int64_t kept_classes) {
    return add_bytes(kReportFixedBytes, mul_bytes(kept_classes, kReportBytesPerToken));
}

}  // namespace collapse::internal
