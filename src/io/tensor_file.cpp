// .npy and .safetensors: mapped readers and streaming, atomically renamed writers.
#include "io/tensor_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_set>

#include "base/atomic_file.hpp"
#include "base/dtype.hpp"
#include "base/error.hpp"
#include "base/text.hpp"

// Both formats are little-endian; the readers hand out the mapped bytes as they are.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tensor_file assumes a little-endian host");

namespace collapse::internal::io {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

uint64_t read_le(const uint8_t* p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

// Product of dims times itemsize, or false on a negative dim or overflow of size_t / int64_t.
// Zero dims are left out of the overflow check, so no partial product (a row of a [0, 2^62, 2^62]
// tensor, say) can overflow later either.
bool shape_bytes(const std::vector<int64_t>& shape, size_t itemsize, size_t* out) {
    uint64_t nonzero = 1;
    bool empty = false;
    for (int64_t d : shape) {
        if (d < 0) return false;
        if (d == 0) empty = true;
        else if (__builtin_mul_overflow(nonzero, (uint64_t)d, &nonzero)) return false;
    }
    if (nonzero > (uint64_t)INT64_MAX || __builtin_mul_overflow(nonzero, (uint64_t)itemsize, &nonzero) ||
        nonzero > (uint64_t)INT64_MAX)
        return false;
    *out = empty ? 0 : (size_t)nonzero;
    return true;
}

// ---------------------------------------------------------------------------------------------
// .npy header: a Python dict literal such as {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }

struct NpyHeader {
    std::string descr;
    bool fortran_order = false;
    std::vector<int64_t> shape;
};

class NpyHeaderParser {
public:
    NpyHeaderParser(const std::string& path, const char* p, size_t n) : path_(path), s_(p), n_(n) {}

    NpyHeader parse() {
        NpyHeader h;
        bool have_descr = false, have_fortran = false, have_shape = false;
        expect('{');
        while (true) {
            skip_space();
            if (peek() == '}') break;
            const size_t key_at = i_;
            const std::string key = parse_string();
            expect(':');
            skip_space();
            // A key twice would be read by numpy as its last value: refused, not guessed.
            const auto once = [&](bool& have) {
                if (have) bad("key '", key, "' appears twice in the header dict (offset ", key_at, ")");
                have = true;
            };
            if (key == "descr") {
                once(have_descr);
                if (peek() == '[') bad("structured dtypes (a list descr) are not supported");
                h.descr = parse_string();
            } else if (key == "fortran_order") {
                once(have_fortran);
                h.fortran_order = parse_bool();
            } else if (key == "shape") {
                once(have_shape);
                h.shape = parse_tuple();
            } else {
                bad("unexpected key '", printable(key), "' in the header dict");
            }
            skip_space();
            if (peek() == ',') {
                ++i_;
                continue;
            }
            if (peek() != '}') bad("expected ',' or '}' at header offset ", i_);
        }
        ++i_;
        if (!have_descr || !have_fortran || !have_shape)
            bad("header dict must have the keys 'descr', 'fortran_order' and 'shape'");
        // numpy pads the dict with spaces and a newline; anything else after it is not a header.
        skip_space();
        if (i_ < n_)
            bad("unexpected '", printable(std::string(s_ + i_, s_ + n_), 16), "' after the header dict at header offset ", i_);
        return h;
    }

private:
    template <class... A>
    [[noreturn]] void bad(const A&... parts) const {
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path_, ": bad header: ", parts...);
    }
    char peek() const { return i_ < n_ ? s_[i_] : '\0'; }
    void skip_space() {
        while (i_ < n_ && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
    }
    void expect(char c) {
        skip_space();
        if (peek() != c) bad("expected '", c, "' at header offset ", i_);
        ++i_;
    }
    std::string parse_string() {
        skip_space();
        const char q = peek();
        if (q != '\'' && q != '"') bad("expected a quoted string at header offset ", i_);
        const size_t start = ++i_;
        while (i_ < n_ && s_[i_] != q) ++i_;
        if (i_ >= n_) bad("unterminated string");
        return std::string(s_ + start, s_ + i_++);
    }
    bool parse_bool() {
        if (n_ - i_ >= 4 && std::memcmp(s_ + i_, "True", 4) == 0) {
            i_ += 4;
            return true;
        }
        if (n_ - i_ >= 5 && std::memcmp(s_ + i_, "False", 5) == 0) {
            i_ += 5;
            return false;
        }
        bad("expected True or False for 'fortran_order'");
    }
    int64_t parse_int() {
        skip_space();
        if (!(peek() >= '0' && peek() <= '9')) bad("expected a non-negative integer in 'shape' at header offset ", i_);
        int64_t v = 0;
        while (peek() >= '0' && peek() <= '9') {
            if (__builtin_mul_overflow(v, (int64_t)10, &v) || __builtin_add_overflow(v, (int64_t)(peek() - '0'), &v))
                bad("dimension in 'shape' overflows int64");
            ++i_;
        }
        if (peek() == 'L') ++i_;  // Python 2 long literal, written by old numpy
        return v;
    }
    std::vector<int64_t> parse_tuple() {
        std::vector<int64_t> dims;
        expect('(');
        while (true) {
            skip_space();
            if (peek() == ')') break;
            dims.push_back(parse_int());
            skip_space();
            if (peek() == ',') {
                ++i_;
                continue;
            }
            if (peek() != ')') bad("expected ',' or ')' in 'shape' at header offset ", i_);
        }
        ++i_;
        return dims;
    }

    const std::string& path_;
    const char* s_;
    size_t n_;
    size_t i_ = 0;
};

constexpr size_t kMaxNpyHeader = size_t(1) << 20;
constexpr uint64_t kMaxSafetensorsHeader = 100000000;  // the format's own limit

constexpr const char* kNpySupported = "<f2 <f4 <f8 <i4 <i8 |u1 |b1";

collapse_dtype npy_dtype(const std::string& path, const std::string& descr) {
    std::string code = descr;
    char order = '=';
    if (!code.empty() && (code[0] == '<' || code[0] == '>' || code[0] == '=' || code[0] == '|')) {
        order = code[0];
        code = code.substr(1);
    }
    struct Entry {
        const char* code;
        collapse_dtype dtype;
    };
    static const Entry table[] = {{"f2", COLLAPSE_F16}, {"f4", COLLAPSE_F32}, {"f8", COLLAPSE_F64},
                                  {"i4", COLLAPSE_I32}, {"i8", COLLAPSE_I64}, {"u1", COLLAPSE_U8},
                                  {"b1", COLLAPSE_BOOL}};
    for (const Entry& e : table) {
        if (code != e.code) continue;
        // Byte order only matters for multi-byte types; '|' ("not applicable") is ambiguous for them.
        if (dtype_size(e.dtype) == 1) return e.dtype;
        if (order == '>')
            fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": big-endian dtype '", printable(descr),
                 "' is not supported; convert with arr.astype('<", code, "')");
        if (order == '|')
            fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": dtype '", printable(descr),
                 "' has no byte order; save it as '<", code, "'");
        return e.dtype;
    }
    fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": unsupported dtype '", printable(descr),
         "' (supported: ", kNpySupported, ")");
}

const char* npy_descr(collapse_dtype t) {
    switch (t) {
        case COLLAPSE_F16: return "<f2";
        case COLLAPSE_F32: return "<f4";
        case COLLAPSE_F64: return "<f8";
        case COLLAPSE_I32: return "<i4";
        case COLLAPSE_I64: return "<i8";
        case COLLAPSE_U8: return "|u1";
        case COLLAPSE_BOOL: return "|b1";
        case COLLAPSE_BF16: return nullptr;
    }
    return nullptr;
}

// ---------------------------------------------------------------------------------------------
// safetensors dtype names

struct StName {
    const char* name;
    collapse_dtype dtype;
};
constexpr StName kStDtypes[] = {{"F16", COLLAPSE_F16}, {"BF16", COLLAPSE_BF16}, {"F32", COLLAPSE_F32},
                                {"F64", COLLAPSE_F64}, {"I32", COLLAPSE_I32},   {"I64", COLLAPSE_I64},
                                {"U8", COLLAPSE_U8},   {"BOOL", COLLAPSE_BOOL}};

template <class... A>
[[noreturn]] void st_fail(const std::string& path, const A&... parts) {
    fail(COLLAPSE_ERR_IO, "cannot read .safetensors file ", path, ": ", parts...);
}

const char* st_name(collapse_dtype t) {
    for (const StName& e : kStDtypes)
        if (e.dtype == t) return e.name;
    return nullptr;
}

// ---------------------------------------------------------------------------------------------
// A tensor file of a declared data size, written through an AtomicFile (base/atomic_file.hpp: a
// unique O_EXCL temporary beside it, renamed over the path on commit(); removed if never committed).

class AtomicWriter {
public:
    AtomicWriter(const std::string& path, size_t declared_bytes) : file_(path, "tensor file"), declared_(declared_bytes) { buf_.reserve(kBuffer); }

    AtomicWriter(const AtomicWriter&) = delete;
    AtomicWriter& operator=(const AtomicWriter&) = delete;

    // Header bytes: not counted against the declared data size.
    void write_header(const std::string& header) { put(header.data(), header.size()); }

    void append(const void* data, size_t bytes) {
        if (committed_) fail(COLLAPSE_ERR_IO, "cannot append to ", file_.path(), ": the writer is already closed");
        if (bytes > declared_ - written_)
            fail(COLLAPSE_ERR_IO, "cannot append to ", file_.path(), ": ", written_, " + ", bytes,
                 " bytes exceeds the declared size of ", declared_, " bytes");
        put(data, bytes);
        written_ += bytes;
    }

    void commit() {
        if (committed_) return;
        if (written_ != declared_)
            fail(COLLAPSE_ERR_IO, "cannot close ", file_.path(), ": ", written_,
                 " bytes of data were appended, the shape declares ", declared_);
        check_open();
        flush();
        file_.commit();
        committed_ = true;
    }

private:
    static constexpr size_t kBuffer = size_t(1) << 20;

    void check_open() const {
        if (file_.fd() < 0)
            fail(COLLAPSE_ERR_IO, "cannot write ", file_.path(), ": the file is no longer open after an earlier error");
    }

    void put(const void* data, size_t bytes) {
        check_open();
        const uint8_t* p = static_cast<const uint8_t*>(data);
        if (buf_.size() + bytes <= kBuffer) {
            buf_.insert(buf_.end(), p, p + bytes);
            return;
        }
        flush();
        if (bytes < kBuffer)
            buf_.insert(buf_.end(), p, p + bytes);
        else
            write_all(p, bytes);
    }

    void flush() {
        write_all(buf_.data(), buf_.size());
        buf_.clear();
    }

    // After a failed write the file's contents are unknown: the temporary file is removed and the
    // writer refuses everything after.
    void write_all(const uint8_t* p, size_t bytes) {
        while (bytes > 0) {
            const ssize_t n = ::write(file_.fd(), p, std::min(bytes, size_t(1) << 30));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                const int err = n < 0 ? errno : EIO;
                const std::string tmp = file_.temp_path();
                file_.abandon();
                fail(COLLAPSE_ERR_IO, "cannot write ", tmp.empty() ? "" : tmp + " (for ", file_.path(), tmp.empty() ? "" : ")", ": ", errno_text(err));
            }
            p += n;
            bytes -= (size_t)n;
        }
    }

    AtomicFile file_;
    size_t declared_ = 0;
    size_t written_ = 0;
    bool committed_ = false;
    std::vector<uint8_t> buf_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// MappedFile

MappedFile::MappedFile(const std::string& path, const std::string& what) : path_(path), what_(what) {
    struct ::stat st;
    fd_ = open_regular_file(path, what, &st);
    size_ = (size_t)st.st_size;
    mtime_sec_ = (int64_t)st.st_mtim.tv_sec;
    mtime_nsec_ = (int64_t)st.st_mtim.tv_nsec;
    if (size_ > 0) {
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_.get(), 0);
        if (p == MAP_FAILED) fail(COLLAPSE_ERR_IO, "cannot map ", what, " ", path, ": ", errno_text(errno));
        data_ = static_cast<const uint8_t*>(p);
    }
    // The descriptor stays open: read() and check_unchanged() use it.
}

MappedFile::~MappedFile() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

void MappedFile::release(size_t offset, size_t bytes) const {
    if (!data_ || offset >= size_) return;
    bytes = std::min(bytes, size_ - offset);
    // Round inward: a page shared with a neighbouring range may still be in use.
    const size_t page = (size_t)::sysconf(_SC_PAGESIZE);
    const size_t begin = (offset + page - 1) / page * page;
    const size_t end = (offset + bytes) / page * page;
    if (begin >= end) return;
    (void)::madvise(const_cast<uint8_t*>(data_) + begin, end - begin, MADV_DONTNEED);
}

void MappedFile::check_unchanged() const {
    struct ::stat st;
    if (::fstat(fd_.get(), &st) != 0) fail(COLLAPSE_ERR_IO, "cannot stat ", what_, " ", path_, ": ", errno_text(errno));
    if ((size_t)st.st_size != size_)
        fail(COLLAPSE_ERR_IO, what_, " ", path_, " changed while it was read: its size went from ", size_, " to ",
             (int64_t)st.st_size, " bytes; rerun on a file that stays unchanged until the run ends");
    if ((int64_t)st.st_mtim.tv_sec != mtime_sec_ || (int64_t)st.st_mtim.tv_nsec != mtime_nsec_)
        fail(COLLAPSE_ERR_IO, what_, " ", path_,
             " changed while it was read: it was modified after it was opened (same size, new modification time); "
             "rerun on a file that stays unchanged until the run ends");
}

void MappedFile::read(size_t offset, size_t bytes, void* dst) const {
    if (offset > size_ || bytes > size_ - offset)
        fail(COLLAPSE_ERR_IO, "cannot read ", what_, " ", path_, ": bytes [", offset, ", ", offset + bytes,
             ") lie outside the file's ", size_, " bytes");
    uint8_t* out = static_cast<uint8_t*>(dst);
    size_t done = 0;
    while (done < bytes) {
        const ssize_t n = ::pread(fd_.get(), out + done, bytes - done, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(COLLAPSE_ERR_IO, "cannot read ", what_, " ", path_, " at byte ", offset + done, ": ", errno_text(errno));
        }
        if (n == 0) {
            check_unchanged();  // names the new size
            fail(COLLAPSE_ERR_IO, what_, " ", path_, " changed while it was read: it ends at byte ", offset + done,
                 ", it had ", size_, " bytes when it was opened");
        }
        done += (size_t)n;
    }
    // After the copy: a rewrite in place that raced with it shows in the modification time.
    check_unchanged();
}

// ---------------------------------------------------------------------------------------------
// Tensor

int64_t Tensor::row_elements() const {
    int64_t n = 1;
    for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
    return n;
}

int64_t Tensor::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

size_t Tensor::row_bytes() const { return (size_t)row_elements() * dtype_size(dtype); }

const void* Tensor::row(int64_t r) const { return static_cast<const uint8_t*>(data()) + (size_t)r * row_bytes(); }

const void* Tensor::read_rows(int64_t r0, int64_t n, std::vector<uint8_t>& buf) const {
    if (r0 < 0 || n < 0 || r0 > rows() || n > rows() - r0)
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "tensor '", name, "': ", n, " rows from row ", r0, " are outside its ", rows(),
             " rows");  // (r0 + n may overflow: not printed)
    const size_t bytes = (size_t)n * row_bytes();  // within the tensor, whose size was checked at open
    buf.resize(bytes);
    file->read(offset + (size_t)r0 * row_bytes(), bytes, buf.data());
    return buf.data();
}

void require_label_shape(const Tensor& t, int64_t rows, const std::string& what) {
    const bool ok = (t.shape.size() == 1 && t.shape[0] == rows) ||
                    (t.shape.size() == 2 && t.shape[0] == rows && t.shape[1] == 1);
    if (!ok)
        fail(COLLAPSE_ERR_SHAPE, what, " '", printable(t.name), "' has shape ", shape_text(t.shape), ", expected [", rows,
             "] or [", rows, ", 1] (one value per feature row)");
}

void require_shape(const Tensor& t, const std::vector<int64_t>& expected, const std::string& what) {
    if (t.shape != expected)
        fail(COLLAPSE_ERR_SHAPE, what, " '", printable(t.name), "' has shape ", shape_text(t.shape), ", expected ",
             shape_text(expected));
}

// ---------------------------------------------------------------------------------------------
// .npy reader

Tensor open_npy(const std::string& path) {
    auto file = std::make_shared<MappedFile>(path, ".npy file");
    const size_t size = file->size();
    static const uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
    // Headers are read with pread, not through the mapping: a file that shrinks now is an error.
    uint8_t p[12] = {};
    file->read(0, std::min<size_t>(size, sizeof p), p);

    if (std::memcmp(p, magic, std::min<size_t>(size, 6)) != 0)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": bad magic (not a .npy file)");
    if (size < 8)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": truncated: file has ", size,
             " bytes, too short for the .npy preamble");
    const int major = p[6], minor = p[7];
    if ((major != 1 && major != 2 && major != 3) || minor != 0)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": unsupported .npy version ", major, ".", minor,
             " (supported: 1.0, 2.0, 3.0)");
    const size_t len_bytes = major == 1 ? 2 : 4;
    const size_t preamble = 8 + len_bytes;
    if (size < preamble)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": truncated: file has ", size,
             " bytes, too short for the .npy preamble");
    const size_t header_len = (size_t)read_le(p + 8, (int)len_bytes);
    if (header_len > size - preamble)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": truncated: the header runs past the end of the file (",
             preamble + header_len, " header bytes declared, file has ", size, ")");
    // numpy writes a few hundred bytes; the bound keeps a bogus length from allocating gigabytes.
    if (header_len > kMaxNpyHeader)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": header length ", header_len, " exceeds the limit of ",
             kMaxNpyHeader, " bytes");
    std::string header(header_len, '\0');
    file->read(preamble, header_len, header.data());

    const NpyHeader h = NpyHeaderParser(path, header.data(), header.size()).parse();
    if (h.fortran_order)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path,
             ": Fortran-order arrays are not supported; save with np.ascontiguousarray");
    const collapse_dtype dtype = npy_dtype(path, h.descr);
    size_t data_bytes = 0;
    if (!shape_bytes(h.shape, dtype_size(dtype), &data_bytes))
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": shape ", shape_text(h.shape), " overflows");
    const size_t offset = preamble + header_len;
    if (size - offset < data_bytes)
        fail(COLLAPSE_ERR_IO, "cannot read .npy file ", path, ": truncated: expected ", data_bytes,
             " bytes of data after the header, file has ", size - offset);

    Tensor t;
    t.file = std::move(file);
    t.name = path;
    t.dtype = dtype;
    t.shape = h.shape;
    t.offset = offset;
    return t;
}

// ---------------------------------------------------------------------------------------------
// .safetensors reader

SafetensorsFile::SafetensorsFile(const std::string& path)
    : file_(std::make_shared<MappedFile>(path, ".safetensors file")) {
    const size_t size = file_->size();

    if (size < 8) st_fail(path, "truncated: file has ", size, " bytes, too short for the 8-byte header length");
    uint8_t p[8];
    file_->read(0, 8, p);  // pread, not the mapping: a file that shrinks now is an error
    const uint64_t header_len = read_le(p, 8);
    if (header_len > size - 8)
        st_fail(path, "header length ", header_len, " runs past the end of the file (", size,
                " bytes): truncated, or not a .safetensors file");
    if (header_len > kMaxSafetensorsHeader)
        st_fail(path, "header length ", header_len, " exceeds the format's limit of ", kMaxSafetensorsHeader, " bytes");
    const size_t data_start = 8 + (size_t)header_len;
    const size_t data_size = size - data_start;
    std::string text((size_t)header_len, '\0');
    file_->read(8, text.size(), text.data());

    nlohmann::ordered_json header;  // keeps header order, the tie-break for zero-size tensors
    std::string duplicate;          // a tensor name given twice (the parser keeps the last one)
    try {
        std::unordered_set<std::string> seen;
        header = nlohmann::ordered_json::parse(text, [&](int depth, nlohmann::ordered_json::parse_event_t ev, nlohmann::ordered_json& v) {
            if (ev == nlohmann::ordered_json::parse_event_t::key && depth == 1 && !seen.insert(v.get<std::string>()).second && duplicate.empty())
                duplicate = v.get<std::string>();
            return true;
        });
    } catch (const nlohmann::ordered_json::exception& e) {
        st_fail(path, "corrupt header JSON: ", e.what());
    }
    if (!header.is_object()) st_fail(path, "corrupt header JSON: the header is not a JSON object");
    if (!duplicate.empty()) st_fail(path, "tensor '", printable(duplicate), "' is named twice in the header");
    std::vector<std::pair<uint64_t, uint64_t>> spans;  // [begin, end) of every tensor, for the layout check

    for (const auto& item : header.items()) {
        const std::string& name = item.key();
        if (name == "__metadata__") continue;  // free-form string map; nothing here depends on it
        const std::string shown = printable(name);  // a name may hold control characters
        const nlohmann::ordered_json& v = item.value();
        if (!v.is_object()) st_fail(path, "tensor '", shown, "': entry is not a JSON object");

        const auto dt = v.find("dtype");
        if (dt == v.end() || !dt->is_string()) st_fail(path, "tensor '", shown, "': missing or non-string \"dtype\"");
        const std::string dname = dt->get<std::string>();
        const StName* match = nullptr;
        for (const StName& e : kStDtypes)
            if (dname == e.name) match = &e;
        if (!match)
            st_fail(path, "tensor '", shown, "': unsupported dtype ", printable(dname),
                    " (supported: F16 BF16 F32 F64 I32 I64 U8 BOOL)");

        const auto sh = v.find("shape");
        if (sh == v.end() || !sh->is_array()) st_fail(path, "tensor '", shown, "': missing or non-array \"shape\"");
        std::vector<int64_t> shape;
        for (const auto& d : *sh) {
            if (!d.is_number_unsigned())
                st_fail(path, "tensor '", shown, "': \"shape\" entries must be non-negative integers");
            const uint64_t u = d.get<uint64_t>();
            if (u > (uint64_t)INT64_MAX) st_fail(path, "tensor '", shown, "': dimension ", u, " overflows int64");
            shape.push_back((int64_t)u);
        }

        const auto off = v.find("data_offsets");
        if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
            !(*off)[1].is_number_unsigned())
            st_fail(path, "tensor '", shown, "': \"data_offsets\" must be [begin, end] with non-negative integers");
        const uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
        if (begin > end) st_fail(path, "tensor '", shown, "': data_offsets begin ", begin, " > end ", end);
        if (end > data_size)
            st_fail(path, "tensor '", shown, "': data_offsets end ", end, " is past the end of the data section (",
                    data_size, " bytes)");
        size_t bytes = 0;
        if (!shape_bytes(shape, dtype_size(match->dtype), &bytes))
            st_fail(path, "tensor '", shown, "': shape ", shape_text(shape), " overflows");
        if (end - begin != bytes)
            st_fail(path, "tensor '", shown, "': data_offsets span ", end - begin, " bytes, but shape ",
                    shape_text(shape), " of ", dname, " needs ", bytes);

        Tensor t;
        t.file = file_;
        t.name = name;
        t.dtype = match->dtype;
        t.shape = std::move(shape);
        t.offset = data_start + (size_t)begin;
        tensors_.push_back(std::move(t));
        spans.push_back({begin, end});
    }
    // File order is the natural order to stream in.
    std::stable_sort(tensors_.begin(), tensors_.end(),
                     [](const Tensor& a, const Tensor& b) { return a.offset < b.offset; });
    // The format's layout (the reference loader checks it too): the tensors tile the data section
    // from 0 to its end, without overlaps (labels over the features' last bytes read as garbage
    // labels), holes or trailing bytes.
    std::sort(spans.begin(), spans.end());
    uint64_t at = 0;
    for (const auto& [begin, end] : spans) {
        if (begin == end) continue;  // an empty tensor holds no bytes
        if (begin < at) st_fail(path, "tensors overlap: data_offsets [", begin, ", ", end, ") start before ", at, ", the end of another tensor");
        if (begin > at) st_fail(path, "the data section has a hole: bytes [", at, ", ", begin, ") belong to no tensor");
        at = end;
    }
    if (at != data_size) st_fail(path, "the data section has ", data_size - at, " bytes after the last tensor (", data_size, " bytes in all)");
}

std::vector<std::string> SafetensorsFile::names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const Tensor& t : tensors_) out.push_back(t.name);
    return out;
}

bool SafetensorsFile::has(const std::string& name) const {
    return std::any_of(tensors_.begin(), tensors_.end(), [&](const Tensor& t) { return t.name == name; });
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
    for (const Tensor& t : tensors_)
        if (t.name == name) return t;
    std::ostringstream avail;
    const size_t shown = std::min<size_t>(tensors_.size(), 32);
    for (size_t i = 0; i < shown; ++i) avail << (i ? ", " : "") << printable(tensors_[i].name, 60);
    if (tensors_.size() > shown) avail << ", ... (" << tensors_.size() - shown << " more)";
    if (tensors_.empty()) avail << "(none)";
    fail(COLLAPSE_ERR_IO, "no tensor named '", printable(name), "' in ", path(), "; available: ", avail.str());
}

// ---------------------------------------------------------------------------------------------
// Writers

namespace {

void check_dtype(const std::string& path, collapse_dtype dtype) {
    if (!dtype_is_valid((int)dtype))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot write ", path, ": invalid dtype ", (int)dtype);
}

size_t declared_bytes(const std::string& path, const std::string& what, collapse_dtype dtype,
                      const std::vector<int64_t>& shape) {
    size_t bytes = 0;
    if (!shape_bytes(shape, dtype_size(dtype), &bytes))
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot write ", path, ": ", what, "shape ", shape_text(shape),
             " has a negative dimension or overflows");
    return bytes;
}

// Version 1.0 unless the header needs more than 65535 bytes; padded so data starts on 64 bytes.
std::string npy_header(collapse_dtype dtype, const std::vector<int64_t>& shape) {
    std::ostringstream dict;
    dict << "{'descr': '" << npy_descr(dtype) << "', 'fortran_order': False, 'shape': (";
    for (size_t i = 0; i < shape.size(); ++i) dict << (i ? ", " : "") << shape[i];
    if (shape.size() == 1) dict << ',';
    dict << "), }";
    std::string body = dict.str();

    for (int major : {1, 2}) {
        const size_t preamble = major == 1 ? 10 : 12;
        const size_t unpadded = preamble + body.size() + 1;  // + '\n'
        const size_t total = (unpadded + 63) / 64 * 64;
        const size_t header_len = total - preamble;
        if (major == 1 && header_len > 0xffff) continue;
        std::string out = "\x93NUMPY";
        out += (char)major;
        out += '\0';
        for (size_t i = 0; i < preamble - 8; ++i) out += (char)((header_len >> (8 * i)) & 0xff);
        out += body;
        out.append(total - unpadded, ' ');
        out += '\n';
        return out;
    }
    return {};  // unreachable: version 2.0 always fits
}

}  // namespace

struct NpyWriter::Impl {
    std::unique_ptr<AtomicWriter> out;
};

NpyWriter::NpyWriter(const std::string& path, collapse_dtype dtype, std::vector<int64_t> shape)
    : impl_(std::make_unique<Impl>()) {
    check_dtype(path, dtype);
    if (dtype == COLLAPSE_BF16)
        fail(COLLAPSE_ERR_IO, "cannot write ", path,
             ": bfloat16 cannot be stored in a .npy file (numpy has no bfloat16); write a .safetensors file instead");
    const size_t bytes = declared_bytes(path, "", dtype, shape);
    impl_->out = std::make_unique<AtomicWriter>(path, bytes);
    impl_->out->write_header(npy_header(dtype, shape));
}

NpyWriter::~NpyWriter() = default;

void NpyWriter::append(const void* data, size_t bytes) { impl_->out->append(data, bytes); }

void NpyWriter::close() { impl_->out->commit(); }

struct SafetensorsWriter::Impl {
    std::unique_ptr<AtomicWriter> out;
};

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<TensorSpec> tensors)
    : impl_(std::make_unique<Impl>()) {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    std::unordered_set<std::string> seen;
    size_t offset = 0;
    for (const TensorSpec& t : tensors) {
        check_dtype(path, t.dtype);
        if (t.name == "__metadata__")
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot write ", path, ": '__metadata__' is reserved as a tensor name");
        if (!seen.insert(t.name).second)
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot write ", path, ": duplicate tensor name '", t.name, "'");
        const size_t bytes = declared_bytes(path, "tensor '" + t.name + "': ", t.dtype, t.shape);
        size_t end = 0;
        if (__builtin_add_overflow(offset, bytes, &end))
            fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot write ", path, ": total size overflows");
        header[t.name] = {{"dtype", st_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
        offset = end;
    }
    std::string text;
    try {
        text = header.dump();
    } catch (const nlohmann::json::exception& e) {  // e.g. a tensor name that is not valid UTF-8
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "cannot write ", path, ": ", e.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned

    std::string prefix(8, '\0');
    for (int i = 0; i < 8; ++i) prefix[i] = (char)(((uint64_t)text.size() >> (8 * i)) & 0xff);
    impl_->out = std::make_unique<AtomicWriter>(path, offset);
    impl_->out->write_header(prefix + text);
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::append(const void* data, size_t bytes) { impl_->out->append(data, bytes); }

void SafetensorsWriter::close() { impl_->out->commit(); }

std::string npy_bytes(collapse_dtype dtype, const std::vector<int64_t>& shape, const void* data) {
    check_dtype("a .npy file", dtype);
    if (dtype == COLLAPSE_BF16) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "bfloat16 cannot be stored in a .npy file (numpy has no bfloat16)");
    const size_t bytes = declared_bytes("a .npy file", "", dtype, shape);
    std::string out = npy_header(dtype, shape);
    if (bytes > 0) out.append(static_cast<const char*>(data), bytes);
    return out;
}

void write_npy(const std::string& path, collapse_dtype dtype, const std::vector<int64_t>& shape, const void* data) {
    NpyWriter w(path, dtype, shape);
    size_t bytes = 0;
    shape_bytes(shape, dtype_size(dtype), &bytes);  // already validated by the constructor
    w.append(data, bytes);
    w.close();
}

}  // namespace collapse::internal::io
