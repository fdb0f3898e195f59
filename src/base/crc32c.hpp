// CRC32C, the checksum of checkpoint sections and spill extents.
#pragma once
#include <cstddef>
#include <cstdint>

namespace collapse::internal {

// CRC32C (Castagnoli). crc32c(data, n) is the checksum of a whole buffer; pass the previous result
// as `crc` to continue over a following buffer: crc32c(b, nb, crc32c(a, na)) == crc32c(a+b).
// Uses the SSE4.2 instruction where the CPU has it, else the table-driven slicing-by-8 code.
uint32_t crc32c(const void* data, size_t bytes, uint32_t crc = 0);
// The portable table-driven code alone (tests compare the two).
uint32_t crc32c_software(const void* data, size_t bytes, uint32_t crc = 0);

}  // namespace collapse::internal
