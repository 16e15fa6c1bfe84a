"""A trained model packaged for inference outside this toolkit.

`export_model` writes one folder:

  model.jax        the model as a `jax.export` artifact (StableHLO), for JAX.
  saved_model/     the same function as a TensorFlow SavedModel, for TF Serving
                   and other TensorFlow runtimes (the graph holds the StableHLO
                   in an XlaCallModule op: load it with a TensorFlow as recent
                   as the one that wrote it; 2.21 here). Written where
                   TensorFlow is installed; without it the export says so in
                   one log line and holds the other two files.
  preprocess.json  how to turn a picture into the model's input, and class names.

Both artifacts are the model alone, in inference mode, with its weights baked
in as constants: they take float32 NHWC images that are already normalised, for
any batch size, and return logits. Normalisation stays outside so a deployment
can fuse it with its own decoding and resizing; preprocess.json says what it is.
"""

import json
import os
import shutil
import tempfile
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging

from kd_jax import parallel
from kd_jax.network import Network, Variables

MODEL_FILE = "model.jax"
SAVED_MODEL_DIR = "saved_model"
PREPROCESS_FILE = "preprocess.json"
# Both, whatever this run trained on: a model trained on a GPU is often served
# on CPUs, and lowering for a platform needs no such device here.
PLATFORMS = ("cpu", "cuda")
_BATCH = "batch"
_COLOR_NAMES = {1: "grayscale", 3: "RGB"}


def _inference_function(network: Network, variables: Variables) -> Callable:
  """`images -> logits` in eval mode, closing over host copies of the weights.

  Closing over numpy arrays (rather than taking them as arguments) is what
  makes the exported function carry its weights as constants.
  """
  host_variables = parallel.host_copy(variables)
  # An exported model must run without kd_jax, so without its native kernels.
  portable = network.portable()

  def infer(images_BxHxWxC: jax.Array) -> jax.Array:
    return portable.apply(host_variables, images_BxHxWxC, train=False)[0]

  return infer


def _write_jax_export(
    infer: Callable, image_shape: tuple, platforms: Sequence[str], path: str
) -> jax.export.Exported:
  """Serialises `infer` with a symbolic batch dimension to `path`."""
  (batch,) = jax.export.symbolic_shape(_BATCH)
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(
      jax.ShapeDtypeStruct((batch, *image_shape), np.float32)
  )
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return exported


def _write_saved_model(
    infer: Callable, image_shape: tuple, platforms: Sequence[str], path: str
) -> None:
  """Saves `infer` as a SavedModel whose `serving_default` maps images to logits.

  Where TensorFlow is not installed, says so in one log line instead.
  """
  # TensorFlow takes seconds to import; only this needs it.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning(
        "export: no %s/ since %s is not installed (pip install tensorflow-cpu for one); "
        "%s serves the model without it",
        SAVED_MODEL_DIR,
        e.name or "tensorflow",
        MODEL_FILE,
    )
    return

  infer_tf = jax2tf.convert(
      infer,
      polymorphic_shapes=[f"({_BATCH}, {', '.join(map(str, image_shape))})"],
      with_gradient=False,
      native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  # The argument name and the dict key become the signature's input and output
  # names, which TF Serving clients address.
  module.serve = tf.function(
      lambda images: {"logits": infer_tf(images)},
      input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name="images")],
      autograph=False,
  )
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _preprocess_spec(
    image_shape: tuple, mean_C, std_C, class_names: Sequence[str], model_name: str
) -> dict:
  """The contents of preprocess.json."""
  height, width, channels = image_shape
  color = _COLOR_NAMES.get(channels, f"{channels}-channel")
  return {
      "model": model_name,
      "image_size": [height, width],
      "channels": channels,
      "mean": [float(m) for m in np.asarray(mean_C)],
      "std": [float(s) for s in np.asarray(std_C)],
      "class_names": list(class_names),
      "input": (
          f"{color} images resized to {height}x{width}, as float32 NHWC "
          f"[batch, {height}, {width}, {channels}], each channel normalised as "
          "(pixels / 255 - mean) / std with pixels the 0..255 values and mean, std from this file"
      ),
      "output": (
          f"float32 logits [batch, {len(class_names)}], one per class in class_names order; "
          "softmax gives probabilities"
      ),
      "platforms": list(PLATFORMS),
  }


def _move_into_place(staging: str, out_dir: str) -> None:
  """Renames `staging` to `out_dir`, replacing any earlier export there."""
  if not os.path.exists(out_dir):
    os.rename(staging, out_dir)
    return
  # A folder cannot be renamed over a non-empty one: move the old export aside
  # first, so at every moment out_dir holds a complete export or nothing.
  trash = tempfile.mkdtemp(
      prefix=f".{os.path.basename(out_dir)}.old.", dir=os.path.dirname(out_dir)
  )
  os.rename(out_dir, os.path.join(trash, "export"))
  os.rename(staging, out_dir)
  shutil.rmtree(trash, ignore_errors=True)


def export_model(
    network: Network,
    variables: Variables,
    *,
    image_shape: tuple,
    mean_C,
    std_C,
    class_names: Sequence[str],
    out_dir: str,
) -> None:
  """Writes model.jax, saved_model/ (given TensorFlow) and preprocess.json into `out_dir`.

  Everything is written to a temporary folder beside `out_dir` and renamed into
  place at the end, so `out_dir` never holds a half-written export; an
  existing `out_dir` is replaced.

  Args:
    network: the model's graphs.
    variables: its trained weights (on any devices; copied to the host).
    image_shape: (H, W, C) of one input image.
    mean_C: per-channel mean of the training images, on the 0..1 scale.
    std_C: per-channel standard deviation, on the 0..1 scale.
    class_names: the class names, in label order.
    out_dir: the folder to create.
  """
  image_shape = tuple(int(d) for d in image_shape)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
  # mkdtemp makes it private to us; a serving process may run as another user.
  os.chmod(staging, 0o755)
  try:
    infer = _inference_function(network, variables)
    exported = _write_jax_export(infer, image_shape, PLATFORMS, os.path.join(staging, MODEL_FILE))
    num_logits = exported.out_avals[0].shape[-1]
    if num_logits != len(class_names):
      raise ValueError(f"the model predicts {num_logits} classes but got {len(class_names)} names")
    _write_saved_model(infer, image_shape, PLATFORMS, os.path.join(staging, SAVED_MODEL_DIR))
    with open(os.path.join(staging, PREPROCESS_FILE), "w") as f:
      json.dump(
          _preprocess_spec(image_shape, mean_C, std_C, class_names, network.name), f, indent=2
      )
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  _move_into_place(staging, out_dir)


def load_exported(path: str) -> Callable[[jax.Array], jax.Array]:
  """The model in a model.jax file, as a jitted `images -> logits` function.

  Needs neither this toolkit nor the model's code: the file holds the
  computation. Takes normalised float32 NHWC images of any batch size.
  """
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return jax.jit(exported.call)
