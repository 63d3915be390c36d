#include "core/error.h"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace qf {

namespace {

// Length of the valid UTF-8 sequence at s[i] and its code point, or 0 when s[i] does not start
// one (stray continuation byte, overlong form, surrogate, beyond U+10FFFF, cut off).
size_t utf8_valid_len(std::string_view s, size_t i, uint32_t* cp) {
  const auto b0 = static_cast<uint8_t>(s[i]);
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1, *cp = b0 & 0x1Fu;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2, *cp = b0 & 0x0Fu;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3, *cp = b0 & 0x07u;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + need >= s.size()) return 0;
  for (size_t k = 1; k <= need; ++k) {
    const auto c = static_cast<uint8_t>(s[i + k]);
    if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) return 0;
    *cp = (*cp << 6) | (c & 0x3Fu);
  }
  return need + 1;
}

// Code points a terminal acts on instead of showing: C1 controls, line/paragraph separators and
// the bidirectional overrides/isolates (which can make a line read differently from its bytes).
bool is_format_control(uint32_t cp) {
  return (cp >= 0x80 && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029 || (cp >= 0x202A && cp <= 0x202E) ||
         (cp >= 0x2066 && cp <= 0x2069);
}

void append_hex(std::string& out, uint8_t b) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "\\x%02X", b);
  out += buf;
}

}  // namespace

std::string escape_text(std::string_view s, size_t max_bytes) {
  std::string out;
  out.reserve(s.size() < 256 ? s.size() + 8 : 256);
  size_t i = 0;
  while (i < s.size()) {
    if (out.size() >= max_bytes) {
      out += str("... (", s.size() - i, " more bytes)");
      break;
    }
    const auto b = static_cast<uint8_t>(s[i]);
    if (b >= 0x20 && b < 0x7F) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    uint32_t cp = 0;
    const size_t len = b >= 0x80 ? utf8_valid_len(s, i, &cp) : 0;
    if (len == 0) {  // C0 control, DEL, or a byte that is not valid UTF-8
      append_hex(out, b);
      ++i;
    } else if (is_format_control(cp)) {
      for (size_t k = 0; k < len; ++k) append_hex(out, static_cast<uint8_t>(s[i + k]));
      i += len;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  return out;
}

std::string errno_message(int err) {
  switch (err) {
    case ENOENT: return "no such file";
    case EACCES: case EPERM: return "permission denied";
    case EISDIR: return "is a directory";
    case ENOTDIR: return "a parent folder is not a directory";
    case ELOOP: return "too many levels of symbolic links";
    case ENAMETOOLONG: return "file name too long";
    case EMFILE: case ENFILE: return "too many open files";
    default: {
      std::string s = std::strerror(err);
      if (!s.empty() && s[0] >= 'A' && s[0] <= 'Z') s[0] = static_cast<char>(s[0] - 'A' + 'a');
      return s;
    }
  }
}

std::string quote_for_error(std::string_view s) {
  constexpr size_t kMaxQuoted = 200;
  size_t n = s.size();
  if (n > kMaxQuoted) {
    n = kMaxQuoted;
    while (n > 0 && (static_cast<uint8_t>(s[n]) & 0xC0) == 0x80) --n;  // not inside a UTF-8 sequence
  }
  std::string out = str("'", escape_text(s.substr(0, n)), "'");
  if (n < s.size()) out += str("... (", s.size(), " bytes)");
  return out;
}

}  // namespace qf
