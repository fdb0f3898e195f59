// libFuzzer: the checkpoint reader (io::CheckpointReader: header, section table, CRCs) and a
// session loading the file through the C API (collapse_session_load), then computing.
// The seeds are checkpoints of sessions made with kV classes (make_fuzz_corpus.cpp).
#include "base/error.hpp"
#include "collapse/collapse.h"
#include "fuzz_common.hpp"
#include "io/checkpoint_file.hpp"

constexpr int64_t kV = 8;  // the seeds' V (make_fuzz_corpus.cpp)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const fuzz::ScratchFile file(".ckpt");
    file.write(data, size);
    try {
        const collapse::internal::io::CheckpointReader r(file.path());
        for (const std::string& name : r.names()) (void)r.section(name);
    } catch (const collapse::internal::Error&) {
    }
    collapse_options o;
    collapse_options_default(&o);
    o.num_classes = kV;
    o.window_size = 4;  // the window seed's (make_fuzz_corpus.cpp)
    collapse_session* s = nullptr;
    if (collapse_session_create(&o, &s) != COLLAPSE_OK) std::abort();
    if (collapse_session_load(s, file.path().c_str()) == COLLAPSE_OK) {
        collapse_report* rep = nullptr;
        if (collapse_session_compute(s, &rep) == COLLAPSE_OK) collapse_report_destroy(rep);
    }
    collapse_session_destroy(s);
    return 0;
}
