"""configs/cifar_fast.py: its teacher's whitening fitted to the data; a few steps of its run."""

import json
import os

import cv2
import jax
import numpy as np
import pytest
from flax import nnx

from configs import cifar_fast
from kd_jax import layers, parallel, pipeline, whitening
from kd_jax.data import Dataset, in_memory
from kd_jax.network import create_network


def _dataset(rng, size=12, train=40, test=8, classes=4) -> Dataset:
  # Smooth images: neighbouring pixels and channels correlate, as in photographs.
  def images(count):
    coarse = rng.integers(0, 256, (count, size // 2 + 1, size // 2 + 1, 3)).astype(np.float32)
    smooth = np.stack([cv2.resize(image, (size, size)) for image in coarse])
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)

  return Dataset(
      images(train),
      rng.integers(0, classes, train),
      images(test),
      rng.integers(0, classes, test),
      tuple(f"c{i}" for i in range(classes)),
  )


def test_whitening_is_fitted_to_the_normalised_training_patches():
  dataset = _dataset(np.random.default_rng(0))
  mesh = parallel.make_mesh()
  data = in_memory.put_on_device(dataset, mesh, {"augment": "none"})
  network, variables = create_network("airbench", num_classes=4, in_channels=3, seed=0)
  fitted = whitening.fit(network, variables, data, mesh, batch_size=16)

  x = (dataset.train_images / 255.0 - data.mean_C) / data.std_C
  windows = [x[:, dy : dy + 11, dx : dx + 11] for dy in (0, 1) for dx in (0, 1)]
  patches_Nx12 = np.stack(windows, axis=-2).reshape(-1, 12)  # (row, column, channel)
  expected = layers.whitening_kernel(patches_Nx12.T @ patches_Nx12 / len(patches_Nx12), 2)
  filters = np.asarray(fitted.batch_stats["whiten"]["filters"][...])
  # Eigenvectors are defined up to sign: compare each filter up to its sign.
  signs = np.sign((filters * expected).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(filters, expected * signs, rtol=1e-3, atol=1e-3)
  # Everything else is as it was; a network without whitening is left alone.
  np.testing.assert_array_equal(
      fitted.params["fc"]["kernel"][...], variables.params["fc"]["kernel"][...]
  )
  student, plain = create_network("dsconv_student", num_classes=4, in_channels=3, seed=0)
  assert whitening.fit(student, plain, data, mesh, batch_size=16) is plain


def test_the_optimiser_masks_find_the_whitening_and_batch_norm_biases():
  network, variables = create_network("airbench", num_classes=4, in_channels=3, seed=0)
  for module_type, expected in (
      (layers.PatchWhitening, {"['whiten']['bias']"}),
      (nnx.BatchNorm, {f"['blocks'][{b}]['bn{i}']['bias']" for b in range(3) for i in (1, 2)}),
  ):
    mask = network.biases_of(variables, module_type)
    marked = {
        jax.tree_util.keystr(path, simple=False).removesuffix(".value")
        for path, leaf in jax.tree_util.tree_leaves_with_path(mask)
        if leaf
    }
    assert marked == expected


@pytest.mark.slow  # a whole run: its compilations take a minute or more
def test_cifar_fast_runs_a_few_steps_on_an_image_tree(tmp_path):
  dataset = _dataset(np.random.default_rng(1), size=16)
  for split, images, labels in (
      ("train", dataset.train_images, dataset.train_labels),
      ("test", dataset.test_images, dataset.test_labels),
  ):
    for index, (image, label) in enumerate(zip(images, labels)):
      folder = tmp_path / "tree" / split / f"c{label}"
      folder.mkdir(parents=True, exist_ok=True)
      assert cv2.imwrite(str(folder / f"{index}.png"), image)
  config = cifar_fast.get_config()
  config.data.update(source="folder", dir=str(tmp_path / "tree"))
  for stage in (config.teacher, config.student):
    stage.update(epochs=1, batch_size=8)
  config.teacher.optimizer.warmup_epochs = 0.25
  config.eval.update(batch_size=8, latency_repeats=1, throughput_repeats=1)
  config.export.enabled = False
  config.baseline.enabled = False  # the student's network without a teacher: nothing new here
  workdir = str(tmp_path / "work")
  report = pipeline.train_and_evaluate(config, workdir)

  for name in ("teacher", "student"):
    assert 0.0 <= report[name]["top1"] <= 1.0
    assert report[name]["tta"] == "flip_translate"
  assert report["teacher"]["params"] > report["student"]["params"]
  with open(os.path.join(workdir, "teacher", "metrics.jsonl")) as f:
    (epoch,) = [json.loads(line) for line in f]
  assert np.isfinite(epoch["loss"]) and epoch["test_top1"] == report["teacher"]["top1"]
