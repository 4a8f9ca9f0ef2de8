// How many of a round's drafts the target verifies, as dspark/runtime/schedulers.py: `fixed` verifies them all;
// `sps` is the paper's Algorithm 1 (admission by prefix survival, throughput from the steps-per-second table
// `dspark profile` wrote into the bundle for this machine, early stop at the first non-improvement) on the
// confidences `dspark calibrate` fitted (a lookup draft's: its measured acceptance rates). `auto` is sps where the
// bundle has a table for this machine and the drafts carry confidences, else fixed.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "dspark/dspark.hpp"
#include "sequence.hpp"

namespace dspark {

// steps/s of one target call with `rows` rows of `width` new tokens, bilinear between profiled points
struct StepsPerSecond {
  std::vector<double> rows, widths;
  std::vector<std::vector<double>> steps_per_second;  // [rows][widths]
  double operator()(double r, double w) const;
};

// Algorithm 1 over per-row confidences of drafts 1..n (proposed[r] of them)
std::vector<int> sps_lengths(const std::vector<std::vector<double>>& confidences, const std::vector<int>& proposed,
                             const StepsPerSecond& table);

// the name `dspark profile` gives this machine's CPU: cpu-<model name, lowercased, runs of other characters as
// '-'>-<cores>c (dspark/runtime/profile.py's device_name)
std::string cpu_device_name();

class Scheduler {
 public:
  Scheduler(const Bundle& bundle, const Options& options, bool drafts_with_confidence);
  // verify lengths for the round's proposals
  std::vector<int> choose(const std::vector<Proposal>& proposals) const;

 private:
  std::optional<StepsPerSecond> table_;  // set: sps over it; unset: fixed
  std::vector<double> temperatures_, biases_;  // the STS fit; empty: raw confidences
};

}  // namespace dspark
