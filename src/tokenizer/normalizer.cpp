// Normalizers of tokenizer.json: the ones Llama/Mistral/Qwen-style BPE files use.
#include "core/error.h"
#include "tokenizer/json_util.h"
#include "tokenizer/pipeline.h"
#include "tokenizer/unicode.h"

namespace qf::tok {

namespace {
std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  if (from.empty()) return std::string(s);
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}
bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
}  // namespace

void Normalizer::parse(const json& j, const std::string& where) {
  if (j.is_null()) return;
  const std::string type = j.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const auto& n : j.at("normalizers")) parse(n, where);
  } else if (type == "Prepend") {
    steps_.emplace_back(Step::kPrepend, j.at("prepend").get<std::string>(), "");
  } else if (type == "Replace") {
    const json& pat = j.at("pattern");
    const std::string content = j.at("content").get<std::string>();
    if (pat.contains("String")) {
      steps_.emplace_back(Step::kReplace, pat.at("String").get<std::string>(), content);
    } else {
      Step st(Step::kReplaceRegex, "", content);
      try {
        st.re = std::make_shared<Regex>(pat.at("Regex").get<std::string>());
      } catch (const Error& e) {
        fail(where, ": normalizer Replace: ", e.what());
      }
      steps_.push_back(std::move(st));
    }
  } else if (type == "NFC") {
    steps_.emplace_back(Step::kNFC, "", "");
  } else if (type == "NFD") {
    steps_.emplace_back(Step::kNFD, "", "");
  } else if (type == "NFKC") {
    steps_.emplace_back(Step::kNFKC, "", "");
  } else if (type == "NFKD") {
    steps_.emplace_back(Step::kNFKD, "", "");
  } else if (type == "Lowercase") {
    steps_.emplace_back(Step::kLowercase, "", "");
  } else if (type == "Strip") {
    Step st(Step::kStrip, "", "");
    st.left = jbool(j, "strip_left", true);
    st.right = jbool(j, "strip_right", true);
    steps_.push_back(std::move(st));
  } else {
    fail(where, ": unsupported normalizer type ", quote_for_error(type));
  }
}

void Normalizer::add_nfc() { steps_.emplace_back(Step::kNFC, "", ""); }

std::string Normalizer::apply(std::string_view in) const {
  std::string s(in);
  for (const Step& st : steps_) {
    switch (st.kind) {
      case Step::kPrepend:
        if (!s.empty()) s.insert(0, st.a);  // HF prepends only to non-empty text
        break;
      case Step::kReplace:
        s = replace_all(s, st.a, st.b);
        break;
      case Step::kReplaceRegex: {
        std::vector<std::pair<size_t, size_t>> spans;
        st.re->find_all(s, spans);
        std::string out;
        size_t pos = 0;
        for (auto [b, e] : spans) {
          out.append(s, pos, b - pos);
          out += st.b;
          pos = e;
        }
        out.append(s, pos, std::string::npos);
        s = std::move(out);
        break;
      }
      case Step::kNFC: s = normalize_unicode(s, NormForm::kNFC); break;
      case Step::kNFD: s = normalize_unicode(s, NormForm::kNFD); break;
      case Step::kNFKC: s = normalize_unicode(s, NormForm::kNFKC); break;
      case Step::kNFKD: s = normalize_unicode(s, NormForm::kNFKD); break;
      case Step::kLowercase: s = lowercase_unicode(s); break;
      case Step::kStrip: {
        size_t b = 0, e = s.size();
        if (st.left)
          while (b < e && is_space(s[b])) ++b;
        if (st.right)
          while (e > b && is_space(s[e - 1])) --e;
        s = s.substr(b, e - b);
        break;
      }
    }
  }
  return s;
}

}  // namespace qf::tok
