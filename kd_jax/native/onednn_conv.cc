// kd_jax's CPU 3x3 convolution: oneDNN's direct convolution and its two gradients as XLA FFI
// handlers, and an inference form that adds a bias (a folded batch norm), optionally a residual,
// and optionally applies ReLU in the same pass.
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

// The three convolutions of one shape.
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

// The memory layouts every convolution of one shape shares. oneDNN names dimensions N, C, H, W
// whatever the layout; the tags give the layouts.
struct Layouts {
  dnnl::memory::desc src, hwio, any, dst;
  dnnl::memory::dims strides, padding;
};

Layouts MakeLayouts(dnnl::memory::dim n, dnnl::memory::dim h, dnnl::memory::dim w,
                    dnnl::memory::dim c, dnnl::memory::dim d, dnnl::memory::dim oh,
                    dnnl::memory::dim ow, int64_t stride, dnnl::memory::dim groups) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  Layouts layouts{dnnl::memory::desc({n, c, h, w}, dt::f32, tag::nhwc),
                  dnnl::memory::desc({d, c, 3, 3}, dt::f32, tag::hwio),
                  dnnl::memory::desc({d, c, 3, 3}, dt::f32, tag::any),
                  dnnl::memory::desc({n, d, oh, ow}, dt::f32, tag::nhwc),
                  {stride, stride},
                  {1, 1}};
  if (groups > 1) {
    // oneDNN's grouped kernel is (G, D/G, C/G, 3, 3); XLA's HWIO (3, 3, C/G, D) holds output
    // channel g * D/G + o at the innermost position, hence these strides.
    const dnnl::memory::dim dg = d / groups, cg = c / groups;
    dnnl::memory::dims dims{groups, dg, cg, 3, 3};
    layouts.hwio =
        dnnl::memory::desc(dims, dt::f32, dnnl::memory::dims{dg, 1, d, 3 * cg * d, cg * d});
    layouts.any = dnnl::memory::desc(dims, dt::f32, tag::any);
  }
  return layouts;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The value made for `key` the first time it is asked for: creating primitives (oneDNN picks and
// JIT-compiles kernels) costs far more than running them. One cache per Value type.
template <typename Value, typename Key, typename Make>
const Value& Cached(const Key& key, Make make) {
  static std::mutex mutex;
  static auto* cache = new std::map<Key, std::unique_ptr<Value>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache->find(key);
  if (found == cache->end()) {
    found = cache->emplace(key, std::make_unique<Value>(make())).first;
  }
  return *found->second;
}

const Primitives& Get(dnnl::memory::dim n, dnnl::memory::dim h, dnnl::memory::dim w,
                      dnnl::memory::dim c, dnnl::memory::dim d, dnnl::memory::dim oh,
                      dnnl::memory::dim ow, int64_t stride, dnnl::memory::dim groups) {
  return Cached<Primitives>(std::make_tuple(n, h, w, c, d, stride, groups), [&] {
    const Layouts l = MakeLayouts(n, h, w, c, d, oh, ow, stride, groups);
    const dnnl::primitive_attr attr = UserScratchpad();
    dnnl::convolution_forward::primitive_desc forward(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, l.src,
        l.any, l.dst, l.strides, l.padding, l.padding, attr);
    dnnl::convolution_backward_data::primitive_desc backward_data(
        Engine(), dnnl::algorithm::convolution_direct, l.src, l.any, l.dst, l.strides, l.padding,
        l.padding, forward, attr);
    dnnl::convolution_backward_weights::primitive_desc backward_weights(
        Engine(), dnnl::algorithm::convolution_direct, l.src, l.any, l.dst, l.strides, l.padding,
        l.padding, forward, attr);
    size_t scratchpad_bytes = std::max({forward.scratchpad_desc().get_size(),
                                        backward_data.scratchpad_desc().get_size(),
                                        backward_weights.scratchpad_desc().get_size()});
    return Primitives{
        l.src, l.hwio, l.dst,
        MakeStep(dnnl::convolution_forward(forward), forward.weights_desc(), l.hwio, false),
        MakeStep(dnnl::convolution_backward_data(backward_data), backward_data.weights_desc(),
                 l.hwio, false),
        MakeStep(dnnl::convolution_backward_weights(backward_weights),
                 backward_weights.diff_weights_desc(), l.hwio, true),
        scratchpad_bytes};
  });
}

// The inference convolution of one shape, with its bias, residual and ReLU as oneDNN post-ops.
struct Inference {
  dnnl::memory::desc src, hwio, bias, dst;
  Step forward;
  size_t scratchpad_bytes;
};

const Inference& GetInference(dnnl::memory::dim n, dnnl::memory::dim h, dnnl::memory::dim w,
                              dnnl::memory::dim c, dnnl::memory::dim d, dnnl::memory::dim oh,
                              dnnl::memory::dim ow, int64_t stride, dnnl::memory::dim groups,
                              bool residual, bool relu) {
  return Cached<Inference>(std::make_tuple(n, h, w, c, d, stride, groups, residual, relu), [&] {
    const Layouts l = MakeLayouts(n, h, w, c, d, oh, ow, stride, groups);
    dnnl::memory::desc bias({d}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::x);
    // The residual is added after the bias and before the ReLU, as in a residual block.
    dnnl::post_ops post_ops;
    if (residual) post_ops.append_binary(dnnl::algorithm::binary_add, l.dst);
    if (relu) post_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr attr = UserScratchpad();
    attr.set_post_ops(post_ops);
    dnnl::convolution_forward::primitive_desc forward(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, l.src,
        l.any, bias, l.dst, l.strides, l.padding, l.padding, attr);
    return Inference{
        l.src, l.hwio, bias, l.dst,
        MakeStep(dnnl::convolution_forward(forward), forward.weights_desc(), l.hwio, false),
        forward.scratchpad_desc().get_size()};
  });
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

// Runs one step; `kernel` is the kernel, in the `hwio` layout, that it reads (forward,
// backward data) or writes (backward weights), under `kernel_arg`.
ffi::Error Run(const Step& step, const dnnl::memory::desc& hwio_layout, size_t scratchpad_bytes,
               std::unordered_map<int, dnnl::memory> args, int kernel_arg, float* kernel) {
  try {
    dnnl::stream stream(Engine());
    // Uninitialised: oneDNN writes its scratch before reading it.
    std::unique_ptr<char[]> scratchpad(new char[scratchpad_bytes]);
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 dnnl::memory({{static_cast<dnnl::memory::dim>(scratchpad_bytes)},
                               dnnl::memory::data_type::u8, dnnl::memory::format_tag::x},
                              Engine(), scratchpad.get()));
    dnnl::memory hwio(hwio_layout, Engine(), kernel);
    if (step.weights == hwio_layout) {
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
  return Run(p.forward, p.hwio, p.scratchpad_bytes,
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
  return Run(p.backward_data, p.hwio, p.scratchpad_bytes,
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
  return Run(p.backward_weights, p.hwio, p.scratchpad_bytes,
             {{DNNL_ARG_SRC, dnnl::memory(p.src, Engine(), x.typed_data())},
              {DNNL_ARG_DIFF_DST, dnnl::memory(p.dst, Engine(), dy.typed_data())}},
             DNNL_ARG_DIFF_WEIGHTS, dkernel->typed_data());
}

// y = conv(x, kernel) + bias, plus `residual` (same shape as y) with kResidual, then ReLU if
// `relu`. Without kResidual the fourth argument is not read.
template <bool kResidual>
ffi::Error Conv3x3Inference(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride, bool relu) {
  auto x_dims = x.dimensions(), kernel_dims = kernel.dimensions(), y_dims = y->dimensions();
  if (!Valid(x_dims, kernel_dims, y_dims) || bias.element_count() != y_dims[3] ||
      (kResidual && !std::equal(y_dims.begin(), y_dims.end(), residual.dimensions().begin(),
                                residual.dimensions().end()))) {
    return ffi::Error::InvalidArgument(
        "conv3x3 inference: expected bias (D,) and a residual shaped as y (N,OH,OW,D)");
  }
  const Inference& p =
      GetInference(x_dims[0], x_dims[1], x_dims[2], x_dims[3], kernel_dims[3], y_dims[1],
                   y_dims[2], stride, x_dims[3] / kernel_dims[2], kResidual, relu);
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, dnnl::memory(p.src, Engine(), x.typed_data())},
      {DNNL_ARG_BIAS, dnnl::memory(p.bias, Engine(), bias.typed_data())},
      {DNNL_ARG_DST, dnnl::memory(p.dst, Engine(), y->typed_data())}};
  if (kResidual) {
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                 dnnl::memory(p.dst, Engine(), residual.typed_data()));
  }
  return Run(p.forward, p.hwio, p.scratchpad_bytes, std::move(args), DNNL_ARG_WEIGHTS,
             kernel.typed_data());
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

#define KD_JAX_CONV3X3_INFERENCE_HANDLER(name, function)  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,            \
                                ffi::Ffi::Bind()           \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("stride")      \
                                    .Attr<bool>("relu"));

KD_JAX_CONV3X3_INFERENCE_HANDLER(KdJaxOnednnConv3x3Inference, Conv3x3Inference<false>)
KD_JAX_CONV3X3_INFERENCE_HANDLER(KdJaxOnednnConv3x3InferenceResidual, Conv3x3Inference<true>)
