// Checkpoint container: CRC32C, the streaming atomic writer and the validating mapped reader.
// The format is described at the top of checkpoint_file.hpp.
#include "io/checkpoint_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <unordered_set>

#include "base/atomic_file.hpp"
#include "base/crc32c.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "base/text.hpp"
#include "io/tensor_file.hpp"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "checkpoint_file assumes a little-endian host");

namespace collapse::internal::io {

namespace {

constexpr char kMagic[8] = {'C', 'L', 'P', 'S', 'C', 'K', 'P', 'T'};

// Header field offsets (see the header file's layout block).
constexpr size_t kHVersion = 8, kHFlags = 12, kHCount = 16, kHEntryBytes = 20, kHDataOffset = 24,
                 kHFileBytes = 32, kHTableCrc = 40, kHReserved = 44, kHReservedBytes = 16, kHCrc = 60;
// Table entry field offsets.
constexpr size_t kEName = 0, kEDtype = 32, kENdim = 36, kEShape = 40, kEOffset = 72, kEBytes = 80, kECrc = 88,
                 kEReserved = 92;

static_assert(kHCrc + 4 == kCheckpointHeaderBytes, "header layout");
static_assert(kEReserved + 4 == kCheckpointEntryBytes, "entry layout");

// ------------------------------------------------------------------------------------------------
// Little helpers

uint32_t rd32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}
uint64_t rd64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}
void wr32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void wr64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

uint64_t align_up(uint64_t v) { return (v + kCheckpointAlign - 1) / kCheckpointAlign * kCheckpointAlign; }

std::string hex32(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08X", v);
    return buf;
}

bool all_zero(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (p[i] != 0) return false;
    return true;
}

// product(shape) * dtype_size, or false on a bad dtype, a negative dim or overflow.
bool payload_size(uint32_t dtype_code, const int64_t* shape, size_t ndim, uint64_t* out) {
    if (!dtype_is_valid((int)dtype_code) || dtype_code > (uint32_t)COLLAPSE_BOOL) return false;
    uint64_t n = dtype_size((collapse_dtype)dtype_code);
    for (size_t i = 0; i < ndim; ++i) {
        if (shape[i] < 0) return false;
        const uint64_t d = (uint64_t)shape[i];
        if (d != 0 && n > UINT64_MAX / d) return false;
        n *= d;
    }
    *out = n;
    return true;
}

// A name as it can be printed: bytes outside printable ASCII as \xNN.
std::string printable(const std::string& s) {
    std::string out;
    for (unsigned char c : s) {
        if (c >= 0x20 && c < 0x7f) {
            out += (char)c;
        } else {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02X", c);
            out += buf;
        }
    }
    return out;
}

// Paths with a live writer in this process: two writers of one checkpoint at once are a mistake
// (whichever commits last would silently win).
std::mutex g_inflight_mutex;
std::set<std::string> g_inflight;

const uint8_t kZeros[4096] = {};

}  // namespace

// ================================================================================================
// CheckpointWriter

struct CheckpointWriter::Impl {
    struct Entry {
        std::string name;
        uint32_t dtype_code = 0;
        std::vector<int64_t> shape;
        uint64_t offset = 0, bytes = 0, written = 0;
        uint32_t crc = 0;
    };

    std::string path;
    std::unique_ptr<AtomicFile> file;  // the temp file (or <path> itself when it is not a regular file)
    Options opt;
    bool registered = false;
    bool failed = false;
    bool committed = false;
    bool in_section = false;
    uint64_t data_offset = 0;
    uint64_t end = 0;  // end of the last payload written so far
    std::vector<Entry> entries;
    Entry pending;

    ~Impl() {
        file.reset();  // removes an uncommitted temp file
        unregister();
    }

    // The path is free for another writer once this one has committed or failed.
    void unregister() {
        if (!registered) return;
        std::lock_guard<std::mutex> lock(g_inflight_mutex);
        g_inflight.erase(path);
        registered = false;
    }

    // A file-system error: the temp file is gone and the writer refuses everything after.
    [[noreturn]] void io_fail(const char* what, int err) {
        failed = true;
        const std::string tmp = file ? file->temp_path() : std::string();
        if (file) file->abandon();
        unregister();
        fail(COLLAPSE_ERR_IO, what, " checkpoint ", path, tmp.empty() ? "" : " (temp file " + tmp + ")", ": ", std::strerror(err));
    }

    void check_usable(const char* action) const {
        if (failed)
            fail(COLLAPSE_ERR_IO, "cannot ", action, " checkpoint ", path,
                 ": the writer stopped after an earlier error; nothing was written under that name");
        if (committed)
            fail(COLLAPSE_ERR_STATE, "cannot ", action, " checkpoint ", path, ": it is already committed");
    }

    void write_at(const void* data, size_t bytes, uint64_t offset) {
        const uint8_t* p = static_cast<const uint8_t*>(data);
        while (bytes > 0) {
            const size_t chunk = std::min(bytes, size_t(1) << 30);
            const ssize_t n = opt.write_fn(file->fd(), p, chunk, (off_t)offset);
            if (n < 0) {
                if (errno == EINTR) continue;
                io_fail("cannot write", errno);
            }
            if (n == 0) io_fail("cannot write", EIO);
            p += n;
            bytes -= (size_t)n;
            offset += (uint64_t)n;
        }
    }

    void write_zeros(uint64_t from, uint64_t to) {
        while (from < to) {
            const size_t n = (size_t)std::min<uint64_t>(to - from, sizeof kZeros);
            write_at(kZeros, n, from);
            from += n;
        }
    }
};

CheckpointWriter::CheckpointWriter(const std::string& path) : CheckpointWriter(path, Options()) {}

CheckpointWriter::CheckpointWriter(const std::string& path, Options options) : impl_(new Impl) {
    Impl& m = *impl_;
    m.path = path;
    m.opt = std::move(options);
    if (!m.opt.write_fn)
        m.opt.write_fn = [](int fd, const void* d, size_t n, off_t off) { return ::pwrite(fd, d, n, off); };
    if (path.empty()) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint path is empty");
    if (m.opt.max_sections > (size_t(1) << 24))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", path, ": max_sections ", m.opt.max_sections,
             " is more than the limit of ", size_t(1) << 24);
    m.data_offset = align_up(kCheckpointHeaderBytes + kCheckpointEntryBytes * (uint64_t)m.opt.max_sections);
    m.end = m.data_offset;
    {
        std::lock_guard<std::mutex> lock(g_inflight_mutex);
        if (!g_inflight.insert(path).second)
            fail(COLLAPSE_ERR_STATE, "cannot write checkpoint ", path,
                 ": another CheckpointWriter in this process is writing it");
        m.registered = true;
    }
    try {
        m.file = std::make_unique<AtomicFile>(path, "checkpoint");
    } catch (...) {
        m.failed = true;
        throw;
    }
    // Straight through a path that is not a regular file: the header goes in last, at offset 0.
    if (m.file->direct() && ::lseek(m.file->fd(), 0, SEEK_CUR) < 0 && errno == ESPIPE) {
        m.failed = true;
        fail(COLLAPSE_ERR_IO, "cannot write checkpoint ", path,
             ": it is a pipe or socket, and a checkpoint is written out of order (give a regular file)");
    }
}

CheckpointWriter::~CheckpointWriter() = default;

const std::string& CheckpointWriter::path() const { return impl_->path; }
const std::string& CheckpointWriter::temp_path() const {
    static const std::string none;
    return impl_->file ? impl_->file->temp_path() : none;
}

void CheckpointWriter::begin_section(const std::string& name, uint32_t dtype_code, const std::vector<int64_t>& shape,
                                     size_t bytes) {
    Impl& m = *impl_;
    m.check_usable("add a section to");
    const std::string& p = m.path;
    if (m.in_section)
        fail(COLLAPSE_ERR_STATE, "checkpoint ", p, ": cannot begin section ", printable(name), " before section ",
             printable(m.pending.name), " has ended");
    if (name.empty() || name.size() > kCheckpointMaxName || name.find('\0') != std::string::npos)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", p, ": section name \"", printable(name),
             "\" must be 1 to 32 bytes without NUL");
    for (const Impl::Entry& e : m.entries)
        if (e.name == name) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", p, ": duplicate section ", printable(name));
    if (m.entries.size() >= m.opt.max_sections)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", p, ": section ", printable(name), " would be section number ",
             m.entries.size() + 1, ", more than Options::max_sections = ", m.opt.max_sections);
    if (shape.size() > kCheckpointMaxDims)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", p, ": section ", printable(name), " has ", shape.size(),
             " dims, at most 4 are allowed");
    uint64_t expected = 0;
    if (!payload_size(dtype_code, shape.data(), shape.size(), &expected))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", p, ": section ", printable(name), ": element type code ", dtype_code,
             " with shape ", shape_text(shape), " is not a valid collapse_dtype and shape");
    if (expected != (uint64_t)bytes)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", p, ": section ", printable(name), " declares ", bytes,
             " bytes but shape ", shape_text(shape), " of ", dtype_name((collapse_dtype)dtype_code), " needs ",
             expected);

    Impl::Entry e;
    e.name = name;
    e.dtype_code = dtype_code;
    e.shape = shape;
    e.offset = align_up(m.end);
    e.bytes = bytes;
    m.write_zeros(m.end, e.offset);
    m.end = e.offset;
    m.pending = std::move(e);
    m.in_section = true;
}

void CheckpointWriter::append(const void* data, size_t bytes) {
    Impl& m = *impl_;
    m.check_usable("append to");
    if (!m.in_section)
        fail(COLLAPSE_ERR_STATE, "checkpoint ", m.path, ": append() outside a section (call begin_section first)");
    Impl::Entry& e = m.pending;
    if (bytes > e.bytes - e.written)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", m.path, ": section ", printable(e.name), ": ", e.written, " + ",
             bytes, " bytes exceeds the declared ", e.bytes);
    if (bytes == 0) return;
    if (data == nullptr) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", m.path, ": section ", printable(e.name), ": null data");
    // In pieces: each is checksummed and then written while it is still in cache, and one huge
    // write measured 3x slower than 8 MiB ones (1 GiB of class sums: 2-3 s against 0.9 s).
    constexpr size_t kPiece = size_t(8) << 20;
    const uint8_t* src = static_cast<const uint8_t*>(data);
    for (size_t at = 0; at < bytes; at += kPiece) {
        const size_t n = std::min(kPiece, bytes - at);
        e.crc = crc32c(src + at, n, e.crc);
        m.write_at(src + at, n, e.offset + e.written);
        e.written += n;
    }
    m.end = e.offset + e.written;
}

void CheckpointWriter::end_section() {
    Impl& m = *impl_;
    m.check_usable("end a section of");
    if (!m.in_section) fail(COLLAPSE_ERR_STATE, "checkpoint ", m.path, ": end_section() without begin_section()");
    Impl::Entry& e = m.pending;
    if (e.written != e.bytes)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", m.path, ": section ", printable(e.name), ": ", e.written,
             " bytes appended, ", e.bytes, " declared");
    m.entries.push_back(std::move(e));
    m.pending = Impl::Entry();
    m.in_section = false;
}

void CheckpointWriter::add(const std::string& name, uint32_t dtype_code, const std::vector<int64_t>& shape,
                           const void* data, size_t bytes) {
    if (bytes > 0 && data == nullptr)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "checkpoint ", impl_->path, ": section ", printable(name), ": null data");
    begin_section(name, dtype_code, shape, bytes);
    append(data, bytes);
    end_section();
}

void CheckpointWriter::commit() {
    Impl& m = *impl_;
    if (m.committed) return;
    m.check_usable("commit");
    if (m.in_section)
        fail(COLLAPSE_ERR_STATE, "cannot commit checkpoint ", m.path, ": section ", printable(m.pending.name),
             " has not ended");

    // The table, then the header: both describe payloads already in the file.
    std::vector<uint8_t> table(m.entries.size() * kCheckpointEntryBytes, 0);
    for (size_t i = 0; i < m.entries.size(); ++i) {
        const Impl::Entry& e = m.entries[i];
        uint8_t* t = table.data() + i * kCheckpointEntryBytes;
        std::memcpy(t + kEName, e.name.data(), e.name.size());
        wr32(t + kEDtype, e.dtype_code);
        wr32(t + kENdim, (uint32_t)e.shape.size());
        for (size_t d = 0; d < e.shape.size(); ++d) wr64(t + kEShape + 8 * d, (uint64_t)e.shape[d]);
        wr64(t + kEOffset, e.offset);
        wr64(t + kEBytes, e.bytes);
        wr32(t + kECrc, e.crc);
    }
    uint8_t header[kCheckpointHeaderBytes] = {};
    std::memcpy(header, kMagic, 8);
    wr32(header + kHVersion, kCheckpointVersion);
    wr32(header + kHFlags, 0);
    wr32(header + kHCount, (uint32_t)m.entries.size());
    wr32(header + kHEntryBytes, (uint32_t)kCheckpointEntryBytes);
    wr64(header + kHDataOffset, m.data_offset);
    wr64(header + kHFileBytes, m.end);
    wr32(header + kHTableCrc, crc32c(table.data(), table.size()));
    wr32(header + kHCrc, crc32c(header, kHCrc));

    m.write_at(table.data(), table.size(), kCheckpointHeaderBytes);
    m.write_zeros(kCheckpointHeaderBytes + table.size(), m.data_offset);
    m.write_at(header, sizeof header, 0);

    try {
        m.file->commit();  // fsync, rename over the path, fsync the directory
    } catch (...) {
        m.failed = true;
        m.unregister();
        throw;
    }
    m.committed = true;
    m.unregister();
}

// ================================================================================================
// CheckpointReader

CheckpointReader::CheckpointReader(const std::string& path) : CheckpointReader(path, Options()) {}

CheckpointReader::~CheckpointReader() = default;

CheckpointReader::CheckpointReader(const std::string& path, Options options) : path_(path) {
    file_ = std::make_shared<MappedFile>(path);  // throws COLLAPSE_ERR_IO naming the path
    const uint8_t* p = file_->data();
    const uint64_t size = file_->size();
    const std::string pre = "cannot read checkpoint " + path + ": ";

    // Magic, then the header's own checksum, then its version: a flipped version byte is
    // "corrupt header", a real newer file (valid checksum) is "newer collapse".
    if (size == 0) fail(COLLAPSE_ERR_IO, pre, "truncated at header (the file is empty)");
    if (std::memcmp(p, kMagic, (size_t)std::min<uint64_t>(size, 8)) != 0)
        fail(COLLAPSE_ERR_IO, pre, "not a collapse checkpoint (wrong magic)");
    if (size < kCheckpointHeaderBytes)
        fail(COLLAPSE_ERR_IO, pre, "truncated at header (the file has ", size, " bytes, the header needs ",
             kCheckpointHeaderBytes, ")");
    {
        const uint32_t expected = rd32(p + kHCrc), found = crc32c(p, kHCrc);
        if (expected != found)
            fail(COLLAPSE_ERR_IO, pre, "corrupt header (checksum mismatch: expected ", hex32(expected), ", found ",
                 hex32(found), ")");
    }
    version_ = rd32(p + kHVersion);
    if (version_ > kCheckpointVersion)
        fail(COLLAPSE_ERR_IO, pre, "written by a newer collapse (format v", version_, ", this build reads v",
             kCheckpointVersion, ")");
    if (version_ == 0)
        fail(COLLAPSE_ERR_IO, pre, "unsupported format version 0 (this build reads v", kCheckpointVersion, ")");
    const uint32_t flags = rd32(p + kHFlags);
    if (flags != 0)
        fail(COLLAPSE_ERR_IO, pre, "unsupported flags ", hex32(flags), " (format v1 defines none)");
    const uint64_t count = rd32(p + kHCount);
    const uint32_t entry_bytes = rd32(p + kHEntryBytes);
    const uint64_t data_offset = rd64(p + kHDataOffset);
    const uint64_t file_bytes = rd64(p + kHFileBytes);
    const uint64_t table_end = kCheckpointHeaderBytes + count * kCheckpointEntryBytes;
    if (entry_bytes != kCheckpointEntryBytes)
        fail(COLLAPSE_ERR_IO, pre, "corrupt header (table entry size ", entry_bytes, ", format v1 has ",
             kCheckpointEntryBytes, ")");
    if (!all_zero(p + kHReserved, kHReservedBytes))
        fail(COLLAPSE_ERR_IO, pre, "corrupt header (reserved bytes are not zero)");
    if (data_offset % kCheckpointAlign != 0 || data_offset < table_end || file_bytes < data_offset)
        fail(COLLAPSE_ERR_IO, pre, "corrupt header (", count, " sections, data offset ", data_offset,
             ", file size ", file_bytes, " are inconsistent)");

    // The table.
    if (size < data_offset)
        fail(COLLAPSE_ERR_IO, pre, "truncated at section table (the file has ", size, " bytes, the table ends at ",
             data_offset, ")");
    {
        const uint32_t expected = rd32(p + kHTableCrc);
        const uint32_t found = crc32c(p + kCheckpointHeaderBytes, (size_t)(table_end - kCheckpointHeaderBytes));
        if (expected != found)
            fail(COLLAPSE_ERR_IO, pre, "corrupt section table (checksum mismatch: expected ", hex32(expected),
                 ", found ", hex32(found), ")");
        if (!all_zero(p + table_end, (size_t)(data_offset - table_end)))
            fail(COLLAPSE_ERR_IO, pre, "corrupt section table (the reserved slots after entry ", count,
                 " are not zero)");
    }
    std::unordered_set<std::string> seen;
    uint64_t end = data_offset;
    for (uint64_t i = 0; i < count; ++i) {
        const uint8_t* t = p + kCheckpointHeaderBytes + i * kCheckpointEntryBytes;
        const char* name_bytes = reinterpret_cast<const char*>(t + kEName);
        const size_t name_len = strnlen(name_bytes, kCheckpointMaxName);
        Entry e;
        e.view.name.assign(name_bytes, name_len);
        const std::string where = "corrupt section table (entry " + std::to_string(i) + ", section \"" +
                                  printable(e.view.name) + "\": ";
        if (name_len == 0) fail(COLLAPSE_ERR_IO, pre, where, "empty name)");
        if (!all_zero(t + kEName + name_len, kCheckpointMaxName - name_len))
            fail(COLLAPSE_ERR_IO, pre, where, "bytes after the name's NUL are not zero)");
        if (!seen.insert(e.view.name).second) fail(COLLAPSE_ERR_IO, pre, where, "duplicate name)");
        e.view.dtype_code = rd32(t + kEDtype);
        const uint32_t ndim = rd32(t + kENdim);
        if (ndim > kCheckpointMaxDims) fail(COLLAPSE_ERR_IO, pre, where, ndim, " dims, at most 4)");
        int64_t shape[kCheckpointMaxDims];
        for (size_t d = 0; d < kCheckpointMaxDims; ++d) shape[d] = (int64_t)rd64(t + kEShape + 8 * d);
        for (size_t d = ndim; d < kCheckpointMaxDims; ++d)
            if (shape[d] != 0) fail(COLLAPSE_ERR_IO, pre, where, "unused dim ", d, " is not zero)");
        e.view.shape.assign(shape, shape + ndim);
        e.offset = rd64(t + kEOffset);
        e.view.bytes = 0;
        const uint64_t bytes = rd64(t + kEBytes);
        e.crc = rd32(t + kECrc);
        uint64_t expected_bytes = 0;
        if (!payload_size(e.view.dtype_code, shape, ndim, &expected_bytes))
            fail(COLLAPSE_ERR_IO, pre, where, "element type code ", e.view.dtype_code, " with shape ",
                 shape_text(e.view.shape), " is invalid)");
        if (bytes != expected_bytes)
            fail(COLLAPSE_ERR_IO, pre, where, bytes, " bytes, but the shape needs ", expected_bytes, ")");
        if (rd32(t + kEReserved) != 0) fail(COLLAPSE_ERR_IO, pre, where, "reserved bytes are not zero)");
        if (e.offset != align_up(end))
            fail(COLLAPSE_ERR_IO, pre, where, "offset ", e.offset, ", the layout puts it at ", align_up(end), ")");
        if (bytes > file_bytes - std::min(file_bytes, e.offset))
            fail(COLLAPSE_ERR_IO, pre, where, "bytes [", e.offset, ", +", bytes, ") run past the file size ",
                 file_bytes, " in the header)");
        e.view.bytes = (size_t)bytes;
        end = e.offset + bytes;
        entries_.push_back(std::move(e));
    }
    if (end != file_bytes)
        fail(COLLAPSE_ERR_IO, pre, "corrupt header (file size ", file_bytes, ", but the sections end at ", end, ")");

    // The payloads: present in full, nothing after them, zero padding between them.
    if (size < file_bytes) {
        for (const Entry& e : entries_)
            if (e.offset + e.view.bytes > size)
                fail(COLLAPSE_ERR_IO, pre, "truncated at section ", printable(e.view.name), " (the file has ", size,
                     " bytes, the section ends at ", e.offset + e.view.bytes, ")");
    }
    if (size > file_bytes)
        fail(COLLAPSE_ERR_IO, pre, "trailing bytes (the file has ", size, " bytes, its header says ", file_bytes,
             ")");
    for (size_t i = 0; i + 1 < entries_.size(); ++i) {
        const uint64_t pad_from = entries_[i].offset + entries_[i].view.bytes;
        if (!all_zero(p + pad_from, (size_t)(entries_[i + 1].offset - pad_from)))
            fail(COLLAPSE_ERR_IO, pre, "corrupt padding after section ", printable(entries_[i].view.name),
                 " (non-zero bytes before offset ", entries_[i + 1].offset, ")");
    }
    for (Entry& e : entries_) e.view.data = e.view.bytes ? p + e.offset : nullptr;

    verified_.reset(new std::atomic<bool>[entries_.size()]);
    for (size_t i = 0; i < entries_.size(); ++i) verified_[i].store(false);
    if (options.verify_all) verify_all_sections();
}

void CheckpointReader::verify(size_t index) const {
    if (verified_[index].load(std::memory_order_acquire)) return;
    const Entry& e = entries_[index];
    // In pieces, each dropped from the resident set once checked: a section may be larger than
    // the memory the session is allowed.
    constexpr size_t kPiece = size_t(8) << 20;
    uint32_t found = 0;
    for (size_t at = 0; at < e.view.bytes; at += kPiece) {
        const size_t n = std::min(kPiece, e.view.bytes - at);
        found = crc32c(static_cast<const uint8_t*>(e.view.data) + at, n, found);
        release(e.view, at, n);
    }
    if (found != e.crc)
        fail(COLLAPSE_ERR_IO, "cannot read checkpoint ", path_, ": corrupt section ", printable(e.view.name),
             " (checksum mismatch: expected ", hex32(e.crc), ", found ", hex32(found), ")");
    verified_[index].store(true, std::memory_order_release);
}

void CheckpointReader::release(const CheckpointSection& s, size_t offset, size_t bytes) const {
    if (!s.data) return;
    file_->release((size_t)(static_cast<const uint8_t*>(s.data) - file_->data()) + offset, bytes);
}

void CheckpointReader::verify_all_sections() const {
    for (size_t i = 0; i < entries_.size(); ++i) verify(i);
}

std::vector<std::string> CheckpointReader::names() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const Entry& e : entries_) out.push_back(e.view.name);
    return out;
}

bool CheckpointReader::has(const std::string& name) const {
    for (const Entry& e : entries_)
        if (e.view.name == name) return true;
    return false;
}

const CheckpointReader::Entry& CheckpointReader::find(const std::string& name) const {
    for (const Entry& e : entries_)
        if (e.view.name == name) return e;
    std::string list;
    for (const Entry& e : entries_) list += (list.empty() ? "" : ", ") + printable(e.view.name);
    fail(COLLAPSE_ERR_IO, "cannot read checkpoint ", path_, ": missing section ", printable(name), " (it has ",
         list.empty() ? std::string("no sections") : list, ")");
}

CheckpointSection CheckpointReader::section(const std::string& name) const {
    const Entry& e = find(name);
    verify((size_t)(&e - entries_.data()));
    return e.view;
}

}  // namespace collapse::internal::io
