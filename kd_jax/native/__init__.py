"""kd_jax's native CPU kernels: oneDNN's 3x3 convolution, its gradients and an inference form
with bias, residual and ReLU fused, through XLA's FFI.

XLA:CPU's own 3x3 convolutions run 1.4-4x slower than oneDNN's on the teacher's layers,
and kd_jax's depthwise ones (forward and backward) 3-4x slower on the student's
(BENCHMARKS.md). `python -m kd_jax.native.build` compiles onednn_conv.cc against the
oneDNN wheels in requirements.txt; where it has not been built (or cannot load), kd_jax
keeps to XLA's operations and runs the same, only slower. Whether a network calls it is
decided once, when the network is built (`kd_jax.network.choose_convolutions`).
"""

import ctypes
import functools
import os

import jax
import numpy as np
from absl import logging

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build", "libkd_jax_onednn.so")
# XLA's name for each handler -> its symbol in the library.
_TARGETS = {
    "kd_jax_onednn_conv3x3": "KdJaxOnednnConv3x3",
    "kd_jax_onednn_conv3x3_backward_data": "KdJaxOnednnConv3x3BackwardData",
    "kd_jax_onednn_conv3x3_backward_weights": "KdJaxOnednnConv3x3BackwardWeights",
    "kd_jax_onednn_conv3x3_inference": "KdJaxOnednnConv3x3Inference",
    "kd_jax_onednn_conv3x3_inference_residual": "KdJaxOnednnConv3x3InferenceResidual",
}


@functools.cache
def available() -> bool:
  """Whether the library is built; loads it and registers its handlers with XLA, once."""
  if not os.path.exists(LIBRARY):
    logging.info("kd_jax: %s not built; CPU convolutions stay XLA's", LIBRARY)
    return False
  try:
    library = ctypes.CDLL(LIBRARY)
  except OSError as e:
    logging.warning("kd_jax: cannot load %s (%s); CPU convolutions stay XLA's", LIBRARY, e)
    return False
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def _call(
    target: str, out_shape: tuple, *arrays: jax.Array, stride: int, **attributes
) -> jax.Array:
  if not available():
    raise RuntimeError(f"{LIBRARY} is not built: run python -m kd_jax.native.build")
  out = jax.ShapeDtypeStruct(out_shape, arrays[0].dtype)
  return jax.ffi.ffi_call(target, out)(*arrays, stride=np.int64(stride), **attributes)


def _conv3x3_out_shape(x_shape: tuple, kernel_3x3xKxD: jax.Array, stride: int) -> tuple:
  batch, height, width, _ = x_shape
  return (batch, -(-height // stride), -(-width // stride), kernel_3x3xKxD.shape[-1])


def conv3x3(x_BxHxWxC: jax.Array, kernel_3x3xKxD: jax.Array, stride: int) -> jax.Array:
  """oneDNN's 3x3 convolution, padding 1, float32 (B, H, W, C) -> (B, ceil(H/s), ceil(W/s), D).

  The kernel is HWIO with K = C / G input channels for G groups, as XLA's
  feature_group_count (K = 1: depthwise). No derivative rule of its own
  (`ops.conv3x3_onednn` has one); call where `available()`.
  """
  out_shape = _conv3x3_out_shape(x_BxHxWxC.shape, kernel_3x3xKxD, stride)
  return _call("kd_jax_onednn_conv3x3", out_shape, x_BxHxWxC, kernel_3x3xKxD, stride=stride)


def conv3x3_inference(
    x_BxHxWxC: jax.Array,
    kernel_3x3xKxD: jax.Array,
    bias_D: jax.Array,
    residual: jax.Array | None,
    stride: int,
    relu: bool,
) -> jax.Array:
  """`conv3x3` + bias (+ residual, shaped as the output), then ReLU if `relu`, in one pass.

  For inference: no derivative rule of its own (`ops.conv3x3_bias_onednn` has one).
  """
  out_shape = _conv3x3_out_shape(x_BxHxWxC.shape, kernel_3x3xKxD, stride)
  target = "kd_jax_onednn_conv3x3_inference"
  if residual is None:
    residual = bias_D  # a placeholder: this handler does not read it
  else:
    target += "_residual"
  return _call(
      target,
      out_shape,
      x_BxHxWxC,
      kernel_3x3xKxD,
      bias_D,
      residual,
      stride=stride,
      relu=relu,
  )


def conv3x3_input_gradient(
    dy_BxOHxOWxD: jax.Array, kernel_3x3xKxD: jax.Array, x_shape: tuple, stride: int
) -> jax.Array:
  """The gradient of `conv3x3` with respect to its input x (of shape `x_shape`)."""
  return _call(
      "kd_jax_onednn_conv3x3_backward_data",
      x_shape,
      dy_BxOHxOWxD,
      kernel_3x3xKxD,
      stride=stride,
  )


def conv3x3_kernel_gradient(
    x_BxHxWxC: jax.Array, dy_BxOHxOWxD: jax.Array, kernel_shape: tuple, stride: int
) -> jax.Array:
  """The gradient of `conv3x3` with respect to its kernel (of shape `kernel_shape`)."""
  return _call(
      "kd_jax_onednn_conv3x3_backward_weights",
      kernel_shape,
      x_BxHxWxC,
      dy_BxOHxOWxD,
      stride=stride,
  )
