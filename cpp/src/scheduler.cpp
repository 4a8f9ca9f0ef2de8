#include "scheduler.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

#include "sampling.hpp"

namespace dspark {

namespace {

// SpsScheduler's MEMORY, PROBE_EVERY and PROBE_SHARE (schedulers.py says why)
constexpr size_t kMemory = 24;
constexpr int kProbeEvery = 16;
constexpr double kProbeShare = 0.02;

// a fractional index of x on a sorted axis, clamped to its ends
double axis_index(const std::vector<double>& axis, double x) {
  if (axis.size() < 2) return 0.0;
  x = std::min(std::max(x, axis.front()), axis.back());
  size_t i = static_cast<size_t>(std::upper_bound(axis.begin(), axis.end(), x) - axis.begin());
  i = std::min(i == 0 ? 0 : i - 1, axis.size() - 2);
  return static_cast<double>(i) + (x - axis[i]) / (axis[i + 1] - axis[i]);
}

std::vector<double> numbers(const json::Value& v, const char* what) {
  std::vector<double> out;
  for (const auto& item : v.items(what)) out.push_back(item.number(what));
  return out;
}

}  // namespace

double StepsPerSecond::operator()(double r, double w) const {
  double ri = axis_index(rows, r), wi = axis_index(widths, w);
  size_t r0 = static_cast<size_t>(std::floor(ri)), w0 = static_cast<size_t>(std::floor(wi));
  size_t r1 = std::min(r0 + 1, rows.size() - 1), w1 = std::min(w0 + 1, widths.size() - 1);
  double fr = ri - static_cast<double>(r0), fw = wi - static_cast<double>(w0);
  const auto& t = steps_per_second;
  double top = t[r0][w0] * (1 - fw) + t[r0][w1] * fw;
  double bottom = t[r1][w0] * (1 - fw) + t[r1][w1] * fw;
  // beyond the profiled range a call is assumed throughput-bound: cost grows with tokens
  double scale = std::max(1.0, r / rows.back()) * std::max(1.0, w / widths.back());
  return (top * (1 - fr) + bottom * fr) / scale;
}

double StepsPerSecond::by_rows(const std::vector<double>& values, int r) const {
  // schedulers.py's StepsPerSecond._by_rows
  double x = static_cast<double>(r);
  if (x >= rows.back()) return values.back() * x / rows.back();
  size_t i = static_cast<size_t>(std::upper_bound(rows.begin(), rows.end(), x) - rows.begin());
  i = i == 0 ? 0 : i - 1;
  if (x <= rows[i]) return values[i];
  return values[i] + (x - rows[i]) * (values[i + 1] - values[i]) / (rows[i + 1] - rows[i]);
}

double StepsPerSecond::draft_cost(int r) const { return by_rows(draft_seconds, r); }

double StepsPerSecond::read_cost(int r, int backlog) const {
  return backlog && !draft_read_seconds.empty() ? backlog * by_rows(draft_read_seconds, r) : 0.0;
}

namespace {

// by draft position: every row's prefix survival there, summed (schedulers.py's summed_survival)
std::vector<double> summed_survival(const std::vector<std::vector<double>>& confidences,
                                    const std::vector<int>& proposed) {
  int longest = proposed.empty() ? 0 : *std::max_element(proposed.begin(), proposed.end());
  std::vector<double> gains(static_cast<size_t>(longest), 0.0);
  for (size_t r = 0; r < proposed.size(); ++r) {
    double survival = 1.0;
    for (int j = 1; j <= proposed[r]; ++j) {
      survival *= confidences[r][static_cast<size_t>(j - 1)];
      gains[static_cast<size_t>(j - 1)] += survival;
    }
  }
  return gains;
}

// the width sps admits and the expected tokens there, with early stop (schedulers.py's best_width); rate(w): the
// steps/s of a call w tokens wide over `rows` rows
template <class Rate>
std::pair<int, double> best_width(int rows, const std::vector<double>& gains, Rate rate) {
  double tau = static_cast<double>(rows), expected = tau;
  double best = tau * rate(1);
  int width = 0;
  for (size_t k = 0; k < gains.size(); ++k) {
    tau += gains[k];
    double throughput = tau * rate(2 + k);
    if (!(throughput > best)) break;  // early stop at the first width that does not pay
    best = throughput;
    width = static_cast<int>(k) + 1;
    expected = tau;
  }
  return {width, expected};
}

std::pair<int, double> best_width(int rows, const std::vector<double>& gains, const StepsPerSecond& table) {
  return best_width(rows, gains, [&](size_t w) { return table(rows, static_cast<double>(w)); });
}

}  // namespace

std::vector<int> sps_lengths(const std::vector<std::vector<double>>& confidences, const std::vector<int>& proposed,
                             const StepsPerSecond& table) {
  int width = best_width(static_cast<int>(proposed.size()), summed_survival(confidences, proposed), table).first;
  std::vector<int> lengths(proposed.size());
  for (size_t r = 0; r < proposed.size(); ++r) lengths[r] = std::min(proposed[r], width);
  return lengths;
}

std::string cpu_device_name() {
  std::string model;
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      model = line.substr(line.find(':') + 1);
      model.erase(0, model.find_first_not_of(" \t"));
      model.erase(model.find_last_not_of(" \t\r") + 1);
      break;
    }
  }
  std::string slug;
  for (char c : model) {
    char l = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    bool keep = (l >= 'a' && l <= 'z') || (l >= '0' && l <= '9');
    if (keep) slug += l;
    else if (!slug.empty() && slug.back() != '-') slug += '-';
  }
  while (!slug.empty() && slug.back() == '-') slug.pop_back();
  return "cpu-" + slug + "-" + std::to_string(std::thread::hardware_concurrency()) + "c";
}

Scheduler::Scheduler(const Bundle& bundle, const Options& options, bool drafts_with_confidence)
    : threshold_(options.threshold) {
  const std::string& asked = options.scheduler;
  if (asked != "auto" && asked != "fixed" && asked != "threshold" && asked != "sps")
    throw Error("scheduler '" + asked + "' is unknown; choose auto, fixed, threshold or sps");
  if (!(threshold_ >= 0 && threshold_ <= 1)) {
    std::ostringstream got;
    got << threshold_;
    throw Error("threshold must be in [0, 1], got " + got.str());
  }
  if ((asked == "auto" || asked == "sps") && options.backend == "ort" && options.provider == "cpu") {
    if (auto table = bundle.read_json("profiles/ort-" + cpu_device_name() + ".json")) {
      StepsPerSecond t;
      t.rows = numbers(table->at("rows"), "rows");
      t.widths = numbers(table->at("widths"), "widths");
      for (const auto& row : table->at("steps_per_second").items("steps_per_second"))
        t.steps_per_second.push_back(numbers(row, "steps_per_second"));
      if (table->has("draft_seconds")) t.draft_seconds = numbers(table->at("draft_seconds"), "draft_seconds");
      if (table->has("draft_length")) t.draft_length = static_cast<int>(table->at("draft_length").integer());
      if (table->has("draft_cost_per_position"))
        t.draft_cost_per_position = table->at("draft_cost_per_position").boolean("draft_cost_per_position");
      if (table->has("draft_read_seconds"))
        t.draft_read_seconds = numbers(table->at("draft_read_seconds"), "draft_read_seconds");
      table_ = std::move(t);
    }
  }
  // sps without its table, and any scheduler without confidences, verifies whole drafts, as the Python runtime
  // falls back
  if (table_) kind_ = Kind::sps;
  if (asked == "threshold") kind_ = Kind::threshold;
  if (!drafts_with_confidence) kind_ = Kind::fixed;
  if (kind_ != Kind::fixed) {
    if (auto fit = bundle.read_json("calibration.json")) {
      temperatures_ = numbers(fit->at("sts_temperatures"), "sts_temperatures");
      // a calibration from dspark 0.4.4 and older holds temperatures alone
      biases_ = fit->has("sts_biases") ? numbers(fit->at("sts_biases"), "sts_biases")
                                       : std::vector<double>(temperatures_.size(), 0.0);
    }
  }
}

std::vector<int> Scheduler::choose(const std::vector<Proposal>& proposals) {
  std::vector<int> proposed;
  for (const auto& p : proposals) proposed.push_back(static_cast<int>(p.tokens.size()));
  if (kind_ == Kind::fixed) return proposed;
  std::vector<std::vector<double>> confidences(proposals.size());
  for (size_t r = 0; r < proposals.size(); ++r) {
    const Proposal& p = proposals[r];
    if (p.tokens.empty()) continue;
    if (!p.has_confidence) return proposed;  // a drafter without a confidence head: this round verifies whole
    for (size_t k = 0; k < p.confidence.size(); ++k) {
      double z = p.confidence[k];
      if (p.sts && k < temperatures_.size()) z = z / temperatures_[k] + biases_[k];  // c_k = sigmoid(z_k/t_k + b_k)
      confidences[r].push_back(sigmoid(z));
    }
  }
  if (kind_ == Kind::sps) {
    std::vector<double> gains = summed_survival(confidences, proposed);
    if (!gains.empty()) {
      auto drafting = static_cast<double>(std::count_if(proposed.begin(), proposed.end(), [](int n) { return n > 0; }));
      std::vector<double> survival(gains.size());
      for (size_t k = 0; k < gains.size(); ++k) survival[k] = gains[k] / drafting;
      if (recent_.size() == kMemory) recent_.pop_front();
      recent_.emplace_back(std::move(survival), static_cast<int>(gains.size()));
      replayed_.clear();
    }
    int width = best_width(static_cast<int>(proposed.size()), gains, *table_).first;
    std::vector<int> lengths(proposed.size());
    for (size_t r = 0; r < proposed.size(); ++r) lengths[r] = std::min(proposed[r], width);
    return lengths;
  }
  std::vector<int> lengths(proposed.size());  // threshold: up to the first draft below it
  for (size_t r = 0; r < proposed.size(); ++r)
    while (lengths[r] < proposed[r] && confidences[r][static_cast<size_t>(lengths[r])] >= threshold_) ++lengths[r];
  return lengths;
}

bool Scheduler::should_draft(int rows, int backlog, double tokens_left) {
  // schedulers.py's SpsScheduler.should_draft: not where every row's sure first draft would not pay for the wider
  // call; where the drafter was profiled, only if the remembered rounds replayed at `rows` rows (each at the width
  // sps chooses for rows of its survival, its draft call priced in) beat plain decoding by enough, over the rounds
  // left, to repay reading the drafter's backlog; after kProbeEvery rounds priced out, one drafts to refresh the
  // memory, or after more where one (a round's loss and the backlog) costs more than kProbeShare of the plain steps
  // between probes
  if (kind_ != Kind::sps) return true;
  const StepsPerSecond& table = *table_;
  if (!(2 * table(rows, 2) > table(rows, 1))) return false;
  if (table.draft_seconds.empty() || recent_.empty()) return true;
  const Replay& r = replayed(rows);
  double debt = table.read_cost(rows, backlog) * table(rows, 1);  // in plain steps
  bool pays = r.loss < 0 && (debt == 0 || -r.loss * tokens_left / r.tokens_a_round > debt);
  if (pays || refused_ >= std::max(static_cast<double>(kProbeEvery), (r.loss + debt) / kProbeShare)) {
    refused_ = 0;
    return true;
  }
  ++refused_;
  return false;
}

int Scheduler::draft_positions(int rows, int length) {
  // schedulers.py's SpsScheduler.draft_positions: a drafter that pays by the position drafts one past the widest
  // verify a remembered round gets replayed at these rows
  if (kind_ != Kind::sps || recent_.empty()) return length;
  const StepsPerSecond& table = *table_;
  if (table.draft_seconds.empty() || !table.draft_cost_per_position) return length;
  return std::min(length, replayed(rows).widest + 1);
}

const Scheduler::Replay& Scheduler::replayed(int rows) {
  auto found = replayed_.find(rows);
  if (found == replayed_.end()) found = replayed_.emplace(rows, replay(rows)).first;
  return found->second;
}

Scheduler::Replay Scheduler::replay(int rows) const {
  // schedulers.py's SpsScheduler.replay
  const StepsPerSecond& table = *table_;
  int longest = 0;
  for (const auto& round : recent_) longest = std::max(longest, round.second);
  std::vector<double> rates;  // steps/s of a call 1 + j tokens wide over these rows
  for (int j = 0; j <= longest; ++j) rates.push_back(table(rows, 1.0 + j));
  auto rate = [&](size_t w) { return rates[w - 1]; };
  double tokens = 0, seconds = 0;
  int widest = 0;
  for (const auto& [survival, positions] : recent_) {
    std::vector<double> gains(survival.size());
    for (size_t k = 0; k < gains.size(); ++k) gains[k] = rows * survival[k];
    auto [width, expected] = best_width(rows, gains, rate);
    tokens += expected;
    seconds += draft_cost(rows, positions) + 1 / rates[static_cast<size_t>(width)];
    widest = std::max(widest, width);
  }
  double plain = rows * rates[0];  // tokens/s
  double remembered = static_cast<double>(recent_.size());
  return {(seconds - tokens / plain) / remembered * rates[0], tokens / remembered / rows, widest};
}

double Scheduler::draft_cost(int rows, int positions) const {
  // schedulers.py's SpsScheduler.draft_cost: a draft LM's round by the positions it drafted
  const StepsPerSecond& table = *table_;
  double seconds = table.draft_cost(rows);
  if (!table.draft_cost_per_position || table.draft_length == 0) return seconds;
  return seconds * std::min(1.0, static_cast<double>(positions) / table.draft_length);
}

TableBlockSchedule::TableBlockSchedule(std::map<int, int> table) : table_(std::move(table)) {}

int TableBlockSchedule::cap(int rows, int default_length) {
  auto above = table_.upper_bound(rows);  // the first listed size above rows; the one before it decides
  int length = above == table_.begin() ? table_.begin()->second : std::prev(above)->second;
  return std::min(default_length, length);
}

namespace {

int bucket_of(int rows) {  // Python's int.bit_length: 1, 2-3, 4-7, ...
  int bits = 0;
  for (; rows > 0; rows >>= 1) ++bits;
  return bits;
}

}  // namespace

std::optional<double> AdaptiveBlockSchedule::rate(int bucket, bool drafted) const {
  auto it = rounds_.find({bucket, drafted});
  if (it == rounds_.end() || it->second.empty()) return std::nullopt;
  double tokens = 0, seconds = 0;
  for (const auto& [t, s] : it->second) tokens += t, seconds += s;
  return tokens / seconds;
}

double AdaptiveBlockSchedule::rate_error(int bucket, bool drafted) const {
  const auto& seen = rounds_.at({bucket, drafted});
  if (seen.size() < 2) return std::numeric_limits<double>::infinity();
  double n = static_cast<double>(seen.size()), r = *rate(bucket, drafted);
  double spread = 0, seconds = 0;
  for (const auto& [t, s] : seen) {
    spread += (t - r * s) * (t - r * s);
    seconds += s;
  }
  return std::sqrt(spread / (n - 1) / n) / (seconds / n);
}

int AdaptiveBlockSchedule::cap(int rows, int default_length) {
  int bucket = bucket_of(rows);
  std::optional<double> drafting = rate(bucket, true), plain = rate(bucket, false);
  if (!drafting || rounds_.at({bucket, true}).size() < kExplore) return default_length;
  if (!plain) return 0;
  bool drafts = *drafting + kMargin * rate_error(bucket, true) >= *plain;
  int& since = since_probe_[bucket];
  auto interval = interval_.find(bucket);
  if (since >= (interval == interval_.end() ? kProbeEvery : interval->second)) {
    since = 0;
    probing_[bucket] = !drafts;
    return drafts ? 0 : default_length;  // the other mode, once
  }
  since += 1;
  return drafts ? default_length : 0;
}

void AdaptiveBlockSchedule::observe(int rows, bool drafted, int tokens, double seconds) {
  if (seconds <= 0) return;
  int bucket = bucket_of(rows);
  double this_rate = tokens / seconds;
  auto probe = probing_.find(bucket);
  if (probe != probing_.end() && probe->second == drafted) {
    probing_.erase(probe);
    std::optional<double> chosen = rate(bucket, !drafted);
    bool slower = chosen && this_rate < *chosen;
    auto it = interval_.find(bucket);
    int interval = it == interval_.end() ? kProbeEvery : it->second;
    interval_[bucket] = slower ? std::min(2 * interval, kProbeEvery * kMaxBackoff) : kProbeEvery;
  }
  Key key{bucket, drafted};
  auto& seen = rounds_[key];
  if (seen.size() == 1 && warmed_.insert(key).second) seen.clear();  // a mode's first round counts until a second
  seen.emplace_back(tokens, seconds);
  if (seen.size() > kWindow) seen.pop_front();
}

std::unique_ptr<BlockSchedule> make_block_schedule(const std::string& spec) {
  if (spec.empty() || spec == "off") return nullptr;
  if (spec == "auto") return std::make_unique<AdaptiveBlockSchedule>();
  const std::string usage = "block schedule '" + spec + "': use auto, off or BATCH:LENGTH pairs separated by commas, "
                            "for example 1:7,4:4,16:0";
  std::map<int, int> table;
  std::stringstream items(spec);
  for (std::string item; std::getline(items, item, ',');) {
    size_t colon = item.find(':');
    if (colon == std::string::npos) throw Error(usage);
    int rows = 0, length = 0;
    try {
      size_t used_rows = 0, used_length = 0;
      rows = std::stoi(item.substr(0, colon), &used_rows);
      length = std::stoi(item.substr(colon + 1), &used_length);
      if (used_rows != colon || used_length != item.size() - colon - 1) throw Error(usage);
    } catch (const std::logic_error&) {  // stoi: not a number, or out of range
      throw Error(usage);
    }
    if (rows < 1 || length < 0)
      throw Error("block schedule '" + spec + "': give BATCH:LENGTH pairs with BATCH >= 1 and LENGTH >= 0");
    table[rows] = length;
  }
  if (table.empty()) throw Error(usage);
  return std::make_unique<TableBlockSchedule>(std::move(table));
}

}  // namespace dspark
