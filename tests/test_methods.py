"""Distillation methods from config, and the CIFAR-100 recipes that use them."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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


@pytest.mark.parametrize("field,value", [("method", "contrastive"), ("alpha", 1.5)])
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
    assert distill.method == "dkd" and distill.dkd_beta == cifar100.PAIRS[pair]["dkd_beta"]
  elif method == "kd_ls":
    assert distill.logit_standardization and distill.temperature == 2.0
    assert distill.loss_scale * (1 - distill.alpha) == pytest.approx(1.0)
    assert distill.loss_scale * distill.alpha == pytest.approx(9.0)
  elif method in cifar100.FEATURE_METHODS:
    weight = {"fitnet": 100.0, "at": 1000.0, "crd": 0.8}.get(method)
    assert distill.method == method and distill.get(f"{method}_weight") == (
        weight or cifar100.PAIRS[pair]["reviewkd_weight"]
    )
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


def _feature_method(name, student, teacher, image_shape, num_train=1, **distill):
  """make_feature_method of `name` for a run of 5 steps, 1 epoch and `num_train` examples."""
  config = _distill(method=name, **distill)
  return methods.make_feature_method(
      config, student, teacher, image_shape, 0, num_train=num_train, steps_per_epoch=5, epochs=1
  )


def _step_data(labels, step=0, index=None, teacher_logits=None):
  """A step's StepData; the batch's examples are the first of the dataset unless `index`."""
  index = np.arange(len(labels), dtype=np.int32) if index is None else index
  return methods.StepData(jnp.int32(step), index, teacher_logits)


def _random_features(network, image_shape, seed):
  shapes = methods.feature_shapes(*network, image_shape)
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=(2, *f.shape[1:])).astype(np.float32) for k, f in shapes.items()}


def test_at_pairs_the_deepest_stage_outputs_with_weight_1000():
  student, teacher = _abstract_network("resnet8"), _abstract_network("resnet18")
  method = _feature_method("at", student, teacher, (16, 16, 3))
  assert method.connector_variables is None
  student_features = _random_features(student, (16, 16, 3), 1)
  teacher_features = _random_features(teacher, (16, 16, 3), 2)
  logits, labels = STUDENT[:2], LABELS[:2]
  loss, _, parts = method.objective(
      logits, student_features, teacher_features, labels, None, _step_data(labels)
  )
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
  method = _feature_method("fitnet", student, teacher, (8, 8, 3))
  student_features = _random_features(student, (8, 8, 3), 3)
  teacher_features = _random_features(teacher, (8, 8, 3), 4)
  logits, labels = STUDENT[:2], LABELS[:2]
  step_data = _step_data(labels)
  loss, stats, parts = method.objective(
      logits, student_features, teacher_features, labels, method.connector_variables, step_data
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
@pytest.mark.parametrize(
    "method,term,extra",
    [
        ("at", "at", {}),
        ("fitnet", "hint", {}),
        # About as many negatives as the quickstart has training images: a cheap step. Its
        # loss rises while the first epoch's embeddings replace the memory's random ones.
        ("crd", "crd", {"distill.crd_negatives": 1024, "student.epochs": 3}),
    ],
)
def test_feature_methods_distil_the_quickstart(method, term, extra, quickstart_run, tmp_path):
  config = small_config(
      **{
          "distill.method": method,
          "teacher.checkpoint": os.path.join(quickstart_run[0], "teacher"),  # trained already
          "student.epochs": 2,
          "baseline.enabled": False,
          "checkpoint.every_steps": 0,
          **extra,
      }
  )
  report = pipeline.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "student" / "metrics.jsonl") as f:
    epochs = [json.loads(line) for line in f]
  assert len(epochs) == config.student.epochs
  assert epochs[-1][term] < epochs[0][term]  # the student matches features
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


def _normalised(x):
  return x / np.sqrt((x * x).sum(-1, keepdims=True))


def _crd_reference(features, params, memories, normalizers, index, negatives):
  """RepDistiller's CRDLoss in float64 NumPy: (loss, the memories after, the normalisers).

  `features`, `params` and `memories` are (student's, teacher's) pairs; a normaliser
  below 0 is taken from this batch.
  """
  embeddings = [
      _normalised(f.astype(np.float64) @ p["kernel"] + p["bias"]) for f, p in zip(features, params)
  ]
  rows = np.concatenate([index[:, None], negatives], axis=1)
  num_data, (batch, k) = len(memories[0]), rows.shape
  noise = (k - 1) / num_data  # m * Pn: the negatives' share of the noise distribution
  loss, new_normalizers = 0.0, []
  # Student anchors against the teacher's memory, then the reverse (CRD's out_v1, out_v2).
  for anchor, memory, z in zip(embeddings, memories[::-1], normalizers):
    p = np.exp(np.einsum("bd,bkd->bk", anchor, memory[rows]) / 0.07)
    z = p.mean() * num_data if z < 0 else z
    p = p / z
    log_d1 = np.log(p[:, 0] / (p[:, 0] + noise))
    log_d0 = np.log(noise / (p[:, 1:] + noise))
    loss += -(log_d1.sum() + log_d0.sum()) / batch
    new_normalizers.append(z)
  after = []
  for memory, embedding in zip(memories, embeddings):
    memory = memory.astype(np.float64).copy()
    memory[index] = _normalised(0.5 * memory[index] + 0.5 * embedding)
    after.append(memory)
  return loss, after, new_normalizers


def _numpy_tree(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(tree))


def test_crd_objective_is_ce_plus_0_8_nce_against_a_float64_reference():
  student, teacher = _abstract_network("resnet8"), _abstract_network("wrn_16_2")
  method = _feature_method("crd", student, teacher, (8, 8, 3), num_train=10, crd_negatives=6)
  rng = np.random.default_rng(5)
  labels = LABELS[:4]
  logits = STUDENT[:4]
  sizes = [methods.feature_shapes(*n, (8, 8, 3))["pooled"].shape[-1] for n in (student, teacher)]
  variables = method.connector_variables
  normalizers = [-1.0, -1.0]  # not taken yet
  for step, index in enumerate([np.array([3, 0, 7, 9]), np.array([7, 2, 3, 5])]):
    features = [rng.normal(size=(4, size)).astype(np.float32) for size in sizes]
    negatives = methods.crd_negatives(0, jnp.int32(step), (4, 6), 10)
    params = _numpy_tree(variables.params)
    memory = _numpy_tree(variables.batch_stats)
    want, want_memories, normalizers = _crd_reference(
        features,
        (params["student_head"], params["teacher_head"]),
        (memory["student_memory"], memory["teacher_memory"]),
        normalizers,
        index,
        np.asarray(negatives),
    )
    loss, state, parts = method.objective(
        logits,
        {"pooled": features[0]},
        {"pooled": features[1]},
        labels,
        variables,
        _step_data(labels, step, index.astype(np.int32)),
    )
    np.testing.assert_allclose(float(parts["crd"]), want, rtol=1e-5)
    ce = float(losses.cross_entropy(logits, labels))
    np.testing.assert_allclose(float(loss), ce + 0.8 * want, rtol=1e-5)
    got = _numpy_tree(state)
    np.testing.assert_allclose(got["normalizers"], normalizers, rtol=1e-5)  # the first step's
    for name, want_memory in zip(("student_memory", "teacher_memory"), want_memories):
      np.testing.assert_allclose(got[name], want_memory, atol=1e-6)
      untouched = np.setdiff1d(np.arange(10), index)
      np.testing.assert_array_equal(got[name][untouched], memory[name][untouched])
    variables = variables.replace(batch_stats=state)


def test_crd_memory_moves_the_batch_rows_halfway_and_renormalises():
  embeddings_BxD = np.array([[0, 1, 0, 0], [0, 0, 0.6, 0.8]], np.float32)
  got = np.asarray(connectors.remember(jnp.eye(4), np.array([0, 3]), embeddings_BxD))
  want = np.eye(4)
  want[0] = np.array([1, 1, 0, 0]) / np.sqrt(2)  # normalise(0.5 * old + 0.5 * new)
  want[3] = np.array([0, 0, 0.3, 0.9]) / np.sqrt(0.9)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_crd_with_kd_adds_the_kd_objective_in_place_of_ce():
  student, teacher = _abstract_network("resnet8"), _abstract_network("wrn_16_2")
  features = [_random_features(n, (8, 8, 3), seed) for n, seed in ((student, 6), (teacher, 7))]
  logits, teacher_logits, labels = STUDENT[:2], TEACHER[:2], LABELS[:2]
  step_data = _step_data(labels, step=3, teacher_logits=teacher_logits)
  recipe = dict(num_train=4, crd_negatives=3, temperature=4.0, alpha=0.9, loss_scale=2.0)
  results = {}
  for with_kd in (False, True):
    method = _feature_method("crd", student, teacher, (8, 8, 3), crd_with_kd=with_kd, **recipe)
    results[with_kd] = method.objective(
        logits, *features, labels, method.connector_variables, step_data
    )
  (plain, _, plain_parts), (with_kd, _, parts) = results[False], results[True]
  assert parts["crd"] == plain_parts["crd"]  # the same heads and memory from the same seed
  kd, _ = losses.distillation_loss(logits, teacher_logits, labels, 4.0, 0.9)
  ce = losses.cross_entropy(logits, labels)
  np.testing.assert_allclose(float(plain), float(ce + 0.8 * parts["crd"]), rtol=1e-6)
  np.testing.assert_allclose(float(with_kd), float(2.0 * kd + 0.8 * parts["crd"]), rtol=1e-6)
  assert float(parts["temperature"]) == 4.0 and "kl" in parts


def test_crd_refuses_offline_distillation_in_one_line():
  with pytest.raises(UserInputError, match="distill.method=crd .* set distill.mode=online") as e:
    methods.check(_distill(method="crd", mode="offline"))
  assert "\n" not in str(e.value)


class _NoPooledFeatures(nnx.Module):
  """A user's model whose features lack "pooled"."""

  def __init__(self):
    self.fc = nnx.Linear(3, 10, rngs=nnx.Rngs(0))

  def __call__(self, x_BxHxWxC):
    return self.fc(x_BxHxWxC.mean((1, 2)))

  def with_features(self, x_BxHxWxC):
    return self(x_BxHxWxC), {"stage1": x_BxHxWxC}


def test_crd_refuses_a_model_without_pooled_features():
  student, teacher = _abstract_network("resnet8"), split_model("mine", _NoPooledFeatures())
  with pytest.raises(UserInputError, match="'pooled' feature, which the teacher gives none of"):
    _feature_method("crd", student, teacher, (8, 8, 3))


def _train_batch_norm(y, bn):
  """Batch norm in training mode: the batch's statistics, PyTorch's epsilon, `bn`'s scale, bias."""
  normalized = (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + 1e-5)
  return normalized * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])


def _conv3x3(x, kernel):
  """A 3x3 convolution, padding 1: (B, H, W, C) with (3, 3, C, D) -> (B, H, W, D)."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = x.shape[1:3]
  return sum(
      padded[:, i : i + height, j : j + width] @ kernel[i, j] for i in range(3) for j in range(3)
  )


def test_attention_fusion_weighs_its_stage_and_the_deeper_one_as_reviewkd():
  # A 2x2 student stage, a deeper 1x1 mix, a 4x4 teacher stage: both resizes happen.
  fusion = nnx.eval_shape(
      lambda: connectors.AttentionFusion(3, 4, 5, (4, 4), fuse=True, rngs=nnx.Rngs(0))
  )
  # Random parameters (batch norms' scales and biases too), so that each one counts.
  random = lambda x: RNG.normal(size=x.shape).astype(np.float32)
  nnx.update(fusion, jax.tree.map(random, nnx.state(fusion, nnx.Param)))
  nnx.update(fusion, jax.tree.map(lambda x: np.zeros(x.shape), nnx.state(fusion, nnx.BatchStat)))
  x = RNG.normal(size=(2, 2, 2, 3)).astype(np.float32)
  deeper = RNG.normal(size=(2, 1, 1, 4)).astype(np.float32)
  output, mix = nnx.jit(lambda f, x, deeper: f(x, deeper))(fusion, x, deeper)
  reduced = _train_batch_norm(x @ np.asarray(fusion.reduce.kernel[0, 0]), fusion.reduce_bn)
  deeper_2x2 = np.broadcast_to(deeper, (2, 2, 2, 4))
  joint = np.concatenate([reduced, deeper_2x2], axis=-1)
  attention = fusion.attention
  weights = 1 / (1 + np.exp(-(joint @ np.asarray(attention.kernel) + np.asarray(attention.bias))))
  want_mix = reduced * weights[..., :1] + deeper_2x2 * weights[..., 1:]
  want_mix = want_mix.repeat(2, axis=1).repeat(2, axis=2)  # nearest, to the teacher's 4x4
  want = _train_batch_norm(_conv3x3(want_mix, np.asarray(fusion.expand.kernel)), fusion.expand_bn)
  np.testing.assert_allclose(np.asarray(mix), want_mix, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(output), want, rtol=1e-4, atol=1e-4)


def test_reviewkd_objective_is_ce_plus_the_warmed_up_hcl_of_the_fused_stages():
  student, teacher = _abstract_network("resnet8"), _abstract_network("wrn_16_2")
  config = _distill(method="reviewkd", reviewkd_weight=2.0)
  method = methods.make_feature_method(
      config, student, teacher, (8, 8, 3), 0, num_train=1, steps_per_epoch=10, epochs=1
  )
  student_features = _random_features(student, (8, 8, 3), 5)
  teacher_features = _random_features(teacher, (8, 8, 3), 6)
  logits, labels = STUDENT[:2], LABELS[:2]
  # ReviewKD's pairs: the student's stage outputs and pooled embedding (a 1x1 map), fused,
  # against the teacher's stages before their last ReLU and its pooled embedding.
  as_map = lambda f: f.reshape(2, 1, 1, -1) if f.ndim == 2 else f
  stages = [as_map(student_features[k]) for k in ("stage1", "stage2", "stage3", "pooled")]
  targets = [as_map(teacher_features[k]) for k in ("stage1_preact", "stage2_preact")]
  targets += [as_map(teacher_features[k]) for k in ("stage3_preact", "pooled")]
  fusion = nnx.eval_shape(
      lambda: connectors.ReviewFusion(
          [s.shape for s in stages], [t.shape for t in targets], rngs=nnx.Rngs(0)
      )
  )
  nnx.update(fusion, method.connector_variables.params, method.connector_variables.batch_stats)
  assert fusion.fusions[0].reduce.kernel.shape == (1, 1, 16, 64)  # as wide as the deepest
  fuse = nnx.jit(lambda fusion, stages: fusion(stages))
  fused = fuse(fusion, stages)
  assert [f.shape for f in fused] == [t.shape for t in targets]
  want_hcl = float(losses.hierarchical_context_loss(fused, targets))
  ce = float(losses.cross_entropy(logits, labels))
  objective = jax.jit(method.objective)
  # Epochs 1-based, 10 steps each: 1/20 of the weight in epoch 1, all of it from epoch 20.
  for step, warmup in [(0, 1 / 20), (9, 1 / 20), (10, 2 / 20), (195, 1.0), (500, 1.0)]:
    loss, stats, parts = objective(
        logits,
        student_features,
        teacher_features,
        labels,
        method.connector_variables,
        _step_data(labels, step),
    )
    np.testing.assert_allclose(float(parts["hcl"]), want_hcl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + 2.0 * warmup * want_hcl, rtol=1e-5)
  # The fusions' batch norms train: their running statistics are the step's result.
  assert jax.tree.structure(stats) == jax.tree.structure(method.connector_variables.batch_stats)
  # The shallowest output reviews the deepest stage; the deepest never sees shallower ones.
  assert not np.allclose(fuse(fusion, [*stages[:3], stages[3] + 1.0])[0], fused[0])
  np.testing.assert_array_equal(fuse(fusion, [stages[0] + 1.0, *stages[1:]])[3], fused[3])


def test_reviewkd_with_stages_it_cannot_pair_is_one_line_up_front(tmp_path):
  # The quickstart's student halves the digits at once (4x4 to the last stage), where its
  # teacher's last stage is 2x2.
  workdir = tmp_path / "run"
  with pytest.raises(UserInputError) as refused:
    pipeline.train_and_evaluate(small_config(**{"distill.method": "reviewkd"}), str(workdir))
  message = str(refused.value)
  assert "the student's stage3 is 4x4 and the teacher's stage3_preact 2x2" in message
  assert "\n" not in message
  assert not (workdir / "teacher").exists()


@pytest.mark.slow
def test_reviewkd_distils_the_quickstart(quickstart_run, tmp_path, monkeypatch):
  # The export's model.jax is read below; without TensorFlow no SavedModel is made (seconds).
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  config = small_config(
      **{
          "distill.method": "reviewkd",
          "teacher.checkpoint": os.path.join(quickstart_run[0], "teacher"),  # trained already
          # resnet8's stages have the sizes of its teacher's (resnet8 too)
          "student.model": "resnet8",
          "student.width_multiplier": 1.0,
          "student.epochs": 2,
          "baseline.enabled": False,
          "checkpoint.every_steps": 0,
          "export.enabled": True,
      }
  )
  report = pipeline.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "student" / "metrics.jsonl") as f:
    epochs = [json.loads(line) for line in f]
  assert len(epochs) == 2 and epochs[-1]["hcl"] < epochs[0]["hcl"]
  assert report["student"]["top1"] > 0.3  # ten classes: chance is 0.1
  # The fusions are in the student's checkpoint, whole...
  network = _abstract_network("resnet8")
  method = methods.make_feature_method(
      config.distill, network, network, (8, 8, 1), 0, num_train=1, steps_per_epoch=1, epochs=1
  )
  checkpoints = tmp_path / "student" / "checkpoints"
  last = max(int(step.name) for step in checkpoints.iterdir() if step.name.isdigit())
  train = ocp.StandardCheckpointer().restore(checkpoints / str(last) / "train")
  saved, built = (jax.tree.leaves(v) for v in (train["connectors"], method.connector_variables))
  assert sorted(x.shape for x in saved) == sorted(x.shape for x in built)
  # ...but neither in the exported student (its attention's 128x2 kernel) nor in its count.
  with open(tmp_path / "export" / "student" / "model.jax", "rb") as f:
    module = jax.export.deserialize(bytearray(f.read())).mlir_module()
  assert "tensor<64x10xf32>" in module and "tensor<128x2xf32>" not in module
  assert report["student"]["params"] == models.count_params(
      models.create_model("resnet8", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  )
