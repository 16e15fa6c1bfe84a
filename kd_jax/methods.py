"""Distillation methods: the objective a student step minimises, from config.

  kd      Hinton et al.: (1 - alpha) CE + alpha T^2 KL(teacher || student)
  dkd     decoupled KD (Zhao et al., 2022): dkd_ce_weight CE + w(e) (a TCKD + b NCKD),
          w(e) rising linearly to 1 over the first dkd_warmup_epochs epochs
  at      attention transfer (Zagoruyko and Komodakis, 2017): CE + at_weight AT over
          the stage outputs
  fitnet  FitNets (Romero et al., 2015): CE + fitnet_weight MSE(regressor(student
          stage2), teacher stage2)

kd and dkd can standardise the logits inside the distillation term (Sun et al.,
2024), and `loss_scale` multiplies their whole objective (logit
standardisation's recipe is CE 1 + KD 9: alpha 0.9 with loss_scale 10).
Every weight that changes over the run is computed from the step number, so
the jitted step never recompiles.

at and fitnet are feature methods: they compare the models' named features
(kd_jax.models), so their teacher runs inside the step, and fitnet trains a
connector (kd_jax.connectors) with the student. Their weights are RepDistiller's.
"""

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax import connectors, losses, schedules
from kd_jax.errors import UserInputError
from kd_jax.models import Features
from kd_jax.network import Network, Variables, split_model

FEATURE_METHODS = ("at", "fitnet")
METHODS = ("kd", "dkd", *FEATURE_METHODS)
# FitNets' hint and guided layers, RepDistiller's hint_layer=2 (its features: stem, 3 stages).
FITNET_HINT = "stage2"

# objective(student_logits_BxC, teacher_logits_BxC, labels_B, step) -> (loss, parts)
Objective = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


def check(distill_config) -> None:
  """Rejects an unknown method or out-of-range weight before any work is done."""
  if distill_config.method not in METHODS:
    raise UserInputError(
        f"unknown distill.method {distill_config.method!r}; use one of {', '.join(METHODS)}"
    )
  if not 0.0 <= distill_config.alpha <= 1.0:
    raise UserInputError(f"distill.alpha={distill_config.alpha} must lie in [0, 1]")
  if distill_config.method in FEATURE_METHODS and distill_config.mode != "online":
    raise UserInputError(
        f"distill.method={distill_config.method} distils the teacher's features, which only "
        f"a teacher run inside the step gives: set distill.mode=online, not "
        f"{distill_config.mode!r}"
    )


def make_objective(distill_config, steps_per_epoch: int, epochs: int) -> Objective:
  """The distillation objective of `distill_config` (kd or dkd) for a run of `epochs`."""
  check(distill_config)
  temperature_fn = schedules.temperature_schedule(distill_config, steps_per_epoch, epochs)
  standardize = distill_config.logit_standardization
  scale = distill_config.loss_scale

  def kd(student_logits_BxC, teacher_logits_BxC, labels_B, step):
    temperature = temperature_fn(step)
    loss, parts = losses.distillation_loss(
        student_logits_BxC,
        teacher_logits_BxC,
        labels_B,
        temperature,
        distill_config.alpha,
        logit_standardization=standardize,
    )
    return scale * loss, {**parts, "temperature": temperature}

  def dkd(student_logits_BxC, teacher_logits_BxC, labels_B, step):
    temperature = temperature_fn(step)
    epoch = step // steps_per_epoch + 1  # 1-based, as in the paper's code
    warmup = jnp.minimum(epoch / distill_config.dkd_warmup_epochs, 1.0)
    ce = losses.cross_entropy(student_logits_BxC, labels_B)
    decoupled = losses.dkd_loss(
        student_logits_BxC,
        teacher_logits_BxC,
        labels_B,
        alpha=distill_config.dkd_alpha,
        beta=distill_config.dkd_beta,
        temperature=temperature,
        logit_standardization=standardize,
    )
    loss = scale * (distill_config.dkd_ce_weight * ce + warmup * decoupled)
    return loss, {"ce": ce, "dkd": decoupled, "temperature": temperature}

  return {"kd": kd, "dkd": dkd}[distill_config.method]


def labels_objective(label_smoothing: float = 0.0) -> Objective:
  """Labels only, what the teacher and the baseline minimise: cross-entropy, smoothed or not."""

  def objective(student_logits_BxC, teacher_logits_BxC, labels_B, step):
    del teacher_logits_BxC, step  # Unused: no teacher.
    return losses.cross_entropy(student_logits_BxC, labels_B, label_smoothing), {}

  return objective


# objective(student_logits_BxC, student_features, teacher_features, labels_B, connector_variables)
#   -> (loss, the connectors' batch statistics after the pass (None without), parts)
FeatureObjective = Callable[
    [jax.Array, Features, Features, jax.Array, Variables | None],
    tuple[jax.Array, nnx.State | None, dict],
]


@dataclasses.dataclass(frozen=True)
class FeatureMethod:
  """A feature method: its connectors' initial variables (None without any) and its objective."""

  connector_variables: Variables | None
  objective: FeatureObjective


def feature_shapes(network: Network, variables: Variables, image_shape) -> Features:
  """The shapes of `network`'s named features for a batch of one image, computing nothing."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(
      lambda v, x: network.apply_with_features(v, x, train=False)[1], variables, images
  )


def _stage_outputs(features: Features) -> list[str]:
  """The names of the stage outputs among `features`, shallowest first."""
  names = [name for name in features if re.fullmatch(r"stage\d+", name)]
  return sorted(names, key=lambda name: int(name[len("stage") :]))


def make_feature_method(
    distill_config,
    student: tuple[Network, Variables],
    teacher: tuple[Network, Variables],
    image_shape,
    seed: int,
) -> FeatureMethod:
  """The feature method of `distill_config` between two networks, its connectors from `seed`.

  Both models must have `with_features` (kd_jax.models; settings.check_feature_method).

  Raises:
    UserInputError: for features the method cannot pair.
  """
  check(distill_config)
  student_shapes, teacher_shapes = (feature_shapes(*n, image_shape) for n in (student, teacher))
  if distill_config.method == "at":
    return _attention_transfer(distill_config, student_shapes, teacher_shapes)
  return _fitnet(distill_config, student_shapes, teacher_shapes, student[0].compute_dtype, seed)


def _attention_transfer(distill_config, student_shapes, teacher_shapes) -> FeatureMethod:
  """AT between the deepest stage outputs the two models both have (RepDistiller's p = 2)."""
  pairs = min(len(_stage_outputs(student_shapes)), len(_stage_outputs(teacher_shapes)))
  student_names = _stage_outputs(student_shapes)[-pairs:]
  teacher_names = _stage_outputs(teacher_shapes)[-pairs:]

  def objective(student_logits_BxC, student_features, teacher_features, labels_B, connector_vars):
    del connector_vars  # AT trains no connectors
    ce = losses.cross_entropy(student_logits_BxC, labels_B)
    at = losses.attention_transfer_loss(
        [student_features[name] for name in student_names],
        [teacher_features[name] for name in teacher_names],
    )
    return ce + distill_config.at_weight * at, None, {"ce": ce, "at": at}

  return FeatureMethod(None, objective)


def _fitnet(distill_config, student_shapes, teacher_shapes, compute_dtype, seed) -> FeatureMethod:
  """FitNets: a regressor from the student's stage2 to the teacher's, trained by MSE."""
  regressor, variables = split_model(
      "fitnet_regressor",
      connectors.HintRegressor(
          student_shapes[FITNET_HINT].shape, teacher_shapes[FITNET_HINT].shape, rngs=nnx.Rngs(seed)
      ),
      compute_dtype,
  )

  def objective(student_logits_BxC, student_features, teacher_features, labels_B, regressor_vars):
    ce = losses.cross_entropy(student_logits_BxC, labels_B)
    hint_BxHxWxC = student_features[FITNET_HINT]
    regressed, batch_stats = regressor.apply(regressor_vars, hint_BxHxWxC, train=True)
    hint = losses.fitnet_loss(regressed, teacher_features[FITNET_HINT])
    return ce + distill_config.fitnet_weight * hint, batch_stats, {"ce": ce, "hint": hint}

  return FeatureMethod(variables, objective)
