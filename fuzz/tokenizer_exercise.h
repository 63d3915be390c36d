// What the tokenizer targets do with a tokenizer that loaded: encode a few fixed texts (special
// tokens, byte fallback, invalid UTF-8, long digit runs), decode the ids at once and streamed,
// and look up ids around the vocabulary's ends. Every id that encode returns and every special
// id the tokenizer reports must lie inside the vocabulary (the model indexes its embedding rows
// with them).
#pragma once
#include <string_view>

#include "fuzz_common.h"
#include "tokenizer/tokenizer.h"

namespace qf::fuzz {

inline void check_id(const Tokenizer& t, int64_t id, const char* what) {
  if (id < 0 || id >= t.vocab_size())
    finding(str(what, " id ", id, " is outside the vocabulary (vocab_size ", t.vocab_size(), ")"));
}

inline void exercise_tokenizer(const Tokenizer& t) {
  const TokenizerInfo& info = t.info();
  for (auto id : {info.bos_id, info.eos_id, info.unk_id, info.pad_id})
    if (id) check_id(t, *id, "special token");
  static constexpr std::string_view kTexts[] = {
      "Hello world! It's 2024: 12345 tokens.",
      " <s>Once upon a time</s>\n\n  there  was\ta <unk> fox",
      "<|begin_of_text|><|im_start|>user\nhi<|im_end|><|endoftext|>",
      "\xc3\xbc" "n" "\xc3\xaf" "c" "\xc3\xb6" "d" "\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82",  // ünïcödé 日本 🙂
      std::string_view("\xff\xfe\x00 broken \xc3", 12),
      "",
  };
  for (std::string_view text : kTexts) {
    for (bool special : {true, false}) {
      const auto ids = t.encode(text, special, special);
      for (int32_t id : ids) check_id(t, id, "encoded");
      (void)t.decode(ids, !special);
      if (!special) continue;
      StreamDecoder sd(t, true);
      for (int32_t id : ids) (void)sd.push(id);
      (void)sd.flush();
    }
  }
  // Ids around both ends of the vocabulary, and past them (decode drops unknown ids).
  const int32_t n = t.vocab_size();
  std::vector<int32_t> ids;
  for (int32_t id = 0; id < n && id < 64; ++id) ids.push_back(id);
  for (int32_t id : {n - 2, n - 1, n, n + 1, -1}) ids.push_back(id);
  (void)t.decode(ids, false);
  StreamDecoder sd(t, false);
  for (int32_t id : ids) {
    (void)sd.push(id);
    (void)t.is_special(id);
    (void)t.is_eos(id);
    expect_errors([&] {
      const std::string tok = t.id_to_token(id);
      if (auto back = t.token_to_id(tok); back && *back < 0) finding("token_to_id returned a negative id");
    });
  }
  (void)sd.flush();
}

}  // namespace qf::fuzz
