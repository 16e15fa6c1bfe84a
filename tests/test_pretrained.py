"""Pretrained weights: torchvision's state dicts load into kd_jax's models and give its logits.

The fixture (tests/fixtures/make_torchvision_fixture.py, run with torch) holds
torchvision's own models at the real depths and names but reduced widths,
random weights and batch-norm statistics, and torchvision's logits for a
random batch; the same reduced configurations build here through the registry.
"""

import json
import os

import cv2
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs import default
from conftest import save_torch_state_dict
from kd_jax import checkpoint, models, network, pipeline, predict, pretrained
from kd_jax.errors import UserInputError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torchvision")
NUM_CLASSES = 10
# The fixture's widths: the ResNets' stem and stages at 1/16, MobileNetV2 at width_mult 0.25.
NARROW = {
    "resnet18": {"widths": (4, 4, 8, 16, 32)},
    "resnet34": {"widths": (4, 4, 8, 16, 32)},
    "resnet50": {"widths": (4, 4, 8, 16, 32)},
    "mobilenet_v2": {"width_mult": 0.25},
}


def narrow_model(name: str, num_classes: int = NUM_CLASSES) -> nnx.Module:
  """The registry's `name` at the fixture's widths."""
  return models.resolve(name)(
      num_classes=num_classes, in_channels=3, rngs=nnx.Rngs(0), **NARROW[name]
  )


def logits_of(net: network.Network, variables: network.Variables, images_BxHxWxC) -> jax.Array:
  """The model's inference logits, compiled once (op-by-op execution is far slower)."""
  return jax.jit(lambda v, x: net.apply(v, x, train=False)[0])(variables, images_BxHxWxC)


def fixture(name: str) -> tuple[dict, dict]:
  """(state dict, {"images", "logits"}) of the fixture's `name`."""
  return (
      safetensors.numpy.load_file(os.path.join(FIXTURES, f"{name}.safetensors")),
      safetensors.numpy.load_file(os.path.join(FIXTURES, f"{name}_io.safetensors")),
  )


@pytest.mark.parametrize("name", list(pretrained.HEAD_WEIGHTS))
def test_logits_equal_torchvisions(name):
  tensors, io = fixture(name)
  model = nnx.eval_shape(lambda: narrow_model(name))  # shapes alone: the file gives every value
  assert not pretrained.assign(model, tensors, name)
  net, variables = network.split_model(name, model)
  logits = np.asarray(logits_of(net, variables, io["images"]))
  expected = io["logits"]
  assert logits.shape == expected.shape == (2, NUM_CLASSES)
  assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_other_class_count_keeps_a_fresh_head_and_the_body():
  tensors, _ = fixture("resnet18")
  model = narrow_model("resnet18", num_classes=3)
  fresh_kernel = np.asarray(model.fc.kernel[...])
  assert pretrained.assign(model, tensors, "resnet18")
  np.testing.assert_array_equal(model.fc.kernel[...], fresh_kernel)
  np.testing.assert_array_equal(
      model.stem_conv.kernel[...], tensors["conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(model.stem_bn.var[...], tensors["bn1.running_var"])


def test_mismatched_file_names_the_tensors_and_changes_nothing():
  tensors, _ = fixture("resnet18")
  del tensors["layer2.0.conv1.weight"]
  tensors["extra.weight"] = np.zeros(3, np.float32)
  model = narrow_model("resnet18")
  before = np.asarray(model.stem_conv.kernel[...])
  with pytest.raises(UserInputError) as error:
    pretrained.assign(model, tensors, "'w.safetensors'")
  message = str(error.value)
  assert "missing layer2.0.conv1.weight" in message and "unexpected extra.weight" in message
  assert "\n" not in message
  np.testing.assert_array_equal(model.stem_conv.kernel[...], before)


def test_load_checks_shapes_against_the_full_model():
  # The fixture is narrower than the registry's mobilenet_v2.
  with pytest.raises(UserInputError, match=r"wrong shape features.0.0.weight \(8, 3, 3, 3\)"):
    pretrained.load("mobilenet_v2", os.path.join(FIXTURES, "mobilenet_v2.safetensors"))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_files_load_as_float32_weights(tmp_path, dtype):
  # Hub checkpoints are often saved in bfloat16 or float16.
  tensors, _ = fixture("resnet18")
  path = str(tmp_path / "half.safetensors")
  safetensors.numpy.save_file({name: a.astype(dtype) for name, a in tensors.items()}, path)
  model = narrow_model("resnet18")
  pretrained.assign(model, pretrained.read_state_dict(path, "w"), "w")
  kernel = model.stem_conv.kernel[...]
  assert kernel.dtype == np.float32
  expected = tensors["conv1.weight"].astype(dtype).astype(np.float32).transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel, expected)
  assert not np.array_equal(kernel, tensors["conv1.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickled_files_are_refused_with_the_conversion(tmp_path, suffix):
  path = tmp_path / f"resnet50{suffix}"
  path.write_bytes(b"not opened")
  with pytest.raises(UserInputError) as error:
    pretrained.load("resnet50", str(path))
  assert "safetensors.torch.save_file(torch.load(" in str(error.value)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """A three-class image folder, 16x16 RGB, with ImageNet's folder names training/ and val/."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for folder, count in (("training", 8), ("val", 4)):
    for label in range(3):
      (root / folder / f"class{label}").mkdir(parents=True)
      for index in range(count):
        image = rng.integers(0, 128, (16, 16, 3), np.uint8)
        image[..., label] += 127  # each class brighter in one channel
        cv2.imwrite(str(root / folder / f"class{label}" / f"{index}.png"), image)
  return root


def folder_config(root, teacher_model: str, weights: str, teacher_epochs: int):
  """A tiny run on `image_folder`: a pretrained teacher, a small student, no baseline."""
  config = default.get_config()
  config.data.update(
      source="folder",
      dir=str(root),
      train_split="training",
      test_split="val",
      augment="none",
      in_memory="true",
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
  )
  config.teacher.update(model=teacher_model, weights=weights, epochs=teacher_epochs, batch_size=8)
  config.teacher.optimizer.learning_rate = 1e-6
  config.student.update(width_multiplier=0.25, epochs=1, batch_size=8)
  config.distill.mode = "offline"  # the student's step, without the teacher, compiles once
  config.baseline.enabled = False
  config.export.enabled = False
  config.checkpoint.every_steps = 0
  config.eval.update(batch_size=8, latency_repeats=2, throughput_repeats=1)
  return config


@pytest.mark.slow
def test_pretrained_teacher_as_is(image_folder, tmp_path):
  weights = tmp_path / "resnet18.safetensors"
  source = save_torch_state_dict("resnet18", 3, weights)
  workdir = tmp_path / "run"
  report = pipeline.train_and_evaluate(
      folder_config(image_folder, "resnet18", str(weights), 0), str(workdir)
  )
  # load() gives back the file's model (3 classes, from the file)...
  net, variables = pretrained.load("resnet18", str(weights))
  for ours, theirs in zip(
      jax.tree.leaves((variables.params, variables.batch_stats)),
      jax.tree.leaves(nnx.state(source, nnx.Param, nnx.BatchStat)),
      strict=True,
  ):
    np.testing.assert_array_equal(ours, theirs)
  # ...and the teacher's accuracy, independently: that model on the normalised val images.
  images, labels = [], []
  for label in range(3):
    for index in range(4):
      path = str(image_folder / "val" / f"class{label}" / f"{index}.png")
      images.append(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB))
      labels.append(label)
  x = (np.stack(images) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  logits = np.asarray(logits_of(net, variables, x.astype(np.float32)))
  assert report["teacher"]["top1"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
  assert report["teacher"]["epochs"] == 0
  assert not (workdir / "teacher").exists()  # nothing trained
  with open(workdir / predict.DATASET_FILE) as f:
    info = json.load(f)
  np.testing.assert_allclose(info["mean"], IMAGENET_MEAN, rtol=1e-6)
  np.testing.assert_allclose(info["std"], IMAGENET_STD, rtol=1e-6)
  assert report["student"]["epochs"] == 1


@pytest.mark.slow
def test_pretrained_teacher_with_another_head_is_fine_tuned(image_folder, tmp_path):
  weights = tmp_path / "resnet18.safetensors"
  source = save_torch_state_dict("resnet18", 7, weights)  # 7 classes; the data has 3
  config = folder_config(image_folder, "resnet18", str(weights), 0)
  with pytest.raises(UserInputError, match="set teacher.epochs above 0"):
    pipeline.train_and_evaluate(config, str(tmp_path / "refused"))
  assert not (tmp_path / "refused" / "teacher").exists()

  config.teacher.epochs = 1
  workdir = tmp_path / "run"
  report = pipeline.train_and_evaluate(config, str(workdir))
  assert report["teacher"]["epochs"] == 1
  template = pretrained.create_network(
      "teacher", config.teacher, seed=0, num_classes=3, in_channels=3, compute_dtype="float32"
  )[1]
  trained, _ = checkpoint.restore_variables(str(workdir / "teacher"), template, lambda meta: None)
  # The body started from the file (a learning rate of 1e-6 has barely moved it), the head
  # afresh for three classes.
  np.testing.assert_allclose(
      trained.params["stem_conv"]["kernel"][...], source.stem_conv.kernel[...], atol=1e-4
  )
  assert trained.params["fc"]["kernel"][...].shape == (512, 3)
