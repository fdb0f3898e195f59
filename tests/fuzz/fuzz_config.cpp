// libFuzzer: the YAML config parser and validation on arbitrary text. Only collapse's own Error may
// come out; a yaml-cpp exception or a crash is a finding.
#include <string>

#include "base/error.hpp"
#include "core/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        const collapse::internal::Config c = collapse::internal::parse_yaml(std::string((const char*)data, size), "fuzz.yaml");
        collapse::internal::validate(c);
    } catch (const collapse::internal::Error&) {
    }
    return 0;
}
