// Drafts, as dspark/runtime/proposers.py: a draft LM (K single-token steps, a cache that lags and rolls back) or a
// DSpark/DFlash block drafter (one call drafts the block from the target's tapped features; its context cache is
// fed once per committed position and never rolls back); prompt lookup in front of either or of none. All:
// keep/add rows, propose up to a cap, commit.
#pragma once

#include <memory>
#include <vector>

#include "bundle.hpp"
#include "decoder.hpp"
#include "sequence.hpp"

namespace dspark {

class Proposer {
 public:
  virtual ~Proposer() = default;
  virtual void keep(const std::vector<int>& rows) = 0;
  // `features` (block drafters): per new row, the prompt's tapped target features, row-major [tokens, width]
  virtual void add(int count, std::vector<std::vector<float>>* features) = 0;
  virtual std::vector<Proposal> propose(std::vector<Sequence*>& seqs, const std::vector<int>& caps) = 0;
  // the target's verify call (for its tapped features), each row's anchor, proposal length, verified length and
  // accepted count
  virtual void commit(const Decoder& target, const std::vector<int64_t>& anchors, const std::vector<int>& drafted,
                      const std::vector<int>& verified, const std::vector<int>& accepted) = 0;
  // what the next round reads first beyond a round's own, on the widest row (proposers.py's backlog): a new row's
  // prompt, and one token (or target feature) for each round the row sat out
  virtual int backlog(const std::vector<Sequence*>& seqs) const = 0;
  virtual bool wants_features() const { return false; }
  // whether its drafts carry confidence logits (what the sps scheduler reads)
  virtual bool has_confidence() const { return true; }
  int k = 0;
};

// what drafts for the bundle under these options (its draft, prompt lookup, both), or nullptr when nothing does
std::unique_ptr<Proposer> make_proposer(const Bundle& bundle, const Options& options);

}  // namespace dspark
