// Writes the seed corpora of the fuzz targets: small valid inputs, one directory per target.
//   make_fuzz_corpus OUT_DIR      (tests/fuzz/corpus is this program's output, checked in)
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "collapse/collapse.h"
#include "io/tensor_file.hpp"

namespace {

using namespace collapse::internal::io;

void write(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), (std::streamsize)bytes.size());
    if (!out) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(1);
    }
}

void check(collapse_status st) {
    if (st != COLLAPSE_OK) {
        std::fprintf(stderr, "make_fuzz_corpus: %s\n", collapse_last_error());
        std::exit(1);
    }
}

void npy(const std::string& dir) {
    std::vector<float> f(4 * 3);
    for (size_t i = 0; i < f.size(); ++i) f[i] = (float)i * 0.25f;
    write_npy(dir + "/f32_4x3.npy", COLLAPSE_F32, {4, 3}, f.data());
    write_npy(dir + "/i32_5.npy", COLLAPSE_I32, {5}, std::vector<int32_t>{0, 1, 2, 3, 4}.data());
    write_npy(dir + "/i64_3x1.npy", COLLAPSE_I64, {3, 1}, std::vector<int64_t>{7, 8, 9}.data());
    write_npy(dir + "/f16_2x2x2.npy", COLLAPSE_F16, {2, 2, 2}, std::vector<uint16_t>(8, 0x3c00).data());
    write_npy(dir + "/bool_3.npy", COLLAPSE_BOOL, {3}, std::string("\1\0\1", 3).data());
    write_npy(dir + "/f64_scalar.npy", COLLAPSE_F64, {}, std::vector<double>{2.5}.data());
    write_npy(dir + "/u8_0x4.npy", COLLAPSE_U8, {0, 4}, f.data());
}

void safetensors(const std::string& dir) {
    {
        SafetensorsWriter w(dir + "/rows.safetensors", {{"features", COLLAPSE_F32, {4, 3}}, {"labels", COLLAPSE_I64, {4}}});
        std::vector<float> f(12, 0.5f);
        w.append(f.data(), f.size() * 4);
        std::vector<int64_t> l = {0, 1, 2, 1};
        w.append(l.data(), l.size() * 8);
        w.close();
    }
    {
        SafetensorsWriter w(dir + "/seq.safetensors", {{"hidden", COLLAPSE_BF16, {2, 3, 2}},
                                                       {"input_ids", COLLAPSE_I32, {2, 3}},
                                                       {"attention_mask", COLLAPSE_BOOL, {2, 3}}});
        std::vector<uint16_t> h(12, 0x3f80);
        w.append(h.data(), h.size() * 2);
        std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6};
        w.append(ids.data(), ids.size() * 4);
        w.append("\1\1\1\1\1\0", 6);
        w.close();
    }
    const std::string json = R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})";
    std::string len(8, '\0');
    for (int i = 0; i < 8; ++i) len[(size_t)i] = (char)((json.size() >> (8 * i)) & 0xff);
    write(dir + "/metadata.safetensors", len + json + std::string("\0\x3c\0\x3c", 4));
}

void config(const std::string& dir) {
    write(dir + "/small.yaml", "num_classes: 16\nbatch_rows: 1024\nsvd_mode: sampled\nsvd_max_rows_per_token: 64\n");
    write(dir + "/lists.yaml", "exclude_token_ids: [0, 1, 2]\nmin_samples_per_token: 3\ncompute_nc4: true\n");
    write(dir + "/memory.yaml", "host_memory_limit: 64MiB\nnonfinite_policy: skip_row\nbackend: cpu\n");
}

void capi(const std::string& dir) {
    std::mt19937 rng(7);
    for (int i = 0; i < 8; ++i) {
        std::string s(256 + 64 * i, '\0');
        for (char& c : s) c = (char)(rng() & 0xff);
        // Mostly valid options: V = 6, small dims.
        s[0] = 0;
        s[1] = 7;
        write(dir + "/random_" + std::to_string(i), s);
    }
}

// Checkpoints of sessions with V = 8 (fuzz_checkpoint.cpp's kV), d = 4.
void checkpoint(const std::string& dir) {
    const int64_t V = 8, d = 4, n = 24;
    std::vector<float> x((size_t)(n * d)), w((size_t)(V * d));
    std::vector<int32_t> y((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        y[(size_t)i] = (int32_t)(i % V);
        for (int64_t k = 0; k < d; ++k) x[(size_t)(i * d + k)] = (float)std::sin((double)(i * 5 + k));
    }
    for (size_t i = 0; i < w.size(); ++i) w[i] = (float)std::cos((double)i);
    for (int mode = 0; mode < 3; ++mode) {
        collapse_options o;
        check(collapse_options_default(&o));
        o.num_classes = V;
        o.svd_mode = (collapse_svd_mode)mode;
        o.svd_max_rows_per_token = 4;
        collapse_session* s = nullptr;
        check(collapse_session_create(&o, &s));
        const collapse_buffer f{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, d, 0};
        const collapse_buffer l{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
        check(collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr));
        const collapse_buffer wb{w.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, V, d, 0};
        if (mode != 1) check(collapse_session_set_classifier(s, &wb, nullptr));
        check(collapse_session_save(s, (dir + "/svd_mode_" + std::to_string(mode) + ".ckpt").c_str()));
        collapse_session_destroy(s);
    }
    // Open windows (fuzz_checkpoint.cpp's window_size 4): two sequences, one with reduced windows,
    // one waiting behind a gap at position 2 (so every window_* section has content).
    collapse_options o;
    check(collapse_options_default(&o));
    o.num_classes = V;
    o.window_size = 4;
    collapse_session* s = nullptr;
    check(collapse_session_create(&o, &s));
    std::vector<int64_t> seq((size_t)n), pos((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        seq[(size_t)i] = i < 14 ? 3 : -9;
        pos[(size_t)i] = i < 14 ? i : (i - 14 < 2 ? i - 14 : i - 14 + 1);
    }
    const collapse_buffer f{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, d, 0};
    const collapse_buffer l{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
    const collapse_buffer sb{seq.data(), COLLAPSE_I64, COLLAPSE_MEMORY_HOST, n, 1, 0};
    const collapse_buffer pb{pos.data(), COLLAPSE_I64, COLLAPSE_MEMORY_HOST, n, 1, 0};
    check(collapse_session_ingest_tagged_rows(s, &f, &l, nullptr, &sb, &pb, nullptr));
    check(collapse_session_save(s, (dir + "/windows.ckpt").c_str()));
    collapse_session_destroy(s);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_fuzz_corpus OUT_DIR\n");
        return 2;
    }
    const std::string out = argv[1];
    const std::pair<const char*, void (*)(const std::string&)> targets[] = {
        {"fuzz_npy", npy}, {"fuzz_safetensors", safetensors}, {"fuzz_config", config},
        {"fuzz_capi_ingest", capi}, {"fuzz_checkpoint", checkpoint}};
    ::mkdir(out.c_str(), 0755);
    for (const auto& [name, make] : targets) {
        const std::string dir = out + "/" + name;
        ::mkdir(dir.c_str(), 0755);
        make(dir);
    }
    return 0;
}
