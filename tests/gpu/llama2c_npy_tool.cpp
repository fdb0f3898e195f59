// A small .npy helper for tests/gpu/llama2c_check.sh (the device machine may have no Python/NumPy);
// the script compiles it with the host compiler. Little-endian, C-order, v1-v3 headers.
//   llama2c_npy_tool head DATA_DIR K OUT_DIR   the rows of the first K stories (seq.npy values in
//        order of first appearance) of inputs/seq/pos/labels.npy, as int32 files in OUT_DIR; prints rows
//   llama2c_npy_tool maxdiff A.npy B.npy [ROWS]  max |a - b| over the first ROWS rows (all when absent)
//        of two float16/float32 arrays with the same row width; prints "max_abs <x> compared <n> nan_mismatch <m>"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Npy {
    std::string descr;
    std::vector<int64_t> shape;
    std::vector<char> data;
    int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
    int64_t width() const {
        int64_t w = 1;
        for (size_t i = 1; i < shape.size(); ++i) w *= shape[i];
        return w;
    }
};

[[noreturn]] void die(const std::string& m) { throw std::runtime_error(m); }

Npy read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) die(path + ": cannot open");
    char magic[8];
    if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) die(path + ": not a .npy file");
    uint32_t hlen = 0;
    unsigned char b[4] = {0, 0, 0, 0};
    if (magic[6] == 1) {
        if (!in.read((char*)b, 2)) die(path + ": truncated");
        hlen = b[0] | (b[1] << 8);
    } else {
        if (!in.read((char*)b, 4)) die(path + ": truncated");
        hlen = b[0] | (b[1] << 8) | (b[2] << 16) | ((uint32_t)b[3] << 24);
    }
    std::string h(hlen, '\0');
    if (!in.read(&h[0], hlen)) die(path + ": truncated header");
    Npy a;
    const size_t d = h.find("'descr'");
    const size_t q1 = h.find('\'', h.find(':', d) + 1), q2 = h.find('\'', q1 + 1);
    if (d == std::string::npos || q1 == std::string::npos || q2 == std::string::npos) die(path + ": no descr");
    a.descr = h.substr(q1 + 1, q2 - q1 - 1);
    if (h.find("'fortran_order': True") != std::string::npos) die(path + ": Fortran order");
    const size_t s = h.find('(', h.find("'shape'")), e = h.find(')', s);
    std::string dims = h.substr(s + 1, e - s - 1);
    for (size_t p = 0; p < dims.size();) {
        while (p < dims.size() && (dims[p] == ' ' || dims[p] == ',')) ++p;
        if (p >= dims.size()) break;
        a.shape.push_back(std::stoll(dims.substr(p)));
        while (p < dims.size() && dims[p] != ',') ++p;
    }
    a.data.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return a;
}

size_t item(const Npy& a, const std::string& path) {
    if (a.descr == "<f4" || a.descr == "<i4") return 4;
    if (a.descr == "<f2") return 2;
    if (a.descr == "<i8") return 8;
    die(path + ": unsupported dtype " + a.descr);
}

int64_t int_at(const Npy& a, int64_t i) {
    if (a.descr == "<i4") {
        int32_t v;
        std::memcpy(&v, &a.data[(size_t)i * 4], 4);
        return v;
    }
    int64_t v;
    std::memcpy(&v, &a.data[(size_t)i * 8], 8);
    return v;
}

float half_to_float(uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 1024), e - 25);
    return s ? -v : v;
}

float float_at(const Npy& a, int64_t i) {
    if (a.descr == "<f4") {
        float v;
        std::memcpy(&v, &a.data[(size_t)i * 4], 4);
        return v;
    }
    uint16_t h;
    std::memcpy(&h, &a.data[(size_t)i * 2], 2);
    return half_to_float(h);
}

void write_i32(const std::string& path, const std::vector<int32_t>& v) {
    std::string h = "{'descr': '<i4', 'fortran_order': False, 'shape': (" + std::to_string(v.size()) + ",), }";
    while ((10 + h.size() + 1) % 64 != 0) h += ' ';
    h += '\n';
    std::ofstream out(path, std::ios::binary);
    const unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(h.size() & 255), (unsigned char)(h.size() >> 8)};
    out.write((const char*)pre, 10);
    out.write(h.data(), (std::streamsize)h.size());
    out.write((const char*)v.data(), (std::streamsize)(v.size() * 4));
    if (!out) die(path + ": write failed");
}

int head(const std::string& dir, int64_t k, const std::string& out) {
    const Npy seq = read(dir + "/seq.npy");
    item(seq, "seq.npy");
    std::set<int64_t> seen;
    int64_t rows = 0;
    for (; rows < seq.rows(); ++rows) {
        const int64_t s = int_at(seq, rows);
        if (!seen.count(s) && (int64_t)seen.size() == k) break;
        seen.insert(s);
    }
    for (const char* name : {"inputs", "seq", "pos", "labels"}) {
        const std::string p = dir + "/" + name + ".npy";
        const Npy a = read(p);
        if (a.descr != "<i4" && a.descr != "<i8") die(p + ": expected integers, got " + a.descr);
        if (a.rows() < rows) die(p + ": only " + std::to_string(a.rows()) + " rows");
        std::vector<int32_t> v((size_t)rows);
        for (int64_t i = 0; i < rows; ++i) v[(size_t)i] = (int32_t)int_at(a, i);
        write_i32(out + "/" + name + ".npy", v);
    }
    std::printf("%lld\n", (long long)rows);
    return 0;
}

int maxdiff(const std::string& pa, const std::string& pb, int64_t rows) {
    const Npy a = read(pa), b = read(pb);
    item(a, pa), item(b, pb);
    if (a.width() != b.width()) die("row widths differ: " + std::to_string(a.width()) + " vs " + std::to_string(b.width()));
    if (rows < 0) rows = std::min(a.rows(), b.rows());
    if (rows > a.rows() || rows > b.rows()) die("fewer rows than " + std::to_string(rows));
    double mx = 0.0;
    int64_t n = 0, nan_mismatch = 0;
    for (int64_t i = 0; i < rows * a.width(); ++i) {
        const float x = float_at(a, i), y = float_at(b, i);
        if (std::isnan(x) || std::isnan(y)) {
            if (std::isnan(x) != std::isnan(y)) ++nan_mismatch;
            continue;
        }
        mx = std::max(mx, std::fabs((double)x - (double)y));
        ++n;
    }
    std::printf("max_abs %.6g compared %lld nan_mismatch %lld\n", mx, (long long)n, (long long)nan_mismatch);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const std::string cmd = argc > 1 ? argv[1] : "";
        if (cmd == "head" && argc == 5) return head(argv[2], std::stoll(argv[3]), argv[4]);
        if (cmd == "maxdiff" && (argc == 4 || argc == 5)) return maxdiff(argv[2], argv[3], argc == 5 ? std::stoll(argv[4]) : -1);
        std::fprintf(stderr, "usage: llama2c_npy_tool head DATA_DIR K OUT_DIR | maxdiff A.npy B.npy [ROWS]\n");
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "llama2c_npy_tool: %s\n", e.what());
        return 1;
    }
}
