// libFuzzer: the C API's argument validation. Fuzzed options create a session; fuzzed
// collapse_buffer descriptors over one real 4 KiB buffer (filled with fuzzed bytes) go to
// ingest_rows, ingest_sequences and set_classifier; compute runs at the end.
//
// A descriptor that claims memory the caller does not own (rows beyond the buffer) cannot be
// detected by any C API and is skipped; one whose size does not even fit in int64 must be refused
// before anything is read, so it is passed on: reading through it crashes under ASan.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "fuzz_common.hpp"

namespace {

constexpr size_t kBuffer = 4096;
alignas(64) uint8_t g_buffer[kBuffer];

size_t item_size(int dtype) {
    switch (dtype) {
        case COLLAPSE_F64: case COLLAPSE_I64: return 8;
        case COLLAPSE_F32: case COLLAPSE_I32: return 4;
        case COLLAPSE_F16: case COLLAPSE_BF16: return 2;
        default: return 1;
    }
}

enum class Fit { Inside, Overflows, Lies };

// Where the bytes a descriptor spans end up relative to the real buffer.
Fit fit(const collapse_buffer& b, size_t offset) {
    if (b.rows <= 0 || b.cols <= 0) return Fit::Inside;  // nothing to read (or refused outright)
    const __int128 stride = b.row_stride == 0 ? b.cols : b.row_stride;
    if (stride < b.cols) return Fit::Inside;  // refused outright
    int dtype = 0;  // read raw: an out-of-range value is undefined behaviour through the enum type
    std::memcpy(&dtype, &b.dtype, sizeof dtype);
    const __int128 elems = (__int128)(b.rows - 1) * stride + b.cols;  // < 2^127: no overflow
    if (elems > (__int128)INT64_MAX) return Fit::Overflows;
    const __int128 bytes = elems * (__int128)item_size(dtype);
    if (bytes > (__int128)INT64_MAX) return Fit::Overflows;
    return bytes <= (__int128)(kBuffer - offset) ? Fit::Inside : Fit::Lies;
}

collapse_buffer descriptor(fuzz::Bytes& in, size_t* offset) {
    collapse_buffer b;
    // Stored as a C caller would: raw ints, 8 and 9 are not dtypes, 2 is not a memory kind.
    const int dtype = in.u8() % 10, m = in.u8(), memory = m < 240 ? 0 : m % 3;
    std::memcpy(&b.dtype, &dtype, sizeof dtype);
    std::memcpy(&b.memory, &memory, sizeof memory);
    b.rows = in.size();
    b.cols = in.size();
    b.row_stride = in.bit() ? 0 : in.size();
    *offset = (size_t)in.u8() * 16 % kBuffer;
    b.data = in.u8() == 255 ? nullptr : g_buffer + *offset;
    return b;
}

collapse_options options(fuzz::Bytes& in, std::vector<int64_t>& excluded) {
    collapse_options o;
    collapse_options_default(&o);
    if (in.u8() == 255) o.struct_size -= 8;
    o.num_classes = in.u8() % 18 - 1;
    o.dim = in.bit() ? 0 : in.u8() % 10 - 1;
    excluded.resize(in.u8() % 4);
    for (int64_t& e : excluded) e = (int8_t)in.u8();
    o.exclude_token_ids = excluded.data();
    o.num_exclude_token_ids = (int64_t)excluded.size();
    o.min_samples_per_token = (int8_t)in.u8() % 5;
    o.max_tokens_to_analyze = (int8_t)in.u8() % 4;
    o.compute_token_metrics = in.bit();
    o.compute_overall_metrics = in.bit();
    o.compute_class_metrics = in.bit();
    o.min_classes_for_gnc2 = (int8_t)in.u8() % 4;
    o.min_classes_for_unc3 = (int8_t)in.u8() % 4;
    // Only valid enum values in the options: from_options reads them through the enum type, and an
    // out-of-range one is undefined behaviour there (reported; not this target's subject).
    o.svd_mode = (collapse_svd_mode)(in.u8() % 4);  // 3: inside the enum's range, not a mode
    o.svd_max_rows_per_token = (int8_t)in.u8() % 6;
    o.svd_center = in.bit();
    o.global_mean = (collapse_global_mean)(in.u8() % 2);
    static const double powers[] = {1.0, 0.5, 2.0, 0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                                    std::numeric_limits<double>::infinity(), 1e300};
    o.cdnv_power = powers[in.u8() % 8];
    o.unc3_classifier = (collapse_unc3_classifier)(in.u8() % 2);
    o.compute_nc4 = in.bit();
    o.seed = in.u64();
    static const int64_t limits[] = {int64_t(8) << 30, int64_t(1) << 20, int64_t(64) << 10, 0, -1, 4096};
    o.host_memory_limit = limits[in.u8() % 6];
    o.backend = (collapse_backend)(in.u8() < 250 ? 0 : in.u8() % 2);
    o.nonfinite_policy = (collapse_nonfinite_policy)(in.u8() % 2);
    // Spills stay in the scratch directory, whatever the input.
    const char* tmp = std::getenv("TMPDIR");
    std::snprintf(o.intermediate_save_dir, sizeof o.intermediate_save_dir, "%s/collapse_fuzz_spill",
                  tmp && *tmp ? tmp : "/tmp");
    return o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz::Bytes in(data, size);
    std::vector<int64_t> excluded;
    const collapse_options o = options(in, excluded);
    collapse_session* s = nullptr;
    if (collapse_session_create(&o, &s) != COLLAPSE_OK) return 0;
    for (int op = 0; op < 6 && !in.empty(); ++op) {
        const uint8_t kind = in.u8() % 3;
        size_t o1 = 0, o2 = 0, o3 = 0;
        collapse_buffer a = descriptor(in, &o1), b = descriptor(in, &o2), c = descriptor(in, &o3);
        const bool with_c = in.bit();
        const int64_t batch = in.size(), seq_len = in.size();
        // Buffer contents: whatever is left of the input, repeated.
        size_t len = 0;
        const uint8_t* rest = in.rest(&len);
        for (size_t i = 0; i < kBuffer; ++i) g_buffer[i] = len ? rest[(i + op) % len] : (uint8_t)i;
        const Fit fa = fit(a, o1), fb = fit(b, o2), fc = with_c ? fit(c, o3) : Fit::Inside;
        if (fa == Fit::Lies || fb == Fit::Lies || fc == Fit::Lies) continue;
        // Keep each run fast: wide features make d x d accumulators.
        if (fa == Fit::Inside && a.cols > 64) continue;
        collapse_status st = COLLAPSE_OK;
        if (kind == 0) st = collapse_session_ingest_rows(s, &a, &b, with_c ? &c : nullptr, nullptr);
        if (kind == 1) st = collapse_session_ingest_sequences(s, &a, &b, with_c ? &c : nullptr, batch, seq_len, nullptr);
        if (kind == 2) st = collapse_session_set_classifier(s, &a, with_c ? &c : nullptr);
        const bool overflow = fa == Fit::Overflows || (kind != 2 && fb == Fit::Overflows) || fc == Fit::Overflows;
        if (overflow && st == COLLAPSE_OK) std::abort();  // a size that overflows int64 was accepted
    }
    collapse_report* r = nullptr;
    if (collapse_session_compute(s, &r) == COLLAPSE_OK) collapse_report_destroy(r);
    collapse_session_destroy(s);
    return 0;
}
