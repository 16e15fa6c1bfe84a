"""Distillation methods: the objective a student step minimises, from config.

  kd      Hinton et al.: (1 - alpha) CE + alpha T^2 KL(teacher || student)
  dkd     decoupled KD (Zhao et al., 2022): dkd_ce_weight CE + w(e) (a TCKD + b NCKD),
          w(e) rising linearly to 1 over the first dkd_warmup_epochs epochs
  at      attention transfer (Zagoruyko and Komodakis, 2017): CE + at_weight AT over
          the stage outputs
  fitnet  FitNets (Romero et al., 2015): CE + fitnet_weight MSE(regressor(student
          stage2), teacher stage2)
  crd     contrastive representation distillation (Tian et al., 2020): CE (or, with
          crd_with_kd, kd's objective) + crd_weight NCE between embeddings of the
          pooled features and a memory of every training example
  reviewkd  ReviewKD (Chen et al., 2021): CE + reviewkd_weight w(e) HCL(fused student
          stages, teacher stages), w(e) rising linearly to 1 over the first
          reviewkd_warmup_epochs epochs

kd and dkd can standardise the logits inside the distillation term (Sun et al.,
2024), and `loss_scale` multiplies their whole objective (logit
standardisation's recipe is CE 1 + KD 9: alpha 0.9 with loss_scale 10).
Every weight that changes over the run is computed from the step number, so
the jitted step never recompiles.

at, fitnet, crd and reviewkd are feature methods: they compare the models' named
features (kd_jax.models), so their teacher runs inside the step, and fitnet, crd
and reviewkd train connectors (kd_jax.connectors) with the student. The weights
of at, fitnet and crd are RepDistiller's, reviewkd's its own code's.
"""

import dataclasses
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax import connectors, losses, schedules
from kd_jax.errors import UserInputError
from kd_jax.models import Features
from kd_jax.network import Network, Variables, split_model

FEATURE_METHODS = ("at", "fitnet", "crd", "reviewkd")
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


def warmup_factor(step: jax.Array, steps_per_epoch: int, warmup_epochs) -> jax.Array:
  """min(epoch / warmup_epochs, 1), epoch the 1-based epoch of `step` (DKD's, ReviewKD's code)."""
  epoch = step // steps_per_epoch + 1
  return jnp.minimum(epoch / warmup_epochs, 1.0)


def make_objective(distill_config, steps_per_epoch: int, epochs: int) -> Objective:
  """The distillation objective of `distill_config` (kd or dkd) for a run of `epochs`.

  For crd, the kd objective of its settings (its term with `crd_with_kd`).
  """
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
    warmup = warmup_factor(step, steps_per_epoch, distill_config.dkd_warmup_epochs)
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

  return {"kd": kd, "dkd": dkd, "crd": kd}[distill_config.method]


def labels_objective(label_smoothing: float = 0.0) -> Objective:
  """Labels only, what the teacher and the baseline minimise: cross-entropy, smoothed or not."""

  def objective(student_logits_BxC, teacher_logits_BxC, labels_B, step):
    del teacher_logits_BxC, step  # Unused: no teacher.
    return losses.cross_entropy(student_logits_BxC, labels_B, label_smoothing), {}

  return objective


class StepData(NamedTuple):
  """What a feature objective may read of its step besides logits, features and labels."""

  step: jax.Array
  index_B: jax.Array  # each example's place in the training set (the batch's "index")
  teacher_logits_BxC: jax.Array


# objective(student_logits_BxC, student_features, teacher_features, labels_B,
#           connector_variables, step_data)
#   -> (loss, the connectors' batch statistics after the pass (None without), parts)
FeatureObjective = Callable[
    [jax.Array, Features, Features, jax.Array, Variables | None, StepData],
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
    *,
    num_train: int,
    steps_per_epoch: int,
    epochs: int,
) -> FeatureMethod:
  """The feature method of `distill_config` between two networks, its connectors from `seed`.

  Both models must have `with_features` (kd_jax.models; settings.check_feature_method).
  The run it is for has `num_train` training examples and `epochs` of `steps_per_epoch`.

  Raises:
    UserInputError: for features the method cannot pair.
  """
  check(distill_config)
  student_shapes, teacher_shapes = (feature_shapes(*n, image_shape) for n in (student, teacher))
  compute_dtype = student[0].compute_dtype
  if distill_config.method == "at":
    return _attention_transfer(distill_config, student_shapes, teacher_shapes)
  if distill_config.method == "crd":
    kd = make_objective(distill_config, steps_per_epoch, epochs)
    return _crd(distill_config, student_shapes, teacher_shapes, num_train, seed, kd)
  if distill_config.method == "reviewkd":
    shapes = (student_shapes, teacher_shapes)
    return _reviewkd(distill_config, shapes, compute_dtype, seed, steps_per_epoch)
  return _fitnet(distill_config, student_shapes, teacher_shapes, compute_dtype, seed)


def _attention_transfer(distill_config, student_shapes, teacher_shapes) -> FeatureMethod:
  """AT between the deepest stage outputs the two models both have (RepDistiller's p = 2)."""
  pairs = min(len(_stage_outputs(student_shapes)), len(_stage_outputs(teacher_shapes)))
  student_names = _stage_outputs(student_shapes)[-pairs:]
  teacher_names = _stage_outputs(teacher_shapes)[-pairs:]

  def objective(
      student_logits_BxC, student_features, teacher_features, labels_B, connector_vars, step_data
  ):
    del connector_vars, step_data  # AT trains no connectors, and needs nothing more
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

  def objective(
      student_logits_BxC, student_features, teacher_features, labels_B, regressor_vars, step_data
  ):
    del step_data  # FitNets needs nothing more of the step
    ce = losses.cross_entropy(student_logits_BxC, labels_B)
    hint_BxHxWxC = student_features[FITNET_HINT]
    regressed, batch_stats = regressor.apply(regressor_vars, hint_BxHxWxC, train=True)
    hint = losses.fitnet_loss(regressed, teacher_features[FITNET_HINT])
    return ce + distill_config.fitnet_weight * hint, batch_stats, {"ce": ce, "hint": hint}

  return FeatureMethod(variables, objective)


# What CRD embeds of each network: its pooled features (RepDistiller's last feature).
CRD_FEATURE = "pooled"


def _crd(distill_config, student_shapes, teacher_shapes, num_train, seed, kd) -> FeatureMethod:
  """CRD: embedding heads on both pooled features and a memory of `num_train` examples.

  The objective is CE (or, with `crd_with_kd`, the `kd` objective) plus crd_weight times the
  NCE loss of both directions; each step draws crd_negatives negatives per example from a
  key of (seed, step), so a resumed run draws what an uninterrupted one would.
  """
  for network, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
    if CRD_FEATURE not in shapes:
      raise UserInputError(
          f"distill.method=crd embeds each model's {CRD_FEATURE!r} feature, which the "
          f"{network} gives none of: return it from with_features (docs/own_models.md)"
      )
  heads = connectors.ContrastiveHeads(
      student_shapes[CRD_FEATURE].shape[-1],
      teacher_shapes[CRD_FEATURE].shape[-1],
      num_train,
      rngs=nnx.Rngs(seed),
  )
  graph, params, memory = nnx.split(heads, nnx.Param, nnx.BatchStat)

  def objective(
      student_logits_BxC, student_features, teacher_features, labels_B, heads_vars, step_data
  ):
    heads = nnx.merge(graph, heads_vars.params, heads_vars.batch_stats, copy=True)
    shape = (labels_B.shape[0], distill_config.crd_negatives)
    negatives_BxN = crd_negatives(seed, step_data.step, shape, num_train)
    crd = heads(
        student_features[CRD_FEATURE],
        teacher_features[CRD_FEATURE],
        step_data.index_B,
        negatives_BxN,
    )
    if distill_config.crd_with_kd:
      loss, parts = kd(student_logits_BxC, step_data.teacher_logits_BxC, labels_B, step_data.step)
    else:
      loss = losses.cross_entropy(student_logits_BxC, labels_B)
      parts = {"ce": loss}
    loss = loss + distill_config.crd_weight * crd
    return loss, nnx.state(heads, nnx.BatchStat), {**parts, "crd": crd}

  return FeatureMethod(Variables(params, memory), objective)


def crd_negatives(seed: int, step: jax.Array, shape: tuple[int, int], num_train: int) -> jax.Array:
  """The memory rows that each example of `step` is contrasted with: `shape` (B, N) of them.

  Uniform over the training set, with replacement, as CRD's ContrastMemory draws them; a
  pure function of (seed, step), from a key apart from the augmentation's.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 1)
  return jax.random.randint(key, shape, 0, num_train, dtype=jnp.int32)


def _reviewkd_pairs(student_shapes: Features, teacher_shapes: Features):
  """(student names, teacher names) that ReviewKD pairs: stages from the deepest, then "pooled".

  As ReviewKD's code: the student's stage outputs against the teacher's before their last ReLU.

  Raises:
    UserInputError: for a missing feature, or maps whose sizes the fusion cannot pair.
  """
  student_stages, teacher_stages = _stage_outputs(student_shapes), _stage_outputs(teacher_shapes)
  pairs = min(len(student_stages), len(teacher_stages))
  student_names = [*student_stages[len(student_stages) - pairs :], "pooled"]
  teacher_names = [f"{name}_preact" for name in teacher_stages[len(teacher_stages) - pairs :]]
  teacher_names.append("pooled")
  for side, names, shapes in (
      ("student", student_names, student_shapes),
      ("teacher", teacher_names, teacher_shapes),
  ):
    if not pairs or any(name not in shapes for name in names):
      raise UserInputError(
          f"distill.method=reviewkd needs the {side}'s features stage<k>, stage<k>_preact and "
          f"pooled; it gives {', '.join(sorted(shapes)) or 'none'} (docs/own_models.md)"
      )
  for student_name, teacher_name in zip(student_names, teacher_names):
    (s_h, s_w), (t_h, t_w) = (
        _map_shape(shapes[name].shape)[1:3]
        for shapes, name in ((student_shapes, student_name), (teacher_shapes, teacher_name))
    )
    if t_h % s_h or t_w % s_w:
      raise UserInputError(
          f"distill.method=reviewkd: the student's {student_name} is {s_h}x{s_w} and the "
          f"teacher's {teacher_name} {t_h}x{t_w}; ReviewKD pairs maps of equal size or a "
          "student map whose sides divide the teacher's (upsampled to it): pick a teacher "
          "and student whose stage sizes fit"
      )
  return student_names, teacher_names


def _map_shape(shape) -> tuple[int, ...]:
  """A pooled embedding's (B, C) as a 1x1 map's (B, 1, 1, C); a map's (B, H, W, C) as it is."""
  return tuple(shape) if len(shape) == 4 else (shape[0], 1, 1, shape[-1])


def _as_map(features: jax.Array) -> jax.Array:
  """Features as a map (B, H, W, C): a pooled embedding becomes a 1x1 map."""
  return features.reshape(_map_shape(features.shape))


def _reviewkd(distill_config, shapes, compute_dtype, seed, steps_per_epoch) -> FeatureMethod:
  """ReviewKD: the student's stages fused deep to shallow, HCL against the teacher's stages."""
  student_names, teacher_names = _reviewkd_pairs(*shapes)
  student_shapes, teacher_shapes = (
      [_map_shape(side[name].shape) for name in names]
      for side, names in zip(shapes, (student_names, teacher_names))
  )
  fusion, variables = split_model(
      "reviewkd_fusion",
      connectors.ReviewFusion(student_shapes, teacher_shapes, rngs=nnx.Rngs(seed)),
      compute_dtype,
  )

  def objective(
      student_logits_BxC, student_features, teacher_features, labels_B, fusion_vars, step_data
  ):
    ce = losses.cross_entropy(student_logits_BxC, labels_B)
    fused, batch_stats = fusion.apply(
        fusion_vars, [_as_map(student_features[name]) for name in student_names], train=True
    )
    hcl = losses.hierarchical_context_loss(
        fused, [_as_map(teacher_features[name]) for name in teacher_names]
    )
    warmup = warmup_factor(
        step_data.step, steps_per_epoch, distill_config.reviewkd_warmup_epochs
    )
    loss = ce + distill_config.reviewkd_weight * warmup * hcl
    return loss, batch_stats, {"ce": ce, "hcl": hcl}

  return FeatureMethod(variables, objective)
