// libFuzzer: the .npy reader (header parser, size checks, row reads) on arbitrary file contents.
#include "base/error.hpp"
#include "fuzz_common.hpp"
#include "io/tensor_file.hpp"
#include "tensor_checks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const fuzz::ScratchFile file(".npy");
    file.write(data, size);
    try {
        fuzz::check_tensor(collapse::internal::io::open_npy(file.path()));
    } catch (const collapse::internal::Error&) {  // a refusal is the expected outcome
    }
    return 0;
}
