// Loading tokenizer.json / vocab.json + merges.txt (+ tokenizer_config.json), added-token
// splitting, and the encode/decode pipelines.
#include "tokenizer/tokenizer.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "core/error.h"
#include "core/json_file.h"
#include "core/log.h"
#include "tokenizer/json_util.h"
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"

namespace qf {

namespace fs = std::filesystem;

namespace {

inline std::string qtok(std::string_view s) { return quote_for_error(s); }

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool is_word_byte(char c) {
  const auto u = static_cast<uint8_t>(c);
  return u >= 0x80 || (u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || u == '_';
}

// A special-token field of tokenizer_config.json: "text", {"content": "text"} or null.
std::optional<std::string> token_field(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && it->at("content").is_string())
    return it->at("content").get<std::string>();
  fail(where, ": ", key, " must be a string, {\"content\": string} or null, not ", qtok(it->dump()));
}

// Whether a file is there; an error other than "not there" (a folder we may not search) is
// reported as what it is rather than as a missing tokenizer.
bool file_exists(const fs::path& p) {
  struct stat st {};
  if (::stat(p.c_str(), &st) == 0) return true;
  if (errno == ENOENT || errno == ENOTDIR) return false;
  fail(p.string(), ": cannot access: ", errno_message(errno));
}

AddedToken parse_added(const json& a, int32_t id) {
  AddedToken t;
  t.id = id;
  t.content = a.at("content").get<std::string>();
  t.special = tok::jbool(a, "special", false);
  t.lstrip = tok::jbool(a, "lstrip", false);
  t.rstrip = tok::jbool(a, "rstrip", false);
  t.single_word = tok::jbool(a, "single_word", false);
  t.normalized = tok::jbool(a, "normalized", !t.special);
  return t;
}

int32_t checked_id(const json& v, const std::string& what, const std::string& where) {
  if (!v.is_number_integer()) fail(where, ": ", what, " has a non-integer id ", qtok(v.dump()));
  if (v.is_number_unsigned() ? v.get<uint64_t>() >= uint64_t{tok::kMaxTokenId}
                             : v.get<int64_t>() < 0 || v.get<int64_t>() >= tok::kMaxTokenId)
    fail(where, ": ", what, " has id ", v.dump(), ", out of range (0 to ", tok::kMaxTokenId - 1, ")");
  return static_cast<int32_t>(v.get<int64_t>());
}

}  // namespace

// ---- Impl: loading ------------------------------------------------------------------------------

std::optional<int32_t> Tokenizer::Impl::find(std::string_view s) const {
  for (const AddedToken& t : added)
    if (t.content == s) return t.id;
  return model.find(s);
}

const std::string* Tokenizer::Impl::token_str(int32_t id) const {
  auto it = added_by_id.find(id);
  if (it != added_by_id.end()) return &added[it->second].content;
  return model.token(id);
}

void Tokenizer::Impl::add_added(AddedToken t, const std::string& where) {
  if (t.content.empty()) fail(where, ": added token ", t.id, " has empty content");
  auto it = added_by_id.find(t.id);
  if (it != added_by_id.end()) {
    AddedToken& old = added[it->second];
    if (old.content != t.content)
      fail(where, ": added token id ", t.id, " (", qtok(t.content), ") clashes with added token ",
           qtok(old.content));
    old.special = old.special || t.special;  // the config may mark it special
    return;
  }
  if (const std::string* v = model.token(t.id); v && *v != t.content)
    fail(where, ": added token id ", t.id, " (", qtok(t.content), ") clashes with vocab token ",
         qtok(*v));
  added_by_id[t.id] = added.size();
  added.push_back(std::move(t));
}

void Tokenizer::Impl::parse_post_processor(const json& p, const std::string& where) {
  if (p.is_null()) return;
  const std::string type = tok::jstr(p, "type");
  if (type == "Sequence") {
    for (const auto& q : p.at("processors")) parse_post_processor(q, where);
  } else if (type == "TemplateProcessing") {
    template_prefix.clear();
    template_suffix.clear();
    bool seen_seq = false;
    const json specials = p.contains("special_tokens") ? p.at("special_tokens") : json::object();
    if (!p.at("single").is_array()) fail(where, ": post_processor TemplateProcessing: 'single' must be an array");
    for (const auto& item : p.at("single")) {
      if (!item.is_object() || (!item.contains("Sequence") && !item.contains("SpecialToken")))
        fail(where, ": post_processor TemplateProcessing: item ", qtok(item.dump()),
             " is neither {\"Sequence\": ...} nor {\"SpecialToken\": ...}");
      if (item.contains("Sequence")) {
        seen_seq = true;
      } else if (item.contains("SpecialToken")) {
        const std::string name = item.at("SpecialToken").at("id").get<std::string>();
        std::vector<int32_t> ids;
        if (specials.contains(name) && specials.at(name).contains("ids")) {
          for (const auto& id : specials.at(name).at("ids"))
            ids.push_back(checked_id(id, "post_processor special token " + qtok(name), where));
        } else if (auto id = find(name)) {
          ids.push_back(*id);
        }
        auto& dst = seen_seq ? template_suffix : template_prefix;
        dst.insert(dst.end(), ids.begin(), ids.end());
      }
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    template_prefix = {checked_id(p.at("cls").at(1), "post_processor cls token", where)};
    template_suffix = {checked_id(p.at("sep").at(1), "post_processor sep token", where)};
  }
  // ByteLevel and others do not add tokens.
}

void Tokenizer::Impl::apply_config(const json& c, const std::string& where) {
  if (!c.is_object()) fail(where, ": expected a JSON object");
  const char* section = "";  // named in errors from nlohmann's typed access
  try {
    section = "added_tokens_decoder: ";
    if (c.contains("added_tokens_decoder") && !c.at("added_tokens_decoder").is_null()) {
      if (!c.at("added_tokens_decoder").is_object())
        fail(where, ": added_tokens_decoder must be an object mapping id -> token");
      for (const auto& [key, val] : c.at("added_tokens_decoder").items()) {
        if (key.empty() || key.size() > 9 || !std::all_of(key.begin(), key.end(), ::isdigit))
          fail(where, ": added_tokens_decoder key ", qtok(key), " is not a token id");
        add_added(parse_added(val, checked_id(json(std::stoll(key)), "added_tokens_decoder entry", where)),
                  where);
      }
    }
    // A special token the config names must exist. bos/eos decide what encode adds and when
    // generation stops, so an unknown one is an error (transformers would append it as a new
    // token with an id past the model's embeddings). unk/pad only matter in corner cases: an
    // unknown one is reported and ignored. null is legitimate (Qwen2 has "bos_token": null: the
    // model has no BOS), and then nothing is guessed either.
    auto lookup = [&](const char* key, bool required) -> std::optional<int32_t> {
      auto name = token_field(c, key, where);
      if (!name) return std::nullopt;
      auto id = find(*name);
      if (!id && required)
        fail(where, ": ", key, " ", qtok(*name), " is not a token of the vocabulary or the added tokens");
      if (!id) {
        log_warn(where, ": ", key, " ", qtok(*name), " is not a token of the vocabulary; ignored");
        return std::nullopt;
      }
      cfg_specials.push_back(*name);
      return id;
    };
    section = "";
    cfg_names_bos = c.contains("bos_token");  // even null: then there is no BOS, no guessing
    cfg_names_eos = c.contains("eos_token");
    if (auto id = lookup("bos_token", true)) info.bos_id = id;
    if (auto id = lookup("eos_token", true)) info.eos_id = id;
    if (auto id = lookup("unk_token", false)) info.unk_id = id;
    if (auto id = lookup("pad_token", false)) info.pad_id = id;
    section = "additional_special_tokens: ";
    if (c.contains("additional_special_tokens") && c.at("additional_special_tokens").is_array())
      for (const auto& t : c.at("additional_special_tokens")) {
        if (t.is_string()) cfg_specials.push_back(t.get<std::string>());
        else if (t.is_object() && t.contains("content")) cfg_specials.push_back(t.at("content").get<std::string>());
        else fail(where, ": additional_special_tokens entry ", qtok(t.dump()), " is not a token");
      }
    auto flag = [&](const char* key, std::optional<bool>* out) {
      auto it = c.find(key);
      if (it == c.end() || it->is_null()) return;
      if (!it->is_boolean()) fail(where, ": ", key, " must be true or false, not ", qtok(it->dump()));
      *out = it->get<bool>();
    };
    flag("add_bos_token", &cfg_add_bos);
    flag("add_eos_token", &cfg_add_eos);
    cfg_where = where;
    section = "chat_template: ";
    if (c.contains("chat_template") && !c.at("chat_template").is_null()) {
      const json& t = c.at("chat_template");
      if (t.is_string()) {
        info.chat_template = t.get<std::string>();
      } else if (t.is_array()) {  // [{"name": "default", "template": ...}, ...]
        for (const auto& e : t)
          if (e.is_object() && (!info.chat_template || tok::jstr(e, "name") == "default"))
            info.chat_template = tok::jstr(e, "template");
      } else {
        fail(where, ": chat_template must be a string or a list of {\"name\", \"template\"}");
      }
    }
  } catch (const json::exception& e) {
    fail(where, ": ", section, json_error_text(e));
  }
}

void Tokenizer::Impl::finalize(const std::string& kind, const std::string& where) {
  // Special tokens the config names but no added token declares are still matched as a unit
  // (HF's slow tokenizers do this, e.g. GPT-2's <|endoftext|> which lives in vocab.json).
  for (const std::string& name : cfg_specials) {
    bool known = false;
    for (AddedToken& t : added)
      if (t.content == name) t.special = known = true;
    if (!known && !name.empty())
      if (auto id = model.find(name)) {
        AddedToken t;
        t.content = name, t.id = *id, t.special = true;
        added_by_id[t.id] = added.size();
        added.push_back(std::move(t));
      }
  }
  // Guesses use added tokens only: a byte-level vocab may hold "<s>" as ordinary text.
  auto first_found = [&](std::initializer_list<const char*> names) -> std::optional<int32_t> {
    for (const char* n : names)
      for (const AddedToken& t : added)
        if (t.content == n) return t.id;
    return std::nullopt;
  };
  if (!info.bos_id && !cfg_names_bos) {
    if (!template_prefix.empty()) info.bos_id = template_prefix.front();
    else info.bos_id = first_found({"<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"});
  }
  if (!info.eos_id && !cfg_names_eos) {
    if (!template_suffix.empty()) info.eos_id = template_suffix.back();
    else info.eos_id = first_found({"</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"});
  }
  // add_bos_token without a BOS token is refused, as transformers does ("add_bos_token = True but
  // bos_token = None"): silently encoding without BOS gives a model input it was not trained on.
  if (cfg_add_bos && *cfg_add_bos && !info.bos_id)
    fail(cfg_where, ": add_bos_token is true but there is no BOS token (bos_token is null or missing)");
  if (cfg_add_eos && *cfg_add_eos && !info.eos_id)
    fail(cfg_where, ": add_eos_token is true but there is no EOS token (eos_token is null or missing)");
  prefix = cfg_add_bos ? (*cfg_add_bos ? std::vector<int32_t>{*info.bos_id} : std::vector<int32_t>{})
                       : template_prefix;
  suffix = cfg_add_eos ? (*cfg_add_eos ? std::vector<int32_t>{*info.eos_id} : std::vector<int32_t>{})
                       : template_suffix;
  // Template ids are added to every encoded text: each must be a token (the model has no
  // embedding for an id outside the vocabulary).
  for (const auto* ids : {&template_prefix, &template_suffix})
    for (int32_t id : *ids)
      if (!token_str(id)) fail(where, ": post_processor adds token id ", id, ", which is not in the vocabulary");

  special_ids.clear();
  for (const AddedToken& t : added)
    if (t.special) special_ids.insert(t.id);
  for (auto id : {info.bos_id, info.eos_id, info.unk_id, info.pad_id})
    if (id) special_ids.insert(*id);

  eos_ids.clear();
  if (info.eos_id) eos_ids.insert(*info.eos_id);
  for (const char* n : {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>",
                        "<end_of_turn>", "<|end|>", "</s>"})
    for (const AddedToken& t : added)
      if (t.special && t.content == n) eos_ids.insert(t.id);

  for (auto& v : added_by_byte) v.clear();
  for (uint32_t i = 0; i < added.size(); ++i)
    added_by_byte[static_cast<uint8_t>(added[i].content[0])].push_back(i);
  for (auto& v : added_by_byte)
    std::stable_sort(v.begin(), v.end(), [&](uint32_t a, uint32_t b) {
      return added[a].content.size() > added[b].content.size();
    });

  info.kind = kind;
  int32_t n = model.size();
  for (const AddedToken& t : added) n = std::max(n, t.id + 1);
  // Ids may have holes (small test vocabularies keep their original ids), but not arbitrarily
  // many: every id is below (number of tokens) + kMaxIdGap, so a single huge id cannot cost gigabytes.
  const int64_t entries = model.n_tokens() + static_cast<int64_t>(added.size());
  for (const AddedToken& t : added)
    if (t.id >= entries + tok::kMaxIdGap)
      fail(where, ": added token ", qtok(t.content), " has id ", t.id, ", out of range: ", entries,
           " tokens may use ids below ", entries + tok::kMaxIdGap);
  info.vocab_size = n;
  info.n_merges = model.n_merges();
  info.n_added = static_cast<int32_t>(added.size());
  info.add_bos = !prefix.empty();
  info.add_eos = !suffix.empty();
  info.pre_tokenizer = pre.pattern();
}

// ---- loading entry points -----------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

bool Tokenizer::present(const fs::path& dir) {
  return file_exists(dir / "tokenizer.json") || (file_exists(dir / "vocab.json") && file_exists(dir / "merges.txt"));
}

Tokenizer Tokenizer::load(const fs::path& dir) {
  std::optional<fs::path> cfg;
  if (file_exists(dir / "tokenizer_config.json")) cfg = dir / "tokenizer_config.json";
  if (file_exists(dir / "tokenizer.json")) return from_tokenizer_json(dir / "tokenizer.json", cfg);
  if (file_exists(dir / "vocab.json") && file_exists(dir / "merges.txt"))
    return from_vocab_merges(dir / "vocab.json", dir / "merges.txt", "", cfg);
  fail(dir.string(), ": no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)");
}

Tokenizer Tokenizer::from_tokenizer_json(const fs::path& path, const std::optional<fs::path>& config) {
  auto impl = std::make_unique<Impl>();
  const std::string where = path.string();
  const json j = read_json_file(path);
  const char* section = "model: ";  // named in errors from nlohmann's typed access
  try {
    if (!j.is_object() || !j.contains("model") || !j.at("model").is_object())
      fail(where, ": not a tokenizer.json (no \"model\" object)");
    const json& m = j.at("model");
    const std::string type = tok::jstr(m, "type", m.contains("merges") ? "BPE" : "");
    if (type != "BPE")
      fail(where, ": unsupported tokenizer model type ", qtok(type), " (only BPE is supported)");
    if (!m.contains("vocab") || !m.at("vocab").is_object())
      fail(where, ": model.vocab must be an object mapping token -> id");
    if (m.at("vocab").empty()) fail(where, ": model.vocab is empty (a tokenizer needs tokens)");
    std::vector<std::pair<std::string, int32_t>> vocab;
    vocab.reserve(m.at("vocab").size());
    for (const auto& [tok, id] : m.at("vocab").items())
      vocab.emplace_back(tok, checked_id(id, "vocab token " + qtok(tok), where));
    impl->model.set_vocab(std::move(vocab), where);

    std::vector<std::pair<std::string, std::string>> merges;
    if (m.contains("merges") && !m.at("merges").is_null()) {
      if (!m.at("merges").is_array()) fail(where, ": model.merges must be an array");
      merges.reserve(m.at("merges").size());
      for (const auto& e : m.at("merges")) {
        if (e.is_string()) {  // "a b"
          const std::string s = e.get<std::string>();
          const size_t sp = s.find(' ');
          if (sp == std::string::npos || sp == 0 || sp + 1 >= s.size() || s.find(' ', sp + 1) != std::string::npos)
            fail(where, ": malformed merge ", qtok(s), " (expected two tokens separated by one space)");
          merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
        } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {  // ["a", "b"]
          merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
        } else {
          fail(where, ": malformed merge ", qtok(e.dump()));
        }
      }
    }
    impl->model.set_merges(merges, where);
    if (const std::string p = tok::jstr(m, "continuing_subword_prefix"); !p.empty())
      fail(where, ": BPE continuing_subword_prefix is not supported");
    if (const std::string p = tok::jstr(m, "end_of_word_suffix"); !p.empty())
      fail(where, ": BPE end_of_word_suffix is not supported");

    static const json kNull;
    auto field = [&](const char* key) -> const json& {  // by reference: no deep copy
      auto it = j.find(key);
      return it == j.end() ? kNull : *it;
    };
    section = "normalizer: ";
    impl->normalizer.parse(field("normalizer"), where);
    section = "pre_tokenizer: ";
    impl->pre.parse(field("pre_tokenizer"), where);
    section = "decoder: ";
    impl->decoder.parse(field("decoder"), where);
    section = "model: ";

    std::optional<int32_t> unk;
    if (const std::string u = tok::jstr(m, "unk_token"); !u.empty()) {
      unk = impl->model.find(u);
      if (!unk) log_warn(where, ": model.unk_token ", qtok(u), " is not in the vocabulary; unknown text is dropped");
    }
    impl->info.unk_id = unk;
    impl->model.set_options(unk, tok::jbool(m, "fuse_unk", false), tok::jbool(m, "byte_fallback", false),
                            tok::jbool(m, "ignore_merges", false), impl->pre.byte_level());

    section = "added_tokens: ";
    if (j.contains("added_tokens") && !j.at("added_tokens").is_null()) {
      if (!j.at("added_tokens").is_array()) fail(where, ": added_tokens must be an array");
      for (const auto& a : j.at("added_tokens"))
        impl->add_added(parse_added(a, checked_id(a.at("id"), "added token", where)), where);
    }
    section = "post_processor: ";
    if (auto pp = j.find("post_processor"); pp != j.end()) impl->parse_post_processor(*pp, where);
  } catch (const json::exception& e) {
    fail(where, ": ", section, json_error_text(e));
  }
  if (config) impl->apply_config(read_json_file(*config), config->string());
  impl->finalize(impl->pre.byte_level() || impl->decoder.byte_level() ? "byte-bpe" : "spm-bpe", where);
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_vocab_merges(const fs::path& vocab_json, const fs::path& merges_txt,
                                       const std::string& pattern,
                                       const std::optional<fs::path>& config) {
  auto impl = std::make_unique<Impl>();
  const std::string wv = vocab_json.string(), wm = merges_txt.string();
  {
    const json v = read_json_file(vocab_json);
    if (!v.is_object()) fail(wv, ": expected a JSON object mapping token -> id");
    if (v.empty()) fail(wv, ": the vocabulary is empty (a tokenizer needs tokens)");
    std::vector<std::pair<std::string, int32_t>> vocab;
    vocab.reserve(v.size());
    for (const auto& [tok, id] : v.items()) vocab.emplace_back(tok, checked_id(id, "token " + qtok(tok), wv));
    impl->model.set_vocab(std::move(vocab), wv);
  }
  {
    const std::string text = read_text_file(merges_txt, kMaxJsonFileBytes);
    std::vector<std::pair<std::string, std::string>> merges;
    size_t pos = 0, line_no = 0;
    while (pos < text.size()) {
      size_t nl = text.find('\n', pos);
      if (nl == std::string::npos) nl = text.size();
      std::string_view line(text.data() + pos, nl - pos);
      pos = nl + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
      const size_t sp = line.find(' ');
      if (sp == std::string_view::npos || sp == 0 || sp + 1 >= line.size() ||
          line.find(' ', sp + 1) != std::string_view::npos)
        fail(wm, ": line ", line_no, ": expected two tokens separated by one space");
      merges.emplace_back(std::string(line.substr(0, sp)), std::string(line.substr(sp + 1)));
    }
    impl->model.set_merges(merges, wm);
  }
  bool qwen2 = false;
  if (config) {
    const json c = read_json_file(*config);
    if (c.is_object() && c.contains("tokenizer_class") && c.at("tokenizer_class").is_string())
      qwen2 = c.at("tokenizer_class").get<std::string>().starts_with("Qwen2");
    impl->apply_config(c, config->string());
  }
  // Qwen2's slow tokenizer normalizes to NFC and has its own pattern; others default to GPT-2's.
  if (qwen2) impl->normalizer.add_nfc();
  impl->pre.set_regex(!pattern.empty() ? pattern : qwen2 ? tok::kQwen2Pattern : tok::kGpt2Pattern, wm);
  impl->decoder.set_byte_level();
  if (impl->info.unk_id && !impl->model.token(*impl->info.unk_id)) impl->info.unk_id.reset();
  impl->model.set_options(impl->info.unk_id, false, false, false, true);
  impl->finalize("byte-bpe", wv);
  return Tokenizer(std::move(impl));
}

// ---- encode / decode ----------------------------------------------------------------------------

void Tokenizer::Impl::encode_text(std::string_view text, bool at_start, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::vector<tok::PreToken> pieces;
  pieces.push_back({normalizer.empty() ? std::string(text) : normalizer.apply(text), at_start});
  pre.apply(pieces);
  for (const auto& p : pieces) model.encode_word(p.text, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
  const Impl& im = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special) out = im.prefix;
  // Split on added tokens: leftmost, then longest match (candidates are sorted longest first).
  size_t seg = 0, i = 0;
  while (i < text.size()) {
    const auto& cands = im.added_by_byte[static_cast<uint8_t>(text[i])];
    const AddedToken* hit = nullptr;
    for (uint32_t c : cands) {
      const AddedToken& t = im.added[c];
      if (t.special && !parse_special) continue;
      if (text.compare(i, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        const size_t e = i + t.content.size();
        if ((i > 0 && is_word_byte(text[i - 1])) || (e < text.size() && is_word_byte(text[e]))) continue;
      }
      hit = &t;
      break;
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t b = i, e = i + hit->content.size();
    if (hit->lstrip)
      while (b > seg && is_space(text[b - 1])) --b;
    if (hit->rstrip)
      while (e < text.size() && is_space(text[e])) ++e;
    im.encode_text(text.substr(seg, b - seg), seg == 0, out);
    out.push_back(hit->id);
    seg = i = e;
  }
  im.encode_text(text.substr(seg), seg == 0, out);
  if (add_special) out.insert(out.end(), im.suffix.begin(), im.suffix.end());
  return out;
}

std::string Tokenizer::Impl::decode_raw(const int32_t* ids, size_t n, bool skip_special) const {
  std::vector<std::string> toks;
  toks.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    const std::string* s = token_str(ids[k]);
    if (!s || (skip_special && special_ids.count(ids[k]))) continue;  // unknown ids are dropped, as HF
    toks.push_back(*s);
  }
  return decoder.apply(std::move(toks));
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  return tok::utf8_lossy(impl_->decode_raw(ids.data(), ids.size(), skip_special));
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* s = impl_->token_str(id);
  if (!s) fail("token id ", id, " is out of range (vocab size ", impl_->info.vocab_size, ")");
  return *s;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const { return impl_->find(token); }
bool Tokenizer::is_special(int32_t id) const { return impl_->special_ids.count(id) > 0; }
bool Tokenizer::is_eos(int32_t id) const { return impl_->eos_ids.count(id) > 0; }
const TokenizerInfo& Tokenizer::info() const { return impl_->info; }

}  // namespace qf
