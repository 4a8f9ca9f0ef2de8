// Runtime-owned KV caches, as dspark/runtime/kv.py: one buffer [layer, slot, kv_head, position, head_dim] whose
// first rows() slots of each layer hold the running rows, a length per row, capacity that starts at 64 positions
// and doubles (capped at the context). A row that ends leaves its slot to a row moved from the end, a row that
// joins takes a spare slot, so neither copies the others (regrown to hold more rows, the slots are what is running,
// as in Python). The same capacity policy as Python keeps every graph call the same shape, so both hosts compute
// the same numbers.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "runner.hpp"

namespace dspark {

// Zeroed bytes from calloc: a fresh large block comes zeroed from the operating system, so pages the cache never
// writes are never touched (std::vector zero-fills, and faults in, every byte of every regrown buffer)
class ZeroedBytes {
 public:
  explicit ZeroedBytes(size_t size = 0);
  unsigned char* data() { return data_.get(); }
  const unsigned char* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> data_;
};

class KVCache {
 public:
  KVCache(int layers, int rows, int heads, int head_dim, DType dtype, int max_len, int capacity = 64);

  int rows() const { return rows_; }
  int capacity() const { return capacity_; }
  DType dtype() const { return dtype_; }
  std::vector<int64_t> lens;

  // room for `length` positions in every row, and buffer capacity for `padded` (an in-place graph writes each
  // row's whole padded chunk, so a row near the context limit may need slots past it)
  void reserve(int64_t length, int64_t padded = 0);
  // keep the listed rows, old row rows[i] becoming row i: a row that changes slot must move into the slot of a
  // dropped row (fill order)
  void keep_rows(const std::vector<int>& rows);
  void add_rows(const KVCache& other);            // append other's rows
  KVCache empty_like(int rows) const;
  // write the first counts[r] positions of new_k/new_v [layer, row, head, new, dim] at each row's length
  void append(const TensorView& new_k, const TensorView& new_v, const std::vector<int>& counts);

  // the whole cache [layer, row, head, capacity, dim], contiguous (spare slots are dropped first)
  TensorView k_view() { return whole(true); }
  TensorView v_view() { return whole(false); }
  TensorView layer_view(bool key, int layer);      // [row, head, capacity, dim] of one layer (ort flavour)

 private:
  int layers_, rows_, slots_, heads_, dim_, max_len_, capacity_;
  DType dtype_;
  size_t esize_;
  ZeroedBytes k_, v_;
  TensorView whole(bool key);
  size_t bytes(int slots, int capacity) const;
  void regrid(int rows, int slots, int capacity, const std::vector<int>& take, const KVCache* tail);
};

}  // namespace dspark
