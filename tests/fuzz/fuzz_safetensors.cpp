// libFuzzer: the .safetensors reader (JSON header, offsets, shapes) on arbitrary file contents.
#include "base/error.hpp"
#include "fuzz_common.hpp"
#include "io/tensor_file.hpp"
#include "tensor_checks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const fuzz::ScratchFile file(".safetensors");
    file.write(data, size);
    try {
        const collapse::internal::io::SafetensorsFile f(file.path());
        for (const std::string& name : f.names()) fuzz::check_tensor(f.tensor(name));
        (void)f.tensor("no such tensor");  // the refusal lists the names
    } catch (const collapse::internal::Error&) {
    }
    return 0;
}
