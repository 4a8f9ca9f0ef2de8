#include "kv.hpp"

#include <algorithm>
#include <cstring>
#include <new>

namespace dspark {

ZeroedBytes::ZeroedBytes(size_t size) : data_(static_cast<unsigned char*>(std::calloc(size ? size : 1, 1))) {
  if (!data_) throw std::bad_alloc();
}

KVCache::KVCache(int layers, int rows, int heads, int head_dim, DType dtype, int max_len, int capacity)
    : lens(rows, 0), layers_(layers), rows_(rows), slots_(rows), heads_(heads), dim_(head_dim), max_len_(max_len),
      capacity_(std::min(capacity, max_len)), dtype_(dtype), esize_(dtype_size(dtype)) {
  k_ = ZeroedBytes(bytes(slots_, capacity_));
  v_ = ZeroedBytes(bytes(slots_, capacity_));
}

size_t KVCache::bytes(int rows, int capacity) const {
  return static_cast<size_t>(layers_) * rows * heads_ * capacity * dim_ * esize_;
}

TensorView KVCache::whole(bool key) {
  if (slots_ != rows_) {  // a graph that reads the whole cache takes it contiguous: drop the spare rows
    std::vector<int> all(rows_);
    for (int r = 0; r < rows_; ++r) all[r] = r;
    regrid(rows_, rows_, capacity_, all, nullptr);
  }
  return TensorView{dtype_, {layers_, rows_, heads_, capacity_, dim_}, (key ? k_ : v_).data()};
}

TensorView KVCache::layer_view(bool key, int layer) {
  unsigned char* base = (key ? k_ : v_).data() + bytes(slots_, capacity_) / layers_ * layer;
  return TensorView{dtype_, {rows_, heads_, capacity_, dim_}, base};
}

// Rebuild both buffers with `slots` rows of `capacity` positions: row i copies old row take[i] (or, past take,
// `tail`'s rows), its live positions only; sources are never wider than `capacity`, and the rest stays zero.
void KVCache::regrid(int rows, int slots, int capacity, const std::vector<int>& take, const KVCache* tail) {
  size_t line = static_cast<size_t>(dim_) * esize_;
  for (int which = 0; which < 2; ++which) {
    ZeroedBytes& dst_buf = which ? v_ : k_;
    ZeroedBytes out(bytes(slots, capacity));
    for (int l = 0; l < layers_; ++l)
      for (int r = 0; r < rows; ++r) {
        bool own = r < static_cast<int>(take.size());
        const KVCache* src = own ? this : tail;
        int sr = own ? take[r] : r - static_cast<int>(take.size());
        const ZeroedBytes& sb = which ? src->v_ : src->k_;
        size_t live = static_cast<size_t>(src->lens[sr]) * line;
        for (int h = 0; h < heads_; ++h) {
          const unsigned char* s = sb.data() + ((((static_cast<size_t>(l) * src->slots_ + sr) * heads_ + h) *
                                                 src->capacity_) * line);
          unsigned char* d = out.data() + ((((static_cast<size_t>(l) * slots + r) * heads_ + h) * capacity) * line);
          std::memcpy(d, s, live);
        }
      }
    dst_buf = std::move(out);
  }
  rows_ = rows;
  slots_ = slots;
  capacity_ = capacity;
}

void KVCache::reserve(int64_t length, int64_t padded) {
  if (length > max_len_)
    throw Error("sequence needs " + std::to_string(length) + " positions but the bundle's max context is " +
                std::to_string(max_len_));
  int64_t needed = std::max(length, padded);
  if (needed <= capacity_) return;
  int capacity = static_cast<int>(std::max<int64_t>(needed, std::min<int64_t>(max_len_, 2 * capacity_)));
  std::vector<int> all(rows_);
  for (int r = 0; r < rows_; ++r) all[r] = r;
  regrid(rows_, slots_, capacity, all, nullptr);
}

void KVCache::keep_rows(const std::vector<int>& rows) {
  // a row that changes slot moves into the slot of a dropped row (the engine's fill order), so moves never
  // overwrite a row still to move; only its live positions are copied, and the other rows stay where they are
  size_t line = static_cast<size_t>(dim_) * esize_, span = static_cast<size_t>(capacity_) * line;
  std::vector<int64_t> kept;
  for (int r : rows) kept.push_back(lens[r]);
  for (int which = 0; which < 2; ++which) {
    unsigned char* base = (which ? v_ : k_).data();
    for (int l = 0; l < layers_; ++l)
      for (size_t slot = 0; slot < rows.size(); ++slot) {
        int from = rows[slot];
        if (from == static_cast<int>(slot)) continue;
        for (int h = 0; h < heads_; ++h) {
          size_t layer = static_cast<size_t>(l) * slots_;
          std::memmove(base + ((layer + slot) * heads_ + h) * span, base + ((layer + from) * heads_ + h) * span,
                       static_cast<size_t>(lens[from]) * line);
        }
      }
  }
  rows_ = static_cast<int>(rows.size());
  lens = kept;
}

void KVCache::add_rows(const KVCache& other) {
  size_t line = static_cast<size_t>(dim_) * esize_;
  int rows = rows_ + other.rows_;
  if (rows > slots_ || other.capacity_ > capacity_) {  // rows grow to what is running, as Python's cache
    std::vector<int> all(rows_);
    for (int r = 0; r < rows_; ++r) all[r] = r;
    std::vector<int64_t> joined = lens;
    joined.insert(joined.end(), other.lens.begin(), other.lens.end());
    regrid(rows, std::max(rows, slots_), std::max(capacity_, other.capacity_), all, &other);
    lens = joined;
    return;
  }
  for (int which = 0; which < 2; ++which) {
    unsigned char* dst = (which ? v_ : k_).data();
    const unsigned char* src = (which ? other.v_ : other.k_).data();
    for (int l = 0; l < layers_; ++l)
      for (int r = 0; r < other.rows_; ++r)
        for (int h = 0; h < heads_; ++h)
          std::memcpy(dst + ((((static_cast<size_t>(l) * slots_ + rows_ + r) * heads_ + h) * capacity_) * line),
                      src + ((((static_cast<size_t>(l) * other.slots_ + r) * heads_ + h) * other.capacity_) * line),
                      static_cast<size_t>(other.lens[r]) * line);
  }
  rows_ = rows;
  lens.insert(lens.end(), other.lens.begin(), other.lens.end());
}

KVCache KVCache::empty_like(int rows) const { return KVCache(layers_, rows, heads_, dim_, dtype_, max_len_); }

void KVCache::append(const TensorView& new_k, const TensorView& new_v, const std::vector<int>& counts) {
  int64_t need = 0;
  for (int r = 0; r < rows_; ++r) need = std::max(need, lens[r] + counts[r]);
  reserve(need);
  int width = static_cast<int>(new_k.shape[3]);  // new tokens per row in the graph's output
  size_t line = static_cast<size_t>(dim_) * esize_;
  for (int which = 0; which < 2; ++which) {
    const unsigned char* src = static_cast<const unsigned char*>((which ? new_v : new_k).data);
    unsigned char* dst = (which ? v_ : k_).data();
    for (int l = 0; l < layers_; ++l)
      for (int r = 0; r < rows_; ++r) {
        if (!counts[r]) continue;
        for (int h = 0; h < heads_; ++h) {
          const unsigned char* s = src + (((static_cast<size_t>(l) * rows_ + r) * heads_ + h) * width) * line;
          size_t at = ((static_cast<size_t>(l) * slots_ + r) * heads_ + h) * capacity_ + static_cast<size_t>(lens[r]);
          unsigned char* d = dst + at * line;
          std::memcpy(d, s, counts[r] * line);
        }
      }
  }
  for (int r = 0; r < rows_; ++r) lens[r] += counts[r];
}

}  // namespace dspark
