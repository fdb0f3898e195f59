// The row store of the exact per-token SVD: every kept row, by class, in host memory up to a byte
// budget and beyond it in segment files on disk, partitioned by label, so that finalisation can
// bring the rows back a bounded group of classes at a time. The sampled mode's reservoirs live
// here too (without a spill budget: they are bounded by svd_max_rows_per_token).
//
// Disk layout: one directory per store, "<spill parent>/collapse-spill-<pid>-XXXXXX", holding
// P = min(V, 64) partition files "part-NNN.seg"; class c lives in partition c * P / V. A flush
// appends, to each partition file, the in-memory rows of its classes in class order, as extents of
// at most 4 MiB (offset, rows, CRC32C of the bytes, checked when read back). Rows come back in the
// order they were added (disk extents in flush order, then memory), so a class that is read whole
// gives bit-identical results whatever was spilled. The files are scratch: never synced, removed by
// the destructor; a checkpoint copies the rows into itself. Directories left by killed processes
// are removed by the next store that spills into the same parent (see remove_stale).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/host_budget.hpp"

namespace collapse::internal {

// std::allocator that leaves new elements uninitialised: appended rows are written right away, so
// zero-filling them first would be a wasted pass over memory.
template <class T>
struct UninitAllocator : std::allocator<T> {
    template <class U>
    struct rebind {
        using other = UninitAllocator<U>;
    };
    UninitAllocator() = default;
    template <class U>
    UninitAllocator(const UninitAllocator<U>&) {}
    template <class U>
    void construct(U* p) noexcept {
        ::new (static_cast<void*>(p)) U;
    }
    template <class U, class... A>
    void construct(U* p, A&&... a) {
        ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
    }
};
using RowVector = std::vector<double, UninitAllocator<double>>;

class RowStore {
public:
    // pwrite semantics (returns bytes written or -1 with errno); tests inject failures with it.
    using WriteFn = std::function<ssize_t(int fd, const void* data, size_t bytes, off_t offset)>;

    // memory_budget < 0: never spill (reservoirs, or a store that must stay in memory).
    // host_budget (optional): the store's own bookkeeping (its V-long index, extent lists, flush
    // and read-back buffers, marks) is counted there before it is allocated; the rows in memory are
    // the owner's to count (memory_bytes(), growth()).
    RowStore(int64_t num_classes, int64_t dim, int64_t memory_budget, std::string spill_parent, WriteFn write_fn = {},
             HostBudget* host_budget = nullptr);
    ~RowStore();
    RowStore(const RowStore&) = delete;
    RowStore& operator=(const RowStore&) = delete;

    int64_t rows(int32_t c) const { return disk_rows_[(size_t)c] + memory_rows(c); }
    int64_t total_rows() const { return total_rows_; }
    int64_t memory_bytes() const { return memory_bytes_; }  // allocated (capacity), not just used
    int64_t disk_bytes() const { return disk_bytes_; }
    int64_t memory_budget() const { return budget_; }
    // Bytes of the per-class index a store of V classes allocates when it is created.
    static int64_t index_bytes(int64_t num_classes);
    int64_t flushes() const { return flushes_; }
    const std::string& spill_dir() const { return dir_; }  // empty until the first flush

    // Bytes append(c, n) will allocate (vectors grow by doubling; this is exact).
    int64_t growth(int32_t c, int64_t n) const;
    // Bytes class c's rows occupy in memory now (capacity): while append() moves them into a
    // larger vector, both exist.
    int64_t capacity_bytes(int32_t c) const { return (int64_t)mem_[(size_t)c].capacity() * 8; }
    // Makes room within the budget for rows about to be appended; `growth` returns the bytes they
    // will allocate (a sum of growth()), and is asked again after each step: first every in-memory
    // row goes to disk (the vectors keep their capacity), then, if that is not enough, the
    // vectors' memory goes too. Throws Error(COLLAPSE_ERR_IO) naming the directory and the system
    // error if the disk refuses; the store is then unchanged. A batch larger than the whole budget
    // still goes to memory, alone.
    void make_room(const std::function<int64_t()>& growth);
    // Room for n more rows of class c, in memory, for the caller to fill. Never throws but bad_alloc.
    double* append(int32_t c, int64_t n);
    // The in-memory rows of class c (reservoirs rewrite slots in place; only for a store that never spills).
    double* memory_data(int32_t c) { return mem_[(size_t)c].data(); }
    int64_t memory_rows(int32_t c) const { return (int64_t)(mem_[(size_t)c].size() / (size_t)d_); }
    // Replaces every row of class c (reservoir merge; only for a store that never spills).
    void assign(int32_t c, RowVector rows);
    void flush();
    // Every in-memory row to disk, and the vectors' memory given back (finalisation short of room).
    void spill_memory();
    void clear();  // every row, in memory and on disk

    // Rows of the classes `ids`, in ascending class order. fn(c, rows, n, first, last) gets each
    // class whole (first = 0, last = true) when it fits in `load_budget` bytes, else in pieces of at
    // most that size, in order. Classes without rows get one call with n = 0. Throws
    // Error(COLLAPSE_ERR_IO) on a read error or a checksum mismatch, naming the file and class.
    // group_end (optional) is called after each group of classes read back together: the rows
    // handed to fn stay valid until then, so a caller may keep the pointers and work on the whole
    // group at once (the per-token SVDs go to threads that way).
    using ClassFn = std::function<void(int32_t c, const double* rows, int64_t n, int64_t first, bool last)>;
    void for_each_class(std::vector<int32_t> ids, int64_t load_budget, const ClassFn& fn,
                        const std::function<void()>& group_end = {}) const;

    // A point to roll back to (loading a checkpoint): rows added after mark() are dropped by
    // rollback(). mark(growth) first makes room for the incoming rows, so that no later flush mixes
    // rows from both sides of the mark.
    struct Mark {
        HostBudget::Lease lease;  // of the two V-long vectors below
        std::vector<int64_t> memory_rows, extents;
        std::vector<int64_t> file_bytes;
        int64_t flushes = 0, memory_rows_total = 0;
    };
    Mark mark(const std::function<int64_t()>& growth);
    void rollback(const Mark& m);

private:
    struct Extent {
        int64_t offset, rows;
        uint32_t crc;
    };
    int partition(int32_t c) const { return (int)((int64_t)c * (int64_t)parts_ / V_); }
    void open_spill();
    void read_bytes(int p, int64_t offset, size_t bytes, void* dst, int32_t c) const;
    void read_extent(int p, const Extent& e, int32_t c, double* dst) const;
    void check_extent(int p, const Extent& e, int32_t c, const double* data) const;
    void check_crc(int p, const Extent& e, int32_t c, uint32_t crc) const;
    void release();

    int64_t V_, d_, budget_;
    std::string parent_, dir_;
    bool created_parent_ = false;
    int lock_fd_ = -1;  // an flock on dir_ while the store lives
    WriteFn write_;
    int parts_;
    HostBudget* host_;
    HostBudget::Lease index_lease_;    // index_bytes(), before the vectors below exist
    HostBudget::Lease extents_lease_;  // capacity of the extent lists, grown by flush()
    HostBudget::Lease stage_lease_;    // flush's write buffer
    std::vector<int> fd_;              // [parts], -1 until the first flush
    std::vector<int64_t> file_bytes_;  // [parts]
    std::vector<RowVector> mem_;
    std::vector<char> stage_;  // flush's write buffer, kept between flushes
    std::vector<std::vector<Extent>> extents_;  // [V]
    std::vector<int64_t> disk_rows_;            // [V]
    int64_t total_rows_ = 0, memory_bytes_ = 0, memory_rows_ = 0, disk_bytes_ = 0, flushes_ = 0;
};

}  // namespace collapse::internal
