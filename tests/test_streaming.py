"""Streamed data: the same batches as in memory, end to end, resumable mid-epoch."""

import json
import os
import shutil

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import small_config
from configs import default
from kd_jax import data, optim, parallel, pipeline, train
from kd_jax.data import in_memory, placement, streaming
from kd_jax.errors import UserInputError
from kd_jax.network import create_network

SIZE = 8


@pytest.fixture(scope="module")
def smooth_tree(tmp_path_factory):
  """3 classes x 12 training and 4 test images: smooth colour ramps, some 11 x 13.

  Smooth, so that interpolations of one crop box agree to a few levels.
  """
  root = tmp_path_factory.mktemp("smooth")
  rng = np.random.default_rng(0)
  for split, count in (("train", 12), ("test", 4)):
    for label in range(3):
      os.makedirs(root / split / f"class{label}")
      for i in range(count):
        height, width = (11, 13) if i % 4 == 3 else (SIZE, SIZE)
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        slope = rng.uniform(50, 200, 3)
        image = np.stack([slope[0] * x, slope[1] * y, 60 * label + slope[2] * (x + y) / 2], -1)
        cv2.imwrite(str(root / split / f"class{label}" / f"{i:02d}.png"), image.astype(np.uint8))
  return root


def _photo(rng, label: int, height: int, width: int) -> np.ndarray:
  """A small photo-like BGR image: a shaded, textured background and a few soft shapes whose
  colours lean towards the class's."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  light = rng.uniform(60, 180, 3) + rng.uniform(-2, 2, 3) * (x + y)[..., None]
  texture = 25 * np.sin(x * rng.uniform(0.3, 1.5) + y * rng.uniform(0.3, 1.5))[..., None]
  image = light + texture + rng.normal(0, 10, (height, width, 3))
  tint = np.roll([200.0, 60.0, 60.0], label)
  for _ in range(3):
    centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    axes = (int(rng.integers(2, width // 2)), int(rng.integers(2, height // 2)))
    colour = np.clip(tint + rng.normal(0, 30, 3), 0, 255).tolist()
    cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
  return np.clip(cv2.GaussianBlur(image, (3, 3), 0.8), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
  """Like a slice of CIFAR-10: 3 classes x 12 training and 4 test JPEGs of photo-like content,
  32 x 32 but for a few 48 x 40 ones, which loading resizes to the most common size."""
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(1)
  for split, count in (("train", 12), ("test", 4)):
    for label in range(3):
      os.makedirs(root / split / f"class{label}")
      for i in range(count):
        height, width = (48, 40) if i % 6 == 5 else (32, 32)
        path = str(root / split / f"class{label}" / f"{i:04d}.jpg")
        assert cv2.imwrite(path, _photo(rng, label, height, width), [cv2.IMWRITE_JPEG_QUALITY, 90])
  return root


def _data_config(root, **fields):
  return ml_collections.ConfigDict(
      {
          "source": "folder",
          "dir": str(root),
          "image_size": SIZE,
          "augment": "crop_flip",
          "in_memory": "false",
          "workers": 2,
          "prefetch": 2,
          "stats_images": 1000,
          **fields,
      }
  )


def _pixels(training_data, view_BxHxWxC) -> np.ndarray:
  """A normalised view back on the 0..255 scale, rounded."""
  return np.round((np.asarray(view_BxHxWxC) * training_data.std_C + training_data.mean_C) * 255)


@pytest.mark.parametrize(
    "kind, tree, image_size",
    [("crop_flip", "photo_tree", 0), ("resized_crop_flip", "smooth_tree", SIZE)],
)
def test_streamed_batches_are_the_in_memory_batches(request, kind, tree, image_size):
  config = _data_config(request.getfixturevalue(tree), augment=kind, image_size=image_size)
  mesh = parallel.make_mesh()
  held_data = in_memory.put_on_device(data.load_dataset(config), mesh, {"augment": kind})
  streamed = streaming.StreamedData(data.open_dataset(config), mesh, config)
  # Every image sampled: the statistics are the in-memory ones, to the bit.
  np.testing.assert_array_equal(streamed.mean_C, held_data.mean_C)
  np.testing.assert_array_equal(streamed.std_C, held_data.std_C)
  seed, batch_size = 3, 8
  steps = held_data.steps_per_epoch(batch_size)
  assert streamed.steps_per_epoch(batch_size) == steps == 36 // batch_size
  for epoch, start in ((0, 0), (1, 2)):  # a whole epoch, and one entered mid-way
    pairs = zip(
        held_data.train_batches(seed, epoch, start, batch_size),
        streamed.train_batches(seed, epoch, start, batch_size),
        strict=True,
    )
    order_SxB = placement.epoch_indices(seed, epoch, 36, batch_size)
    for position, (held, read) in enumerate(pairs, start):
      np.testing.assert_array_equal(read["label"], held["label"])
      # Each example's place in the dataset, as a contrastive memory indexes it.
      np.testing.assert_array_equal(held["index"], order_SxB[position])
      np.testing.assert_array_equal(read["index"], held["index"])
      # What the student sees: augmented in the step, or (resized crops) cropped on the host.
      step = epoch * steps + position
      expected = held_data.student_view(seed, step, held["image"])
      got = streamed.student_view(seed, step, read["image"])
      if kind == "crop_flip":
        np.testing.assert_array_equal(read["image"], held["image"])
        np.testing.assert_array_equal(got, expected)
      else:
        got, expected = _pixels(streamed, got), _pixels(held_data, expected)
        # Same boxes and flips; the host crops the full-size image with OpenCV.
        assert np.abs(got - expected).mean() < 6, position
        flipped = np.sign(got[:, 0, -1, 0] - got[:, 0, 0, 0])
        assert (flipped == np.sign(expected[:, 0, -1, 0] - expected[:, 0, 0, 0])).mean() > 0.7

  forward = jax.jit(lambda variables, x: x.reshape(x.shape[0], -1).astype(jnp.float32))
  for split in ("train", "test"):
    held_logits, held_labels = held_data.predict(forward, None, split, 16)
    read_logits, read_labels = streamed.predict(forward, None, split, 16)
    np.testing.assert_array_equal(read_labels, held_labels)
    np.testing.assert_array_equal(read_logits, held_logits)


def test_both_kinds_feed_one_train_step_program(photo_tree):
  # Two programs (one augmenting in the step, one fed augmented images) are
  # fused differently by the compiler; on 4 CPU devices their losses parted
  # from the second step, and training amplifies that. One program, the same
  # batches: the same numbers, wherever the backend is deterministic.
  config = _data_config(photo_tree, image_size=0)
  mesh = parallel.make_mesh()
  network, variables = create_network(
      "dsconv_student", num_classes=3, in_channels=3, seed=0, width_multiplier=0.25
  )
  optimizer = optim.make_optimizer(default.optimizer_config(name="sgd"), 4, 1, 8)
  state = train.TrainState(np.int32(0), variables, optimizer.init(variables.params))
  programs = []
  for kind in (
      in_memory.put_on_device(data.load_dataset(config), mesh, config),
      streaming.StreamedData(data.open_dataset(config), mesh, config),
  ):
    step = train.make_train_step(network, optimizer, kind, seed=3, mesh=mesh)
    batch = next(kind.train_batches(3, 0, 0, 8))
    programs.append(step.lower(state, batch, None).as_text())
  assert programs[1] == programs[0]


def test_stream_order_splits_processes_and_matches_one_process():
  np.testing.assert_array_equal(
      streaming.stream_order(5, 2, np.array([50]), 0, 8), placement.epoch_indices(5, 2, 50, 8)
  )
  counts = np.array([13, 12, 12])
  parts = [streaming.stream_order(5, 2, counts, p, 6) for p in range(3)]
  assert all(part.shape == (6, 2) for part in parts)  # 12 // 2 steps of 2 per process
  for p, part in enumerate(parts):
    assert len(set(part.ravel())) == part.size and part.max() < counts[p]
  assert not np.array_equal(parts[1], parts[2])  # each shuffles on its own


def _run_config(root, in_memory, **overrides):
  return small_config(
      **{
          "data.source": "folder",
          "data.dir": str(root),
          "data.image_size": 0,
          "data.augment": "crop_flip",
          "data.in_memory": in_memory,
          "teacher.epochs": 1,
          "student.epochs": 2,
          "teacher.batch_size": 8,
          "student.batch_size": 8,
          "eval.batch_size": 8,
          "baseline.enabled": False,
          "checkpoint.every_steps": 2,
          "checkpoint.keep": 100,
          **overrides,
      }
  )


def _history(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _without_times(history):
  return [{k: v for k, v in epoch.items() if k != "epoch_time_s"} for epoch in history]


@pytest.mark.slow
def test_streamed_run_equals_in_memory_run_and_resumes_mid_epoch(photo_tree, tmp_path):
  held = pipeline.train_and_evaluate(_run_config(photo_tree, "true"), str(tmp_path / "m"))
  streamed_config = _run_config(photo_tree, "false")
  streamed = pipeline.train_and_evaluate(streamed_config, str(tmp_path / "s"))
  # Teacher and student, epoch by epoch, to the last bit: the same training.
  for stage in ("teacher", "student"):
    assert streamed[stage]["top1"] == held[stage]["top1"]
    assert _without_times(_history(tmp_path / "s", stage)) == _without_times(
        _history(tmp_path / "m", stage)
    )

  # Interrupted after step 6 of the student's 8 (mid-way through its second
  # epoch): only what was written up to there remains. The rerun resumes there.
  resumed = tmp_path / "r"
  shutil.copytree(tmp_path / "s", resumed)
  folder = resumed / "student" / "checkpoints"
  for name in os.listdir(folder):
    if name.isdigit() and int(name) > 6:
      shutil.rmtree(folder / name)
  first_epoch = _history(resumed, "student")[:1]
  with open(resumed / "student" / "metrics.jsonl", "w") as f:
    f.write(json.dumps(first_epoch[0]) + "\n")
  os.remove(resumed / "report.json")
  again = pipeline.train_and_evaluate(streamed_config, str(resumed))
  assert again["student"]["top1"] == streamed["student"]["top1"]

  # One epoch added (a restart from scratch would have added two), as before.
  assert _without_times(_history(resumed, "student")) == _without_times(
      _history(tmp_path / "s", "student")
  )


def test_a_corrupt_image_in_a_stream_is_named(smooth_tree, tmp_path):
  root = tmp_path / "tree"
  shutil.copytree(smooth_tree, root)
  (root / "train" / "class1" / "05.png").write_bytes(b"not a png")
  config = _data_config(root)
  streamed = streaming.StreamedData(
      data.open_dataset(config), parallel.make_mesh(), _data_config(root, stats_images=1)
  )
  with pytest.raises(UserInputError, match=r"cannot decode .*class1/05\.png: fix or remove it"):
    for _ in streamed.train_batches(0, 0, 0, 36):
      pass


def test_in_memory_choice(smooth_tree):
  assert data.streams(_data_config(smooth_tree, in_memory="false"))
  assert not data.streams(_data_config(smooth_tree, in_memory=True))
  # 36 + 12 images of 8 x 8 x 3 bytes: 9 KiB.
  assert data.streams(_data_config(smooth_tree, in_memory="auto", memory_budget_gb=8e-6))
  assert not data.streams(_data_config(smooth_tree, in_memory="auto", memory_budget_gb=1e-5))
  assert not data.streams(ml_collections.ConfigDict({"source": "digits", "in_memory": "auto"}))
  with pytest.raises(UserInputError, match="data.in_memory='sometimes': use true, false or auto"):
    data.streams(_data_config(smooth_tree, in_memory="sometimes"))
  with pytest.raises(UserInputError, match="data.source='digits' cannot be streamed"):
    data.open_dataset(ml_collections.ConfigDict({"source": "digits"}))


def test_eval_crop_takes_the_centre_of_the_resized_image(smooth_tree):
  # image_size 8 at eval_crop 0.5: shorter side to 16, then the central 8 x 8.
  config = _data_config(smooth_tree, eval_crop=0.5)
  streamed = streaming.StreamedData(data.open_dataset(config), parallel.make_mesh(), config)
  forward = jax.jit(lambda variables, x: x.reshape(x.shape[0], -1).astype(jnp.float32))
  logits, _ = streamed.predict(forward, None, "test", 12)
  files = data.open_dataset(config).test.files
  for row, name in zip(logits, files):
    image = cv2.imread(str(smooth_tree / name), cv2.IMREAD_COLOR_RGB)
    height, width = image.shape[:2]  # 8 x 8 or 11 x 13: the shorter side becomes 16
    resized = cv2.resize(image, (round(width * 16 / height), 16), interpolation=cv2.INTER_LINEAR)
    top, left = (16 - 8) // 2, (resized.shape[1] - 8) // 2
    np.testing.assert_array_equal(row.reshape(8, 8, 3), resized[top : top + 8, left : left + 8])


def test_eval_crop_needs_streamed_data(smooth_tree, tmp_path):
  config = _run_config(smooth_tree, "true", **{"data.eval_crop": 0.875})
  with pytest.raises(UserInputError, match="data.eval_crop=0.875 .* only for streamed data"):
    pipeline.train_and_evaluate(config, str(tmp_path))
