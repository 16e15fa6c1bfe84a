"""Distillation methods from config, and the CIFAR-100 recipes that use them."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar100, default
from kd_jax import losses, methods
from kd_jax.errors import UserInputError

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
