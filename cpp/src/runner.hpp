// One small interface over graph backends (ONNX Runtime here, TensorRT engines where TensorRT exists): named
// host tensors in, named host tensors out, as dspark/runtime/runners.py.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "dspark/dspark.hpp"

namespace dspark {

enum class DType { F32, F16, I64, I32 };
DType dtype_of(const std::string& name);  // manifest dtype names ("float32", "int64", ...)
size_t dtype_size(DType t);

// A view of host memory the caller owns.
struct TensorView {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  void* data = nullptr;
  size_t count() const {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    return n;
  }
  template <class T> T* as() const { return static_cast<T*>(data); }
};

using Feeds = std::map<std::string, TensorView>;

class GraphRunner {
 public:
  virtual ~GraphRunner() = default;
  // Runs the graph on `feeds`. Outputs named in `bound` are written into that caller memory (the ort flavour's
  // KV buffers, updated in place); the others are returned, valid until the next run.
  virtual Feeds run(const Feeds& feeds, const Feeds& bound = {}) = 0;
};

std::unique_ptr<GraphRunner> make_runner(const Bundle& bundle, const std::string& graph, const Options& options);

// float view of a float32 or float16 output (converted into `scratch` when it is float16)
const float* as_float(const TensorView& t, std::vector<float>& scratch);
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

}  // namespace dspark
