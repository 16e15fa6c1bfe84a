"""Accuracy, and what a model costs to run: size, FLOPs, latency, throughput."""

import time
from typing import Callable

import jax
import numpy as np

from kd_jax import parallel
from kd_jax.data import augment as augment_lib
from kd_jax.network import Network, Variables


def make_forward(network: Network, mean_C: np.ndarray, std_C: np.ndarray) -> Callable:
  """Inference on uint8 images, `forward(variables, images) -> logits`.

  Normalisation is part of it, with the training split's statistics, so the
  function is what a deployment runs.
  """

  def forward(variables: Variables, images_BxHxWxC: jax.Array) -> jax.Array:
    x = augment_lib.normalize(images_BxHxWxC, mean_C, std_C)
    return network.apply(variables, x, train=False)[0]

  return forward


def jit_forward(network: Network, mean_C: np.ndarray, std_C: np.ndarray, mesh) -> Callable:
  """`make_forward` compiled for batches split over `mesh`.

  Its logits come back replicated, so that every process of a multi-host run
  can read all of them.
  """
  return parallel.in_order(
      jax.jit(make_forward(network, mean_C, std_C), out_shardings=parallel.replicated(mesh))
  )


def topk_accuracy(logits_NxC: np.ndarray, labels_N: np.ndarray, k: int) -> float:
  """Fraction of examples whose label is among the k highest logits."""
  topk_NxK = np.argsort(-logits_NxC, axis=-1, kind="stable")[:, :k]
  return float(np.mean(np.any(topk_NxK == labels_N[:, None], axis=-1)))


def _median_seconds(fn: Callable, repeats: int) -> float:
  """Median wall time of `fn()` after one warm-up call, synchronised."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_efficiency(
    forward: Callable,
    variables: Variables,
    image_shape: tuple,
    *,
    batch_size: int,
    latency_repeats: int,
    throughput_repeats: int
) -> dict:
  """Size and speed of a model for inference, on one device.

  Returns "params", "param_bytes", "flops" (forward FLOPs per image, from
  XLA's cost analysis of the compiled batch-1 forward), "latency_ms" (batch 1)
  and "throughput" (images/s at `batch_size`).
  """
  variables = parallel.local_replica(variables)
  device = jax.tree.leaves(variables)[0].devices().pop()
  params = jax.tree.leaves(variables.params)
  jitted = jax.jit(forward)
  one = jax.device_put(np.zeros((1, *image_shape), np.uint8), device)
  many = jax.device_put(np.zeros((batch_size, *image_shape), np.uint8), device)
  # The ahead-of-time executable serves the timing too: calling `jitted` would compile again.
  single = jitted.lower(variables, one).compile()
  return {
      "params": int(sum(p.size for p in params)),
      "param_bytes": int(sum(p.size * p.dtype.itemsize for p in params)),
      "flops": float(single.cost_analysis()["flops"]),
      "latency_ms": 1e3 * _median_seconds(lambda: single(variables, one), latency_repeats),
      "throughput": batch_size
      / _median_seconds(lambda: jitted(variables, many), throughput_repeats),
  }
