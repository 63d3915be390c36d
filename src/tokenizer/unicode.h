// UTF-8 and Unicode helpers for the tokenizer: validation that never throws (input may be any
// bytes), lossy repair, the GPT-2 byte<->unicode table, and utf8proc normalization forms.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace qf::tok {

// One step of a UTF-8 decoder at s[i]: a valid sequence of `len` bytes, an invalid maximal
// subpart of `len` bytes (replaced by one U+FFFD, as Rust's from_utf8_lossy does), or a sequence
// cut off by the end of the buffer after `len` bytes (it may still complete when more arrives).
struct Utf8Step {
  enum Kind { kValid, kInvalid, kIncomplete } kind;
  size_t len;
  uint32_t cp;  // the code point when kValid
};
Utf8Step utf8_step(std::string_view s, size_t i);

// s with invalid sequences (and a cut-off tail) replaced by U+FFFD.
std::string utf8_lossy(std::string_view s);
// The largest end position >= from such that s[from, end) holds no cut-off sequence at its end;
// bytes after it are the start of a sequence that more bytes could complete.
size_t utf8_complete_end(std::string_view s, size_t from);
void append_utf8(std::string& out, uint32_t cp);

// GPT-2's reversible byte -> printable code point table used by byte-level BPE.
const std::array<std::string, 256>& byte_to_unicode();
// Inverse of byte_to_unicode for one code point; -1 when cp is not in the table.
int unicode_to_byte(uint32_t cp);

enum class NormForm { kNFC, kNFD, kNFKC, kNFKD };
// Unicode normalization via utf8proc. Input that is not valid UTF-8 is returned unchanged
// (the tokenizer must not fail on arbitrary bytes).
std::string normalize_unicode(std::string_view s, NormForm form);
std::string lowercase_unicode(std::string_view s);

}  // namespace qf::tok
