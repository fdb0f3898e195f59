#include "core/row_store.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>

#include "core/config.hpp"
#include "base/error.hpp"
#include "base/bytes.hpp"
#include "base/atomic_file.hpp"
#include "base/crc32c.hpp"

namespace collapse::internal {

namespace {

constexpr int kMaxPartitions = 64;
constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux

std::string part_name(const std::string& dir, int p) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "/part-%03d.seg", p);
    return dir + buf;
}

// Thousands of freed class vectors stay in the heap, resident, unless malloc is asked to return
// them: without this the process would hold the memory the budget says was given back.
void give_back_freed_memory() {
#ifdef __GLIBC__
    ::malloc_trim(0);
#endif
}

}  // namespace

int64_t RowStore::index_bytes(int64_t num_classes) {
    const int64_t per_class = (int64_t)(sizeof(RowVector) + sizeof(std::vector<Extent>) + sizeof(int64_t));
    return add_bytes(mul_bytes(num_classes, per_class), kMaxPartitions * (int64_t)(sizeof(int) + sizeof(int64_t)));
}

RowStore::RowStore(int64_t num_classes, int64_t dim, int64_t memory_budget, std::string spill_parent, WriteFn write_fn,
                   HostBudget* host_budget)
    : V_(num_classes),
      d_(dim),
      budget_(memory_budget),
      parent_(std::move(spill_parent)),
      write_(write_fn ? std::move(write_fn) : WriteFn(::pwrite)),
      parts_((int)std::min<int64_t>(std::max<int64_t>(num_classes, 1), kMaxPartitions)),
      host_(host_budget),
      index_lease_(host_ ? host_->reserve(index_bytes(num_classes), "the row store's index of V = " + std::to_string(num_classes) +
                                                                         " classes (" + std::to_string(index_bytes(num_classes) / std::max<int64_t>(num_classes, 1)) +
                                                                         " bytes a class)",
                                          kFixNumClasses)
                         : HostBudget::Lease()),
      extents_lease_(host_ ? host_->lease() : HostBudget::Lease()),
      stage_lease_(host_ ? host_->lease() : HostBudget::Lease()),
      fd_((size_t)parts_, -1),
      file_bytes_((size_t)parts_, 0),
      mem_((size_t)num_classes),
      extents_((size_t)num_classes),
      disk_rows_((size_t)num_classes, 0) {}

RowStore::~RowStore() {
    for (int fd : fd_)
        if (fd >= 0) ::close(fd);
    if (!dir_.empty()) {
        std::error_code ec;
        std::filesystem::remove_all(dir_, ec);  // scratch: nothing to report from a destructor
        if (created_parent_) ::rmdir(parent_.c_str());  // only if empty
    }
    if (lock_fd_ >= 0) ::close(lock_fd_);
}

// Capacity doubles (at least) when a class outgrows it: growth() is what append() will allocate.
int64_t RowStore::growth(int32_t c, int64_t n) const {
    const auto& v = mem_[(size_t)c];
    const int64_t need = (int64_t)v.size() + n * d_, cap = (int64_t)v.capacity();
    return need <= cap ? 0 : (std::max(need, 2 * cap) - cap) * 8;
}

double* RowStore::append(int32_t c, int64_t n) {
    auto& v = mem_[(size_t)c];
    memory_bytes_ += growth(c, n);
    memory_rows_ += n;
    const size_t old = v.size(), need = old + (size_t)(n * d_);
    if (need > v.capacity()) v.reserve(std::max(need, 2 * v.capacity()));
    v.resize(need);
    total_rows_ += n;
    return v.data() + old;
}

void RowStore::assign(int32_t c, RowVector rows) {
    auto& v = mem_[(size_t)c];
    total_rows_ += (int64_t)(rows.size() / (size_t)d_) - memory_rows(c);
    memory_rows_ += (int64_t)(rows.size() / (size_t)d_) - memory_rows(c);
    memory_bytes_ += ((int64_t)rows.capacity() - (int64_t)v.capacity()) * 8;
    v = std::move(rows);
}

void RowStore::make_room(const std::function<int64_t()>& growth) {
    if (budget_ < 0 || memory_bytes_ + growth() <= budget_) return;
    flush();  // keeps the vectors' capacity, which the next rows reuse
    if (memory_bytes_ + growth() <= budget_) return;
    release();
}

// The vectors' memory itself (a flush keeps it): when the classes that come differ from the ones
// that were held.
void RowStore::spill_memory() {
    flush();
    release();
}

void RowStore::release() {
    for (auto& v : mem_)
        if (v.empty()) RowVector().swap(v);
    std::vector<char>().swap(stage_);
    stage_lease_.reset();
    memory_bytes_ = 0;
    for (const auto& v : mem_) memory_bytes_ += (int64_t)v.capacity() * 8;
    give_back_freed_memory();
}

void RowStore::open_spill() {
    if (!dir_.empty()) return;
    std::error_code ec;
    if (!created_parent_) created_parent_ = !std::filesystem::exists(parent_, ec);
    std::filesystem::create_directories(parent_, ec);
    // Directories left by processes killed before their destructor ran (base/atomic_file.hpp: the
    // exact name for this host, a pid that no longer runs here, no lock held).
    const std::string prefix = "collapse-spill-" + host_name() + "-";
    remove_stale_temporaries(parent_, prefix);
    std::string tmpl = parent_ + "/" + prefix + std::to_string(::getpid()) + "-XXXXXX";
    if (ec || !::mkdtemp(tmpl.data()))
        fail(COLLAPSE_ERR_IO, "cannot create a spill directory for the exact row store under intermediate_save_dir = '", parent_,
             "': ", ec ? ec.message() : std::strerror(errno),
             " (the rows do not fit in host_memory_limit; give a writable intermediate_save_dir, raise host_memory_limit, or use svd_mode: sampled)");
    dir_ = tmpl;
    // Held until the store goes: tells remove_stale() of other processes that this one is alive.
    lock_fd_ = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (lock_fd_ >= 0) (void)::flock(lock_fd_, LOCK_EX | LOCK_NB);
}

// Every in-memory row goes to disk, partition by partition, through a staging buffer so that
// small classes leave in large writes. Nothing is recorded until every write has succeeded; on a
// failure the files are cut back to their old length and the rows stay in memory. The vectors keep
// their capacity for the next rows.
void RowStore::flush() {
    if (memory_rows_ == 0) return;
    open_spill();
    std::vector<std::pair<int32_t, Extent>> added;
    const std::vector<int64_t> old_bytes = file_bytes_;
    const size_t stage_cap = (size_t)std::clamp<int64_t>(budget_ / 8, 64 * 1024, 4 << 20);
    std::vector<char>& stage = stage_;
    // The extent lists grow (to list_capacity, reserved once the writes have succeeded) and `added`
    // holds the new extents until then: both, and the write buffer, are counted before anything is
    // written; a failed flush gives the lists' share back. The lists grow by exactly what a flush
    // adds (not by doubling): every flush adds about one extent per class, and doubled lists of
    // many classes would take more memory than the rows the budget leaves in memory.
    const size_t extent_rows = std::max<size_t>(1, stage_cap / ((size_t)d_ * 8));
    auto list_capacity = [&](int32_t c) {
        const auto& ex = extents_[(size_t)c];
        const size_t need = ex.size() + (mem_[(size_t)c].size() / (size_t)d_ + extent_rows - 1) / extent_rows;
        return std::max(need, ex.capacity());
    };
    int64_t new_extents = 0, list_growth = 0;
    for (int32_t c = 0; c < V_; ++c) {
        if (mem_[(size_t)c].empty()) continue;
        new_extents += (int64_t)((mem_[(size_t)c].size() / (size_t)d_ + extent_rows - 1) / extent_rows);
        list_growth += (int64_t)((list_capacity(c) - extents_[(size_t)c].capacity()) * sizeof(Extent));
    }
    const std::string what = "spilling the exact row store (" + std::to_string(new_extents) + " extents to index)";
    const HostBudget::Lease added_lease =
        host_ ? host_->reserve(mul_bytes(new_extents, (int64_t)(sizeof(std::pair<int32_t, Extent>) + sizeof(size_t))), what) : HostBudget::Lease();
    const int64_t lists_before = extents_lease_.bytes();
    extents_lease_.resize(add_bytes(lists_before, list_growth), what);
    // The write buffer gathers small classes into large writes; without room for it every extent
    // is written from where it lies.
    const bool staging = stage_lease_.bytes() >= (int64_t)stage_cap || !host_ || host_->fits((int64_t)stage_cap - stage_lease_.bytes());
    if (staging) stage_lease_.resize((int64_t)stage_cap, what);
    std::vector<size_t> capacity;  // the lists' new capacities (new_extents bounds their count)
    for (int32_t c = 0; c < V_; ++c)
        if (!mem_[(size_t)c].empty()) capacity.push_back(list_capacity(c));
    added.reserve((size_t)new_extents);
    int p = 0;
    int32_t stage_class = -1;  // for messages: the last class in the staging buffer
    auto write_out = [&](const char* src, size_t bytes) {
        for (size_t done = 0; done < bytes;) {
            const ssize_t w = write_(fd_[(size_t)p], src + done, bytes - done, (off_t)(file_bytes_[(size_t)p] + (int64_t)done));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0)
                fail(COLLAPSE_ERR_IO, "spilling the exact row store to ", part_name(dir_, p), " failed: ", std::strerror(w < 0 ? errno : ENOSPC),
                     " (", format_bytes((int64_t)bytes), " up to class ", stage_class, "; nothing was lost: the rows are still in memory)");
            done += (size_t)w;
        }
        file_bytes_[(size_t)p] += (int64_t)bytes;
    };
    auto drain = [&] {
        if (!stage.empty()) write_out(stage.data(), stage.size());
        stage.clear();
    };
    try {
        for (int32_t c = 0; c < V_; ++c) {
            const auto& v = mem_[(size_t)c];
            if (v.empty()) continue;
            if (partition(c) != p) {
                drain();
                p = partition(c);
            }
            if (fd_[(size_t)p] < 0) {
                const std::string name = part_name(dir_, p);
                fd_[(size_t)p] = ::open(name.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                if (fd_[(size_t)p] < 0) fail(COLLAPSE_ERR_IO, "cannot create spill file ", name, ": ", std::strerror(errno));
            }
            // Extents of at most stage_cap bytes: finalisation reads and checks an extent at once.
            const size_t row_bytes = (size_t)d_ * 8;
            stage_class = c;
            for (size_t r0 = 0; r0 < v.size() / (size_t)d_; r0 += extent_rows) {
                const size_t rows = std::min(extent_rows, v.size() / (size_t)d_ - r0), bytes = rows * row_bytes;
                const char* src = reinterpret_cast<const char*>(v.data() + r0 * (size_t)d_);
                if (stage.size() + bytes > stage_cap) drain();
                const int64_t at = file_bytes_[(size_t)p] + (int64_t)stage.size();
                uint32_t crc;
                if (bytes >= stage_cap || !staging) {
                    crc = crc32c(src, bytes);
                    write_out(src, bytes);
                } else {
                    if (stage.capacity() < stage_cap) stage.reserve(stage_cap);
                    stage.insert(stage.end(), src, src + bytes);
                    crc = crc32c(stage.data() + stage.size() - bytes, bytes);  // from the copy, still in cache
                }
                added.push_back({c, Extent{at, (int64_t)rows, crc}});
            }
        }
        drain();
    } catch (...) {
        for (int q = 0; q < parts_; ++q)
            if (fd_[(size_t)q] >= 0 && file_bytes_[(size_t)q] != old_bytes[(size_t)q]) (void)!::ftruncate(fd_[(size_t)q], old_bytes[(size_t)q]);
        file_bytes_ = old_bytes;
        stage_.clear();  // its bytes belong to the failed flush: the next one must not write them
        extents_lease_.update(lists_before);
        throw;
    }
    size_t k = 0;
    for (int32_t c = 0; c < V_; ++c)
        if (!mem_[(size_t)c].empty()) extents_[(size_t)c].reserve(capacity[k++]);
    for (const auto& a : added) {
        extents_[(size_t)a.first].push_back(a.second);
        disk_rows_[(size_t)a.first] += a.second.rows;
        disk_bytes_ += a.second.rows * d_ * 8;
        mem_[(size_t)a.first].clear();
    }
    memory_rows_ = 0;
    ++flushes_;
}

void RowStore::clear() {
    for (auto& v : mem_) RowVector().swap(v);
    std::vector<char>().swap(stage_);
    stage_lease_.reset();
    for (auto& e : extents_) std::vector<Extent>().swap(e);
    extents_lease_.reset();
    std::fill(disk_rows_.begin(), disk_rows_.end(), 0);
    for (int p = 0; p < parts_; ++p)
        if (fd_[(size_t)p] >= 0) (void)!::ftruncate(fd_[(size_t)p], 0);
    std::fill(file_bytes_.begin(), file_bytes_.end(), 0);
    total_rows_ = memory_bytes_ = memory_rows_ = disk_bytes_ = 0;
}

void RowStore::read_bytes(int p, int64_t offset, size_t bytes, void* dst, int32_t c) const {
    char* out = static_cast<char*>(dst);
    for (size_t done = 0; done < bytes;) {
        const ssize_t r = ::pread(fd_[(size_t)p], out + done, bytes - done, (off_t)(offset + (int64_t)done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            fail(COLLAPSE_ERR_IO, "reading spill file ", part_name(dir_, p), " (class ", c, ", offset ", offset + (int64_t)done, ") failed: ",
                 r < 0 ? std::strerror(errno) : "the file is shorter than its manifest says");
        done += (size_t)r;
    }
}

void RowStore::read_extent(int p, const Extent& e, int32_t c, double* dst) const {
    read_bytes(p, e.offset, (size_t)(e.rows * d_) * 8, dst, c);
    check_extent(p, e, c, dst);
}

void RowStore::check_extent(int p, const Extent& e, int32_t c, const double* data) const {
    check_crc(p, e, c, crc32c(data, (size_t)(e.rows * d_) * 8));
}

void RowStore::check_crc(int p, const Extent& e, int32_t c, uint32_t crc) const {
    if (crc != e.crc)
        fail(COLLAPSE_ERR_IO, "spill file ", part_name(dir_, p), " is corrupt: class ", c, " at offset ", e.offset,
             " has checksum ", crc, ", written as ", e.crc);
}

void RowStore::for_each_class(std::vector<int32_t> ids, int64_t load_budget, const ClassFn& fn,
                              const std::function<void()>& group_end) const {
    std::sort(ids.begin(), ids.end());
    const int64_t row_bytes = d_ * 8;
    const int64_t budget = std::max(load_budget, row_bytes);
    // One buffer for every group, allocated once and never zero-filled: every byte is read into.
    // Only classes with spilled rows pass through it (with their rows still in memory): nothing
    // spilled, nothing to hold.
    const int64_t buf_bytes = disk_bytes_ == 0 ? row_bytes : std::max(std::min(budget, disk_bytes_ + memory_rows_ * row_bytes), row_bytes);
    const HostBudget::Lease buf_lease =
        host_ ? host_->reserve(buf_bytes, "reading the spilled row store back (" + format_bytes(budget) + " at a time)") : HostBudget::Lease();
    const std::unique_ptr<double[]> buf(new double[(size_t)(buf_bytes / 8)]);
    size_t i = 0;
    while (i < ids.size()) {
        // A group: consecutive classes whose spilled rows fit the budget together (classes held
        // only in memory cost nothing to visit).
        size_t j = i;
        int64_t group = 0, group_extents = 0;
        while (j < ids.size()) {
            const int32_t c = ids[j];
            const int64_t need = disk_rows_[(size_t)c] > 0 ? rows(c) * row_bytes : 0;
            if (j > i && group + need > budget) break;
            group += need;
            group_extents += (int64_t)extents_[(size_t)c].size();
            ++j;
            if (need > budget) break;  // a class larger than the budget goes alone, in pieces
        }
        if (group > budget) {  // one class, in pieces of at most `budget` bytes
            const int32_t c = ids[i];
            const int64_t piece = budget / row_bytes, n = rows(c);
            int64_t first = 0, filled = 0;
            auto emit = [&](bool last) {
                fn(c, buf.get(), filled, first, last);
                first += filled;
                filled = 0;
            };
            const int p = partition(c);
            for (const Extent& e : extents_[(size_t)c]) {
                // An extent is checksummed whole: read it whole when it fits, else stream it.
                if (e.rows <= piece) {
                    if (filled + e.rows > piece) emit(false);
                    read_extent(p, e, c, buf.get() + filled * d_);
                    filled += e.rows;
                } else {
                    // Larger than a piece (flush caps extents, but a small load budget can still be
                    // below that): streamed through the buffer, its checksum checked at its end.
                    uint32_t crc = 0;
                    for (int64_t r = 0; r < e.rows;) {
                        if (filled == piece) emit(false);
                        const int64_t k = std::min(piece - filled, e.rows - r);
                        read_bytes(p, e.offset + r * row_bytes, (size_t)(k * row_bytes), buf.get() + filled * d_, c);
                        crc = crc32c(buf.get() + filled * d_, (size_t)(k * row_bytes), crc);
                        filled += k, r += k;
                    }
                    check_crc(p, e, c, crc);
                }
            }
            const double* m = mem_[(size_t)c].data();
            for (int64_t r = 0, mr = memory_rows(c); r < mr;) {
                if (filled == piece) emit(false);
                const int64_t k = std::min(piece - filled, mr - r);
                std::memcpy(buf.get() + filled * d_, m + r * d_, (size_t)(k * row_bytes));
                filled += k, r += k;
            }
            if (first + filled != n) fail(COLLAPSE_ERR_INTERNAL, "row store: class ", c, " gave ", first + filled, " rows of ", n);
            emit(true);
            if (group_end) group_end();
            i = j;
            continue;
        }
        // Read the group's extents in file order, each to its class's place in the buffer.
        struct Read {
            int p;
            const Extent* e;
            int32_t c;
            int64_t dst;
        };
        const HostBudget::Lease index_lease =
            host_ ? host_->reserve(add_bytes(mul_bytes(group_extents, (int64_t)sizeof(Read)), (int64_t)((j - i) * sizeof(int64_t) + kMaxIov * sizeof(struct iovec))),
                                   "reading the spilled row store back (the read list of " + std::to_string(group_extents) + " extents)")
                  : HostBudget::Lease();
        std::vector<Read> reads;
        reads.reserve((size_t)group_extents);
        std::vector<int64_t> place(j - i, -1);
        int64_t at = 0;
        for (size_t k = i; k < j; ++k) {
            const int32_t c = ids[k];
            if (disk_rows_[(size_t)c] == 0) continue;
            place[k - i] = at;
            int64_t r = at;
            for (const Extent& e : extents_[(size_t)c]) reads.push_back({partition(c), &e, c, r}), r += e.rows * d_;
            if (!mem_[(size_t)c].empty())  // an empty vector's data() may be null: not a memcpy source
                std::memcpy(buf.get() + r, mem_[(size_t)c].data(), mem_[(size_t)c].size() * 8);
            at += rows(c) * d_;
        }
        std::sort(reads.begin(), reads.end(),
                  [](const Read& a, const Read& b) { return a.p != b.p ? a.p < b.p : a.e->offset < b.e->offset; });
        // Extents next to each other in a file (consecutive classes of one flush) come in one
        // scattering preadv; each is then checked against its own checksum.
        std::vector<struct iovec> iov;
        for (size_t a = 0; a < reads.size();) {
            size_t b = a + 1;
            int64_t end = reads[a].e->offset + reads[a].e->rows * row_bytes;
            while (b < reads.size() && b - a < kMaxIov && reads[b].p == reads[a].p && reads[b].e->offset == end)
                end += reads[b].e->rows * row_bytes, ++b;
            iov.clear();
            for (size_t k = a; k < b; ++k) iov.push_back({buf.get() + reads[k].dst, (size_t)(reads[k].e->rows * row_bytes)});
            const ssize_t got = ::preadv(fd_[(size_t)reads[a].p], iov.data(), (int)iov.size(), (off_t)reads[a].e->offset);
            for (size_t k = a; k < b; ++k) {
                if (got != end - reads[a].e->offset) read_extent(reads[k].p, *reads[k].e, reads[k].c, buf.get() + reads[k].dst);  // short: one by one
                else check_extent(reads[k].p, *reads[k].e, reads[k].c, buf.get() + reads[k].dst);
            }
            a = b;
        }
        for (size_t k = i; k < j; ++k) {
            const int32_t c = ids[k];
            const double* x = place[k - i] >= 0 ? buf.get() + place[k - i] : mem_[(size_t)c].data();
            fn(c, rows(c) > 0 ? x : nullptr, rows(c), 0, true);
        }
        if (group_end) group_end();
        i = j;
    }
}

RowStore::Mark RowStore::mark(const std::function<int64_t()>& growth) {
    make_room(growth);
    Mark m;
    if (host_) m.lease = host_->reserve(mul_bytes(V_, 16), "a roll-back point of the row store (two V-long vectors)", kFixNumClasses);
    m.memory_rows.resize((size_t)V_);
    m.extents.resize((size_t)V_);
    for (int64_t c = 0; c < V_; ++c) {
        m.memory_rows[(size_t)c] = memory_rows((int32_t)c);
        m.extents[(size_t)c] = (int64_t)extents_[(size_t)c].size();
    }
    m.file_bytes = file_bytes_;
    m.flushes = flushes_;
    m.memory_rows_total = memory_rows_;
    return m;
}

void RowStore::rollback(const Mark& m) {
    // mark() emptied memory whenever a later flush was possible, so a flush after the mark moved
    // only new rows: drop their extents, cut the files back, drop new memory rows.
    if (m.flushes != flushes_ && m.memory_rows_total != 0)
        fail(COLLAPSE_ERR_INTERNAL, "row store: a flush after mark() took rows from before it");
    for (int64_t c = 0; c < V_; ++c) {
        auto& ex = extents_[(size_t)c];
        while ((int64_t)ex.size() > m.extents[(size_t)c]) {
            disk_rows_[(size_t)c] -= ex.back().rows;
            disk_bytes_ -= ex.back().rows * d_ * 8;
            total_rows_ -= ex.back().rows;
            ex.pop_back();
        }
        auto& v = mem_[(size_t)c];
        const int64_t keep = m.flushes == flushes_ ? m.memory_rows[(size_t)c] : 0;
        total_rows_ -= memory_rows((int32_t)c) - keep;
        memory_rows_ -= memory_rows((int32_t)c) - keep;
        const size_t old_cap = v.capacity();
        v.resize((size_t)(keep * d_));
        if (keep == 0) RowVector().swap(v);
        memory_bytes_ += ((int64_t)v.capacity() - (int64_t)old_cap) * 8;
    }
    for (int p = 0; p < parts_; ++p)
        if (fd_[(size_t)p] >= 0 && file_bytes_[(size_t)p] != m.file_bytes[(size_t)p]) {
            (void)!::ftruncate(fd_[(size_t)p], m.file_bytes[(size_t)p]);
            file_bytes_[(size_t)p] = m.file_bytes[(size_t)p];
        }
}

}  // namespace collapse::internal
