#include "npy.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace llama2c {

namespace {

[[noreturn]] void bad(const std::string& path, const std::string& what) {
    throw std::runtime_error(path + ": " + what);
}

// The value text of 'key' in the header dict, up to the next ',' or '}' outside brackets.
std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
    const size_t k = header.find("'" + key + "'");
    if (k == std::string::npos) bad(path, "npy header lacks '" + key + "'");
    size_t i = header.find(':', k);
    if (i == std::string::npos) bad(path, "malformed npy header");
    ++i;
    int depth = 0;
    size_t j = i;
    for (; j < header.size(); ++j) {
        const char c = header[j];
        if (c == '(' || c == '[') ++depth;
        else if (c == ')' || c == ']') --depth;
        else if ((c == ',' || c == '}') && depth == 0) break;
    }
    std::string v = header.substr(i, j - i);
    const size_t a = v.find_first_not_of(" \t"), b = v.find_last_not_of(" \t");
    return a == std::string::npos ? std::string() : v.substr(a, b - a + 1);
}

}  // namespace

int64_t NpyArray::count() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
}

NpyArray read_npy(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) bad(path, "cannot open (" + std::string(std::strerror(errno)) + ")");
    char magic[8];
    if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) bad(path, "not a .npy file (bad magic)");
    const int major = (unsigned char)magic[6];
    uint32_t hlen = 0;
    if (major == 1) {
        unsigned char b[2];
        if (!in.read((char*)b, 2)) bad(path, "truncated npy header");
        hlen = b[0] | (b[1] << 8);
    } else if (major == 2 || major == 3) {
        unsigned char b[4];
        if (!in.read((char*)b, 4)) bad(path, "truncated npy header");
        hlen = b[0] | (b[1] << 8) | (b[2] << 16) | ((uint32_t)b[3] << 24);
    } else {
        bad(path, "unsupported npy version " + std::to_string(major));
    }
    if (hlen > (1u << 20)) bad(path, "npy header too long");
    std::string header(hlen, '\0');
    if (!in.read(header.data(), hlen)) bad(path, "truncated npy header");

    NpyArray a;
    std::string descr = header_value(header, "descr", path);
    if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"')) bad(path, "malformed npy descr " + descr);
    a.descr = descr.substr(1, descr.size() - 2);
    if (header_value(header, "fortran_order", path) != "False") bad(path, "Fortran-order arrays are not supported");
    std::string shape = header_value(header, "shape", path);
    if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') bad(path, "malformed npy shape " + shape);
    shape = shape.substr(1, shape.size() - 2);
    size_t p = 0;
    while (p < shape.size()) {
        const size_t q = shape.find(',', p);
        std::string item = shape.substr(p, q == std::string::npos ? std::string::npos : q - p);
        const size_t s = item.find_first_not_of(' ');
        if (s != std::string::npos) {
            char* end = nullptr;
            const long long v = std::strtoll(item.c_str() + s, &end, 10);
            if (v < 0 || end == item.c_str() + s) bad(path, "malformed npy shape (" + shape + ")");
            a.shape.push_back(v);
        }
        if (q == std::string::npos) break;
        p = q + 1;
    }
    int item = 0;
    if (a.descr == "<f4" || a.descr == "<i4" || a.descr == "<u4") item = 4;
    else if (a.descr == "<f8" || a.descr == "<i8" || a.descr == "<u8") item = 8;
    else if (a.descr == "<f2" || a.descr == "<i2" || a.descr == "<u2") item = 2;
    else if (a.descr == "|u1" || a.descr == "|i1" || a.descr == "|b1") item = 1;
    else bad(path, "unsupported npy dtype '" + a.descr + "'");
    const int64_t n = a.count();
    if (n > (int64_t(1) << 40) / item) bad(path, "npy array too large");
    const std::streamoff start = in.tellg();
    in.seekg(0, std::ios::end);
    const std::streamoff size = in.tellg();
    if (size - start != n * item)
        bad(path, "holds " + std::to_string(size - start) + " data bytes, the header's shape needs " + std::to_string(n * item));
    in.seekg(start);
    a.bytes.resize((size_t)(n * item));
    if (n > 0 && !in.read(a.bytes.data(), n * item)) bad(path, "read failed");
    return a;
}

std::vector<int64_t> read_npy_ints(const std::string& path) {
    const NpyArray a = read_npy(path);
    if (a.shape.size() != 1)
        bad(path, "expected a 1-D array, got " + std::to_string(a.shape.size()) + " dimensions");
    std::vector<int64_t> v((size_t)a.count());
    if (a.descr == "<i4") {
        for (size_t i = 0; i < v.size(); ++i) {
            int32_t x;
            std::memcpy(&x, a.bytes.data() + 4 * i, 4);
            v[i] = x;
        }
    } else if (a.descr == "<i8") {
        std::memcpy(v.data(), a.bytes.data(), 8 * v.size());
    } else {
        bad(path, "dtype '" + a.descr + "' is not int32 (<i4) or int64 (<i8)");
    }
    return v;
}

void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
    std::string dims;
    int64_t n = 1;
    for (int64_t s : shape) {
        dims += std::to_string(s) + ",";
        n *= s;
    }
    if (shape.size() > 1) dims.pop_back();
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
    // Total header (magic + 2 + text + '\n') padded to a multiple of 64.
    const size_t unpadded = 10 + header.size() + 1;
    header.append((64 - unpadded % 64) % 64, ' ');
    header += '\n';
    const std::string tmp = path + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) bad(path, "cannot create (" + std::string(std::strerror(errno)) + ")");
        out.write("\x93NUMPY\x01\x00", 8);
        const unsigned char len[2] = {(unsigned char)(header.size() & 0xff), (unsigned char)(header.size() >> 8)};
        out.write((const char*)len, 2);
        out.write(header.data(), (std::streamsize)header.size());
        out.write((const char*)data, (std::streamsize)(n * 4));
        out.close();
        if (!out) {
            std::remove(tmp.c_str());
            bad(path, "write failed");
        }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        bad(path, "cannot rename the temporary file into place");
    }
}

}  // namespace llama2c
