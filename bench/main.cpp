// collapse_bench: the engine's throughput, each figure printed next to the ceiling it is measured
// against (measured in the same run, on the same buffers) and the ratio. bench/README.md explains
// every figure. Inputs come from SynthGenerator (core/synth.hpp) and are generated before any
// timing starts. This file holds the options, the header of the output, the JSON file and the
// dispatch; each figure family is in its own file (common.hpp lists them).
//
//   collapse_bench [--quick] [--backend cpu|cuda] [--only ingest|gram|finalize|pairs|svd|nc4|spill|checkpoint|e2e]
//                  [--scratch DIR] [--json FILE]
//
// --backend cuda measures a different set of figures (C1 fp16 device ingest vs. D2D copy, C2 pair
// metrics vs. the same tile GEMMs, C3 per-token SVD and its cuSOLVER share, C4 end to end file ->
// report vs. read + solver + GEMM floor: cuda_bench.cpp).
#include <cblas.h>
#include <omp.h>
#include <sys/utsname.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "common.hpp"
#include "cpu/blas_setup.hpp"

#ifdef COLLAPSE_BENCH_CUDA
#include "cuda_helpers.hpp"
#endif

#ifndef COLLAPSE_BENCH_BUILD_TYPE
#define COLLAPSE_BENCH_BUILD_TYPE "unknown"
#endif
#ifndef COLLAPSE_BENCH_CXX_FLAGS
#define COLLAPSE_BENCH_CXX_FLAGS ""
#endif
#ifndef COLLAPSE_BENCH_COMPILER
#define COLLAPSE_BENCH_COMPILER ""
#endif

using namespace bench;

namespace {

std::string cpu_model() {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("model name", 0) == 0) {
            const auto p = line.find(':');
            if (p != std::string::npos) return line.substr(p + 2);
        }
    return "unknown";
}

std::string now_string() {
    char buf[64];
    const std::time_t t = std::time(nullptr);
    std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S %Z", std::localtime(&t));
    return buf;
}

int usage(const char* argv0, const char* why) {
    if (why) std::fprintf(stderr, "collapse_bench: %s\n", why);
    std::fprintf(stderr, "usage: %s [--quick] [--backend cpu|cuda] [--only ingest|gram|finalize|pairs|svd|nc4|spill|checkpoint|e2e]"
                         " [--scratch DIR] [--json FILE]\n", argv0);
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    // As the CLI does: BLAS kernels for this CPU, quiet worker threads (cpu/blas_setup.hpp).
    const std::string blas_setup = collapse::internal::cpu::setup_process_blas();
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&](const char* flag) -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(std::string(flag) + " needs a value");
            return argv[++i];
        };
        try {
            if (a == "--quick") o.quick = true;
            else if (a == "--backend") {
                const std::string b = value("--backend");
                if (b != "cpu" && b != "cuda") return usage(argv[0], "--backend must be cpu or cuda");
                o.cuda = b == "cuda";
            } else if (a == "--only") {
                o.only = value("--only");
                if (o.only == "pairs") o.only = "finalize";
                if (o.only != "ingest" && o.only != "gram" && o.only != "finalize" && o.only != "svd" && o.only != "nc4" && o.only != "spill" &&
                    o.only != "checkpoint" && o.only != "e2e")
                    return usage(argv[0], "--only must be ingest, gram, finalize (or pairs), svd, nc4, spill, checkpoint or e2e (cuda)");
            } else if (a == "--json") o.json_path = value("--json");
            else if (a == "--scratch") o.scratch = value("--scratch");
            else if (a == "-h" || a == "--help") return usage(argv[0], nullptr), 0;
            else return usage(argv[0], ("unknown argument " + a).c_str());
        } catch (const std::exception& e) {
            return usage(argv[0], e.what());
        }
    }

    if (o.scratch.empty()) o.scratch = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
    json out;
    const std::string model = cpu_model();
    const unsigned hw = std::thread::hardware_concurrency();
    utsname un{};
    uname(&un);
    std::printf("collapse_bench  %s\n", now_string().c_str());
    std::printf("machine: %s, %u logical cores (online), %s %s\n", model.c_str(), hw, un.sysname, un.release);
    std::printf("build:   %s (%s; flags: %s), collapse %s\n", COLLAPSE_BENCH_BUILD_TYPE, COLLAPSE_BENCH_COMPILER,
                COLLAPSE_BENCH_CXX_FLAGS, collapse_version_string());
    std::printf("threads: OpenMP max %d, OpenBLAS %d (%s)\n", omp_get_max_threads(), openblas_get_num_threads(),
                openblas_get_config());
    if (!blas_setup.empty()) std::printf("blas:    %s (cpu/blas_setup.hpp, as the CLI)\n", blas_setup.c_str());
    std::printf("backend: %s%s\n", o.cuda ? "cuda" : "cpu", o.quick ? "  (--quick: smaller sizes)" : "");
    std::printf("inputs:  SynthGenerator (core/synth.hpp), Zipf(%.1f) labels, collapse %.1f, seed %llu, float32 rows\n", kZipf,
                kCollapse, (unsigned long long)kSeed);
    out["date"] = now_string();
    out["machine"] = {{"cpu", model}, {"logical_cores", hw}, {"kernel", un.release}};
    out["build"] = {{"type", COLLAPSE_BENCH_BUILD_TYPE}, {"compiler", COLLAPSE_BENCH_COMPILER}, {"flags", COLLAPSE_BENCH_CXX_FLAGS},
                    {"version", collapse_version_string()}};
    out["threads"] = {{"openmp", omp_get_max_threads()}, {"openblas", openblas_get_num_threads()}};
    out["backend"] = o.cuda ? "cuda" : "cpu";
    out["quick"] = o.quick;
    out["inputs"] = {{"generator", "SynthGenerator"}, {"zipf_s", kZipf}, {"collapse", kCollapse}, {"seed", kSeed}};

    if (o.cuda) {
        if (!collapse_backend_available("cuda")) {
            std::printf("cuda backend not built/available: skipping every figure\n");
            out["skipped"] = "cuda backend not built/available";
            if (!o.json_path.empty()) std::ofstream(o.json_path) << out.dump(2) << "\n";
            return 0;
        }
#ifdef COLLAPSE_BENCH_CUDA
        std::string name, why;
        double gib = 0;
        if (bench_cuda::device_info(&name, &gib, &why)) {
            std::printf("device:  %s, %.1f GiB\n", name.c_str(), gib);
            out["device"] = {{"name", name}, {"memory_gib", gib}};
        }
#else
        std::printf("cuda backend available but collapse_bench was built without the CUDA toolkit: skipping\n");
        out["skipped"] = "collapse_bench built without CUDA";
        if (!o.json_path.empty()) std::ofstream(o.json_path) << out.dump(2) << "\n";
        return 0;
#endif
    }

    const auto t0 = Clock::now();
    try {
        if (o.cuda) {
#ifdef COLLAPSE_BENCH_CUDA
            // The three figures of the CUDA issue (bench/README.md): C1 ingest, C2 pair metrics, C3 per-token SVD.
            if (o.only == "gram") std::printf("\n(gram: no CUDA figure; the CUDA figures are ingest, pairs and svd)\n");
            if (o.only.empty() || o.only == "ingest") cuda_ingest(o, out);
            if (o.only.empty() || o.only == "finalize") cuda_pairs(o, out);
            if (o.only.empty() || o.only == "svd") cuda_token_svd(o, out);
            // C4 writes and analyses files (tens of seconds): in a full run, or asked for (--only e2e).
            if ((o.only.empty() && !o.quick) || o.only == "e2e") cuda_end_to_end(o, out);
#endif
        } else {
            if (o.only.empty() || o.only == "ingest") bench_ingest(o, out);
            if (o.only.empty() || o.only == "gram") bench_gram(o, out);
            if (o.only.empty() || o.only == "finalize") bench_finalize(o, out);
            if (o.only.empty() || o.only == "svd") bench_svd(o, out);
            if (o.only.empty() || o.only == "nc4") bench_nc4(o, out);
            if (o.only.empty() || o.only == "spill") bench_spill(o, out);
            if (o.only.empty() || o.only == "checkpoint") bench_checkpoint(o, out);
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "collapse_bench: error: %s\n", e.what());
        return 1;
    }
    std::printf("\ntotal %.1f s, of which %.1f s generating inputs (SynthGenerator, outside every clock)\n", since(t0),
                synth_seconds());
    out["total_seconds"] = since(t0);
    out["input_generation_seconds"] = synth_seconds();
    if (!o.json_path.empty()) {
        std::ofstream f(o.json_path);
        f << out.dump(2) << "\n";
        if (!f) {
            std::fprintf(stderr, "collapse_bench: error: cannot write %s\n", o.json_path.c_str());
            return 1;
        }
        std::printf("figures written to %s\n", o.json_path.c_str());
    }
    return 0;
}
