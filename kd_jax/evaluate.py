"""Accuracy, and what a model costs to run: size, FLOPs, latency, throughput."""

import time
from typing import Callable

import jax
import numpy as np

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


def predict_logits(
    forward: Callable,
    variables: Variables,
    images_NxHxWxC: jax.Array,
    batch_size: int,
    gather: Callable,
) -> np.ndarray:
  """Logits of every image, in batches of one fixed size.

  The last batch is padded with copies of the first image and the padding
  dropped afterwards, so each example counts exactly once and nothing
  recompiles.
  """
  count = images_NxHxWxC.shape[0]
  num_batches = -(-count // batch_size)
  indices = np.zeros(num_batches * batch_size, np.int32)
  indices[:count] = np.arange(count)
  outputs = [
      forward(variables, gather(images_NxHxWxC, batch_indices))
      for batch_indices in indices.reshape(num_batches, batch_size)
  ]
  return np.concatenate(jax.device_get(outputs))[:count]


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
  device = jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  params = jax.tree.leaves(variables.params)
  jitted = jax.jit(forward)
  one = jax.device_put(np.zeros((1, *image_shape), np.uint8), device)
  many = jax.device_put(np.zeros((batch_size, *image_shape), np.uint8), device)
  cost = jitted.lower(variables, one).compile().cost_analysis()
  return {
      "params": int(sum(p.size for p in params)),
      "param_bytes": int(sum(p.size * p.dtype.itemsize for p in params)),
      "flops": float(cost["flops"]),
      "latency_ms": 1e3 * _median_seconds(lambda: jitted(variables, one), latency_repeats),
      "throughput": batch_size
      / _median_seconds(lambda: jitted(variables, many), throughput_repeats),
  }
