"""kd_jax without TensorFlow, TFDS, grain or tensorboardX, as on a GPU machine that lacks them:
a feature that needs one says so in one line; the rest runs without."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from conftest import normal, small_config
from kd_jax import data, export, logs, pipeline
from kd_jax.errors import UserInputError
from kd_jax.network import create_network


def _uninstall(monkeypatch, package: str, *importers: str) -> None:
  """For this test, importing `package` fails, and the kd_jax modules in `importers` (module
  paths) import afresh, as if it had never been installed."""
  monkeypatch.setitem(sys.modules, package, None)
  for module in importers:
    parent, name = module.rsplit(".", 1)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.delattr(sys.modules[parent], name, raising=False)


def test_tfds_source_without_tensorflow_datasets_names_it(monkeypatch):
  _uninstall(monkeypatch, "tensorflow_datasets", "kd_jax.data.tfds_source")
  with pytest.raises(
      UserInputError, match="data.source='tfds' needs the tensorflow_datasets package"
  ):
    data.load_dataset({"source": "tfds", "name": "cifar10"})


def test_streaming_without_grain_names_it_before_reading_data(monkeypatch, tmp_path):
  _uninstall(monkeypatch, "grain", "kd_jax.data.streaming")
  # No images there: the missing package is named before the folder is looked at.
  config = small_config(
      **{"data.source": "folder", "data.dir": str(tmp_path), "data.in_memory": "false"}
  )
  with pytest.raises(UserInputError, match="needs the grain package.*data.in_memory=true"):
    pipeline.train_and_evaluate(config, str(tmp_path / "workdir"))


def test_stage_log_without_tensorboardx_writes_metrics_jsonl(monkeypatch, tmp_path, caplog):
  _uninstall(monkeypatch, "tensorboardX")
  log = logs.StageLog(str(tmp_path / "teacher"))
  log.write(1, {"loss": 0.5})
  log.close()
  assert os.listdir(tmp_path / "teacher") == ["metrics.jsonl"]
  with open(tmp_path / "teacher" / "metrics.jsonl") as f:
    assert json.loads(f.read()) == {"epoch": 1, "loss": 0.5}
  assert "tensorboardX is not installed" in caplog.text


def test_export_without_tensorflow_writes_a_working_model_jax(monkeypatch, tmp_path, caplog):
  _uninstall(monkeypatch, "tensorflow")
  network, variables = create_network(
      "dsconv_student", num_classes=3, in_channels=1, seed=0, width_multiplier=0.25
  )
  out_dir = str(tmp_path / "export")
  export.export_model(
      network,
      variables,
      image_shape=(8, 8, 1),
      mean_C=[0.5],
      std_C=[0.25],
      class_names=("a", "b", "c"),
      out_dir=out_dir,
  )
  assert sorted(os.listdir(out_dir)) == [export.MODEL_FILE, export.PREPROCESS_FILE]
  assert "no saved_model/ since tensorflow is not installed" in caplog.text
  images = normal((3, 8, 8, 1))
  want = jax.jit(lambda images: network.apply(variables, images, train=False)[0])(images)
  served = export.load_exported(os.path.join(out_dir, export.MODEL_FILE))
  np.testing.assert_allclose(np.asarray(served(images)), want, atol=1e-5)
