"""How fast the teacher's convolutions and forward pass run, per framework, layer by layer.

Times, at batch 128 in float32, each kind of 3x3 convolution in resnet20 (the RGB stem, the
three stages, the two strided convolutions that open stages 2 and 3) alone, the student's
widest 1x1 convolution as a matrix product, the student's two stride-1 depthwise layers
forward and backward (output, input gradient and kernel gradient), and the teacher's whole
forward pass in inference mode, and prints milliseconds and GFLOP/s as one JSON line. With
JAX (kd_jax's environment): XLA's convolution and kd_jax's `layers.Conv3x3` on the
convolutions a network takes on this machine (`network.choose_convolutions`: oneDNN's on one
CPU where kd_jax.native is built), `ops.depthwise_conv_shifted` and `layers.DepthwiseConv`
the same way, alternated call by call so that both share the machine's drift, and kd_jax's
resnet20. With
--framework=torch (the peer's environment): PyTorch's conv2d in channels_last (grouped for
the depthwise layers, with aten's convolution_backward), its matmul, and the peer's ResNet-20
(bench/torch_peer.py) eager in channels_last and under torch.compile, as the
peer's student_online step runs it.

Each convolution is timed alone, its output the program's result: a chain with eager PyTorch
pointwise ops in between measured the allocator more than the convolution (BENCHMARKS.md).

Usage (from the repository root):
  .venv/bin/python bench/conv_rates.py
  ~/torchref/bin/python bench/conv_rates.py --framework=torch
"""

import argparse
import json
import os
import sys
import time

import numpy as np

BATCH = 128
# resnet20's 3x3 convolutions: name -> (input height = width, channels in, channels out, stride).
CONVS = {
    "stem": (32, 3, 16, 1),
    "stage1": (32, 16, 16, 1),
    "stage2_down": (32, 16, 32, 2),
    "stage2": (16, 32, 32, 1),
    "stage3_down": (16, 32, 64, 2),
    "stage3": (8, 64, 64, 1),
}
# dsconv_student's block3 pointwise product: (128 * 16 * 16, 128) @ (128, 256).
DOT = (BATCH * 16 * 16, 128, 256)
# dsconv_student's stride-1 depthwise layers: name -> (height = width, channels).
DEPTHWISE = {"dw_block2": (16, 64), "dw_block3": (16, 128)}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv_gflop(size: int, cin: int, cout: int, stride: int) -> float:
  out = size // stride
  return 2 * BATCH * out * out * cin * cout * 9 / 1e9


def _call_ms(call) -> float:
  start = time.perf_counter()
  call()
  return 1e3 * (time.perf_counter() - start)


def _alternated_ms(calls: dict, repeats: int) -> dict:
  """Median ms of each call, the calls taken in turn `repeats` times after one warm-up each."""
  for call in calls.values():
    call()
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      times[name].append(_call_ms(call))
  return {name: float(np.median(ms)) for name, ms in times.items()}


def _depthwise_gflop(size: int, channels: int) -> float:
  """Output, input gradient and kernel gradient: nine multiply-adds per output each."""
  return 3 * 2 * BATCH * size * size * channels * 9 / 1e9


def _report(rates: dict, key: str, ms: float, gflop: float) -> None:
  rates[f"{key}_ms"] = round(ms, 2)
  rates[f"{key}_gflop_s"] = round(gflop / ms * 1e3)


def _jax_rates(repeats: int) -> dict:
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _REPO)
  from kd_jax import host

  host.reuse_freed_memory()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from kd_jax import layers, ops
  from kd_jax.network import choose_convolutions, create_network

  rng = np.random.default_rng(0)
  rates = {}
  for name, (size, cin, cout, stride) in CONVS.items():
    x = jnp.asarray(rng.standard_normal((BATCH, size, size, cin), np.float32))
    conv = layers.conv3x3(cin, cout, strides=stride, rngs=nnx.Rngs(0))
    layers.use_convolutions(conv, choose_convolutions(conv, "float32"))
    graphdef, params = nnx.split(conv)
    kd_jax_conv = jax.jit(lambda params, x, graphdef=graphdef: nnx.merge(graphdef, params)(x))
    xla_conv = jax.jit(
        lambda kernel, x, stride=stride: jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    )
    ms = _alternated_ms(
        {
            "xla_conv": lambda: jax.block_until_ready(xla_conv(conv.kernel[...], x)),
            "kd_jax": lambda: jax.block_until_ready(kd_jax_conv(params, x)),
        },
        repeats,
    )
    for variant, variant_ms in ms.items():
      _report(rates, f"{variant}_{name}", variant_ms, _conv_gflop(size, cin, cout, stride))
  for name, (size, channels) in DEPTHWISE.items():
    x = jnp.asarray(rng.standard_normal((BATCH, size, size, channels), np.float32))
    dy = jnp.asarray(rng.standard_normal((BATCH, size, size, channels), np.float32))
    layer = layers.DepthwiseConv(channels, rngs=nnx.Rngs(0))
    layers.use_convolutions(layer, choose_convolutions(layer, "float32"))
    kernel = layer.kernel[...]

    def train_pass(conv, kernel, x, dy):
      y, vjp = jax.vjp(conv, x, kernel)
      return y, *vjp(dy)

    shifted = jax.jit(
        lambda kernel, x, dy: train_pass(
            lambda x, kernel: ops.depthwise_conv_shifted(x, kernel, 1), kernel, x, dy
        )
    )
    graphdef, _ = nnx.split(layer)

    def layer_conv(x, kernel, graphdef=graphdef):
      return nnx.merge(graphdef, nnx.State({"kernel": nnx.Param(kernel)}))(x)

    kd_jax_layer = jax.jit(lambda kernel, x, dy: train_pass(layer_conv, kernel, x, dy))
    ms = _alternated_ms(
        {
            "shifted": lambda: jax.block_until_ready(shifted(kernel, x, dy)),
            "kd_jax": lambda: jax.block_until_ready(kd_jax_layer(kernel, x, dy)),
        },
        repeats,
    )
    for variant, variant_ms in ms.items():
      _report(rates, f"{variant}_{name}_train", variant_ms, _depthwise_gflop(size, channels))
  rows, inner, cols = DOT
  a = jnp.asarray(rng.standard_normal((rows, inner), np.float32))
  b = jnp.asarray(rng.standard_normal((inner, cols), np.float32))
  matmul = jax.jit(lambda a, b: a @ b)
  ms = _alternated_ms({"dot": lambda: jax.block_until_ready(matmul(a, b))}, repeats)["dot"]
  _report(rates, "dot", ms, 2 * rows * inner * cols / 1e9)
  network, variables = create_network("resnet20", num_classes=10, in_channels=3, seed=0)
  forward = jax.jit(lambda variables, x: network.apply(variables, x, train=False)[0])
  images = jnp.asarray(rng.random((BATCH, 32, 32, 3), np.float32))
  rates["teacher_forward_ms"] = round(
      _alternated_ms(
          {"forward": lambda: jax.block_until_ready(forward(variables, images))}, repeats
      )["forward"],
      2,
  )
  rates["jax"] = jax.__version__
  return rates


def _torch_rates(repeats: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  channels_last = torch.channels_last
  rates = {}
  with torch.no_grad():
    for name, (size, cin, cout, stride) in CONVS.items():
      x = torch.randn(BATCH, cin, size, size).to(memory_format=channels_last)
      kernel = torch.randn(cout, cin, 3, 3).to(memory_format=channels_last)
      ms = _alternated_ms(
          {
              "conv2d": lambda x=x, kernel=kernel, stride=stride: F.conv2d(
                  x, kernel, None, stride, 1
              )
          },
          repeats,
      )["conv2d"]
      _report(rates, f"conv2d_{name}", ms, _conv_gflop(size, cin, cout, stride))
    for name, (size, channels) in DEPTHWISE.items():
      x = torch.randn(BATCH, channels, size, size).to(memory_format=channels_last)
      dy = torch.randn(BATCH, channels, size, size).to(memory_format=channels_last)
      kernel = torch.randn(channels, 1, 3, 3)

      def train_pass(x=x, dy=dy, kernel=kernel, channels=channels):
        y = F.conv2d(x, kernel, None, 1, 1, 1, channels)
        return y, torch.ops.aten.convolution_backward(
            dy,
            x,
            kernel,
            None,
            [1, 1],
            [1, 1],
            [1, 1],
            False,
            [0, 0],
            channels,
            [True, True, False],
        )

      ms = _alternated_ms({"conv2d": train_pass}, repeats)["conv2d"]
      _report(rates, f"conv2d_{name}_train", ms, _depthwise_gflop(size, channels))
    rows, inner, cols = DOT
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    ms = _alternated_ms({"dot": lambda: a @ b}, repeats)["dot"]
    _report(rates, "dot", ms, 2 * rows * inner * cols / 1e9)
    # The peer's ResNet-20, beside this script (bench/ is on the path when it runs).
    from torch_peer import ResNet

    teacher = ResNet().to(memory_format=channels_last).eval()
    images = torch.randn(BATCH, 3, 32, 32).to(memory_format=channels_last)
    forwards = {"eager_channels_last": teacher, "compile": torch.compile(teacher)}
    for variant, forward in forwards.items():
      forward(images)  # compiles
      ms = _alternated_ms({variant: lambda forward=forward: forward(images)}, repeats)[variant]
      rates[f"{variant}_teacher_forward_ms"] = round(ms, 2)
  rates["torch"] = torch.__version__
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  rates = _jax_rates(args.repeats) if args.framework == "jax" else _torch_rates(args.repeats)
  print(json.dumps({"framework": args.framework, "batch": BATCH, **rates}))


if __name__ == "__main__":
  main()
