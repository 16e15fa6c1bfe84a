"""How fast the teacher's convolutions and the student's 1x1 products run, per framework.

Times, at batch 128 in float32, the 3x3 convolutions (stride 1, padding 1) of
resnet20's stem and three stages and the student's widest 1x1 convolution as a
matrix product, and prints GFLOP/s as one JSON line. With JAX (kd_jax's
environment): XLA's convolution, kd_jax's `conv3x3_winograd` (stages) and
`conv3x3_column_pairs` (stem); with --framework=torch (the peer's environment):
PyTorch's conv2d in channels_last and its matmul. Each stage figure is the median
of --repeats synchronised calls of a chain of five layers (conv, scale, ReLU,
residual), so that fused neighbours count as in a network; the stem is one layer
with its scale and ReLU.

Usage (from the repository root):
  .venv/bin/python bench/conv_rates.py
  /tmp/torchref/bin/python bench/conv_rates.py --framework=torch
"""

import argparse
import json
import os
import sys
import time

import numpy as np

BATCH = 128
# (height = width, channels) of resnet20's stages.
STAGES = ((32, 16), (16, 32), (8, 64))
LAYERS = 5
# resnet20's stem: (height = width, channels in, channels out), one layer with its scale and ReLU.
STEM = (32, 3, 16)
# dsconv_student's block3 pointwise product: (128 * 16 * 16, 128) @ (128, 256).
DOT = (BATCH * 16 * 16, 128, 256)


def _median_ms(call, repeats: int) -> float:
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _conv_gflop(size: int, channels: int) -> float:
  return 2 * BATCH * size * size * channels * channels * 9 * LAYERS / 1e9


def _stem_gflop() -> float:
  size, cin, cout = STEM
  return 2 * BATCH * size * size * cin * cout * 9 / 1e9


def _jax_rates(repeats: int) -> dict:
  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from kd_jax import host

  host.reuse_freed_memory()
  import jax
  import jax.numpy as jnp

  from kd_jax import ops

  def chain(conv):
    def run(x, kernels):
      for kernel in kernels:
        x = jnp.maximum(conv(x, kernel) * 0.5 + 0.1, 0.0) + x
      return x

    return jax.jit(run)

  rng = np.random.default_rng(0)
  rates = {}
  convs = {"xla_conv": ops.conv3x3_lax, "winograd": ops.conv3x3_winograd}
  for size, channels in STAGES:
    x = jnp.asarray(rng.standard_normal((BATCH, size, size, channels), np.float32))
    kernels = [
        jnp.asarray(0.05 * rng.standard_normal((3, 3, channels, channels), np.float32))
        for _ in range(LAYERS)
    ]
    for name, conv in convs.items():
      run = chain(conv)
      ms = _median_ms(lambda: jax.block_until_ready(run(x, kernels)), repeats)
      rates[f"{name}_{size}x{size}x{channels}_gflop_s"] = round(
          _conv_gflop(size, channels) / ms * 1e3
      )
  size, cin, cout = STEM
  x = jnp.asarray(rng.standard_normal((BATCH, size, size, cin), np.float32))
  kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
  stems = {
      name: jax.jit(lambda x, kernel, conv=conv: jnp.maximum(conv(x, kernel) * 0.5 + 0.1, 0.0))
      for name, conv in (("xla_conv", ops.conv3x3_lax), ("column_pairs", ops.conv3x3_column_pairs))
  }
  # A few ms each, so the two alternate call by call, many times, to share the machine's drift.
  stem_ms = {name: [] for name in stems}
  for _ in range(5 * repeats):
    for name, stem in stems.items():
      stem_ms[name].append(_median_ms(lambda stem=stem: jax.block_until_ready(stem(x, kernel)), 1))
  for name, times in stem_ms.items():
    rates[f"{name}_stem_gflop_s"] = round(_stem_gflop() / float(np.median(times)) * 1e3)
  rows, inner, cols = DOT
  a = jnp.asarray(rng.standard_normal((rows, inner), np.float32))
  b = jnp.asarray(rng.standard_normal((inner, cols), np.float32))
  matmul = jax.jit(lambda a, b: a @ b)
  ms = _median_ms(lambda: jax.block_until_ready(matmul(a, b)), repeats)
  rates["dot_gflop_s"] = round(2 * rows * inner * cols / ms / 1e6)
  rates["jax"] = jax.__version__
  return rates


def _torch_rates(repeats: int) -> dict:
  # pylint: disable=g-import-not-at-top
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  rates = {}
  with torch.no_grad():
    for size, channels in STAGES:
      x = torch.randn(BATCH, channels, size, size).to(memory_format=torch.channels_last)
      kernels = [0.05 * torch.randn(channels, channels, 3, 3) for _ in range(LAYERS)]

      def run(x=x, kernels=kernels):
        for kernel in kernels:
          x = torch.relu(F.conv2d(x, kernel, padding=1) * 0.5 + 0.1) + x
        return x

      ms = _median_ms(run, repeats)
      rates[f"conv2d_{size}x{size}x{channels}_gflop_s"] = round(
          _conv_gflop(size, channels) / ms * 1e3
      )
    size, cin, cout = STEM
    x = torch.randn(BATCH, cin, size, size).to(memory_format=torch.channels_last)
    kernel = torch.randn(cout, cin, 3, 3)
    ms = _median_ms(lambda: torch.relu(F.conv2d(x, kernel, padding=1) * 0.5 + 0.1), repeats)
    rates["conv2d_stem_gflop_s"] = round(_stem_gflop() / ms * 1e3)
    rows, inner, cols = DOT
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    ms = _median_ms(lambda: a @ b, repeats)
    rates["dot_gflop_s"] = round(2 * rows * inner * cols / ms / 1e6)
  rates["torch"] = torch.__version__
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  rates = _jax_rates(args.repeats) if args.framework == "jax" else _torch_rates(args.repeats)
  print(json.dumps({"framework": args.framework, "batch": BATCH, **rates}))


if __name__ == "__main__":
  main()
