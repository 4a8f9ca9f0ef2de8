// The bundle's lookup store (`dspark lookup-data`: token ids of earlier answers of the same target, in
// lookup_store.npy), as dspark/runtime/store.py's TokenStore: for a row with no match in its own tokens, the
// continuation that most often followed the longest suffix of its tokens found there. One sorted array of n-gram
// hashes per match length; a hash hit is checked against the tokens, so a collision never proposes anything.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bundle.hpp"
#include "dspark/dspark.hpp"

namespace dspark {

class TokenStore {
 public:
  static constexpr size_t kCandidates = 64;  // latest occurrences of a suffix that vote on its continuation

  TokenStore(std::vector<int64_t> tokens, int min_match, int max_match);
  // the bundle's store indexed for these match lengths, or nullptr where the bundle has none. Engines of one
  // process share an index while any holds it (as store.py's load_store): about 0.5 s and 75 MB for 1.5 M tokens
  static std::shared_ptr<const TokenStore> open(const Bundle& bundle, int min_match, int max_match);

  // up to cap tokens, chosen position by position by majority (ties: the smaller id) among the occurrences that
  // agree so far; empty when no suffix of min_match..max_match tokens occurs
  std::vector<int64_t> continuation(const std::vector<int64_t>& history, int cap) const;

 private:
  std::vector<int64_t> tokens_;
  std::map<int, std::vector<std::pair<uint64_t, int64_t>>> index_;  // n -> (hash, start), sorted
};

}  // namespace dspark
