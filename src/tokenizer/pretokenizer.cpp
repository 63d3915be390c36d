// Pre-tokenizers of tokenizer.json: regex Split, ByteLevel, Metaspace (+ Digits/Whitespace as
// regex splits). Byte-level mapping itself is left to the BPE model, which works on raw bytes.
#include <algorithm>

#include "core/error.h"
#include "tokenizer/json_util.h"
#include "tokenizer/pipeline.h"

namespace qf::tok {

namespace {
std::shared_ptr<Regex> make_regex(const std::string& pattern, bool literal, const std::string& where) {
  try {
    return std::make_shared<Regex>(pattern, literal);
  } catch (const Error& e) {
    fail(where, ": pre_tokenizer: ", e.what());
  }
}
}  // namespace

void PreTokenizer::parse(const json& j, const std::string& where) {
  if (!j.is_null()) parse_one(j, where);
}

void PreTokenizer::set_regex(const std::string& pattern, const std::string& where) {
  Step st(Step::kSplit);
  st.re = make_regex(pattern, false, where);
  steps_.push_back(st);
  Step bl(Step::kByteLevel);
  steps_.push_back(bl);
  byte_level_ = true;
  pattern_ = pattern;
}

void PreTokenizer::parse_one(const json& j, const std::string& where) {
  const std::string type = j.at("type").get<std::string>();
  Step st(Step::kSplit);
  if (type == "Sequence") {
    for (const auto& p : j.at("pretokenizers")) parse_one(p, where);
    return;
  } else if (type == "Split") {
    const json& pat = j.at("pattern");
    if (pat.contains("Regex")) {
      const std::string p = pat.at("Regex").get<std::string>();
      st.re = make_regex(p, false, where);
      if (pattern_.empty()) pattern_ = p;
    } else {
      st.re = make_regex(pat.at("String").get<std::string>(), true, where);
    }
    const std::string b = jstr(j, "behavior", "Isolated");
    if (b == "Isolated") st.behavior = Behavior::kIsolated;
    else if (b == "Removed") st.behavior = Behavior::kRemoved;
    else if (b == "MergedWithPrevious") st.behavior = Behavior::kMergedWithPrevious;
    else if (b == "MergedWithNext") st.behavior = Behavior::kMergedWithNext;
    else if (b == "Contiguous") st.behavior = Behavior::kContiguous;
    else fail(where, ": pre_tokenizer Split: unknown behavior ", quote_for_error(b));
    st.invert = jbool(j, "invert", false);
  } else if (type == "ByteLevel") {
    st.kind = Step::kByteLevel;
    st.add_prefix_space = jbool(j, "add_prefix_space", true);
    if (jbool(j, "use_regex", true)) {
      st.re = make_regex(kGpt2Pattern, false, where);
      if (pattern_.empty()) pattern_ = kGpt2Pattern;
    }
    byte_level_ = true;
  } else if (type == "Metaspace") {
    st.kind = Step::kMetaspace;
    st.replacement = jstr(j, "replacement", "\xE2\x96\x81");
    if (j.contains("prepend_scheme") && !j.at("prepend_scheme").is_null()) {
      const std::string s = j.at("prepend_scheme").get<std::string>();
      st.scheme = s == "first" ? Step::kFirst : s == "never" ? Step::kNever : Step::kAlways;
    } else {  // older files: add_prefix_space
      st.scheme = jbool(j, "add_prefix_space", true) ? Step::kAlways : Step::kNever;
    }
    st.split = jbool(j, "split", true);
  } else if (type == "Digits") {
    st.re = make_regex(jbool(j, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", false, where);
  } else if (type == "Whitespace") {
    st.re = make_regex(R"(\w+|[^\w\s]+)", false, where);
    st.behavior = Behavior::kRemoved;
    st.invert = true;
  } else if (type == "WhitespaceSplit") {
    st.re = make_regex(R"(\s+)", false, where);
    st.behavior = Behavior::kRemoved;
  } else {
    fail(where, ": unsupported pre_tokenizer type ", quote_for_error(type));
  }
  steps_.push_back(std::move(st));
}

void PreTokenizer::apply(std::vector<PreToken>& pieces) const {
  for (const Step& st : steps_) split(st, pieces);
}

void PreTokenizer::split(const Step& st, std::vector<PreToken>& pieces) {
  std::vector<PreToken> out;
  out.reserve(pieces.size());
  std::vector<std::pair<size_t, size_t>> spans;
  for (PreToken& p : pieces) {
    if (p.text.empty()) continue;
    if (st.kind == Step::kByteLevel && st.add_prefix_space && p.text[0] != ' ')
      p.text = " " + p.text;  // (insert(0, ..) trips a GCC -Wrestrict false positive)
    if (st.kind == Step::kMetaspace) {
      std::string t;
      t.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ') t += st.replacement;
        else t += c;
      }
      const bool starts = t.compare(0, st.replacement.size(), st.replacement) == 0;
      if (!starts && (st.scheme == Step::kAlways || (st.scheme == Step::kFirst && p.at_start)))
        t.insert(0, st.replacement);
      if (!st.split || st.replacement.empty()) {
        out.push_back({std::move(t), p.at_start});
        continue;
      }
      // Split before every replacement char (HF: MergedWithNext).
      size_t b = 0;
      while (b < t.size()) {
        size_t e = t.find(st.replacement, b + 1);
        if (e == std::string::npos) e = t.size();
        out.push_back({t.substr(b, e - b), p.at_start && b == 0});
        b = e;
      }
      continue;
    }
    if (!st.re) {  // ByteLevel without regex
      out.push_back(std::move(p));
      continue;
    }
    // Cover the text with (span, is_match) pieces, then combine them as `behavior` says.
    spans.clear();
    st.re->find_all(p.text, spans);
    struct Span {
      size_t b, e;
      bool match;
    };
    std::vector<Span> all;
    size_t pos = 0;
    for (auto [b, e] : spans) {
      if (b > pos) all.push_back({pos, b, st.invert});
      all.push_back({b, e, !st.invert});
      pos = e;
    }
    if (pos < p.text.size()) all.push_back({pos, p.text.size(), st.invert});
    std::vector<Span> res;
    switch (st.behavior) {
      case Behavior::kIsolated: res = all; break;
      case Behavior::kRemoved:
        for (const Span& s : all)
          if (!s.match) res.push_back(s);
        break;
      case Behavior::kMergedWithPrevious: {
        bool prev_match = false;
        for (const Span& s : all) {
          if (s.match && !prev_match && !res.empty()) res.back().e = s.e;
          else res.push_back(s);
          prev_match = s.match;
        }
        break;
      }
      case Behavior::kMergedWithNext: {
        bool prev_match = false;
        for (size_t i = all.size(); i-- > 0;) {
          const Span& s = all[i];
          if (s.match && !prev_match && !res.empty()) res.back().b = s.b;
          else res.push_back(s);
          prev_match = s.match;
        }
        std::reverse(res.begin(), res.end());
        break;
      }
      case Behavior::kContiguous: {
        bool prev_match = false;
        for (const Span& s : all) {
          if (s.match && prev_match && !res.empty()) res.back().e = s.e;
          else res.push_back(s);
          prev_match = s.match;
        }
        break;
      }
    }
    for (const Span& s : res)
      if (s.e > s.b) out.push_back({p.text.substr(s.b, s.e - s.b), p.at_start && s.b == 0});
  }
  pieces = std::move(out);
}

}  // namespace qf::tok
