"""The exported model (jax.export and SavedModel) against the model it came from."""

import json
import os
from typing import NamedTuple

import jax
import numpy as np
import pytest

from kd_jax import export
from kd_jax.network import Network, Variables, create_network

IMAGE_SHAPE = (16, 16, 3)
CLASS_NAMES = tuple(f"class_{i}" for i in range(10))
MEAN_C = np.array([0.49, 0.48, 0.45], np.float32)
STD_C = np.array([0.25, 0.24, 0.26], np.float32)
BATCH_SIZES = (1, 7)


def _trained_looking(variables: Variables) -> Variables:
  """Fresh weights with running variances scaled randomly away from 1.

  With initial statistics, a model run in training mode or with the wrong
  statistics could give nearly the same logits; with these, only the exact
  variables in eval mode do, and the logits reach a few units, so the
  tolerance below is tight in relative terms too.
  """
  rng = np.random.default_rng(1)
  batch_stats = jax.tree.map(
      lambda a: (np.asarray(a) * np.exp(rng.normal(size=a.shape))).astype(a.dtype),
      variables.batch_stats,
  )
  return variables.replace(batch_stats=batch_stats)


class Exported(NamedTuple):
  network: Network
  variables: Variables
  out_dir: str
  kwargs: dict  # export_model's arguments besides the model and out_dir
  cases: dict  # batch size -> (images, the model's logits for them)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  network, variables = create_network(
      "dsconv_student", num_classes=10, in_channels=3, seed=0, width_multiplier=0.25
  )
  variables = _trained_looking(variables)
  out_dir = str(tmp_path_factory.mktemp("run") / "export")
  kwargs = dict(image_shape=IMAGE_SHAPE, mean_C=MEAN_C, std_C=STD_C, class_names=CLASS_NAMES)
  export.export_model(network, variables, out_dir=out_dir, **kwargs)
  apply = jax.jit(lambda images: network.apply(variables, images, train=False)[0])
  rng = np.random.default_rng(0)
  # Two batch sizes: the exported batch dimension is symbolic.
  cases = {}
  for batch in BATCH_SIZES:
    images = rng.normal(size=(batch, *IMAGE_SHAPE)).astype(np.float32)
    cases[batch] = images, np.asarray(apply(images))
  return Exported(network, variables, out_dir, kwargs, cases)


def test_jax_export_gives_the_model_logits_at_any_batch_size(exported):
  path = os.path.join(exported.out_dir, export.MODEL_FILE)
  infer = export.load_exported(path)
  for images, expected in exported.cases.values():
    np.testing.assert_allclose(infer(images), expected, rtol=1e-5, atol=1e-5)
  # It runs without kd_jax: on XLA's convolutions, whichever the network took here.
  with open(path, "rb") as f:
    assert "kd_jax_onednn" not in jax.export.deserialize(bytearray(f.read())).mlir_module()


def test_saved_model_gives_the_model_logits_at_any_batch_size(exported):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  serve = tf.saved_model.load(os.path.join(exported.out_dir, export.SAVED_MODEL_DIR)).signatures[
      "serving_default"
  ]
  (inputs,) = serve.structured_input_signature[1].values()
  assert inputs.name == "images" and inputs.shape.as_list() == [None, *IMAGE_SHAPE]
  for images, expected in exported.cases.values():
    logits = serve(images=tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_preprocess_json_describes_the_input(exported):
  with open(os.path.join(exported.out_dir, export.PREPROCESS_FILE)) as f:
    spec = json.load(f)
  assert spec["image_size"] == [16, 16] and spec["channels"] == 3
  np.testing.assert_allclose(spec["mean"], MEAN_C)
  np.testing.assert_allclose(spec["std"], STD_C)
  assert spec["class_names"] == list(CLASS_NAMES)
  assert spec["model"] == "dsconv_student"
  assert "RGB" in spec["input"] and "(pixels / 255 - mean) / std" in spec["input"]


def test_reexport_replaces_the_folder_and_a_failed_one_leaves_it(exported):
  network, variables, out_dir, kwargs, _ = exported
  parent = os.path.dirname(out_dir)
  with open(os.path.join(out_dir, "stale"), "w") as f:
    f.write("from an earlier export")

  with pytest.raises(ValueError, match="10 classes"):
    export.export_model(
        network, variables, out_dir=out_dir, **{**kwargs, "class_names": ("cat", "dog")}
    )
  assert os.path.exists(os.path.join(out_dir, "stale"))

  export.export_model(network, variables, out_dir=out_dir, **kwargs)
  assert sorted(os.listdir(out_dir)) == sorted(
      [export.MODEL_FILE, export.SAVED_MODEL_DIR, export.PREPROCESS_FILE]
  )
  assert os.listdir(parent) == ["export"]


@pytest.mark.slow
def test_a_trained_students_export_on_real_digits(quickstart_run):
  """The pipeline's export of its trained student, on a real batch of digits."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  from kd_jax import checkpoint  # pylint: disable=g-import-not-at-top

  workdir, _ = quickstart_run
  folder = os.path.join(workdir, "export", "student")
  with open(os.path.join(folder, export.PREPROCESS_FILE)) as f:
    preprocess = json.load(f)
  digits = np.rint(load_digits().images[:32] * 255 / 16)[..., None]
  images = ((digits / 255 - preprocess["mean"]) / preprocess["std"]).astype(np.float32)

  network, template = create_network(
      "dsconv_student", num_classes=10, in_channels=1, seed=0, width_multiplier=0.5
  )
  variables, _ = checkpoint.restore_variables(
      os.path.join(workdir, "student"), template, lambda meta: None
  )
  want = np.asarray(network.apply(variables, images, train=False)[0])
  served = export.load_exported(os.path.join(folder, export.MODEL_FILE))
  np.testing.assert_allclose(np.asarray(served(images)), want, atol=1e-5)
  signature = tf.saved_model.load(os.path.join(folder, export.SAVED_MODEL_DIR)).signatures[
      "serving_default"
  ]
  np.testing.assert_allclose(
      signature(images=tf.constant(images))["logits"].numpy(), want, atol=1e-5
  )
  assert (want.argmax(-1) == load_digits().target[:32]).mean() > 0.8
