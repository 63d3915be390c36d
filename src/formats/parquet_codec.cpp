#include "formats/parquet_codec.h"

#include <snappy-c.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "formats/parquet_meta.h"

namespace qf::parquet {

namespace {

// A growing output buffer for the streaming codecs: starts near the input's size and doubles up
// to expected + 1 bytes (the extra byte is how an over-long stream is detected).
class GrowingOutput {
 public:
  GrowingOutput(std::vector<uint8_t>* out, size_t in_size, size_t expected)
      : out_(out), limit_(expected + 1) {
    out_->resize(std::min(limit_, std::max<size_t>(64 << 10, in_size * 4)));
  }
  // Makes room after `used` bytes; false when the buffer is already at its limit.
  bool grow(size_t used) {
    if (used < out_->size()) return true;
    if (out_->size() >= limit_) return false;
    out_->resize(std::min(limit_, out_->size() * 2));
    return true;
  }
  uint8_t* data() { return out_->data(); }
  size_t size() const { return out_->size(); }

 private:
  std::vector<uint8_t>* out_;
  size_t limit_;
};

[[noreturn]] void too_long(const char* codec, size_t expected) {
  fail(codec, " data decompresses to more than the ", expected, " bytes the page header states");
}

void check_size(const char* codec, size_t got, size_t expected) {
  if (got > expected) too_long(codec, expected);
  if (got != expected) fail(codec, " data decompresses to ", got, " bytes, the page header states ", expected);
}

void snappy_decompress(const uint8_t* in, size_t n, size_t expected, std::vector<uint8_t>* out) {
  const char* src = reinterpret_cast<const char*>(in);
  size_t len = 0;
  if (snappy_uncompressed_length(src, n, &len) != SNAPPY_OK) fail("corrupt SNAPPY data (bad length header)");
  check_size("SNAPPY", len, expected);  // before allocating: the length is the stream's first varint
  // A snappy element of 3 bytes makes at most 64, so a stream claiming more than 32 times its size
  // lies; refused before the buffer for it is allocated.
  if (len / 32 > n) fail("corrupt SNAPPY data (", n, " bytes cannot hold ", len, ")");
  out->resize(std::max<size_t>(len, 1));  // never a null buffer, even for an empty stream
  if (snappy_uncompress(src, n, reinterpret_cast<char*>(out->data()), &len) != SNAPPY_OK || len != expected)
    fail("corrupt SNAPPY data");
  out->resize(len);
}

void gzip_decompress(const uint8_t* in, size_t n, size_t expected, std::vector<uint8_t>* out) {
  z_stream zs{};
  if (inflateInit2(&zs, 15 + 32) != Z_OK) fail("zlib: cannot start inflate");  // 15+32: gzip or zlib header
  std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&zs, inflateEnd);
  GrowingOutput buf(out, n, expected);
  zs.next_in = const_cast<Bytef*>(in);
  zs.avail_in = static_cast<uInt>(n);
  size_t used = 0;
  for (;;) {
    if (!buf.grow(used)) too_long("GZIP", expected);
    zs.next_out = buf.data() + used;
    zs.avail_out = static_cast<uInt>(buf.size() - used);
    const int ret = inflate(&zs, Z_NO_FLUSH);
    used = buf.size() - zs.avail_out;
    if (ret == Z_STREAM_END) {
      if (zs.avail_in == 0) break;
      inflateReset(&zs);  // another gzip member follows (concatenated members are one stream)
      continue;
    }
    if (ret == Z_OK) continue;
    if (ret == Z_BUF_ERROR && zs.avail_out == 0) continue;  // needs room: grow
    if (ret == Z_BUF_ERROR) fail("truncated GZIP data");
    fail("corrupt GZIP data (", zs.msg ? zs.msg : "zlib error", ")");
  }
  check_size("GZIP", used, expected);
  out->resize(used);
}

void zstd_decompress(const uint8_t* in, size_t n, size_t expected, std::vector<uint8_t>* out) {
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!ctx) fail("zstd: cannot create a decompression context");
  // A frame that declares more content than the page holds is refused before zstd sizes its
  // window for it; the window itself stays within zstd's default limit (128 MiB).
  const unsigned long long declared = ZSTD_getFrameContentSize(in, n);
  if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != ZSTD_CONTENTSIZE_ERROR && declared > expected)
    too_long("ZSTD", expected);
  GrowingOutput buf(out, n, expected);
  ZSTD_inBuffer src{in, n, 0};
  size_t used = 0;
  for (;;) {
    if (!buf.grow(used)) too_long("ZSTD", expected);
    ZSTD_outBuffer dst{buf.data(), buf.size(), used};
    const size_t ret = ZSTD_decompressStream(ctx.get(), &dst, &src);
    if (ZSTD_isError(ret)) fail("corrupt ZSTD data (", ZSTD_getErrorName(ret), ")");
    used = dst.pos;
    if (src.pos == src.size && ret == 0) break;  // every frame complete
    if (src.pos == src.size && dst.pos < dst.size) fail("truncated ZSTD data");
  }
  check_size("ZSTD", used, expected);
  out->resize(used);
}

}  // namespace

bool codec_supported(int32_t codec) {
  return codec == kUncompressed || codec == kSnappy || codec == kGzip || codec == kZstd;
}

void decompress(int32_t codec, const uint8_t* in, size_t in_size, size_t expected, std::vector<uint8_t>* out) {
  out->clear();
  if (in_size == 0 && expected == 0) return;  // nothing was compressed (an empty stream is not valid input)
  switch (codec) {
    case kUncompressed:
      check_size("UNCOMPRESSED", in_size, expected);
      out->assign(in, in + in_size);
      return;
    case kSnappy: return snappy_decompress(in, in_size, expected, out);
    case kGzip: return gzip_decompress(in, in_size, expected, out);
    case kZstd: return zstd_decompress(in, in_size, expected, out);
    default:
      fail("codec ", codec_name(codec), " is not supported (qforge reads UNCOMPRESSED, SNAPPY, GZIP and ZSTD)");
  }
}

}  // namespace qf::parquet
