// The ONNX Runtime graph runner: zero-copy inputs, outputs allocated by ONNX Runtime on the host (or bound to
// caller memory), one IoBinding per session.
#include <onnxruntime_cxx_api.h>

#include <cstring>
#include <map>
#include <tuple>
#include <thread>

#include "runner.hpp"

#ifdef DSPARK_WITH_TENSORRT
#include "runner_trt.hpp"
#endif

namespace dspark {
namespace {

ONNXTensorElementDataType ort_type(DType t) {
  switch (t) {
    case DType::F32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::F16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::I64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case DType::I32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

DType from_ort(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::F32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::F16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return DType::I64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return DType::I32;
    default: throw Error("a graph returned a tensor type this host does not read");
  }
}

// One environment for the process, with one intra-op thread pool that every session shares (sized by the first
// runner's --threads; 0: ONNX Runtime's default). A speculative round alternates between the draft's and the
// target's sessions: with a pool each, the idle pool either spins and takes the cores from the busy one or sleeps
// and pays a wake-up on every draft call (the Python runtime measured 43.0 -> 53.7 tok/s on SmolLM2 with one pool).
Ort::Env& env(int threads) {
  // errors reach the caller as exceptions carrying ONNX Runtime's message; its own log would repeat them
  static Ort::Env e = [threads] {
    Ort::ThreadingOptions pool;
    if (threads > 0) pool.SetGlobalIntraOpNumThreads(threads);
    pool.SetGlobalInterOpNumThreads(1);
    return Ort::Env(pool, ORT_LOGGING_LEVEL_FATAL, "dspark");
  }();
  return e;
}

// ONNX Runtime's messages on one line, so errors stay one line
std::string one_line(const char* what) {
  std::string s(what);
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

class OrtRunner : public GraphRunner {
 public:
  OrtRunner(const Bundle& bundle, const GraphSpec& spec, const Options& options)
      : spec_(spec), memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    env(options.threads);  // providers log through the environment: it must exist before they are appended
    Ort::SessionOptions so;
    so.DisablePerSessionThreads();  // the environment's shared pool runs every session
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    so.SetLogSeverityLevel(3);
    const std::string& p = options.provider;
    try {
      if (p == "cuda") {
        OrtCUDAProviderOptions cuda{};
        so.AppendExecutionProvider_CUDA(cuda);
      } else if (p == "tensorrt") {
        OrtTensorRTProviderOptions trt{};
        so.AppendExecutionProvider_TensorRT(trt);
        OrtCUDAProviderOptions cuda{};  // nodes TensorRT does not take run on CUDA
        so.AppendExecutionProvider_CUDA(cuda);
      } else if (p != "cpu") {
        throw Error("unknown execution provider '" + p + "'; choose: cpu, cuda, tensorrt");
      }
    } catch (const Ort::Exception& e) {
      throw Error("this ONNX Runtime cannot use the " + p + " execution provider (" + one_line(e.what()) +
                  "); build against the onnxruntime-gpu wheel's library, or use --provider cpu");
    }
    std::string path = bundle.file(spec.file);
    try {
      session_ = std::make_unique<Ort::Session>(env(options.threads), path.c_str(), so);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime cannot load " + path + ": " + one_line(e.what()));
    }
    binding_ = std::make_unique<Ort::IoBinding>(*session_);
  }

  Feeds run(const Feeds& feeds, const Feeds& bound) override {
    for (const auto& in : spec_.inputs) {
      auto it = feeds.find(in.name);
      if (it == feeds.end()) throw Error("internal: no feed for graph input " + in.name);
      bind(in.name, it->second, false);
    }
    for (const auto& out : spec_.outputs) {
      auto it = bound.find(out.name);
      if (it != bound.end()) bind(out.name, it->second, true);
      else binding_->BindOutput(out.name.c_str(), memory_);  // ONNX Runtime allocates it at this call's shape
    }
    try {
      session_->Run(Ort::RunOptions{nullptr}, *binding_);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime failed running " + spec_.file + ": " + one_line(e.what()));
    }
    outputs_ = binding_->GetOutputValues();
    std::vector<std::string> names = binding_->GetOutputNames();
    Feeds result;
    for (size_t i = 0; i < names.size(); ++i) {
      if (bound.count(names[i])) continue;
      auto info = outputs_[i].GetTensorTypeAndShapeInfo();
      TensorView v;
      v.dtype = from_ort(info.GetElementType());
      v.shape = info.GetShape();
      v.data = outputs_[i].GetTensorMutableRawData();
      result[names[i]] = v;
    }
    return result;
  }

 private:
  // Bind caller memory to a name; skipped when the same memory and shape are bound already (the KV cache slices
  // of every layer stay bound across calls until the cache grows or changes rows).
  void bind(const std::string& name, const TensorView& t, bool output) {
    auto key = std::make_tuple(t.data, t.shape, t.dtype);
    auto it = bound_.find(name);
    if (it != bound_.end() && it->second.first == key) return;
    Ort::Value value = Ort::Value::CreateTensor(memory_, t.data, t.count() * dtype_size(t.dtype), t.shape.data(),
                                                t.shape.size(), ort_type(t.dtype));
    if (output) binding_->BindOutput(name.c_str(), value);
    else binding_->BindInput(name.c_str(), value);
    bound_.insert_or_assign(name, std::make_pair(key, std::move(value)));
  }

  const GraphSpec& spec_;
  Ort::MemoryInfo memory_;
  std::unique_ptr<Ort::Session> session_;
  std::unique_ptr<Ort::IoBinding> binding_;
  std::map<std::string, std::pair<std::tuple<void*, std::vector<int64_t>, DType>, Ort::Value>> bound_;
  std::vector<Ort::Value> outputs_;
};

}  // namespace

DType dtype_of(const std::string& name) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "int64") return DType::I64;
  if (name == "int32") return DType::I32;
  throw Error("the manifest names a tensor type '" + name + "' this host does not read; re-export the bundle");
}

size_t dtype_size(DType t) { return t == DType::F16 ? 2 : t == DType::I64 ? 8 : 4; }

float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) bits = sign;
    else {  // subnormal: normalise
      int e = -1;
      do { ++e; mant <<= 1; } while (!(mant & 0x400));
      bits = sign | ((112 - e) << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even, as numpy's astype(float16)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = x & 0x7FFFFF;
  if (((x >> 23) & 0xFF) == 0xFF) return static_cast<uint16_t>(sign | 0x7C00 | (mant ? 0x200 : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = (static_cast<uint32_t>(exp) << 10) | (mant >> 13), rem = mant & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;
  return static_cast<uint16_t>(sign | half);
}

const float* as_float(const TensorView& t, std::vector<float>& scratch) {
  if (t.dtype == DType::F32) return t.as<float>();
  scratch.resize(t.count());
  const uint16_t* h = t.as<uint16_t>();
  for (size_t i = 0; i < scratch.size(); ++i) scratch[i] = half_to_float(h[i]);
  return scratch.data();
}

std::unique_ptr<GraphRunner> make_runner(const Bundle& bundle, const std::string& graph, const Options& options) {
  const GraphSpec& spec = bundle.graph(graph);
  if (options.backend == "ort") return std::make_unique<OrtRunner>(bundle, spec, options);
  if (options.backend == "trt") {
#ifdef DSPARK_WITH_TENSORRT
    return make_trt_runner(bundle, spec, options);
#else
    throw Error("this dspark host was built without TensorRT (NvInfer.h and libnvinfer were not found at build "
                "time); rebuild on a machine with TensorRT, or use --backend ort");
#endif
  }
  throw Error("backend '" + options.backend + "' is not available; choose: ort, trt");
}

}  // namespace dspark
