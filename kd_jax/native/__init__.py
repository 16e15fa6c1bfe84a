"""kd_jax's native CPU kernel: oneDNN's 3x3 convolution, called from XLA through its FFI.

XLA:CPU's own 3x3 convolutions run 1.4-4x slower than oneDNN's on the teacher's layers
(BENCHMARKS.md). `python -m kd_jax.native.build` compiles onednn_conv.cc against the
oneDNN wheels in requirements.txt; where it has not been built (or cannot load), kd_jax
keeps to XLA's operations and runs the same, only slower.
"""

import contextlib
import contextvars
import ctypes
import functools
import os

import jax
import numpy as np
from absl import logging

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build", "libkd_jax_onednn.so")
_CONV3X3_TARGET = "kd_jax_onednn_conv3x3"
_portable = contextvars.ContextVar("kd_jax_native_portable", default=False)


@functools.cache
def _registered() -> bool:
  """Loads the library and registers its handler with XLA, once; False if it is not there."""
  if not os.path.exists(LIBRARY):
    logging.info("kd_jax: %s not built; CPU convolutions stay XLA's", LIBRARY)
    return False
  try:
    library = ctypes.CDLL(LIBRARY)
  except OSError as e:
    logging.warning("kd_jax: cannot load %s (%s); CPU convolutions stay XLA's", LIBRARY, e)
    return False
  jax.ffi.register_ffi_target(
      _CONV3X3_TARGET, jax.ffi.pycapsule(library.KdJaxOnednnConv3x3), platform="cpu"
  )
  return True


def onednn_conv_available() -> bool:
  """Whether a model traced now may call oneDNN's convolution on CPU.

  Needs the built library, a single device (the call has no rule for splitting a
  sharded batch, which XLA would otherwise gather onto every device) and no
  `portable()` around the tracing.
  """
  return not _portable.get() and jax.device_count() == 1 and _registered()


@contextlib.contextmanager
def portable():
  """Models traced inside use XLA's operations only, as a saved or exported model must."""
  token = _portable.set(True)
  try:
    yield
  finally:
    _portable.reset(token)


def conv3x3(x_BxHxWxC: jax.Array, kernel_3x3xCxD: jax.Array, stride: int) -> jax.Array:
  """oneDNN's 3x3 convolution, padding 1, float32 (B, H, W, C) -> (B, ceil(H/s), ceil(W/s), D).

  Forward only (no derivative rule); call where `onednn_conv_available()`.
  """
  batch, height, width, _ = x_BxHxWxC.shape
  out_shape = (batch, -(-height // stride), -(-width // stride), kernel_3x3xCxD.shape[-1])
  return jax.ffi.ffi_call(_CONV3X3_TARGET, jax.ShapeDtypeStruct(out_shape, x_BxHxWxC.dtype))(
      x_BxHxWxC, kernel_3x3xCxD, stride=np.int64(stride)
  )
