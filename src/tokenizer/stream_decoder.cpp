// Streaming decode. Decoders are concatenative apart from rules at the very start of the text
// (SentencePiece's leading-space strip), so each push re-decodes only a short window that starts
// one id back (context for those rules) and returns the bytes past what was already returned,
// holding back a character that is still cut off.
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/unicode.h"

namespace qf {

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special) : tok_(tok), skip_special_(skip_special) {}

std::string StreamDecoder::push(int32_t id) {
  const Tokenizer::Impl& im = *tok_.impl_;
  if (!im.token_str(id) || (skip_special_ && im.special_ids.count(id))) return "";  // decode drops these
  ids_.push_back(id);
  const std::string text = im.decode_raw(ids_.data() + window_, ids_.size() - window_, skip_special_);
  if (text.size() < emitted_bytes_) return "";  // cannot happen for supported decoders
  const size_t end = tok::utf8_complete_end(text, emitted_bytes_);
  std::string out = tok::utf8_lossy(std::string_view(text).substr(emitted_bytes_, end - emitted_bytes_));
  emitted_bytes_ = end;
  if (end == text.size() && ids_.size() - window_ > 1) {  // all out: slide, keeping one id of context
    window_ = ids_.size() - 1;
    emitted_bytes_ = im.decode_raw(ids_.data() + window_, 1, skip_special_).size();
  }
  return out;
}

std::string StreamDecoder::flush() {
  const Tokenizer::Impl& im = *tok_.impl_;
  const std::string text = im.decode_raw(ids_.data() + window_, ids_.size() - window_, skip_special_);
  if (text.size() <= emitted_bytes_) return "";
  std::string out = tok::utf8_lossy(std::string_view(text).substr(emitted_bytes_));
  emitted_bytes_ = text.size();
  return out;
}

}  // namespace qf
