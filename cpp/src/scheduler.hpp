// How many of a round's drafts the target verifies, as dspark/runtime/schedulers.py: `fixed` verifies them all;
// `threshold` up to the first whose confidence is below Options::threshold; `sps` is the paper's Algorithm 1
// (admission by prefix survival, throughput from the steps-per-second table `dspark profile` wrote into the bundle
// for this machine, early stop at the first non-improvement). Both read the confidences `dspark calibrate` fitted
// (a lookup draft's: its measured acceptance rates). `auto` is sps where the bundle has a table for this machine
// and the drafts carry confidences, else fixed.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bundle.hpp"
#include "dspark/dspark.hpp"
#include "sequence.hpp"

namespace dspark {

// steps/s of one target call with `rows` rows of `width` new tokens, bilinear between profiled points
struct StepsPerSecond {
  std::vector<double> rows, widths;
  std::vector<std::vector<double>> steps_per_second;  // [rows][widths]
  std::vector<double> draft_seconds;  // [rows]: one draft round of the bundle's drafter; empty where not profiled
  // a draft LM's round is one call per drafted position: draft_seconds times draft_length of them, and a round that
  // drafts fewer costs that share (schedulers.py's StepsPerSecond)
  int draft_length = 0;
  bool draft_cost_per_position = false;
  // [rows]: seconds each token a round's drafter reads first beyond a round's own adds to it; empty: not profiled
  std::vector<double> draft_read_seconds;
  double operator()(double r, double w) const;
  // seconds of a draft round over `rows` rows: linear between profiled counts, in proportion beyond the last
  double draft_cost(int rows) const;
  // seconds a backlog of `backlog` tokens (on the widest row) adds to the next draft round; 0 where not profiled
  double read_cost(int rows, int backlog) const;

 private:
  double by_rows(const std::vector<double>& values, int rows) const;  // linear between counts, in proportion beyond
};

// Algorithm 1 over per-row confidences of drafts 1..n (proposed[r] of them), admitting whole widths
std::vector<int> sps_lengths(const std::vector<std::vector<double>>& confidences, const std::vector<int>& proposed,
                             const StepsPerSecond& table);

// the name `dspark profile` gives this machine's CPU: cpu-<model name, lowercased, runs of other characters as
// '-'>-<cores>c (dspark/runtime/schedulers.py's device_name)
std::string cpu_device_name();

class Scheduler {
 public:
  Scheduler(const Bundle& bundle, const Options& options, bool drafts_with_confidence);
  // verify lengths for the round's proposals (sps also remembers what the drafts were worth)
  std::vector<int> choose(const std::vector<Proposal>& proposals);
  // whether a round over `rows` rows should draft at all, its drafter first reading `backlog` tokens beyond a
  // round's own, with `tokens_left` tokens a row still to generate, from these and past rounds only (schedulers.py's
  // should_draft); called once for each round that may draft
  bool should_draft(int rows, int backlog, double tokens_left);
  // how many of `length` positions a round over `rows` rows that drafts should draft (schedulers.py's
  // draft_positions): a draft LM one past the widest verify its remembered rounds get at these rows
  int draft_positions(int rows, int length);

 private:
  enum class Kind { fixed, threshold, sps };
  Kind kind_ = Kind::fixed;
  double threshold_ = 0.5;
  std::optional<StepsPerSecond> table_;  // sps's
  std::vector<double> temperatures_, biases_;  // the STS fit; empty: raw confidences
  // sps's memory of the last kMemory drafting rounds (schedulers.py's SpsScheduler.recent): each one's prefix
  // survival by position averaged over its drafting rows, and the positions it drafted
  std::deque<std::pair<std::vector<double>, int>> recent_;
  int refused_ = 0;  // rounds in a row should_draft priced out
  double draft_cost(int rows, int positions) const;
  // the remembered rounds replayed at `rows` rows: plain steps a round loses (below 0: gains), tokens a row emits
  // a round, and the widest verify (schedulers.py's SpsScheduler.replay)
  struct Replay {
    double loss, tokens_a_round;
    int widest;
  };
  Replay replay(int rows) const;
  // replay(rows) by row count until the memory changes (schedulers.py's SpsScheduler.replayed): a round that drafts
  // asks for it twice, once whether and once how far to draft
  std::map<int, Replay> replayed_;
  const Replay& replayed(int rows);
};

// Draft length by number of running rows (dspark/runtime/schedulers.py's block schedules)
class BlockSchedule {
 public:
  virtual ~BlockSchedule() = default;
  // the draft length a round over `rows` running rows may use (default_length: the proposer's)
  virtual int cap(int rows, int default_length) = 0;
  // a round's outcome: whether it drafted, the tokens it emitted, its seconds
  virtual void observe(int rows, bool drafted, int tokens, double seconds) = 0;
};

// From a {rows: length} table (0 = plain decoding there), the largest listed batch size at or below the rows
// deciding; it learns nothing from rounds
class TableBlockSchedule : public BlockSchedule {
 public:
  explicit TableBlockSchedule(std::map<int, int> table);  // not empty
  int cap(int rows, int default_length) override;
  void observe(int, bool, int, double) override {}

 private:
  std::map<int, int> table_;
};

// `auto`: drafts at a batch size only while drafting rounds there have emitted more tokens per second than plain
// rounds, both measured on this run, with the Python runtime's AdaptiveBlockSchedule's rules and constants (its
// docstring gives the reasons and the measurements behind them): batch sizes bucketed by bit length, rates over
// the last 32 rounds of a mode, 8 drafting rounds before drafting may be turned off, off only when below plain by
// more than 2 standard errors, the other mode probed once every 24 rounds, the wait doubling (to 16x) while
// probes lose. Decisions read past rounds only, so output stays lossless.
class AdaptiveBlockSchedule : public BlockSchedule {
 public:
  static constexpr size_t kWindow = 32;
  static constexpr size_t kExplore = 8;
  static constexpr double kMargin = 2.0;
  static constexpr int kProbeEvery = 24;
  static constexpr int kMaxBackoff = 16;

  int cap(int rows, int default_length) override;
  void observe(int rows, bool drafted, int tokens, double seconds) override;

 private:
  using Key = std::pair<int, bool>;  // (bucket, drafted)
  std::optional<double> rate(int bucket, bool drafted) const;
  double rate_error(int bucket, bool drafted) const;

  std::map<Key, std::deque<std::pair<double, double>>> rounds_;  // (tokens, seconds) of a mode's last rounds
  std::map<int, int> since_probe_, interval_;
  std::map<int, bool> probing_;  // per bucket: the mode of the probe whose round is not yet observed
  std::set<Key> warmed_;         // modes whose first round was forgotten
};

// "" or "off": none (draft at every batch size); "auto"; or BATCH:LENGTH pairs, e.g. "1:7,4:4,16:0"
std::unique_ptr<BlockSchedule> make_block_schedule(const std::string& spec);

}  // namespace dspark
