// kd_jax's CPU 3x3 convolution: oneDNN's direct convolution as an XLA FFI handler.
//
// XLA:CPU runs 3x3 convolutions 1.4-4x slower than oneDNN on the teacher's layers
// (BENCHMARKS.md), so on CPU kd_jax calls oneDNN for the forward pass. Float32, channels
// last: input (N, H, W, C), kernel HWIO (3, 3, C, D), padding 1, stride s, output
// (N, ceil(H/s), ceil(W/s), D). Built by `python -m kd_jax.native.build`.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// One primitive per shape: creating it (oneDNN picks and JIT-compiles a kernel) costs far
// more than running it.
const dnnl::convolution_forward& Primitive(const dnnl::memory::desc& src,
                                           const dnnl::memory::desc& weights,
                                           const dnnl::memory::desc& dst, int64_t stride) {
  using Key = std::tuple<dnnl::memory::dims, dnnl::memory::dims, int64_t>;
  static std::mutex mutex;
  static auto* primitives = new std::map<Key, dnnl::convolution_forward>();
  std::lock_guard<std::mutex> lock(mutex);
  Key key{src.get_dims(), weights.get_dims(), stride};
  auto found = primitives->find(key);
  if (found == primitives->end()) {
    dnnl::convolution_forward::primitive_desc description(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src,
        weights, dst, {stride, stride}, {1, 1}, {1, 1});
    found = primitives->emplace(key, dnnl::convolution_forward(description)).first;
  }
  return found->second;
}

ffi::Error Conv3x3(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  auto x_dims = x.dimensions();
  auto kernel_dims = kernel.dimensions();
  auto y_dims = y->dimensions();
  if (x_dims.size() != 4 || kernel_dims.size() != 4 || y_dims.size() != 4 ||
      kernel_dims[0] != 3 || kernel_dims[1] != 3 || kernel_dims[2] != x_dims[3]) {
    return ffi::Error::InvalidArgument("conv3x3: expected (N,H,W,C) and (3,3,C,D)");
  }
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  // oneDNN names dimensions N, C, H, W whatever the layout; the tags give the layouts.
  dnnl::memory::desc src({x_dims[0], x_dims[3], x_dims[1], x_dims[2]}, dt::f32, tag::nhwc);
  dnnl::memory::desc weights({kernel_dims[3], kernel_dims[2], 3, 3}, dt::f32, tag::hwio);
  dnnl::memory::desc dst({y_dims[0], y_dims[3], y_dims[1], y_dims[2]}, dt::f32, tag::nhwc);
  try {
    const dnnl::convolution_forward& primitive = Primitive(src, weights, dst, stride);
    dnnl::stream stream(Engine());
    primitive.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(src, Engine(), x.typed_data())},
                               {DNNL_ARG_WEIGHTS, dnnl::memory(weights, Engine(), kernel.typed_data())},
                               {DNNL_ARG_DST, dnnl::memory(dst, Engine(), y->typed_data())}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KdJaxOnednnConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));
