// GPT-2 style tokenizer files (tokenizer/tokenizer.cpp: Tokenizer::load of a folder with
// vocab.json + merges.txt and no tokenizer.json): the input's parts are vocab.json, merges.txt
// and, optionally, tokenizer_config.json (whose tokenizer_class picks Qwen2's pattern and NFC).
#include "fuzz_common.h"
#include "tokenizer_exercise.h"

using namespace qf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 3);
  if (parts.size() < 2) return 0;  // both files are needed to get past the folder lookup
  const auto dir = fuzz::fresh_subdir("tok");
  fuzz::write_file(dir / "vocab.json", parts[0]);
  fuzz::write_file(dir / "merges.txt", parts[1]);
  if (parts.size() > 2) fuzz::write_file(dir / "tokenizer_config.json", parts[2]);
  fuzz::expect_errors([&] { fuzz::exercise_tokenizer(Tokenizer::load(dir)); });
  return 0;
}
