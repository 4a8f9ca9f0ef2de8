#include "rng.hpp"

#include <cstddef>
#include <vector>

namespace dspark {
namespace {

// numpy.random.SeedSequence constants (a hash after Melissa O'Neill's seed_seq), pool of 4 32-bit words
constexpr uint32_t INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
constexpr uint32_t MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715;
constexpr int XSHIFT = 16, POOL = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= MULT_A;
  value *= hash_const;
  value ^= value >> XSHIFT;
  return value;
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t r = MIX_MULT_L * x - MIX_MULT_R * y;
  r ^= r >> XSHIFT;
  return r;
}

// four 64-bit words of SeedSequence(seed).generate_state(4, uint64)
void seed_state(uint64_t seed, uint64_t out[4]) {
  std::vector<uint32_t> entropy{static_cast<uint32_t>(seed)};  // the int as little-endian 32-bit words
  if (seed >> 32) entropy.push_back(static_cast<uint32_t>(seed >> 32));
  uint32_t pool[POOL];
  uint32_t hc = INIT_A;
  for (int i = 0; i < POOL; ++i) pool[i] = hashmix(i < static_cast<int>(entropy.size()) ? entropy[i] : 0, hc);
  for (int s = 0; s < POOL; ++s)
    for (int d = 0; d < POOL; ++d)
      if (s != d) pool[d] = mix(pool[d], hashmix(pool[s], hc));
  for (std::size_t s = POOL; s < entropy.size(); ++s)
    for (int d = 0; d < POOL; ++d) pool[d] = mix(pool[d], hashmix(entropy[s], hc));
  uint32_t words[8];
  uint32_t hb = INIT_B;
  for (int i = 0; i < 8; ++i) {
    uint32_t v = pool[i % POOL];
    v ^= hb;
    hb *= MULT_B;
    v *= hb;
    v ^= v >> XSHIFT;
    words[i] = v;
  }
  for (int i = 0; i < 4; ++i) out[i] = uint64_t(words[2 * i]) | uint64_t(words[2 * i + 1]) << 32;
}

constexpr unsigned __int128 PCG_MULT =
    (static_cast<unsigned __int128>(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;

}  // namespace

Rng::Rng(uint64_t seed) {
  uint64_t s[4];
  seed_state(seed, s);
  unsigned __int128 initstate = (static_cast<unsigned __int128>(s[0]) << 64) | s[1];
  unsigned __int128 initseq = (static_cast<unsigned __int128>(s[2]) << 64) | s[3];
  // PCG's srandom: state 0, odd increment from the sequence, one step, add the seed state, one step
  inc_ = (initseq << 1) | 1;
  state_ = 0;
  state_ = state_ * PCG_MULT + inc_;
  state_ += initstate;
  state_ = state_ * PCG_MULT + inc_;
}

uint64_t Rng::next64() {
  state_ = state_ * PCG_MULT + inc_;
  uint64_t hi = static_cast<uint64_t>(state_ >> 64), lo = static_cast<uint64_t>(state_);
  unsigned rot = static_cast<unsigned>(state_ >> 122);
  uint64_t x = hi ^ lo;
  return (x >> rot) | (x << ((64 - rot) & 63));
}

double Rng::random() { return static_cast<double>(next64() >> 11) * (1.0 / 9007199254740992.0); }

}  // namespace dspark
