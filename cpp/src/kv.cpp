#include "kv.hpp"

#include <algorithm>
#include <cstring>
#include <new>

namespace dspark {

ZeroedBytes::ZeroedBytes(size_t size) : data_(static_cast<unsigned char*>(std::calloc(size ? size : 1, 1))) {
  if (!data_) throw std::bad_alloc();
}

KVCache::KVCache(int layers, int rows, int heads, int head_dim, DType dtype, int max_len, int capacity)
    : lens(rows, 0), layers_(layers), rows_(rows), heads_(heads), dim_(head_dim), max_len_(max_len),
      capacity_(std::min(capacity, max_len)), dtype_(dtype), esize_(dtype_size(dtype)) {
  k_ = ZeroedBytes(bytes(rows_, capacity_));
  v_ = ZeroedBytes(bytes(rows_, capacity_));
}

size_t KVCache::bytes(int rows, int capacity) const {
  return static_cast<size_t>(layers_) * rows * heads_ * capacity * dim_ * esize_;
}

TensorView KVCache::view(unsigned char* p) {
  return TensorView{dtype_, {layers_, rows_, heads_, capacity_, dim_}, p};
}

TensorView KVCache::layer_view(bool key, int layer) {
  unsigned char* base = (key ? k_ : v_).data() + bytes(rows_, capacity_) / layers_ * layer;
  return TensorView{dtype_, {rows_, heads_, capacity_, dim_}, base};
}

// Rebuild both buffers as `rows` x `capacity`: row i copies old row take[i] (or, past take, `tail`'s rows);
// sources are never wider than `capacity`, and positions past a source's capacity stay zero.
void KVCache::regrid(int rows, int capacity, const std::vector<int>& take, const KVCache* tail) {
  size_t line = static_cast<size_t>(dim_) * esize_;
  for (int which = 0; which < 2; ++which) {
    ZeroedBytes& dst_buf = which ? v_ : k_;
    ZeroedBytes out(bytes(rows, capacity));
    for (int l = 0; l < layers_; ++l)
      for (int r = 0; r < rows; ++r) {
        const KVCache* src = r < static_cast<int>(take.size()) ? this : tail;
        int sr = r < static_cast<int>(take.size()) ? take[r] : r - static_cast<int>(take.size());
        const ZeroedBytes& sb = which ? src->v_ : src->k_;
        for (int h = 0; h < heads_; ++h) {
          const unsigned char* s = sb.data() + ((((static_cast<size_t>(l) * src->rows_ + sr) * heads_ + h) *
                                                 src->capacity_) * line);
          unsigned char* d = out.data() + ((((static_cast<size_t>(l) * rows + r) * heads_ + h) * capacity) * line);
          std::memcpy(d, s, static_cast<size_t>(src->capacity_) * line);
        }
      }
    dst_buf = std::move(out);
  }
  rows_ = rows;
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
  regrid(rows_, capacity, all, nullptr);
}

void KVCache::keep_rows(const std::vector<int>& rows) {
  bool same = static_cast<int>(rows.size()) == rows_;
  for (size_t i = 0; same && i < rows.size(); ++i) same = rows[i] == static_cast<int>(i);
  if (same) return;
  std::vector<int64_t> kept;
  for (int r : rows) kept.push_back(lens[r]);
  regrid(static_cast<int>(rows.size()), capacity_, rows, nullptr);
  lens = kept;
}

void KVCache::add_rows(const KVCache& other) {
  std::vector<int> all(rows_);
  for (int r = 0; r < rows_; ++r) all[r] = r;
  regrid(rows_ + other.rows_, std::max(capacity_, other.capacity_), all, &other);
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
          unsigned char* d = dst + ((((static_cast<size_t>(l) * rows_ + r) * heads_ + h) * capacity_) + lens[r]) * line;
          std::memcpy(d, s, counts[r] * line);
        }
      }
  }
  for (int r = 0; r < rows_; ++r) lens[r] += counts[r];
}

}  // namespace dspark
