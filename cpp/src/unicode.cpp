#include "unicode.hpp"

#include <algorithm>

namespace dspark::unicode {
namespace {

struct CodepointRange { uint32_t first, last; };
struct CodepointValue { uint32_t cp; uint8_t value; };
struct Decomposition { uint32_t cp, offset, length; };
struct Composition { uint32_t first, second, composite; };

#include "unicode_tables.inc"

template <size_t N> bool in_ranges(const CodepointRange (&table)[N], uint32_t cp) {
  auto it = std::upper_bound(std::begin(table), std::end(table), cp,
                             [](uint32_t c, const CodepointRange& r) { return c < r.first; });
  return it != std::begin(table) && cp <= (it - 1)->last;
}

uint8_t combining_class(uint32_t cp) {
  auto it = std::lower_bound(std::begin(kCombiningClass), std::end(kCombiningClass), cp,
                             [](const CodepointValue& v, uint32_t c) { return v.cp < c; });
  return it != std::end(kCombiningClass) && it->cp == cp ? it->value : 0;
}

// Hangul syllables decompose and compose by formula (Unicode chapter 3.12)
constexpr uint32_t SBase = 0xAC00, LBase = 0x1100, VBase = 0x1161, TBase = 0x11A7;
constexpr uint32_t LCount = 19, VCount = 21, TCount = 28, NCount = VCount * TCount, SCount = LCount * NCount;

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= SBase && cp < SBase + SCount) {
    uint32_t s = cp - SBase;
    out.push_back(LBase + s / NCount);
    out.push_back(VBase + (s % NCount) / TCount);
    if (s % TCount) out.push_back(TBase + s % TCount);
    return;
  }
  auto it = std::lower_bound(std::begin(kDecompositions), std::end(kDecompositions), cp,
                             [](const Decomposition& d, uint32_t c) { return d.cp < c; });
  if (it != std::end(kDecompositions) && it->cp == cp)
    out.insert(out.end(), kDecompositionData + it->offset, kDecompositionData + it->offset + it->length);
  else
    out.push_back(cp);
}

uint32_t compose(uint32_t a, uint32_t b) {  // 0 when the pair has no primary composite
  if (a >= LBase && a < LBase + LCount && b >= VBase && b < VBase + VCount)
    return SBase + ((a - LBase) * VCount + (b - VBase)) * TCount;
  if (a >= SBase && a < SBase + SCount && (a - SBase) % TCount == 0 && b > TBase && b < TBase + TCount)
    return a + (b - TBase);
  auto it = std::lower_bound(std::begin(kCompositions), std::end(kCompositions), std::make_pair(a, b),
                             [](const Composition& c, const std::pair<uint32_t, uint32_t>& k) {
                               return c.first < k.first || (c.first == k.first && c.second < k.second);
                             });
  return it != std::end(kCompositions) && it->first == a && it->second == b ? it->composite : 0;
}

}  // namespace

bool is_letter(uint32_t cp) { return in_ranges(kLetters, cp); }
bool is_number(uint32_t cp) { return in_ranges(kNumbers, cp); }

bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

std::vector<uint32_t> nfc(const std::vector<uint32_t>& cps) {
  std::vector<uint32_t> d;
  for (uint32_t cp : cps) decompose(cp, d);
  // canonical order: stable sort of each run of non-starters by combining class
  for (size_t i = 0; i < d.size();) {
    if (!combining_class(d[i])) { ++i; continue; }
    size_t j = i;
    while (j < d.size() && combining_class(d[j])) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](uint32_t a, uint32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // canonical composition: a character joins the last starter unless something between blocks it
  std::vector<uint32_t> out;
  long starter = -1;
  int last_cc = 0;
  for (uint32_t c : d) {
    int cc = combining_class(c);
    if (starter >= 0) {
      bool adjacent = static_cast<long>(out.size()) - 1 == starter;
      if (adjacent || (last_cc != 0 && last_cc < cc)) {
        if (uint32_t comp = compose(out[starter], c)) {
          out[starter] = comp;
          continue;
        }
      }
    }
    if (cc == 0) starter = static_cast<long>(out.size());
    last_cc = cc;
    out.push_back(c);
  }
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) out += char(cp);
  else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
  else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
  }
}

std::string encode_utf8(const std::vector<uint32_t>& cps) {
  std::string s;
  for (uint32_t cp : cps) append_utf8(s, cp);
  return s;
}

namespace {
// length of the well-formed UTF-8 sequence at s[i] (Unicode table 3-7), or 0 with `bad` = the maximal subpart
size_t valid_at(const std::string& s, size_t i, size_t& bad, uint32_t& cp) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  if (c < 0x80) { cp = c; return 1; }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
  else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
  else { bad = 1; return 0; }
  cp = c & (need == 1 ? 0x1F : need == 2 ? 0x0F : 0x07);
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) { bad = k; return 0; }
    unsigned char x = b(i + k);
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (x < l || x > h) { bad = k; return 0; }
    cp = (cp << 6) | (x & 0x3F);
  }
  return need + 1;
}
}  // namespace

std::vector<uint32_t> decode_utf8(const std::string& s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0;
    uint32_t cp = 0;
    size_t n = valid_at(s, i, bad, cp);
    if (n) { out.push_back(cp); i += n; }
    else { out.push_back(0xFFFD); i += bad; }
  }
  return out;
}

std::string lossy(const std::string& bytes) { return encode_utf8(decode_utf8(bytes)); }

}  // namespace dspark::unicode
