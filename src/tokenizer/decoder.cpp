// Decoders of tokenizer.json (HF decode_chain), keeping bytes raw until the caller repairs them.
#include "core/error.h"
#include "tokenizer/json_util.h"
#include "tokenizer/pipeline.h"
#include "tokenizer/unicode.h"

namespace qf::tok {

namespace {
int hex_val(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}
// "<0xAB>" -> 0xAB, else -1.
int byte_token_value(const std::string& t) {
  if (t.size() != 6 || t[0] != '<' || t[1] != '0' || t[2] != 'x' || t[5] != '>') return -1;
  const int hi = hex_val(t[3]), lo = hex_val(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}
void replace_in_place(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty() || s.find(from) == std::string::npos) return;
  std::string out;
  size_t pos = 0, hit;
  while ((hit = s.find(from, pos)) != std::string::npos) {
    out.append(s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}
}  // namespace

void Decoder::parse(const json& j, const std::string& where) {
  if (!j.is_null()) parse_one(j, where);
}

void Decoder::set_byte_level() {
  steps_.emplace_back(Step::kByteLevel);
  byte_level_ = true;
}

void Decoder::parse_one(const json& j, const std::string& where) {
  const std::string type = j.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const auto& d : j.at("decoders")) parse_one(d, where);
  } else if (type == "Replace") {
    const json& pat = j.at("pattern");
    if (!pat.contains("String")) fail(where, ": decoder Replace: only String patterns are supported");
    steps_.emplace_back(Step::kReplace, pat.at("String").get<std::string>(),
                      j.at("content").get<std::string>());
  } else if (type == "ByteFallback") {
    steps_.emplace_back(Step::kByteFallback);
  } else if (type == "Fuse") {
    steps_.emplace_back(Step::kFuse);
  } else if (type == "Strip") {
    Step st(Step::kStrip, jstr(j, "content", " "));
    st.start = jsize(j, "start", 0, where);
    st.stop = jsize(j, "stop", 0, where);
    steps_.push_back(std::move(st));
  } else if (type == "ByteLevel") {
    set_byte_level();
  } else if (type == "Metaspace") {
    Step st(Step::kMetaspace, jstr(j, "replacement", "\xE2\x96\x81"), " ");
    if (j.contains("prepend_scheme") && !j.at("prepend_scheme").is_null())
      st.strip_first = j.at("prepend_scheme").get<std::string>() != "never";
    else
      st.strip_first = jbool(j, "add_prefix_space", true);
    steps_.push_back(std::move(st));
  } else {
    fail(where, ": unsupported decoder type ", quote_for_error(type));
  }
}

std::string Decoder::apply(std::vector<std::string> toks) const {
  if (steps_.empty()) {  // HF without a decoder joins tokens with spaces
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      if (i) out += ' ';
      out += toks[i];
    }
    return out;
  }
  for (const Step& st : steps_) {
    switch (st.kind) {
      case Step::kReplace:
        for (auto& t : toks) replace_in_place(t, st.a, st.b);
        break;
      case Step::kByteFallback: {
        std::vector<std::string> out;
        out.reserve(toks.size());
        bool in_bytes = false;  // consecutive byte tokens fuse into one piece
        for (auto& t : toks) {
          const int v = byte_token_value(t);
          if (v >= 0) {
            if (!in_bytes) out.emplace_back();
            out.back() += static_cast<char>(v);
            in_bytes = true;
          } else {
            out.push_back(std::move(t));
            in_bytes = false;
          }
        }
        toks = std::move(out);
        break;
      }
      case Step::kFuse: {
        std::string all;
        for (auto& t : toks) all += t;
        toks.assign(1, std::move(all));
        break;
      }
      case Step::kStrip:
        for (auto& t : toks) {
          size_t b = 0, e = t.size();
          const size_t n = st.a.size();
          for (size_t k = 0; k < st.start && n && e - b >= n && t.compare(b, n, st.a) == 0; ++k) b += n;
          for (size_t k = 0; k < st.stop && n && e - b >= n && t.compare(e - n, n, st.a) == 0; ++k) e -= n;
          t = t.substr(b, e - b);
        }
        break;
      case Step::kByteLevel:
        for (auto& t : toks) {
          std::string bytes;
          bytes.reserve(t.size());
          bool ok = true;
          for (size_t i = 0; i < t.size() && ok;) {
            const Utf8Step u = utf8_step(t, i);
            const int b = u.kind == Utf8Step::kValid ? unicode_to_byte(u.cp) : -1;
            if (b < 0) ok = false;
            else bytes += static_cast<char>(b);
            i += u.len;
          }
          if (ok) t = std::move(bytes);  // else: not a byte-level string (added token): as is
        }
        break;
      case Step::kMetaspace:
        // As HF: in the first token every replacement char is dropped (not only a leading one).
        for (size_t i = 0; i < toks.size(); ++i)
          replace_in_place(toks[i], st.a, i == 0 && st.strip_first ? std::string() : st.b);
        break;
    }
  }
  std::string out;
  for (auto& t : toks) out += t;
  return out;
}

}  // namespace qf::tok
