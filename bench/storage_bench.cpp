// Figures 5 and 6: the engine's own files. The row store's spill and a session checkpoint, each
// against plain file I/O of the same number of bytes.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.hpp"
#include "core/row_store.hpp"
#include "io/session_checkpoint.hpp"

namespace bench {
namespace {

// Scratch files for figures 5 and 6 go here (--scratch, default $TMPDIR or /tmp).
std::string scratch_path(const Options& o, const std::string& name) { return o.scratch + "/" + name; }

// The ceiling of figures 5 and 6: the same number of bytes, from a buffer in memory as large as
// they are (so the source is as cold as the engine's), written to one file with pwrite in 8 MiB
// pieces (fsync'ed when `sync`), then read back into it with pread. One repetition per call: the
// figures interleave it with the engine's, because on this VM the first writes into fresh page
// cache run several times slower than later ones, and whichever ran first would look worse.
struct FileSpeed {
    double write_s = 0, read_s = 0;
};
struct PlainFile {
    std::string path;
    int64_t bytes;
    bool sync;
    std::vector<float> mem;  // filled (so faulted in) once; plain file I/O does not depend on the values
    FileSpeed best{1e300, 1e300};
    PlainFile(std::string p, int64_t n, bool s) : path(std::move(p)), bytes(n), sync(s), mem((size_t)(n / 4 + 1), 1.0f) {}
    ~PlainFile() { ::unlink(path.c_str()); }
    PlainFile(const PlainFile&) = delete;
    PlainFile& operator=(const PlainFile&) = delete;
    void once() {
        const size_t piece = size_t(8) << 20;
        char* const buf = reinterpret_cast<char*>(mem.data());
        ::unlink(path.c_str());
        auto t0 = Clock::now();
        const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
        for (int64_t at = 0; at < bytes; at += (int64_t)piece)
            if (::pwrite(fd, buf + at, (size_t)std::min<int64_t>((int64_t)piece, bytes - at), (off_t)at) < 0)
                throw std::runtime_error("write " + path + ": " + std::strerror(errno));
        if (sync) ::fsync(fd);
        best.write_s = std::min(best.write_s, since(t0));
        t0 = Clock::now();
        for (int64_t at = 0; at < bytes; at += (int64_t)piece)
            if (::pread(fd, buf + at, (size_t)std::min<int64_t>((int64_t)piece, bytes - at), (off_t)at) < 0)
                throw std::runtime_error("read " + path + ": " + std::strerror(errno));
        best.read_s = std::min(best.read_s, since(t0));
        ::close(fd);
    }
};

}  // namespace

// ---- figure 5: row-store spill vs. plain sequential file writes and reads --------------------------

void bench_spill(const Options& o, json& out) {
    const int64_t V = 4096, d = 256, budget = 64 * kMiB;
    const int64_t total = (o.quick ? 256 : 1024) * kMiB;  // float64 rows stored
    const int64_t n = total / (d * 8), B = 16384;
    std::printf("\n== 5. row-store spill: %lld MiB of float64 rows (V=%lld, d=%lld, SynthGenerator Zipf(%.1f) labels, batches of"
                " %lld rows), memory budget %lld MiB, under %s ==\n",
                (long long)(total / kMiB), (long long)V, (long long)d, kZipf, (long long)B, (long long)(budget / kMiB),
                o.scratch.c_str());
    std::printf("   engine: RowStore make_room/append as the CPU backend calls them (write: time spent flushing) and for_each_class\n"
                "   over every class (read back, CRC checked); ceiling: pwrite then pread of the same bytes between one file and a\n"
                "   buffer as large, in 8 MiB pieces. Neither syncs: both measure the page cache unless the file outgrows RAM. Best of 3.\n");
    // Only the labels come from the generator: the store moves and checksums bytes whatever they
    // hold, and generating 1 GiB of rows per repetition would only lengthen the set-up.
    std::vector<int32_t> y((size_t)n);
    synth_generator(V, d).labels(0, n, y.data());
    std::vector<double> row((size_t)d);
    for (int64_t k = 0; k < d; ++k) row[(size_t)k] = (double)k;
    double wbest = 1e300, rbest = 1e300;
    int64_t flushes = 0, spilled = 0;
    std::vector<int32_t> ids((size_t)V);
    std::iota(ids.begin(), ids.end(), 0);
    PlainFile plain_file(scratch_path(o, "collapse_bench_plain.bin"), total, false);
    for (int r = 0; r < 3; ++r) {
        plain_file.once();
        collapse::internal::RowStore st(V, d, budget, o.scratch);
        double wsec = 0;
        std::vector<int64_t> count((size_t)V);
        for (int64_t r0 = 0; r0 < n; r0 += B) {
            std::fill(count.begin(), count.end(), 0);
            for (int64_t i = r0; i < std::min(n, r0 + B); ++i) ++count[(size_t)y[(size_t)i]];
            const auto t0 = Clock::now();
            st.make_room([&] {
                int64_t grow = 0;
                for (int64_t c = 0; c < V; ++c) grow += count[(size_t)c] ? st.growth((int32_t)c, count[(size_t)c]) : 0;
                return grow;
            });
            wsec += since(t0);
            for (int64_t c = 0; c < V; ++c) {
                if (count[(size_t)c] == 0) continue;
                double* dst = st.append((int32_t)c, count[(size_t)c]);
                for (int64_t i = 0; i < count[(size_t)c]; ++i) std::memcpy(dst + i * d, row.data(), (size_t)d * 8);
            }
        }
        const auto t0 = Clock::now();
        st.flush();  // everything on disk, so the read below reads it all back
        wsec += since(t0);
        const auto t1 = Clock::now();
        double check = 0;
        st.for_each_class(ids, budget / 6, [&](int32_t, const double* x, int64_t m, int64_t, bool) { check += m > 0 ? x[0] : 0; });
        rbest = std::min(rbest, since(t1));
        wbest = std::min(wbest, wsec);
        g_sink = g_sink + (float)check;
        flushes = st.flushes(), spilled = st.disk_bytes();
    }
    const FileSpeed plain = plain_file.best;
    const double w = (double)spilled / wbest / kGB, rr = (double)spilled / rbest / kGB;
    const double pw = (double)spilled / plain.write_s / kGB, pr = (double)spilled / plain.read_s / kGB;
    std::printf("spill   bytes=%lld flushes=%lld  write GB/s=%7.3f read GB/s=%7.3f  | plain file write GB/s=%7.3f read GB/s=%7.3f"
                "  ratio write=%.2f read=%.2f\n",
                (long long)spilled, (long long)flushes, w, rr, pw, pr, w / pw, rr / pr);
    std::fflush(stdout);
    out["spill"] = {{"V", V}, {"d", d}, {"bytes", spilled}, {"flushes", flushes}, {"memory_budget", budget},
                    {"write_gb_s", w}, {"read_gb_s", rr}, {"plain_write_gb_s", pw}, {"plain_read_gb_s", pr},
                    {"ratio_write", w / pw}, {"ratio_read", rr / pr}};
}

// ---- figure 6: checkpoint of V = 32000, d = 4096 accumulators vs. a plain fsync'ed file write ------

void bench_checkpoint(const Options& o, json& out) {
    const int64_t V = o.quick ? 8000 : 32000, d = 4096, n = 4096;
    std::printf("\n== 6. checkpoint of the accumulators: V=%lld, d=%lld (class sums %lld MiB, Gram %lld MiB), %lld rows from"
                " SynthGenerator, under %s ==\n",
                (long long)V, (long long)d, (long long)(V * d * 8 / kMiB), (long long)(d * d * 8 / kMiB), (long long)n,
                o.scratch.c_str());
    std::printf("   engine: io::save_checkpoint (sections streamed to a temp file, CRC32C each, fsync, rename) and\n"
                "   io::load_checkpoint into a fresh session (every CRC checked); ceiling: the same bytes from a buffer as\n"
                "   large, pwrite in 8 MiB pieces + fsync, and pread back into it. Best of 3.\n");
    Config cfg = base_config(o, V, d);
    cfg.svd_mode = COLLAPSE_SVD_OFF;  // the accumulators only
    Session s(cfg);
    {
        const Inputs in = Inputs::synth(synth_generator(V, d), n);
        ingest_pass(s, in, n);
    }
    const std::string path = scratch_path(o, "collapse_bench.ckpt");
    double wbest = 1e300, rbest = 1e300;
    collapse::internal::io::save_checkpoint(s, path);  // its size, for the plain file
    PlainFile plain_file(scratch_path(o, "collapse_bench_plain.bin"), (int64_t)std::filesystem::file_size(path), true);
    for (int r = 0; r < 3; ++r) {
        plain_file.once();
        auto t0 = Clock::now();
        collapse::internal::io::save_checkpoint(s, path);
        wbest = std::min(wbest, since(t0));
        Session fresh(cfg);
        t0 = Clock::now();
        collapse::internal::io::load_checkpoint(fresh, path);
        rbest = std::min(rbest, since(t0));
    }
    const int64_t bytes = (int64_t)std::filesystem::file_size(path);
    ::unlink(path.c_str());
    const FileSpeed plain = plain_file.best;
    std::printf("ckpt    V=%lld d=%lld bytes=%lld  save s=%7.3f (GB/s=%6.3f) load s=%7.3f (GB/s=%6.3f)  | plain write+fsync s=%7.3f"
                " read s=%7.3f  ratio save=%.2f load=%.2f\n",
                (long long)V, (long long)d, (long long)bytes, wbest, bytes / wbest / kGB, rbest, bytes / rbest / kGB, plain.write_s,
                plain.read_s, plain.write_s / wbest, plain.read_s / rbest);
    std::fflush(stdout);
    out["checkpoint"] = {{"V", V}, {"d", d}, {"bytes", bytes}, {"save_seconds", wbest}, {"load_seconds", rbest},
                         {"plain_write_fsync_seconds", plain.write_s}, {"plain_read_seconds", plain.read_s},
                         {"ratio_save", plain.write_s / wbest}, {"ratio_load", plain.read_s / rbest}};
}

}  // namespace bench
