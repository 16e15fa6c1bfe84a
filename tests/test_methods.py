"""Distillation methods from config, and the CIFAR-100 recipes that use them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cifar100, default
from conftest import small_config
from kd_jax import connectors, losses, methods, models, pipeline
from kd_jax.errors import UserInputError
from kd_jax.network import split_model

RNG = np.random.default_rng(0)
STUDENT, TEACHER = RNG.normal(size=(2, 8, 10)).astype(np.float32) * 3
LABELS = RNG.integers(0, 10, 8)


def _distill(**overrides):
  config = default.get_config().distill
  config.update(overrides)
  return config


@pytest.mark.parametrize("standardize", [False, True])
def test_kd_objective_is_the_scaled_distillation_loss(standardize):
  config = _distill(
      temperature_schedule="linear", alpha=0.9, loss_scale=10.0, logit_standardization=standardize
  )
  objective = methods.make_objective(config, steps_per_epoch=5, epochs=4)
  loss, parts = objective(STUDENT, TEACHER, LABELS, jnp.int32(12))  # epoch 2 of 4: T = 3
  want, _ = losses.distillation_loss(
      STUDENT, TEACHER, LABELS, 3.0, 0.9, logit_standardization=standardize
  )
  np.testing.assert_allclose(float(loss), 10.0 * float(want), rtol=1e-6)
  assert float(parts["temperature"]) == 3.0


@pytest.mark.parametrize(
    "step,weight", [(0, 1 / 20), (9, 1 / 20), (10, 2 / 20), (195, 20 / 20), (500, 1)]
)
def test_dkd_objective_warms_up_over_epochs(step, weight):
  config = _distill(method="dkd", temperature=4.0, dkd_beta=2.0, dkd_ce_weight=1.0)
  objective = methods.make_objective(config, steps_per_epoch=10, epochs=60)
  loss, parts = objective(STUDENT, TEACHER, LABELS, jnp.int32(step))
  decoupled = losses.dkd_loss(STUDENT, TEACHER, LABELS, alpha=1.0, beta=2.0, temperature=4.0)
  want = losses.cross_entropy(STUDENT, LABELS) + weight * decoupled
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(parts["dkd"]), float(decoupled), rtol=1e-6)


@pytest.mark.parametrize("field,value", [("method", "crd"), ("alpha", 1.5)])
def test_bad_method_settings_are_named(field, value):
  with pytest.raises(UserInputError, match=f"distill.{field}"):
    methods.make_objective(_distill(**{field: value}), 1, 1)


@pytest.mark.parametrize("pair", sorted(cifar100.PAIRS))
@pytest.mark.parametrize("method", cifar100.METHODS)
def test_cifar100_recipes(pair, method):
  config = cifar100.get_config(f"{pair},{method}")
  assert f"{config.teacher.model}-{config.student.model}" == pair
  assert config.student.epochs == 240 and config.student.batch_size == 64
  assert config.student.optimizer.learning_rate == 0.05
  assert tuple(config.student.optimizer.decay_epochs) == (150, 180, 210)
  distill = config.distill
  if method == "dkd":
    assert distill.method == "dkd" and distill.dkd_beta == cifar100.PAIRS[pair]
  elif method == "kd_ls":
    assert distill.logit_standardization and distill.temperature == 2.0
    assert distill.loss_scale * (1 - distill.alpha) == pytest.approx(1.0)
    assert distill.loss_scale * distill.alpha == pytest.approx(9.0)
  else:
    assert (distill.method, distill.temperature, distill.alpha) == ("kd", 4.0, 0.9)
  methods.check(distill)


def test_unknown_cifar100_recipe_is_named():
  with pytest.raises(ValueError, match="resnet20-resnet8"):
    cifar100.get_config("resnet20-resnet8,kd")


def _abstract_network(name, **kwargs):
  """A Network and Variables of `name`, shapes only."""
  model = nnx.eval_shape(
      lambda: models.create_model(name, num_classes=10, in_channels=3, rngs=nnx.Rngs(0), **kwargs)
  )
  return split_model(name, model)


def _random_features(network, image_shape, seed):
  shapes = methods.feature_shapes(*network, image_shape)
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(2, *f.shape[1:])).astype(np.float32) for k, f in shapes.items()}


def test_at_pairs_the_deepest_stage_outputs_with_weight_1000():
  student, teacher = _abstract_network("resnet8"), _abstract_network("resnet18")
  method = methods.make_feature_method(_distill(method="at"), student, teacher, (16, 16, 3), 0)
  assert method.connector_variables is None
  student_features = _random_features(student, (16, 16, 3), 1)
  teacher_features = _random_features(teacher, (16, 16, 3), 2)
  logits, labels = STUDENT[:2], LABELS[:2]
  loss, _, parts = method.objective(logits, student_features, teacher_features, labels, None)
  # resnet8's three stages against resnet18's last three of four.
  at = losses.attention_transfer_loss(
      [student_features[f"stage{k}"] for k in (1, 2, 3)],
      [teacher_features[f"stage{k}"] for k in (2, 3, 4)],
  )
  ce = losses.cross_entropy(logits, labels)
  np.testing.assert_allclose(float(loss), float(ce + 1000 * at), rtol=1e-6)
  np.testing.assert_allclose(float(parts["at"]), float(at), rtol=1e-6)


@pytest.mark.parametrize(
    "student_hw,teacher_hw,kernel",
    [
        ((8, 8), (8, 8), (1, 1)),
        ((8, 8), (4, 4), (3, 3)),
        ((4, 4), (8, 8), (4, 4)),
        ((7, 7), (4, 4), (4, 4)),
    ],
)
def test_fitnet_regressor_maps_the_guided_layer_to_the_hint_shape(student_hw, teacher_hw, kernel):
  regressor = nnx.eval_shape(
      lambda: connectors.HintRegressor((2, *student_hw, 6), (2, *teacher_hw, 10), rngs=nnx.Rngs(0))
  )
  assert regressor.conv.kernel.shape[:2] == kernel
  out = nnx.eval_shape(
      lambda r, x: r(x), regressor, jax.ShapeDtypeStruct((2, *student_hw, 6), jnp.float32)
  )
  assert out.shape == (2, *teacher_hw, 10)


def test_fitnet_refuses_a_guided_layer_it_cannot_map_to_the_hint():
  with pytest.raises(UserInputError, match="guided layer is 2x2 and the teacher's hint 8x8"):
    connectors.HintRegressor((2, 2, 2, 6), (2, 8, 8, 10), rngs=nnx.Rngs(0))


def test_fitnet_objective_is_ce_plus_100_times_the_regressed_hint_mse():
  student, teacher = _abstract_network("resnet8"), _abstract_network("wrn_16_2")
  method = methods.make_feature_method(_distill(method="fitnet"), student, teacher, (8, 8, 3), 0)
  student_features = _random_features(student, (8, 8, 3), 3)
  teacher_features = _random_features(teacher, (8, 8, 3), 4)
  logits, labels = STUDENT[:2], LABELS[:2]
  loss, stats, parts = method.objective(
      logits, student_features, teacher_features, labels, method.connector_variables
  )
  # The regressor from its variables: 1x1 conv (resnet8's 32 channels to wrn_16_2's 64), BN, ReLU.
  params = method.connector_variables.params
  hint = np.einsum("bhwc,cd->bhwd", student_features["stage2"], params["conv"]["kernel"][0, 0])
  hint = hint + params["conv"]["bias"]
  mean, var = hint.mean((0, 1, 2)), hint.var((0, 1, 2))
  regressed = np.maximum((hint - mean) / np.sqrt(var + 1e-5), 0)  # BN's scale 1, bias 0 at init
  want_hint = ((regressed - teacher_features["stage2"]) ** 2).mean()
  np.testing.assert_allclose(float(parts["hint"]), want_hint, rtol=1e-4)
  ce = losses.cross_entropy(logits, labels)
  np.testing.assert_allclose(float(loss), float(ce) + 100 * want_hint, rtol=1e-4)
  # The regressor's batch norm trains: its running mean moves towards the batch's.
  np.testing.assert_allclose(stats["bn"]["mean"][...], 0.1 * mean, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method,term", [("at", "at"), ("fitnet", "hint")])
def test_feature_methods_distil_the_quickstart(method, term, quickstart_run, tmp_path):
  config = small_config(
      **{
          "distill.method": method,
          "teacher.checkpoint": os.path.join(quickstart_run[0], "teacher"),  # trained already
          "student.epochs": 3,
          "baseline.enabled": False,
          "checkpoint.every_steps": 0,
      }
  )
  report = pipeline.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "student" / "metrics.jsonl") as f:
    epochs = [json.loads(line) for line in f]
  assert len(epochs) == 3 and epochs[-1][term] < epochs[0][term]  # the student matches features
  assert report["student"]["top1"] > 0.3  # ten classes: chance is 0.1
  # Connectors are no part of the student: the report counts the student's parameters alone.
  student = nnx.eval_shape(
      lambda: models.create_model(
          "dsconv_student", num_classes=10, in_channels=1, rngs=nnx.Rngs(0), width_multiplier=0.5
      )
  )
  assert report["student"]["params"] == models.count_params(student)
  # The finished student (with its connectors) restores from its checkpoint as it was.
  again = pipeline.train_and_evaluate(config, str(tmp_path), may_train=False)
  assert again["student"]["top1"] == report["student"]["top1"]
