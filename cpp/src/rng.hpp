// The uniform stream of numpy's np.random.default_rng(seed).random(): SeedSequence -> PCG64 (XSL-RR 128/64) ->
// 53-bit doubles. Same seed, same draws as the Python runtime, so sampled runs agree token for token.
#pragma once
#include <cstdint>

namespace dspark {

class Rng {
 public:
  explicit Rng(uint64_t seed);
  double random();  // uniform in [0, 1)

 private:
  unsigned __int128 state_ = 0, inc_ = 0;
  uint64_t next64();
};

}  // namespace dspark
