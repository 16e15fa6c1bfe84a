// kd_jax's CPU 3x3 convolution: oneDNN's direct convolution and its two gradients as XLA FFI
// handlers.
//
// XLA:CPU runs 3x3 convolutions 1.4-4x slower than oneDNN on the teacher's layers, and
// kd_jax's depthwise ones (forward and backward) 3-4x slower on the student's (BENCHMARKS.md),
// so on CPU kd_jax calls oneDNN. Float32, channels last: input x (N, H, W, C), kernel HWIO
// (3, 3, C/G, D) for G groups (G = C / the kernel's input channels, as XLA's
// feature_group_count; G = C is a depthwise convolution), padding 1, stride s, output y
// (N, ceil(H/s), ceil(W/s), D). Built by `python -m kd_jax.native.build`.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// A convolution primitive with the kernel layout oneDNN chose for it, and the reorder between
// that layout and XLA's HWIO (empty where they are the same).
struct Step {
  dnnl::primitive primitive;
  dnnl::memory::desc weights;
  dnnl::reorder reorder;  // only where `weights` is not HWIO
};

// The three convolutions of one shape: creating them (oneDNN picks and JIT-compiles kernels)
// costs far more than running them.
struct Primitives {
  dnnl::memory::desc src, hwio, dst;
  Step forward, backward_data, backward_weights;
  size_t scratchpad_bytes;  // the most any of the three needs
};

Step MakeStep(dnnl::primitive primitive, const dnnl::memory::desc& chosen,
              const dnnl::memory::desc& hwio, bool to_hwio) {
  dnnl::reorder reorder;
  if (chosen != hwio) {
    reorder = to_hwio
                  ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), chosen, Engine(), hwio))
                  : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), hwio, Engine(), chosen));
  }
  return Step{primitive, chosen, reorder};
}

const Primitives& Get(dnnl::memory::dim n, dnnl::memory::dim h, dnnl::memory::dim w,
                      dnnl::memory::dim c, dnnl::memory::dim d, dnnl::memory::dim oh,
                      dnnl::memory::dim ow, int64_t stride, dnnl::memory::dim groups) {
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static auto* cache = new std::map<Key, std::unique_ptr<Primitives>>();
  std::lock_guard<std::mutex> lock(mutex);
  Key key{n, h, w, c, d, stride, groups};
  auto found = cache->find(key);
  if (found != cache->end()) return *found->second;
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  // oneDNN names dimensions N, C, H, W whatever the layout; the tags give the layouts.
  dnnl::memory::desc src({n, c, h, w}, dt::f32, tag::nhwc);
  dnnl::memory::desc hwio({d, c, 3, 3}, dt::f32, tag::hwio);
  dnnl::memory::desc any({d, c, 3, 3}, dt::f32, tag::any);
  if (groups > 1) {
    // oneDNN's grouped kernel is (G, D/G, C/G, 3, 3); XLA's HWIO (3, 3, C/G, D) holds output
    // channel g * D/G + o at the innermost position, hence these strides.
    const dnnl::memory::dim dg = d / groups, cg = c / groups;
    dnnl::memory::dims dims{groups, dg, cg, 3, 3};
    hwio = dnnl::memory::desc(dims, dt::f32, dnnl::memory::dims{dg, 1, d, 3 * cg * d, cg * d});
    any = dnnl::memory::desc(dims, dt::f32, tag::any);
  }
  dnnl::memory::desc dst({n, d, oh, ow}, dt::f32, tag::nhwc);
  dnnl::memory::dims strides{stride, stride}, padding{1, 1};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any,
      dst, strides, padding, padding, attr);
  dnnl::convolution_backward_data::primitive_desc backward_data(
      Engine(), dnnl::algorithm::convolution_direct, src, any, dst, strides, padding, padding,
      forward, attr);
  dnnl::convolution_backward_weights::primitive_desc backward_weights(
      Engine(), dnnl::algorithm::convolution_direct, src, any, dst, strides, padding, padding,
      forward, attr);
  size_t scratchpad_bytes = std::max({forward.scratchpad_desc().get_size(),
                                      backward_data.scratchpad_desc().get_size(),
                                      backward_weights.scratchpad_desc().get_size()});
  auto primitives = std::make_unique<Primitives>(Primitives{
      src, hwio, dst,
      MakeStep(dnnl::convolution_forward(forward), forward.weights_desc(), hwio, false),
      MakeStep(dnnl::convolution_backward_data(backward_data), backward_data.weights_desc(), hwio,
               false),
      MakeStep(dnnl::convolution_backward_weights(backward_weights),
               backward_weights.diff_weights_desc(), hwio, true),
      scratchpad_bytes});
  return *cache->emplace(key, std::move(primitives)).first->second;
}

bool Valid(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
           ffi::Span<const int64_t> y) {
  return x.size() == 4 && kernel.size() == 4 && y.size() == 4 && kernel[0] == 3 &&
         kernel[1] == 3 && x[3] > 0 && kernel[2] > 0 && x[3] % kernel[2] == 0 &&
         kernel[3] % (x[3] / kernel[2]) == 0 && kernel[3] == y[3] && x[0] == y[0];
}

const Primitives& For(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> y, int64_t stride) {
  return Get(x[0], x[1], x[2], x[3], kernel[3], y[1], y[2], stride, x[3] / kernel[2]);
}

// Runs one step; `kernel` is the HWIO kernel it reads (forward, backward data) or writes
// (backward weights), under `kernel_arg`.
ffi::Error Run(const Primitives& p, const Step& step, std::unordered_map<int, dnnl::memory> args,
               int kernel_arg, float* kernel) {
  try {
    dnnl::stream stream(Engine());
    // Uninitialised: oneDNN writes its scratch before reading it.
    std::unique_ptr<char[]> scratchpad(new char[p.scratchpad_bytes]);
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 dnnl::memory({{static_cast<dnnl::memory::dim>(p.scratchpad_bytes)},
                               dnnl::memory::data_type::u8, dnnl::memory::format_tag::x},
                              Engine(), scratchpad.get()));
    dnnl::memory hwio(p.hwio, Engine(), kernel);
    if (step.weights == p.hwio) {
      args.emplace(kernel_arg, hwio);
      step.primitive.execute(stream, args);
    } else {
      dnnl::memory chosen(step.weights, Engine());
      args.emplace(kernel_arg, chosen);
      bool written = kernel_arg == DNNL_ARG_DIFF_WEIGHTS;
      if (!written) step.reorder.execute(stream, hwio, chosen);
      step.primitive.execute(stream, args);
      if (written) step.reorder.execute(stream, chosen, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

constexpr char kShapes[] =
    "conv3x3: expected x (N,H,W,C), kernel (3,3,C/G,D) with G dividing D, y (N,OH,OW,D)";

ffi::Error Conv3x3(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  if (!Valid(x.dimensions(), kernel.dimensions(), y->dimensions())) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  const Primitives& p = For(x.dimensions(), kernel.dimensions(), y->dimensions(), stride);
  return Run(p, p.forward,
             {{DNNL_ARG_SRC, dnnl::memory(p.src, Engine(), x.typed_data())},
              {DNNL_ARG_DST, dnnl::memory(p.dst, Engine(), y->typed_data())}},
             DNNL_ARG_WEIGHTS, kernel.typed_data());
}

// dx from dy and the kernel.
ffi::Error Conv3x3BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                               ffi::ResultBuffer<ffi::F32> dx, int64_t stride) {
  if (!Valid(dx->dimensions(), kernel.dimensions(), dy.dimensions())) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  const Primitives& p = For(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride);
  return Run(p, p.backward_data,
             {{DNNL_ARG_DIFF_DST, dnnl::memory(p.dst, Engine(), dy.typed_data())},
              {DNNL_ARG_DIFF_SRC, dnnl::memory(p.src, Engine(), dx->typed_data())}},
             DNNL_ARG_WEIGHTS, kernel.typed_data());
}

// The kernel's gradient from x and dy.
ffi::Error Conv3x3BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride) {
  if (!Valid(x.dimensions(), dkernel->dimensions(), dy.dimensions())) {
    return ffi::Error::InvalidArgument(kShapes);
  }
  const Primitives& p = For(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride);
  return Run(p, p.backward_weights,
             {{DNNL_ARG_SRC, dnnl::memory(p.src, Engine(), x.typed_data())},
              {DNNL_ARG_DIFF_DST, dnnl::memory(p.dst, Engine(), dy.typed_data())}},
             DNNL_ARG_DIFF_WEIGHTS, dkernel->typed_data());
}

}  // namespace

#define KD_JAX_CONV3X3_HANDLER(name, function)             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,            \
                                ffi::Ffi::Bind()           \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("stride"));

KD_JAX_CONV3X3_HANDLER(KdJaxOnednnConv3x3, Conv3x3)
KD_JAX_CONV3X3_HANDLER(KdJaxOnednnConv3x3BackwardData, Conv3x3BackwardData)
KD_JAX_CONV3X3_HANDLER(KdJaxOnednnConv3x3BackwardWeights, Conv3x3BackwardWeights)
