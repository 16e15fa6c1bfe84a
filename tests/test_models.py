"""Tests for kd_jax.models: shapes, parameter counts, registry, train/eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from kd_jax import models, native, network
from kd_jax.errors import UserInputError


def _normal(shape):
  # NumPy, not jax.random: compiling a sampler per shape dominates test time.
  return np.random.default_rng(0).standard_normal(shape, np.float32)


def _abstract_model(name, **kwargs):
  """Builds `name` without allocating or initialising its parameters."""
  return nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("name", models.model_names())
def test_output_shape(name):
  model = _abstract_model(name, num_classes=7)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits = nnx.eval_shape(lambda m, x: m(x), model, x)
  assert logits.shape == (2, 7)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", ["dsconv_student", "resnet8", "wrn_16_1"])
def test_small_models_run_on_8x8_inputs(name):
  model = models.create_model(name, num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda model, x: model(x))(model, _normal((2, 8, 8, 1)))  # op by op is slow
  assert logits.shape == (2, 10)
  assert jnp.isfinite(logits).all()


# Published sizes, rounded as published, with the classifier head they hold
# for: resnet20's 0.27M and wrn_40_2's 2.2M are CIFAR-10 figures (with 100
# classes: 0.28M, 2.26M); wrn_16_2's 0.70M is a CIFAR-100 one (0.69M with 10
# classes); the others round the same either way.
@pytest.mark.parametrize(
    "name, num_classes, published_millions, digits",
    [
        ("resnet20", 10, 0.27, 2),
        ("resnet56", 100, 0.86, 2),
        ("resnet110", 100, 1.7, 1),
        ("wrn_40_2", 10, 2.2, 1),
        ("wrn_16_2", 100, 0.70, 2),
        ("resnet8x4", 100, 1.2, 1),
        ("resnet32x4", 100, 7.4, 1),
    ],
)
def test_param_counts_match_published(name, num_classes, published_millions, digits):
  count = models.count_params(_abstract_model(name, num_classes=num_classes))
  assert round(count / 1e6, digits) == published_millions


# torchvision's exact counts for 1,000 classes (sum of p.numel() over parameters()).
@pytest.mark.parametrize(
    "name, torchvision_count",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("mobilenet_v2", 3_504_872),
    ],
)
def test_imagenet_models_match_torchvision(name, torchvision_count):
  assert models.count_params(_abstract_model(name, num_classes=1000)) == torchvision_count
  model = _abstract_model(name, num_classes=1000)
  logits = nnx.eval_shape(
      lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  )
  assert logits.shape == (1, 1000)


def _dsconv_params(cin, cout):
  depthwise = 3 * 3 * cin
  pointwise = cin * cout
  batch_norms = 2 * cin + 2 * cout  # scale and bias each
  return depthwise + pointwise + batch_norms


def test_student_param_count_pins_architecture():
  expected = (
      _dsconv_params(3, 64) + _dsconv_params(64, 128) + _dsconv_params(128, 256) + 256 * 10 + 10
  )
  assert expected == 46763
  model = _abstract_model("dsconv_student", num_classes=10)
  assert models.count_params(model) == expected


def test_student_width_multiplier_rounds_channels():
  model = _abstract_model("dsconv_student", num_classes=10, width_multiplier=0.3)
  # 64, 128, 256 times 0.3, rounded: 19, 38, 77.
  assert models.count_params(model) == (
      _dsconv_params(3, 19) + _dsconv_params(19, 38) + _dsconv_params(38, 77) + 77 * 10 + 10
  )


def test_width_multiplier_rejected_for_fixed_width_models():
  with pytest.raises(UserInputError, match="resnet20.*dsconv_student"):
    models.create_model("resnet20", num_classes=10, rngs=nnx.Rngs(0), width_multiplier=0.5)
  with pytest.raises(UserInputError, match="positive"):
    models.create_model("dsconv_student", num_classes=10, rngs=nnx.Rngs(0), width_multiplier=0)


def test_unknown_model_lists_known_names():
  with pytest.raises(UserInputError) as excinfo:
    models.create_model("resnet21", num_classes=10, rngs=nnx.Rngs(0))
  message = str(excinfo.value)
  assert "'resnet21'" in message
  assert ", ".join(models.model_names()) in message
  assert "\n" not in message


def test_model_names_are_the_documented_models_in_alphabetical_order():
  # The models README.md lists, as error messages and --help show them.
  assert models.model_names() == [
      "airbench",
      "dsconv_student",
      "mobilenet_v2",
      "resnet110",
      "resnet14",
      "resnet18",
      "resnet20",
      "resnet32",
      "resnet32x4",
      "resnet34",
      "resnet44",
      "resnet50",
      "resnet56",
      "resnet8",
      "resnet8x4",
      "wrn_16_1",
      "wrn_16_2",
      "wrn_40_1",
      "wrn_40_2",
  ]


def _batch_stats(model):
  stats = nnx.state(model, nnx.BatchStat)
  return [np.asarray(s) for s in jax.tree.leaves(stats)]


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
  # The shapes of test_small_models_run_on_8x8_inputs, to reuse compilations.
  model = models.create_model("dsconv_student", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  x = _normal((2, 8, 8, 1)) + 1.0
  initial = _batch_stats(model)

  # New models train, like PyTorch modules.
  model(x)
  trained = _batch_stats(model)
  assert all(not np.allclose(a, b) for a, b in zip(initial, trained))

  model.eval()
  logits = model(x)
  for a, b in zip(trained, _batch_stats(model)):
    np.testing.assert_array_equal(a, b)
  # Running statistics make each example's logits independent of its batch.
  np.testing.assert_allclose(model(x[:1]), logits[:1], rtol=1e-5, atol=1e-5)

  model.train()
  model(x)
  assert all(not np.allclose(a, b) for a, b in zip(trained, _batch_stats(model)))


PRODUCTS = ("conv_general_dilated", "dot_general", "ffi_call")  # ffi_call: oneDNN's


def _equations(jaxpr):
  """The equations of `jaxpr` and, recursively, of every program inside it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for inner in jaxprs_in_params(eqn.params):
      yield from _equations(inner)


@pytest.mark.parametrize("name", ["dsconv_student", "resnet8"])
def test_bfloat16_compute_keeps_float32_weights_and_logits(name):
  shapes = dict(num_classes=10, in_channels=3, seed=0)
  full, variables = network.create_network(name, **shapes)
  mixed, mixed_variables = network.create_network(name, compute_dtype="bfloat16", **shapes)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mixed_variables))
  assert mixed.convolutions == "xla"  # oneDNN's are float32 only
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))

  # Jitted: op-by-op bfloat16 on a CPU is slow.
  logits = jax.jit(lambda v: mixed.apply(v, images, train=False)[0])(variables)
  reference = jax.jit(lambda v: full.apply(v, images, train=False)[0])(variables)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05)

  def loss(params):
    return mixed.apply(network.Variables(params, variables.batch_stats), images, train=True)[
        0
    ].sum()

  # Every convolution and matrix product runs on bfloat16 operands, forward and
  # backward, in both branches of the depthwise layers' platform choice too.
  forward = jax.make_jaxpr(lambda v: mixed.apply(v, images, train=True))(variables)
  backward = jax.make_jaxpr(jax.grad(loss))(variables.params)
  for program in (forward.jaxpr, backward.jaxpr):
    products = [e for e in _equations(program) if e.primitive.name in PRODUCTS]
    in_branches = [
        e
        for choice in _equations(program)
        if choice.primitive.name == "cond"
        for branch in choice.params["branches"]
        for e in _equations(branch.jaxpr)
        if e.primitive.name in PRODUCTS
    ]
    assert bool(in_branches) == (name == "dsconv_student")  # the walk reached inside
    assert all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars)

  # Gradients reach the float32 master weights as float32.
  grads = jax.jit(jax.grad(loss))(variables.params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_network_runs_the_convolutions_chosen_for_it_and_portable_ones_equal():
  shapes = dict(num_classes=10, in_channels=3, seed=0)
  net, variables = network.create_network("resnet8", **shapes)
  # One CPU device, float32: oneDNN's wherever kd_jax.native is built.
  assert net.convolutions == ("onednn" if native.available() else "xla")
  portable = net.portable()
  assert portable.convolutions == "xla"
  images = _normal((2, 8, 8, 3))
  for train in (True, False):
    logits = []
    for each in (net, portable):
      forward = jax.jit(lambda v, each=each: each.apply(v, images, train=train)[0])
      calls_onednn = "kd_jax_onednn" in forward.lower(variables).as_text()
      assert calls_onednn == (each.convolutions == "onednn")
      logits.append(forward(variables))
    np.testing.assert_allclose(*logits, rtol=1e-5, atol=1e-5)
  # A model without kd_jax's 3x3 layers (a user's, of nnx.Conv) runs XLA's, and says so.
  own = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
  assert network.split_model("own", own)[0].convolutions == "xla"


def test_auto_compute_dtype_is_float32_on_cpu_and_unknown_names_are_refused():
  assert network.resolve_compute_dtype("auto") == "float32"
  assert network.resolve_compute_dtype("bfloat16") == "bfloat16"
  with pytest.raises(UserInputError, match="unknown compute_dtype 'fp8'"):
    network.resolve_compute_dtype("fp8")


# (model, input size, [(height, channels) of each stage], pooled width): one model per family.
FEATURE_SHAPES = [
    ("dsconv_student", 16, [(8, 64), (8, 128), (8, 256)], 256),
    ("resnet8", 16, [(16, 16), (8, 32), (4, 64)], 64),
    ("wrn_16_1", 16, [(16, 16), (8, 32), (4, 64)], 64),
    ("resnet18", 32, [(8, 64), (4, 128), (2, 256), (1, 512)], 512),
    ("resnet50", 32, [(8, 256), (4, 512), (2, 1024), (1, 2048)], 2048),
    ("mobilenet_v2", 32, [(16, 16), (8, 24), (4, 32), (2, 96), (1, 320)], 1280),
]


@pytest.mark.parametrize("name, size, stages, pooled", FEATURE_SHAPES)
def test_features_are_named_stage_outputs_and_the_pooled_embedding(name, size, stages, pooled):
  model = _abstract_model(name, num_classes=7)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  logits, features = nnx.eval_shape(lambda m, x: m.with_features(x), model, x)
  assert logits.shape == (2, 7)
  want = {"pooled": (2, pooled)}
  for k, (height, channels) in enumerate(stages, start=1):
    want[f"stage{k}"] = want[f"stage{k}_preact"] = (2, height, height, channels)
  assert {key: f.shape for key, f in features.items()} == want


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["dsconv_student", "resnet8", "wrn_16_1"])
def test_features_leave_the_logits_and_batch_stats_as_they_are(name, train):
  # The shapes of test_small_models_run_on_8x8_inputs, to reuse compilations.
  net, variables = network.create_network(name, num_classes=10, in_channels=1, seed=0)
  images = _normal((2, 8, 8, 1))
  logits, stats = net.apply(variables, images, train=train)
  with_features, features, stats_with_features = net.apply_with_features(
      variables, images, train=train
  )
  # dsconv_student's logits-only path fuses its last batch norm, ReLU and pool in training.
  tolerance = 1e-6 if name == "dsconv_student" and train else 0
  np.testing.assert_allclose(with_features, logits, rtol=tolerance, atol=tolerance)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_with_features)):
    np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)
  if name in ("dsconv_student", "resnet8"):  # their stages end in a ReLU
    np.testing.assert_array_equal(features["stage3"], np.maximum(features["stage3_preact"], 0))
    np.testing.assert_allclose(
        features["pooled"], features["stage3"].mean((1, 2)), rtol=1e-5, atol=1e-6
    )
