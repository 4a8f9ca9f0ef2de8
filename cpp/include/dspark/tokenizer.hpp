// The bundle's tokenizer.json, read without Python: byte-level BPE (the scheme of GPT-2, Qwen, Llama 3 and
// SmolLM2: an optional NFC normaliser, Split/ByteLevel pre-tokenizers with the GPT-2 or Qwen/Llama 3 regex,
// BPE merges by rank, added and special tokens, a TemplateProcessing post-processor that adds BOS) and the
// word-level scheme of the test suite's tiny bundles (WordLevel + WhitespaceSplit, WordPiece decoder).
// encode/decode equal Hugging Face `tokenizers` (Tokenizer.encode(text).ids and decode(ids,
// skip_special_tokens=True)); a tokenizer.json that uses anything else is refused with the component's name.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dspark {

class Tokenizer {
 public:
  static std::unique_ptr<Tokenizer> from_file(const std::string& path);  // throws dspark::Error
  virtual ~Tokenizer() = default;
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  // text of `ids` (UTF-8; invalid byte sequences become U+FFFD), special tokens skipped
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual size_t vocab_size() const = 0;
};

}  // namespace dspark
