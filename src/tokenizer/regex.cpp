#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace qf::tok {

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

Regex::Regex(const std::string& pattern, bool literal) : pattern_(pattern) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
  if (literal) opts |= PCRE2_LITERAL;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   opts, &err, &err_off, nullptr);
  if (!code) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    fail("regex ", quote_for_error(pattern), " does not compile at offset ", err_off, ": ",
         reinterpret_cast<const char*>(buf));
  }
  // JIT is an optimisation only; the interpreter is used when it is unavailable.
  (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Regex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  auto* code = static_cast<pcre2_code*>(code_);
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t off = 0;
  while (off < s.size()) {
    int rc = pcre2_match(code, subject, s.size(), off, 0, md, nullptr);
    // A JIT stack or heap limit on a huge run: retry with the interpreter before giving up.
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH)
      rc = pcre2_match(code, subject, s.size(), off, PCRE2_NO_JIT, md, nullptr);
    if (rc < 0) break;  // no (more) matches; the rest stays an unmatched gap
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t st = ov[0], en = ov[1];
    if (en <= st) {  // empty match: step over one character so the loop always advances
      if (st >= s.size()) break;
      off = st + utf8_step(s, st).len;
      continue;
    }
    out.emplace_back(st, en);
    off = en;
  }
  pcre2_match_data_free(md);
}

}  // namespace qf::tok
