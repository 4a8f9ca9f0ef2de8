// The TensorRT graph runner (compiled only where TensorRT is found; see CMakeLists.txt).
#pragma once

#include <memory>

#include "runner.hpp"

namespace dspark {
std::unique_ptr<GraphRunner> make_trt_runner(const Bundle& bundle, const GraphSpec& spec, const Options& options);
}
