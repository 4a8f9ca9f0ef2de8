// Unicode pieces the tokenizer needs: UTF-8 <-> code points, the \p{L} / \p{N} / \s classes of the
// pre-tokenizer patterns, NFC normalisation, and UTF-8 repair the way Rust's String::from_utf8_lossy does it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dspark::unicode {

std::vector<uint32_t> decode_utf8(const std::string& s);  // invalid bytes become U+FFFD
void append_utf8(std::string& out, uint32_t cp);
std::string encode_utf8(const std::vector<uint32_t>& cps);
std::string lossy(const std::string& bytes);  // invalid sequences -> U+FFFD, one per maximal subpart

bool is_letter(uint32_t cp);
bool is_number(uint32_t cp);
bool is_space(uint32_t cp);  // the White_Space property
std::vector<uint32_t> nfc(const std::vector<uint32_t>& cps);

}  // namespace dspark::unicode
