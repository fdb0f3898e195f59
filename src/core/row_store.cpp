#include "core/row_store.hpp"

#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "core/config.hpp"
#include "core/error.hpp"
#include "io/checkpoint_file.hpp"

namespace collapse {

namespace {

constexpr int kMaxPartitions = 64;

std::string part_name(const std::string& dir, int p) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "/part-%03d.seg", p);
    return dir + buf;
}

// Spill directories of this host's processes that no longer run (killed before their destructor
// ran) are removed: a crashed run would otherwise leave its rows behind for good.
void remove_stale(const std::string& parent, const std::string& prefix) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(parent, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
        if (pid > 0 && ::kill((pid_t)pid, 0) != 0 && errno == ESRCH) std::filesystem::remove_all(entry.path(), ec);
    }
}

// Thousands of freed class vectors stay in the heap, resident, unless malloc is asked to return
// them: without this the process would hold the memory the budget says was given back.
void give_back_freed_memory() {
#ifdef __GLIBC__
    ::malloc_trim(0);
#endif
}

}  // namespace

RowStore::RowStore(int64_t num_classes, int64_t dim, int64_t memory_budget, std::string spill_parent, WriteFn write_fn)
    : V_(num_classes),
      d_(dim),
      budget_(memory_budget),
      parent_(std::move(spill_parent)),
      write_(write_fn ? std::move(write_fn) : WriteFn(::pwrite)),
      parts_((int)std::min<int64_t>(std::max<int64_t>(num_classes, 1), kMaxPartitions)),
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
    const size_t old = v.size(), need = old + (size_t)(n * d_);
    if (need > v.capacity()) v.reserve(std::max(need, 2 * v.capacity()));
    v.resize(need);
    total_rows_ += n;
    return v.data() + old;
}

void RowStore::assign(int32_t c, std::vector<double> rows) {
    auto& v = mem_[(size_t)c];
    total_rows_ += (int64_t)(rows.size() / (size_t)d_) - memory_rows(c);
    memory_bytes_ += ((int64_t)rows.capacity() - (int64_t)v.capacity()) * 8;
    v = std::move(rows);
}

void RowStore::make_room(int64_t growth_bytes) {
    if (budget_ < 0 || memory_bytes_ == 0 || memory_bytes_ + growth_bytes <= budget_) return;
    flush();
}

void RowStore::open_spill() {
    if (!dir_.empty()) return;
    std::error_code ec;
    created_parent_ = !std::filesystem::exists(parent_, ec);
    std::filesystem::create_directories(parent_, ec);
    char host[256] = "host";
    (void)::gethostname(host, sizeof host - 1);
    const std::string prefix = std::string("collapse-spill-") + host + "-";
    remove_stale(parent_, prefix);
    std::string tmpl = parent_ + "/" + prefix + std::to_string(::getpid()) + "-XXXXXX";
    if (ec || !::mkdtemp(tmpl.data()))
        fail(COLLAPSE_ERR_IO, "cannot create a spill directory for the exact row store under intermediate_save_dir = '", parent_,
             "': ", ec ? ec.message() : std::strerror(errno),
             " (the rows do not fit in host_memory_limit; give a writable intermediate_save_dir, raise host_memory_limit, or use svd_mode: sampled)");
    dir_ = tmpl;
}

// Every in-memory row goes to disk, partition by partition. Nothing is recorded until every write
// has succeeded; on a failure the files are cut back to their old length and the rows stay in memory.
void RowStore::flush() {
    if (memory_bytes_ == 0) return;
    open_spill();
    std::vector<std::pair<int32_t, Extent>> added;
    const std::vector<int64_t> old_bytes = file_bytes_;
    int32_t c = 0;
    try {
        for (int p = 0; p < parts_; ++p) {
            for (; c < V_ && partition(c) == p; ++c) {
                const auto& v = mem_[(size_t)c];
                if (v.empty()) continue;
                if (fd_[(size_t)p] < 0) {
                    const std::string name = part_name(dir_, p);
                    fd_[(size_t)p] = ::open(name.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                    if (fd_[(size_t)p] < 0) fail(COLLAPSE_ERR_IO, "cannot create spill file ", name, ": ", std::strerror(errno));
                }
                const size_t bytes = v.size() * 8;
                const char* src = reinterpret_cast<const char*>(v.data());
                for (size_t done = 0; done < bytes;) {
                    const ssize_t w = write_(fd_[(size_t)p], src + done, bytes - done, (off_t)(file_bytes_[(size_t)p] + (int64_t)done));
                    if (w < 0 && errno == EINTR) continue;
                    if (w <= 0)
                        fail(COLLAPSE_ERR_IO, "spilling the exact row store to ", part_name(dir_, p), " failed: ",
                             std::strerror(w < 0 ? errno : ENOSPC), " (", format_bytes((int64_t)bytes), " of class ", c,
                             "; nothing was lost: the rows are still in memory)");
                    done += (size_t)w;
                }
                added.push_back({c, Extent{file_bytes_[(size_t)p], (int64_t)(v.size() / (size_t)d_), io::crc32c(src, bytes)}});
                file_bytes_[(size_t)p] += (int64_t)bytes;
            }
        }
    } catch (...) {
        for (int p = 0; p < parts_; ++p)
            if (fd_[(size_t)p] >= 0 && file_bytes_[(size_t)p] != old_bytes[(size_t)p]) (void)!::ftruncate(fd_[(size_t)p], old_bytes[(size_t)p]);
        file_bytes_ = old_bytes;
        throw;
    }
    for (const auto& a : added) {
        extents_[(size_t)a.first].push_back(a.second);
        disk_rows_[(size_t)a.first] += a.second.rows;
        disk_bytes_ += a.second.rows * d_ * 8;
        std::vector<double>().swap(mem_[(size_t)a.first]);  // give the memory back
    }
    memory_bytes_ = 0;
    ++flushes_;
    give_back_freed_memory();
}

void RowStore::clear() {
    for (auto& v : mem_) std::vector<double>().swap(v);
    for (auto& e : extents_) e.clear();
    std::fill(disk_rows_.begin(), disk_rows_.end(), 0);
    for (int p = 0; p < parts_; ++p)
        if (fd_[(size_t)p] >= 0) (void)!::ftruncate(fd_[(size_t)p], 0);
    std::fill(file_bytes_.begin(), file_bytes_.end(), 0);
    total_rows_ = memory_bytes_ = disk_bytes_ = 0;
}

void RowStore::read_extent(int p, const Extent& e, int32_t c, double* dst) const {
    const size_t bytes = (size_t)(e.rows * d_) * 8;
    char* out = reinterpret_cast<char*>(dst);
    for (size_t done = 0; done < bytes;) {
        const ssize_t r = ::pread(fd_[(size_t)p], out + done, bytes - done, (off_t)(e.offset + (int64_t)done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            fail(COLLAPSE_ERR_IO, "reading spill file ", part_name(dir_, p), " (class ", c, ", offset ", e.offset, ") failed: ",
                 r < 0 ? std::strerror(errno) : "the file is shorter than its manifest says");
        done += (size_t)r;
    }
    const uint32_t crc = io::crc32c(out, bytes);
    if (crc != e.crc)
        fail(COLLAPSE_ERR_IO, "spill file ", part_name(dir_, p), " is corrupt: class ", c, " at offset ", e.offset,
             " has checksum ", crc, ", written as ", e.crc);
}

void RowStore::for_each_class(std::vector<int32_t> ids, int64_t load_budget, const ClassFn& fn) const {
    std::sort(ids.begin(), ids.end());
    const int64_t row_bytes = d_ * 8;
    const int64_t budget = std::max(load_budget, row_bytes);
    std::vector<double> buf;
    buf.reserve((size_t)(std::min(budget, disk_bytes_) / 8));  // once: growing it would hold two copies
    size_t i = 0;
    while (i < ids.size()) {
        // A group: consecutive classes whose spilled rows fit the budget together (classes held
        // only in memory cost nothing to visit).
        size_t j = i;
        int64_t group = 0;
        while (j < ids.size()) {
            const int32_t c = ids[j];
            const int64_t need = disk_rows_[(size_t)c] > 0 ? rows(c) * row_bytes : 0;
            if (j > i && group + need > budget) break;
            group += need;
            ++j;
            if (need > budget) break;  // a class larger than the budget goes alone, in pieces
        }
        if (group > budget) {  // one class, in pieces of at most `budget` bytes
            const int32_t c = ids[i];
            const int64_t piece = budget / row_bytes, n = rows(c);
            buf.resize((size_t)(piece * d_));
            int64_t first = 0, filled = 0;
            auto emit = [&](bool last) {
                fn(c, buf.data(), filled, first, last);
                first += filled;
                filled = 0;
            };
            const int p = partition(c);
            for (const Extent& e : extents_[(size_t)c]) {
                // An extent is checksummed whole: read it whole when it fits, else stream it.
                if (e.rows <= piece) {
                    if (filled + e.rows > piece) emit(false);
                    read_extent(p, e, c, buf.data() + filled * d_);
                    filled += e.rows;
                } else {
                    std::vector<double> whole((size_t)(e.rows * d_));
                    read_extent(p, e, c, whole.data());
                    for (int64_t r = 0; r < e.rows;) {
                        if (filled == piece) emit(false);
                        const int64_t k = std::min(piece - filled, e.rows - r);
                        std::memcpy(buf.data() + filled * d_, whole.data() + r * d_, (size_t)(k * row_bytes));
                        filled += k, r += k;
                    }
                }
            }
            const double* m = mem_[(size_t)c].data();
            for (int64_t r = 0, mr = memory_rows(c); r < mr;) {
                if (filled == piece) emit(false);
                const int64_t k = std::min(piece - filled, mr - r);
                std::memcpy(buf.data() + filled * d_, m + r * d_, (size_t)(k * row_bytes));
                filled += k, r += k;
            }
            if (first + filled != n) fail(COLLAPSE_ERR_INTERNAL, "row store: class ", c, " gave ", first + filled, " rows of ", n);
            emit(true);
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
        std::vector<Read> reads;
        std::vector<int64_t> place(j - i, -1);
        buf.resize((size_t)(group / 8));
        int64_t at = 0;
        for (size_t k = i; k < j; ++k) {
            const int32_t c = ids[k];
            if (disk_rows_[(size_t)c] == 0) continue;
            place[k - i] = at;
            int64_t r = at;
            for (const Extent& e : extents_[(size_t)c]) reads.push_back({partition(c), &e, c, r}), r += e.rows * d_;
            std::memcpy(buf.data() + r, mem_[(size_t)c].data(), mem_[(size_t)c].size() * 8);
            at += rows(c) * d_;
        }
        std::sort(reads.begin(), reads.end(),
                  [](const Read& a, const Read& b) { return a.p != b.p ? a.p < b.p : a.e->offset < b.e->offset; });
        for (const Read& r : reads) read_extent(r.p, *r.e, r.c, buf.data() + r.dst);
        for (size_t k = i; k < j; ++k) {
            const int32_t c = ids[k];
            const double* x = place[k - i] >= 0 ? buf.data() + place[k - i] : mem_[(size_t)c].data();
            fn(c, rows(c) > 0 ? x : nullptr, rows(c), 0, true);
        }
        i = j;
    }
    std::vector<double>().swap(buf);
    give_back_freed_memory();
}

RowStore::Mark RowStore::mark(int64_t growth_bytes) {
    make_room(growth_bytes);
    Mark m;
    m.memory_rows.resize((size_t)V_);
    m.extents.resize((size_t)V_);
    for (int64_t c = 0; c < V_; ++c) {
        m.memory_rows[(size_t)c] = memory_rows((int32_t)c);
        m.extents[(size_t)c] = (int64_t)extents_[(size_t)c].size();
    }
    m.file_bytes = file_bytes_;
    m.flushes = flushes_;
    m.memory_bytes = memory_bytes_;
    return m;
}

void RowStore::rollback(const Mark& m) {
    // mark() emptied memory whenever a later flush was possible, so a flush after the mark moved
    // only new rows: drop their extents, cut the files back, drop new memory rows.
    if (m.flushes != flushes_ && m.memory_bytes != 0)
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
        const size_t old_cap = v.capacity();
        v.resize((size_t)(keep * d_));
        if (keep == 0) std::vector<double>().swap(v);
        memory_bytes_ += ((int64_t)v.capacity() - (int64_t)old_cap) * 8;
    }
    for (int p = 0; p < parts_; ++p)
        if (fd_[(size_t)p] >= 0 && file_bytes_[(size_t)p] != m.file_bytes[(size_t)p]) {
            (void)!::ftruncate(fd_[(size_t)p], m.file_bytes[(size_t)p]);
            file_bytes_[(size_t)p] = m.file_bytes[(size_t)p];
        }
}

}  // namespace collapse
