"""Accuracy, and what a model costs to run: size, MACs and FLOPs, latency, throughput."""

import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from kd_jax import parallel
from kd_jax.data import augment as augment_lib
from kd_jax.network import CONVOLUTION_NAMES, Network, Variables


# Test-time augmentation (config eval.tta): each view's weight in the averaged logits.
# flip_translate is airbench94's: half the image and its mirror, half the same pair
# shifted one pixel up-left and down-right (into a mirrored border).
TTA_WEIGHTS = {"none": (1.0,), "flip": (0.5, 0.5), "flip_translate": (0.25,) * 2 + (0.125,) * 4}


def tta_views(x_BxHxWxC: jax.Array, tta: str) -> jax.Array:
  """The views of a batch that test-time augmentation `tta` averages over, (V, B, H, W, C)."""
  views = [x_BxHxWxC]
  if tta == "flip_translate":
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views += [padded[:, :-2, :-2], padded[:, 2:, 2:]]
  if tta != "none":
    views = [v for view in views for v in (view, view[:, :, ::-1])]
  return jnp.stack(views)


def make_forward(
    network: Network, mean_C: np.ndarray, std_C: np.ndarray, tta: str = "none"
) -> Callable:
  """Inference on uint8 images, `forward(variables, images) -> logits`.

  Normalisation is part of it, with the training split's statistics, so the
  function is what a deployment runs. With test-time augmentation `tta` (a key
  of TTA_WEIGHTS), the logits are the weighted mean of those of `tta_views`,
  computed as one batch.
  """
  weights_V = jnp.asarray(TTA_WEIGHTS[tta])

  def forward(variables: Variables, images_BxHxWxC: jax.Array) -> jax.Array:
    x = augment_lib.normalize(images_BxHxWxC, mean_C, std_C)
    if tta == "none":
      return network.apply(variables, x, train=False)[0]
    views_VxBxHxWxC = tta_views(x, tta)
    views, batch = views_VxBxHxWxC.shape[:2]
    logits = network.apply(variables, views_VxBxHxWxC.reshape(-1, *x.shape[1:]), train=False)[0]
    return jnp.einsum("v,vbc->bc", weights_V, logits.reshape(views, batch, -1))

  return forward


def jit_forward(
    network: Network, mean_C: np.ndarray, std_C: np.ndarray, mesh, tta: str = "none"
) -> Callable:
  """`make_forward` compiled for batches split over `mesh`.

  Its logits come back replicated, so that every process of a multi-host run
  can read all of them.
  """
  return parallel.in_order(
      jax.jit(make_forward(network, mean_C, std_C, tta), out_shardings=parallel.replicated(mesh))
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


def _conv_macs(eqn: jax_core.JaxprEqn) -> int:
  # Each output element sums a kernel window over the input channels of its group,
  # padding included, as published tables count.
  rhs_shape = eqn.invars[1].aval.shape
  out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs_shape) // out_features


def _dot_macs(eqn: jax_core.JaxprEqn) -> int:
  (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contracting)


def _subjaxprs(eqn: jax_core.JaxprEqn) -> list[jax_core.Jaxpr]:
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jax_core.Jaxpr):
        found.append(item)
  return found


def count_macs(jaxpr: jax_core.Jaxpr) -> int:
  """Multiply-accumulates of the convolutions and matrix products in `jaxpr`, as papers count.

  A choice made by platform (`jax.lax.platform_dependent`) counts its default branch,
  XLA's own operation, which is the layer as written; another conditional its costliest
  branch; a scan its body `length` times.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_macs(eqn)
    elif name == "dot_general":
      total += _dot_macs(eqn)
    elif name == "cond" and None in eqn.params.get("branches_platforms", ()):
      default = eqn.params["branches"][eqn.params["branches_platforms"].index(None)]
      total += count_macs(default.jaxpr)
    elif name == "cond":
      total += max(count_macs(branch.jaxpr) for branch in eqn.params["branches"])
    else:
      repeats = eqn.params["length"] if name == "scan" else 1
      total += repeats * sum(count_macs(sub) for sub in _subjaxprs(eqn))
  return total


def forward_costs(forward: Callable, variables: Variables, images: jax.Array) -> dict:
  """What `forward(variables, images)` computes per image: "macs" and "flops".

  "macs": `count_macs`. "flops": XLA's cost analysis of the compiled forward (two per
  multiply-add, plus the elementwise work). `forward` must run a portable network
  (`Network.portable()`): the cost analysis cannot see inside kd_jax's native convolutions.
  """
  traced = jax.jit(forward).trace(variables, images)
  flops = traced.lower().compile().cost_analysis()["flops"]
  return {"macs": count_macs(traced.jaxpr.jaxpr) // len(images), "flops": flops / len(images)}


def measure_speed(
    forward: Callable, variables: Variables, image_shape: tuple, eval_config
) -> dict:
  """How fast `forward(variables, uint8 images)` runs, on the device that holds `variables`.

  "latency_ms": the median of eval_config.latency_repeats calls at batch 1; "throughput":
  images/s, from the median of eval_config.throughput_repeats calls at eval_config.batch_size.
  """
  device = jax.tree.leaves(variables)[0].devices().pop()
  jitted = jax.jit(forward)
  one = jax.device_put(np.zeros((1, *image_shape), np.uint8), device)
  many = jax.device_put(np.zeros((eval_config.batch_size, *image_shape), np.uint8), device)
  # Timed as compiled ahead of time: calling `jitted` at batch 1 would compile again.
  single = jitted.lower(variables, one).compile()
  latency_s = _median_seconds(lambda: single(variables, one), eval_config.latency_repeats)
  batch_s = _median_seconds(lambda: jitted(variables, many), eval_config.throughput_repeats)
  return {"latency_ms": 1e3 * latency_s, "throughput": eval_config.batch_size / batch_s}


def measure_efficiency(
    network: Network,
    variables: Variables,
    image_shape: tuple,
    eval_config,
    *,
    mean_C: np.ndarray,
    std_C: np.ndarray,
    exported: bool = False,
) -> dict:
  """Size and speed of a model for inference (`make_forward`), on one device.

  Returns "params", "param_bytes", "macs" and "flops" per image (`forward_costs`),
  "convolutions" (the name of `network.convolutions`) and the "latency_ms" and "throughput"
  (`measure_speed`) they ran at. With `exported`, also "exported_latency_ms" and
  "exported_throughput": those of the network on XLA's convolutions, as its export runs.
  """
  variables = parallel.local_replica(variables)
  params = jax.tree.leaves(variables.params)
  portable = make_forward(network.portable(), mean_C, std_C)
  one = np.zeros((1, *image_shape), np.uint8)
  speed = measure_speed(make_forward(network, mean_C, std_C), variables, image_shape, eval_config)
  efficiency = {
      "params": int(sum(p.size for p in params)),
      "param_bytes": int(sum(p.size * p.dtype.itemsize for p in params)),
      **forward_costs(portable, variables, one),
      "convolutions": CONVOLUTION_NAMES[network.convolutions],
      **speed,
  }
  if exported:
    if network.convolutions != "xla":  # else the export runs what was just timed
      speed = measure_speed(portable, variables, image_shape, eval_config)
    efficiency.update({f"exported_{key}": value for key, value in speed.items()})
  return efficiency
