// tokenizer.json without Python: see include/dspark/tokenizer.hpp for what is read. The pre-tokenizer regexes
// are the three fixed patterns byte-level BPE models use (GPT-2; Qwen; Llama 3); rather than carry a regex engine
// with Unicode classes, each is matched by hand, alternative by alternative, with the regex's leftmost-first
// semantics. Any other pattern is refused by name.
#include <algorithm>
#include <cctype>
#include <map>
#include <unordered_map>

#include "dspark/dspark.hpp"
#include "dspark/tokenizer.hpp"
#include "files.hpp"
#include "json.hpp"
#include "unicode.hpp"

namespace dspark {
namespace {

using CPs = std::vector<uint32_t>;
using unicode::is_letter;
using unicode::is_number;
using unicode::is_space;

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

enum class Pattern { Gpt2, Qwen, Llama3 };

bool is_other(uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }
bool is_newline(uint32_t c) { return c == '\r' || c == '\n'; }
uint32_t lower(uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

// 's 't 're 've 'm 'll 'd at i (case-insensitive for Qwen/Llama 3); returns the end or 0
size_t contraction(const CPs& s, size_t i, bool fold) {
  if (s[i] != '\'') return 0;
  static const char* tails[] = {"s", "t", "re", "ve", "m", "ll", "d"};
  for (const char* t : tails) {
    size_t k = 0;
    while (t[k] && i + 1 + k < s.size() && (fold ? lower(s[i + 1 + k]) : s[i + 1 + k]) == static_cast<uint32_t>(t[k])) ++k;
    if (!t[k]) return i + 1 + k;
  }
  return 0;
}

// whitespace alternatives shared by all three: \s+(?!\S) then \s+
size_t trailing_space(const CPs& s, size_t i) {
  size_t k = i;
  while (k < s.size() && is_space(s[k])) ++k;
  if (k == s.size() || k - i == 1) return k;  // at the end, or a single space before text: \s+
  return k - 1;                                // leave the last space to the next word
}

// end of the match starting at i (the pattern matches every non-empty suffix, so it is always > i)
size_t match_at(Pattern p, const CPs& s, size_t i) {
  size_t n = s.size(), j, e;
  if (p == Pattern::Gpt2) {
    if ((e = contraction(s, i, false))) return e;
    j = i + (s[i] == ' ' && i + 1 < n ? 1 : 0);
    if (is_letter(s[j])) { while (j < n && is_letter(s[j])) ++j; return j; }
    if (is_number(s[j])) { while (j < n && is_number(s[j])) ++j; return j; }
    if (is_other(s[j])) { while (j < n && is_other(s[j])) ++j; return j; }
    return trailing_space(s, i);
  }
  if ((e = contraction(s, i, true))) return e;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  j = i;
  if (!is_letter(s[j]) && !is_number(s[j]) && !is_newline(s[j]) && j + 1 < n && is_letter(s[j + 1])) ++j;
  if (is_letter(s[j])) { while (j < n && is_letter(s[j])) ++j; return j; }
  // \p{N} or \p{N}{1,3}
  if (is_number(s[i])) {
    size_t most = p == Pattern::Llama3 ? 3 : 1;
    j = i;
    while (j < n && j - i < most && is_number(s[j])) ++j;
    return j;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  j = i + (s[i] == ' ' && i + 1 < n && is_other(s[i + 1]) ? 1 : 0);
  if (is_other(s[j])) {
    while (j < n && is_other(s[j])) ++j;
    while (j < n && is_newline(s[j])) ++j;
    return j;
  }
  // \s*[\r\n]+ : the whitespace run up to its last newline
  size_t k = i, last_newline = 0;
  while (k < n && is_space(s[k])) {
    if (is_newline(s[k])) last_newline = k + 1;
    ++k;
  }
  if (last_newline) return last_newline;
  return trailing_space(s, i);
}

std::vector<CPs> split_pattern(Pattern p, const CPs& s) {
  std::vector<CPs> out;
  for (size_t i = 0; i < s.size();) {
    size_t e = match_at(p, s, i);
    out.emplace_back(s.begin() + i, s.begin() + e);
    i = e;
  }
  return out;
}

Pattern pattern_of(const std::string& regex) {
  if (regex == kGpt2Pattern) return Pattern::Gpt2;
  if (regex == kQwenPattern) return Pattern::Qwen;
  if (regex == kLlama3Pattern) return Pattern::Llama3;
  throw Error("tokenizer.json splits with a regex this host does not implement (" + regex.substr(0, 60) +
              "...); it supports the GPT-2, Qwen and Llama 3 patterns");
}

// GPT-2's byte <-> printable character map: printable Latin-1 bytes map to themselves, the rest to 256+
std::vector<uint32_t> byte_chars() {
  std::vector<uint32_t> map(256);
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? b : next++;
  }
  return map;
}

struct AddedToken {
  std::string content;
  int64_t id;
  bool special, lstrip, rstrip, single_word;
};

struct PreStep {
  enum Kind { Split, ByteLevel, WhitespaceSplit } kind;
  Pattern pattern = Pattern::Gpt2;
  bool add_prefix_space = false, use_regex = false;
};

class JsonTokenizer : public Tokenizer {
 public:
  explicit JsonTokenizer(const json::Value& t) {
    const auto& model = t.at("model");
    std::string type = model.at("type").str("model.type");
    if (type != "BPE" && type != "WordLevel")
      throw Error("tokenizer model " + type + " is not supported (BPE and WordLevel are)");
    bpe_ = type == "BPE";
    for (const auto& [tok, id] : model.at("vocab").members("vocab")) add_vocab(tok, id.integer("vocab id"));
    if (const auto* unk = model.find("unk_token"); unk && unk->is_string()) {
      auto it = vocab_.find(unk->str());
      if (it != vocab_.end()) unk_ = it->second;
    }
    if (bpe_) {
      for (const char* field : {"continuing_subword_prefix", "end_of_word_suffix"})
        if (const auto* v = model.find(field); v && v->is_string() && !v->str().empty())
          throw Error(std::string("BPE ") + field + " is not supported by this tokenizer");
      if (const auto* bf = model.find("byte_fallback"); bf && bf->kind() == json::Value::Kind::Bool && bf->boolean())
        throw Error("BPE byte_fallback (SentencePiece-style vocabularies) is not supported by this tokenizer");
      if (const auto* im = model.find("ignore_merges"); im && im->kind() == json::Value::Kind::Bool)
        ignore_merges_ = im->boolean();
      int64_t rank = 0;
      for (const auto& m : model.at("merges").items("merges")) {
        std::string a, b;
        if (m.is_string()) {
          const std::string& s = m.str();
          size_t sp = s.find(' ', 1);
          a = s.substr(0, sp);
          b = s.substr(sp + 1);
        } else {
          a = m.items()[0].str("merge");
          b = m.items()[1].str("merge");
        }
        auto ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
        if (ia == vocab_.end() || ib == vocab_.end() || im == vocab_.end())
          throw Error("tokenizer.json has a merge of tokens not in its vocabulary: " + a + " " + b);
        merges_.emplace(key(ia->second, ib->second), std::make_pair(rank++, im->second));
      }
    }
    for (const auto& a : t.at("added_tokens").items("added_tokens")) {
      AddedToken tok{a.at("content").str(), a.at("id").integer(), a.at("special").boolean(),
                     a.at("lstrip").boolean(), a.at("rstrip").boolean(), a.at("single_word").boolean()};
      add_vocab(tok.content, tok.id);
      added_.push_back(tok);
      if (tok.special) special_ids_.push_back(tok.id);
    }
    std::sort(special_ids_.begin(), special_ids_.end());
    read_normalizer(t.at("normalizer"));
    read_pre_tokenizer(t.at("pre_tokenizer"));
    read_post_processor(t.at("post_processor"));
    read_decoder(t.at("decoder"));
    chars_ = byte_chars();
    for (uint32_t b = 0; b < 256; ++b) char_bytes_[chars_[b]] = static_cast<unsigned char>(b);
  }

  size_t vocab_size() const override { return id_to_token_.size(); }

  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int64_t> ids;
    for (const auto& item : template_) {
      if (!item.special_ids.empty()) ids.insert(ids.end(), item.special_ids.begin(), item.special_ids.end());
      else encode_text(text, ids);
    }
    return ids;
  }

  std::string decode(const std::vector<int64_t>& ids) const override {
    std::vector<const std::string*> tokens;
    for (int64_t id : ids) {
      if (id < 0 || id >= static_cast<int64_t>(id_to_token_.size()) || id_to_token_[id].empty()) continue;
      if (std::binary_search(special_ids_.begin(), special_ids_.end(), id)) continue;
      tokens.push_back(&id_to_token_[id]);
    }
    std::string out;
    if (decoder_ == Decoder::ByteLevel) {
      for (const std::string* t : tokens) {
        std::string bytes;
        bool all = true;
        for (uint32_t c : unicode::decode_utf8(*t)) {
          auto it = char_bytes_.find(c);
          if (it == char_bytes_.end()) { all = false; break; }
          bytes += static_cast<char>(it->second);
        }
        out += all ? bytes : *t;
      }
      return unicode::lossy(out);
    }
    if (decoder_ == Decoder::WordPiece) {
      for (size_t i = 0; i < tokens.size(); ++i) {
        std::string t = *tokens[i];
        if (i != 0) {
          if (t.compare(0, prefix_.size(), prefix_) == 0) t = t.substr(prefix_.size());
          else t = " " + t;
        }
        if (cleanup_) t = clean_up(t);
        out += t;
      }
      return out;
    }
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + *tokens[i];
    return out;
  }

 private:
  enum class Decoder { None, ByteLevel, WordPiece };
  struct TemplateItem { std::vector<int64_t> special_ids; };  // empty: the text itself ($A)

  bool bpe_ = true, ignore_merges_ = false, nfc_ = false, cleanup_ = false;
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> id_to_token_;
  int64_t unk_ = -1;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges_;  // (left, right) -> (rank, merged id)
  std::vector<AddedToken> added_;
  std::vector<int64_t> special_ids_;
  std::vector<PreStep> steps_;
  std::vector<TemplateItem> template_{TemplateItem{}};
  Decoder decoder_ = Decoder::None;
  std::string prefix_;
  std::vector<uint32_t> chars_;
  std::unordered_map<uint32_t, unsigned char> char_bytes_;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache_;  // BPE of a piece, by its text

  static uint64_t key(int64_t a, int64_t b) { return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b); }

  void add_vocab(const std::string& tok, int64_t id) {
    vocab_[tok] = id;
    if (id >= static_cast<int64_t>(id_to_token_.size())) id_to_token_.resize(id + 1);
    id_to_token_[id] = tok;
  }

  void read_normalizer(const json::Value& n) {
    if (n.is_null()) return;
    std::string type = n.at("type").str();
    if (type == "NFC") { nfc_ = true; return; }
    if (type == "Sequence") {
      for (const auto& item : n.at("normalizers").items()) read_normalizer(item);
      return;
    }
    throw Error("tokenizer normalizer " + type + " is not supported (NFC is)");
  }

  void read_pre_tokenizer(const json::Value& p) {
    if (p.is_null()) return;
    std::string type = p.at("type").str();
    if (type == "Sequence") {
      for (const auto& item : p.at("pretokenizers").items()) read_pre_tokenizer(item);
    } else if (type == "Split") {
      const auto& pat = p.at("pattern");
      if (!pat.has("Regex")) throw Error("tokenizer Split with a plain string pattern is not supported");
      if (p.at("behavior").str() != "Isolated" || p.at("invert").boolean())
        throw Error("tokenizer Split other than Isolated, not inverted, is not supported");
      steps_.push_back({PreStep::Split, pattern_of(pat.at("Regex").str())});
    } else if (type == "ByteLevel") {
      PreStep s{PreStep::ByteLevel};
      s.add_prefix_space = p.at("add_prefix_space").boolean();
      const auto* r = p.find("use_regex");
      s.use_regex = !r || r->boolean();
      steps_.push_back(s);
    } else if (type == "WhitespaceSplit") {
      steps_.push_back({PreStep::WhitespaceSplit});
    } else {
      throw Error("tokenizer pre-tokenizer " + type + " is not supported (Split, ByteLevel, WhitespaceSplit are)");
    }
  }

  void read_post_processor(const json::Value& p) {
    if (p.is_null()) return;
    std::string type = p.at("type").str();
    if (type == "Sequence") {
      for (const auto& item : p.at("processors").items()) read_post_processor(item);
    } else if (type == "TemplateProcessing") {
      template_.clear();
      for (const auto& item : p.at("single").items()) {
        if (const auto* sp = item.find("SpecialToken")) {
          const auto& ids = p.at("special_tokens").at(sp->at("id").str()).at("ids").items();
          TemplateItem t;
          for (const auto& id : ids) t.special_ids.push_back(id.integer());
          template_.push_back(t);
        } else if (const auto* seq = item.find("Sequence"); seq && seq->at("id").str() == "A") {
          template_.push_back({});
        } else {
          throw Error("tokenizer template item is not supported: only special tokens and $A");
        }
      }
    } else if (type != "ByteLevel") {  // ByteLevel post-processing only trims offsets: ids are unchanged
      throw Error("tokenizer post-processor " + type + " is not supported (ByteLevel, TemplateProcessing are)");
    }
  }

  void read_decoder(const json::Value& d) {
    if (d.is_null()) return;
    std::string type = d.at("type").str();
    if (type == "ByteLevel") decoder_ = Decoder::ByteLevel;
    else if (type == "WordPiece") {
      decoder_ = Decoder::WordPiece;
      prefix_ = d.at("prefix").str();
      cleanup_ = d.at("cleanup").boolean();
    } else {
      throw Error("tokenizer decoder " + type + " is not supported (ByteLevel, WordPiece are)");
    }
  }

  static std::string clean_up(std::string s) {
    static const std::pair<const char*, const char*> rules[] = {
        {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
        {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& [from, to] : rules) {
      std::string f = from, t = to, out;
      size_t pos = 0, at;
      while ((at = s.find(f, pos)) != std::string::npos) {
        out += s.substr(pos, at - pos) + t;
        pos = at + f.size();
      }
      s = out + s.substr(pos);
    }
    return s;
  }

  // split the raw text around added tokens (leftmost, longest first), then run the pipeline on the rest
  void encode_text(const std::string& text, std::vector<int64_t>& ids) const {
    size_t pos = 0, seg = 0;
    while (pos < text.size()) {
      const AddedToken* best = nullptr;
      for (const auto& a : added_)
        if (!a.content.empty() && text.compare(pos, a.content.size(), a.content) == 0 &&
            (!best || a.content.size() > best->content.size()) && word_bounded(a, text, pos))
          best = &a;
      if (!best) { ++pos; continue; }
      size_t start = pos, end = pos + best->content.size();
      if (best->lstrip) while (start > seg && is_space_byte(text[start - 1])) --start;
      if (best->rstrip) while (end < text.size() && is_space_byte(text[end])) ++end;
      encode_segment(text.substr(seg, start - seg), ids);
      ids.push_back(best->id);
      pos = seg = end;
    }
    encode_segment(text.substr(seg), ids);
  }

  static bool is_space_byte(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
  static bool word_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }
  static bool word_bounded(const AddedToken& a, const std::string& text, size_t pos) {
    if (!a.single_word) return true;
    size_t end = pos + a.content.size();
    return (pos == 0 || !word_char(text[pos - 1])) && (end >= text.size() || !word_char(text[end]));
  }

  void encode_segment(const std::string& segment, std::vector<int64_t>& ids) const {
    if (segment.empty()) return;
    CPs cps = unicode::decode_utf8(segment);
    if (nfc_) cps = unicode::nfc(cps);
    std::vector<CPs> pieces{cps};
    for (const auto& step : steps_) {
      std::vector<CPs> next;
      for (auto& piece : pieces) {
        if (piece.empty()) continue;
        if (step.kind == PreStep::Split) {
          for (auto& p : split_pattern(step.pattern, piece)) next.push_back(std::move(p));
        } else if (step.kind == PreStep::WhitespaceSplit) {
          CPs word;
          for (uint32_t c : piece) {
            if (is_space(c)) { if (!word.empty()) next.push_back(word); word.clear(); }
            else word.push_back(c);
          }
          if (!word.empty()) next.push_back(word);
        } else {  // ByteLevel: optional leading space, optional GPT-2 split, then bytes -> printable characters
          if (step.add_prefix_space && piece[0] != ' ') piece.insert(piece.begin(), ' ');
          std::vector<CPs> parts = step.use_regex ? split_pattern(Pattern::Gpt2, piece) : std::vector<CPs>{piece};
          for (auto& part : parts) {
            CPs mapped;
            for (unsigned char b : unicode::encode_utf8(part)) mapped.push_back(chars_[b]);
            next.push_back(std::move(mapped));
          }
        }
      }
      pieces = std::move(next);
    }
    for (const auto& piece : pieces) {
      if (piece.empty()) continue;
      std::string word = unicode::encode_utf8(piece);
      if (!bpe_) {
        auto it = vocab_.find(word);
        if (it != vocab_.end()) ids.push_back(it->second);
        else if (unk_ >= 0) ids.push_back(unk_);
        continue;
      }
      const std::vector<int64_t>& out = bpe(word, piece);
      ids.insert(ids.end(), out.begin(), out.end());
    }
  }

  // merge the lowest-ranked adjacent pair (leftmost on ties) until no pair has a merge
  const std::vector<int64_t>& bpe(const std::string& word, const CPs& chars) const {
    auto hit = cache_.find(word);
    if (hit != cache_.end()) return hit->second;
    std::vector<int64_t> syms;
    auto whole = vocab_.find(word);
    if (ignore_merges_ && whole != vocab_.end()) {
      syms.push_back(whole->second);
    } else {
      for (uint32_t c : chars) {
        std::string ch;
        unicode::append_utf8(ch, c);
        auto it = vocab_.find(ch);
        if (it != vocab_.end()) syms.push_back(it->second);
        else if (unk_ >= 0) syms.push_back(unk_);
      }
      for (;;) {
        int64_t best_rank = -1, merged = 0;
        size_t at = 0;
        for (size_t i = 0; i + 1 < syms.size(); ++i) {
          auto m = merges_.find(key(syms[i], syms[i + 1]));
          if (m != merges_.end() && (best_rank < 0 || m->second.first < best_rank)) {
            best_rank = m->second.first;
            merged = m->second.second;
            at = i;
          }
        }
        if (best_rank < 0) break;
        syms[at] = merged;
        syms.erase(syms.begin() + at + 1);
      }
    }
    if (cache_.size() > 100000) cache_.clear();  // bounded memory on long streams of distinct words
    return cache_.emplace(word, std::move(syms)).first->second;
  }
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  auto text = read_file(path);
  if (!text) throw Error("tokenizer not found: " + path);
  try {
    return std::make_unique<JsonTokenizer>(json::Value::parse(*text));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(path + " is not a tokenizer.json this host reads: " + e.what());
  }
}

}  // namespace dspark
