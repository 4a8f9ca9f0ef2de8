// TensorRT engines from `dspark build` behind the GraphRunner interface, as dspark/runtime/trt.py: one execution
// context per optimization profile (profile i is the manifest's i-th phase, the order the build added them), a
// call runs on the tightest profile that holds its shapes, device buffers are allocated once at the largest shape
// any profile allows and bound with setTensorAddress once, inputs are copied in and shapes set per call, then
// enqueueV3 on a non-default stream and the outputs are copied back. Written against the TensorRT 10 C++ API.
#include "runner_trt.hpp"

#include <NvInfer.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cctype>
#include <iostream>

#include "files.hpp"
#include "json.hpp"

namespace dspark {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA failed in ") + what + ": " + cudaGetErrorString(e));
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << "\n";
  }
};

Logger& logger() {
  static Logger l;
  return l;
}

DType from_trt(nvinfer1::DataType t, const std::string& name) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::F32;
    case nvinfer1::DataType::kHALF: return DType::F16;
    case nvinfer1::DataType::kINT32: return DType::I32;
    case nvinfer1::DataType::kINT64: return DType::I64;
    default: throw Error("engine tensor " + name + " has a type this host does not read");
  }
}

// an engine folder's file; a missing one means the engines were never built here
std::string engine_file(const std::string& path) {
  auto bytes = read_file(path);
  if (!bytes) throw Error("cannot read " + path + "; build the engines with 'dspark build'");
  return *bytes;
}

// this machine's engine folder: bundle/engines/sm<major><minor>-trt<version of the headers built against>
std::string engine_folder(const Bundle& bundle, const Options& options) {
  if (!options.engines_dir.empty()) return options.engines_dir;
  int device = 0;
  cudaDeviceProp prop{};
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  std::string name = "sm" + std::to_string(prop.major) + std::to_string(prop.minor) + "-trt" +
                     std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
                     std::to_string(NV_TENSORRT_PATCH) + "." + std::to_string(NV_TENSORRT_BUILD);
  std::string folder = bundle.file("engines/" + name);
  if (file_size(folder + "/build.json") < 0)
    throw Error("no TensorRT engines for this machine (" + name + ") in " + bundle.file("engines") +
                "; run 'dspark build' here, or point at another folder with the engines option");
  return folder;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DType dtype = DType::F32;
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
};

class TrtRunner : public GraphRunner {
 public:
  TrtRunner(const Bundle& bundle, const GraphSpec& spec, const Options& options) : spec_(spec) {
    std::string folder = engine_folder(bundle, options);
    json::Value info = json::Value::parse(engine_file(folder + "/build.json"));
    const json::Value* entry = info.at("engines").find(spec.name);
    if (!entry) throw Error(folder + " has no engine for graph " + spec.name + "; rebuild with 'dspark build'");
    std::string plan = engine_file(folder + "/" + entry->at("file").str());
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) throw Error("TensorRT could not create a runtime (is a CUDA GPU and driver present?)");
    engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_) throw Error("TensorRT could not deserialize " + folder + "/" + entry->at("file").str() +
                              " (built by another TensorRT version?); rebuild it with 'dspark build'");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    for (const auto& [phase, dims] : bundle.manifest.at("graphs").at(spec.name).at("profiles").members("profiles")) {
      std::map<std::string, std::array<int64_t, 3>> ranges;
      for (const auto& [dim, r] : dims.members())
        ranges[dim] = {r.items()[0].integer(), r.items()[1].integer(), r.items()[2].integer()};
      profiles_.push_back(ranges);
    }
    if (static_cast<int>(profiles_.size()) != engine_->getNbOptimizationProfiles())
      throw Error(spec.name + " engine has " + std::to_string(engine_->getNbOptimizationProfiles()) +
                  " optimization profiles but the manifest lists " + std::to_string(profiles_.size()) +
                  "; rebuild it with 'dspark build'");
    for (size_t i = 0; i < profiles_.size(); ++i) {
      contexts_.emplace_back(engine_->createExecutionContext());
      if (!contexts_.back() || !contexts_.back()->setOptimizationProfileAsync(static_cast<int32_t>(i), stream_))
        throw Error("TensorRT could not create an execution context for profile " + std::to_string(i));
    }
    allocate();
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  ~TrtRunner() override {
    contexts_.clear();
    if (stream_) cudaStreamDestroy(stream_);
  }

  Feeds run(const Feeds& feeds, const Feeds& bound) override {
    if (!bound.empty())
      throw Error("graph " + spec_.name + " updates its KV cache in place (the ONNX Runtime flavour); TensorRT "
                  "engines are built from bundles exported with --runtime tensorrt");
    std::map<std::string, int64_t> sizes;
    for (const auto& in : spec_.inputs) {
      const TensorView& t = feeds.at(in.name);
      for (size_t d = 0; d < in.shape.size(); ++d)
        if (!std::isdigit(static_cast<unsigned char>(in.shape[d][0]))) sizes[in.shape[d]] = t.shape[d];
    }
    nvinfer1::IExecutionContext& ctx = *contexts_[select_profile(sizes)];
    for (const auto& in : spec_.inputs) {
      const TensorView& t = feeds.at(in.name);
      DeviceBuffer& buf = buffers_.at(in.name);
      if (t.dtype != buf.dtype) throw Error("engine input " + in.name + " has another type than the manifest says");
      size_t bytes = t.count() * dtype_size(t.dtype);
      if (bytes > buf.bytes) throw Error("input " + in.name + " is larger than the engine's profiles allow");
      cuda_check(cudaMemcpyAsync(buf.ptr, t.data, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<int32_t>(t.shape.size());
      for (size_t d = 0; d < t.shape.size(); ++d) dims.d[d] = t.shape[d];
      if (!ctx.setInputShape(in.name.c_str(), dims))
        throw Error("TensorRT rejected the shape of " + in.name + " for " + spec_.name);
    }
    if (!ctx.enqueueV3(stream_)) throw Error("TensorRT refused to run " + spec_.name + "; see the log above");
    Feeds out;
    for (const auto& o : spec_.outputs) {
      nvinfer1::Dims dims = ctx.getTensorShape(o.name.c_str());
      TensorView v;
      v.dtype = buffers_.at(o.name).dtype;
      for (int32_t d = 0; d < dims.nbDims; ++d) v.shape.push_back(dims.d[d]);
      std::vector<unsigned char>& host = host_[o.name];
      host.resize(v.count() * dtype_size(v.dtype));
      cuda_check(cudaMemcpyAsync(host.data(), buffers_.at(o.name).ptr, host.size(), cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync");
      v.data = host.data();
      out[o.name] = v;
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out;
  }

 private:
  struct Deleter {
    template <class T> void operator()(T* p) const { delete p; }
  };

  // the tightest profile (smallest summed range over the call's dims) whose ranges hold every size
  size_t select_profile(const std::map<std::string, int64_t>& sizes) const {
    size_t best = profiles_.size();
    int64_t best_width = 0;
    for (size_t i = 0; i < profiles_.size(); ++i) {
      int64_t width = 0;
      bool fits = true;
      for (const auto& [dim, size] : sizes) {
        auto r = profiles_[i].find(dim);
        if (r == profiles_[i].end()) continue;
        fits = fits && r->second[0] <= size && size <= r->second[2];
        width += r->second[2] - r->second[0];
      }
      if (fits && (best == profiles_.size() || width < best_width)) { best = i; best_width = width; }
    }
    if (best == profiles_.size()) throw Error("shapes of this call fit none of " + spec_.name + "'s optimization profiles");
    return best;
  }

  void allocate() {
    std::map<std::string, int64_t> largest;
    for (const auto& p : profiles_)
      for (const auto& [dim, r] : p) largest[dim] = std::max(largest[dim], r[2]);
    auto add = [&](const TensorSpec& t) {
      size_t count = 1;
      for (const auto& d : t.shape) {
        auto it = largest.find(d);
        count *= static_cast<size_t>(it != largest.end() ? it->second : std::stoll(d));
      }
      DeviceBuffer& buf = buffers_[t.name];
      buf.dtype = from_trt(engine_->getTensorDataType(t.name.c_str()), t.name);
      buf.bytes = std::max<size_t>(1, count) * dtype_size(buf.dtype);
      cuda_check(cudaMalloc(&buf.ptr, buf.bytes), "cudaMalloc");
      for (auto& ctx : contexts_)
        if (!ctx->setTensorAddress(t.name.c_str(), buf.ptr))
          throw Error("TensorRT has no tensor " + t.name + " in " + spec_.name + "; rebuild the engine");
    };
    for (const auto& t : spec_.inputs) add(t);
    for (const auto& t : spec_.outputs) add(t);
  }

  const GraphSpec& spec_;
  std::unique_ptr<nvinfer1::IRuntime, Deleter> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine, Deleter> engine_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext, Deleter>> contexts_;
  std::vector<std::map<std::string, std::array<int64_t, 3>>> profiles_;
  std::map<std::string, DeviceBuffer> buffers_;
  std::map<std::string, std::vector<unsigned char>> host_;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<GraphRunner> make_trt_runner(const Bundle& bundle, const GraphSpec& spec, const Options& options) {
  return std::make_unique<TrtRunner>(bundle, spec, options);
}

}  // namespace dspark
