// tokenizer.json (tokenizer/tokenizer.cpp: Tokenizer::load of a folder that holds one), with an
// optional tokenizer_config.json as the second part of the input; the tokenizer that loads is
// then used (tokenizer_exercise.h). Covers the BPE model, normalizers, pre-tokenizers (regexes
// from the file), decoders, added tokens and post-processors.
#include "fuzz_common.h"
#include "tokenizer_exercise.h"

using namespace qf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 2);
  const auto dir = fuzz::fresh_subdir("tok");
  fuzz::write_file(dir / "tokenizer.json", parts[0]);
  if (parts.size() > 1) fuzz::write_file(dir / "tokenizer_config.json", parts[1]);
  fuzz::expect_errors([&] { fuzz::exercise_tokenizer(Tokenizer::load(dir)); });
  return 0;
}
