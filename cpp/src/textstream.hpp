// Incremental detokenisation with stop strings, as dspark/runtime/tokenizer.py's TextStream: decode everything
// generated so far, cut at the first stop string, and hold back a tail that is an unfinished UTF-8 character
// (U+FFFD) or could still grow into a stop string.
#pragma once

#include <string>
#include <vector>

#include "dspark/tokenizer.hpp"

namespace dspark {

class TextStream {
 public:
  TextStream(const Tokenizer& tok, const std::vector<std::string>& stop);
  std::string update(const std::vector<int64_t>& ids, bool final);  // the new text that is safe to show
  std::string text;
  bool stopped = false;

 private:
  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  size_t emitted_ = 0;
};

}  // namespace dspark
