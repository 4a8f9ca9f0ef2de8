#include "textstream.hpp"

namespace dspark {

static const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

TextStream::TextStream(const Tokenizer& tok, const std::vector<std::string>& stop) : tok_(tok) {
  for (const auto& s : stop)
    if (!s.empty()) stop_.push_back(s);
}

std::string TextStream::update(const std::vector<int64_t>& ids, bool final) {
  std::string t = tok_.decode(ids);
  for (const auto& s : stop_) {
    size_t at = t.find(s);
    if (at != std::string::npos) {
      t.resize(at);
      stopped = final = true;
    }
  }
  if (!final) {
    size_t safe = t.size();
    while (safe >= kReplacement.size() && t.compare(safe - kReplacement.size(), kReplacement.size(), kReplacement) == 0)
      safe -= kReplacement.size();
    // hold back a tail that could still grow into a stop string (longest matching proper prefix first)
    for (const auto& s : stop_)
      for (size_t k = std::min(s.size() - 1, safe); k > 0; --k)
        if (t.compare(safe - k, k, s, 0, k) == 0) {
          safe -= k;
          break;
        }
    t.resize(safe);
  }
  text = t;
  std::string delta = emitted_ <= t.size() ? t.substr(emitted_) : std::string();
  emitted_ = t.size();
  return delta;
}

}  // namespace dspark
