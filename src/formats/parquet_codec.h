// Page decompression for Parquet: UNCOMPRESSED, SNAPPY (libsnappy), GZIP (zlib, concatenated
// members allowed) and ZSTD (libzstd). LZO, BROTLI, LZ4 and LZ4_RAW are refused by name.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qf::parquet {

bool codec_supported(int32_t codec);

// Decompresses `in` into `out`, which must come out exactly `expected` bytes long. Output buffers
// grow with the data actually produced, so a header that claims a huge size costs nothing until
// the stream really expands that far. Throws qf::Error (no file name) on corrupt input or a size
// mismatch, and for an unsupported codec.
void decompress(int32_t codec, const uint8_t* in, size_t in_size, size_t expected, std::vector<uint8_t>* out);

}  // namespace qf::parquet
