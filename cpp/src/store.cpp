#include "store.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <tuple>

#include "files.hpp"

namespace dspark {

namespace {

constexpr uint64_t kMix = 0x9E3779B97F4A7C15ull;  // store.py's _MIX: the same hashes, wrapping

uint64_t hash_of(const int64_t* tokens, int n) {
  uint64_t h = 0;
  for (int i = 0; i < n; ++i) h = h * kMix + static_cast<uint64_t>(tokens[i]) + 1;
  return h;
}

Error bad_store(const std::string& path, const std::string& why) {
  return Error(path + ": " + why + "; rewrite the store with 'dspark lookup-data'");
}

// a 1-D array of unsigned 16- or 32-bit or signed 64-bit little-endian integers in NumPy's .npy format, which
// `dspark lookup-data` writes
std::vector<int64_t> read_npy_ids(const std::string& path) {
  auto bad = [&path](const std::string& why) { return bad_store(path, why); };
  auto data = read_file(path);
  if (!data) throw bad("cannot be read");
  const std::string& s = *data;
  if (s.size() < 10 || s.compare(0, 6, "\x93NUMPY") != 0) throw bad("not a NumPy .npy file");
  // version 1 has a 2-byte header length, versions 2 and 3 a 4-byte one (little-endian)
  size_t length_bytes = s[6] == 1 ? 2 : 4, header_len = 0;
  if (s.size() < 8 + length_bytes) throw bad("a truncated .npy header");
  for (size_t b = 0; b < length_bytes; ++b)
    header_len |= static_cast<size_t>(static_cast<unsigned char>(s[8 + b])) << (8 * b);
  size_t start = 8 + length_bytes + header_len;
  if (start > s.size()) throw bad("a truncated .npy header");
  std::string header = s.substr(8 + length_bytes, header_len);
  size_t width = header.find("'<u2'") != std::string::npos   ? 2
                 : header.find("'<u4'") != std::string::npos ? 4
                 : header.find("'<i8'") != std::string::npos ? 8
                                                             : 0;
  if (!width) throw bad("token ids must be little-endian uint16, uint32 or int64");
  if (header.find("'fortran_order': False") == std::string::npos) throw bad("a Fortran-ordered array");
  size_t shape = header.find("'shape': (");
  if (shape == std::string::npos || header.find(',', shape) > header.find(')', shape)) throw bad("not a 1-D array");
  size_t count = std::stoull(header.substr(shape + 10));
  if ((s.size() - start) != count * width) throw bad("its size does not match its header");
  std::vector<int64_t> ids(count);
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data()) + start;
  for (size_t i = 0; i < count; ++i, p += width) {
    uint64_t v = 0;
    for (size_t b = 0; b < width; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
    ids[i] = static_cast<int64_t>(v);
  }
  return ids;
}

}  // namespace

TokenStore::TokenStore(std::vector<int64_t> tokens, int min_match, int max_match) : tokens_(std::move(tokens)) {
  int64_t size = static_cast<int64_t>(tokens_.size());
  for (int n = min_match; n <= max_match; ++n) {
    if (size <= n) continue;
    auto& entries = index_[n];  // n-grams with at least one token after them
    for (int64_t i = 0; i + n < size; ++i) entries.emplace_back(hash_of(tokens_.data() + i, n), i);
    std::sort(entries.begin(), entries.end());  // by hash, then position: numpy's stable argsort order
  }
}

std::shared_ptr<const TokenStore> TokenStore::open(const Bundle& bundle, int min_match, int max_match) {
  const std::string rel = "lookup_store.npy";
  if (!bundle.lists(rel)) return nullptr;
  std::string path = bundle.file(rel);
  // one version of a file: its resolved path, modification time and size (bundle.py's file_identity)
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) throw bad_store(path, "cannot be read");
  char* real = ::realpath(path.c_str(), nullptr);
  std::string resolved = real ? real : path;
  std::free(real);
  using Key = std::tuple<std::string, int64_t, int64_t, int64_t, int, int>;
  Key key{resolved, static_cast<int64_t>(st.st_mtim.tv_sec), static_cast<int64_t>(st.st_mtim.tv_nsec),
          static_cast<int64_t>(st.st_size), min_match, max_match};
  static std::mutex mutex;
  static std::map<Key, std::weak_ptr<const TokenStore>> open_stores;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto held = open_stores[key].lock()) return held;
  for (auto it = open_stores.begin(); it != open_stores.end();)  // forget stores no engine holds any more
    it = it->second.expired() && it->first != key ? open_stores.erase(it) : std::next(it);
  auto store = std::make_shared<const TokenStore>(read_npy_ids(path), min_match, max_match);
  open_stores[key] = store;
  return store;
}

std::vector<int64_t> TokenStore::continuation(const std::vector<int64_t>& history, int cap) const {
  int64_t size = static_cast<int64_t>(tokens_.size());
  for (auto it = index_.rbegin(); it != index_.rend(); ++it) {
    int n = it->first;
    if (static_cast<int64_t>(history.size()) < n) continue;
    const int64_t* suffix = history.data() + history.size() - n;
    uint64_t key = hash_of(suffix, n);
    const auto& entries = it->second;
    auto lo = std::lower_bound(entries.begin(), entries.end(), std::make_pair(key, int64_t{0}));
    auto hi = std::upper_bound(lo, entries.end(), std::make_pair(key, size));
    if (hi - lo > static_cast<std::ptrdiff_t>(kCandidates)) lo = hi - kCandidates;  // the latest occurrences
    std::vector<int64_t> after;
    for (auto e = lo; e != hi; ++e)  // drop hash collisions
      if (std::equal(suffix, suffix + n, tokens_.data() + e->second)) after.push_back(e->second + n);
    if (after.empty()) continue;
    int64_t width = cap;
    for (int64_t a : after) width = std::min(width, size - a);
    std::vector<int64_t> chosen;
    for (int64_t j = 0; j < width; ++j) {  // majority at each position among the occurrences that agree so far
      std::map<int64_t, int> votes;
      for (int64_t a : after) ++votes[tokens_[a + j]];
      auto best = votes.begin();
      for (auto v = votes.begin(); v != votes.end(); ++v)
        if (v->second > best->second) best = v;
      chosen.push_back(best->first);
      std::vector<int64_t> agree;
      for (int64_t a : after)
        if (tokens_[a + j] == best->first) agree.push_back(a);
      after.swap(agree);
    }
    return chosen;
  }
  return {};
}

}  // namespace dspark
