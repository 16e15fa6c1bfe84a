"""Temperature and learning-rate schedules, and the optimisers built on them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from kd_jax import optim, schedules
from kd_jax.errors import UserInputError


def _distill(**overrides):
  config = default.get_config().distill
  config.update(overrides)
  return config


def test_linear_anneal_is_the_guides_formula():
  epochs, steps_per_epoch = 10, 7
  schedule = schedules.temperature_schedule(
      _distill(temperature_schedule="linear"), steps_per_epoch, epochs
  )
  for epoch in range(epochs):
    for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
      np.testing.assert_allclose(float(schedule(step)), 1 + 4 * (1 - epoch / epochs), rtol=1e-6)


def test_cosine_and_constant_temperatures():
  cosine = schedules.temperature_schedule(
      _distill(temperature_schedule="cosine", temperature_start=4.0, temperature_end=1.0), 5, 8
  )
  for epoch in range(8):
    want = 1.0 + 3.0 * 0.5 * (1 + np.cos(np.pi * epoch / 8))
    np.testing.assert_allclose(float(cosine(epoch * 5)), want, rtol=1e-6)
  constant = schedules.temperature_schedule(_distill(temperature=3.0), 5, 8)
  assert float(constant(0)) == float(constant(39)) == 3.0


def test_changing_temperature_does_not_recompile():
  schedule = schedules.temperature_schedule(_distill(temperature_schedule="linear"), 2, 4)
  traces = []

  @jax.jit
  def step_fn(step):
    traces.append(1)
    return schedule(step)

  values = [float(step_fn(jnp.int32(s))) for s in range(8)]
  assert len(traces) == 1
  assert values[0] == 5.0 and values[-1] < values[0]


def test_warmup_cosine_learning_rate():
  config = default.optimizer_config(learning_rate=0.1, warmup_epochs=1)
  schedule = schedules.learning_rate_schedule(config, steps_per_epoch=10, epochs=5, batch_size=64)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 0.1, rtol=1e-6)
  assert float(schedule(30)) < 0.1
  np.testing.assert_allclose(float(schedule(50)), 0.0, atol=1e-8)


def test_step_learning_rate():
  config = default.optimizer_config(
      learning_rate=0.05, schedule="step", decay_epochs=(2, 4), decay_factor=0.1
  )
  schedule = schedules.learning_rate_schedule(config, steps_per_epoch=3, epochs=6, batch_size=64)
  np.testing.assert_allclose(
      [float(schedule(s)) for s in (0, 5, 6, 11, 12)], [0.05, 0.05, 0.005, 0.005, 0.0005], rtol=1e-6
  )


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_clip_and_descend(name):
  config = default.optimizer_config(
      name=name, learning_rate=0.1, schedule="constant", weight_decay=1e-4, grad_clip_norm=1.0
  )
  optimizer = optim.make_optimizer(config, steps_per_epoch=1, epochs=1, batch_size=64)
  params = {"w": jnp.array([3.0, -2.0])}
  state = optimizer.init(params)
  huge_grads = {"w": jnp.array([1e6, -1e6])}
  updates, _ = optimizer.update(huge_grads, state, params)
  # Clipped to norm 1 before the update: no step bigger than the learning rate allows.
  assert float(jnp.abs(updates["w"]).max()) <= 0.1 * 1.01
  assert float(updates["w"][0]) < 0 < float(updates["w"][1])


@pytest.mark.parametrize("field,value", [("name", "rmsprop"), ("schedule", "exponential")])
def test_unknown_optimizer_settings_are_named(field, value):
  config = default.optimizer_config(**{field: value})
  with pytest.raises(UserInputError, match=f"optimizer.{field}"):
    optim.make_optimizer(config, steps_per_epoch=1, epochs=1, batch_size=64)


def test_unknown_temperature_schedule_is_named():
  with pytest.raises(UserInputError, match="temperature_schedule"):
    schedules.temperature_schedule(_distill(temperature_schedule="exp"), 1, 1)


def test_reference_batch_size_scales_the_peak_linearly():
  config = default.optimizer_config(
      learning_rate=0.2, reference_batch_size=512, schedule="constant"
  )
  assert schedules.peak_learning_rate(config, 256) == pytest.approx(0.1)
  schedule = schedules.learning_rate_schedule(config, steps_per_epoch=1, epochs=1, batch_size=1024)
  assert float(schedule(0)) == pytest.approx(0.4)
  config.reference_batch_size = 0
  assert schedules.peak_learning_rate(config, 256) == 0.2


def test_linear_schedule_is_airbenchs_triangle():
  config = default.optimizer_config(
      learning_rate=2.0,
      schedule="linear",
      warmup_epochs=2,
      start_lr_fraction=0.2,
      end_lr_fraction=0.07,
  )
  schedule = schedules.learning_rate_schedule(config, steps_per_epoch=5, epochs=10, batch_size=64)
  total, warmup = 50, 10

  def expected(step):  # airbench94's get_lr, times the peak
    if step < warmup:
      return 2.0 * (0.2 + 0.8 * step / warmup)
    return 2.0 * (1.0 - 0.93 * (step - warmup) / (total - warmup))

  steps = [0, 3, 9, 10, 11, 30, 49, 50]
  np.testing.assert_allclose(
      [float(schedule(s)) for s in steps], [expected(s) for s in steps], rtol=1e-6
  )


def _nesterov_reference(grads_list, params, lr, momentum, decay, multiplier_of):
  """PyTorch's Nesterov SGD in NumPy, each gradient first multiplied by `multiplier_of` its name.

  g = multiplier * grad + decay * p; b = momentum * b + g; p -= lr * (g + momentum * b).
  """
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  buffers = {k: np.zeros_like(v) for k, v in params.items()}
  for grads in grads_list:
    for k in params:
      g = multiplier_of[k] * np.asarray(grads[k], np.float64) + decay * params[k]
      buffers[k] = momentum * buffers[k] + g
      params[k] = params[k] - lr * (g + momentum * buffers[k])
  return params


def _nesterov_sgd(**extra):
  """Nesterov SGD at a constant 0.1, momentum 0.85, weight decay 0.01, and `extra`."""
  return default.optimizer_config(
      name="sgd",
      learning_rate=0.1,
      momentum=0.85,
      nesterov=True,
      weight_decay=0.01,
      grad_clip_norm=0.0,
      schedule="constant",
      **extra,
  )


def _random_grads(params, steps, seed):
  """`steps` random gradients shaped as `params`."""
  rng = np.random.default_rng(seed)
  return [
      {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
      for _ in range(steps)
  ]


def test_whitening_bias_stops_after_its_epochs_as_if_left_out_of_the_optimiser():
  config = _nesterov_sgd(whitening_bias_epochs=1.0)
  params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.3, -0.1, 0.2])}
  grads_list = _random_grads(params, 6, seed=2)
  optimizer = optim.make_optimizer(config, 2, 3, 64, None, {"kernel": False, "bias": True})
  result = _run(optimizer, params, grads_list)
  multipliers = {"kernel": 1, "bias": 1}
  trained = _nesterov_reference(grads_list, params, 0.1, 0.85, 0.01, multipliers)
  first_epoch = _nesterov_reference(grads_list[:2], params, 0.1, 0.85, 0.01, multipliers)
  np.testing.assert_allclose(np.asarray(result["kernel"]), trained["kernel"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(result["bias"]), first_epoch["bias"], rtol=1e-5)


def _run(optimizer, params, grads_list):
  state = optimizer.init(params)
  for grads in grads_list:
    updates, state = optimizer.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params


def test_nesterov_sgd_with_faster_norm_biases_matches_an_independent_update():
  config = _nesterov_sgd(norm_bias_lr_multiplier=64.0)
  params = {"kernel": jnp.array([1.0, -2.0, 0.5]), "bias": jnp.array([0.3, -0.1])}
  norm_biases = {"kernel": False, "bias": True}
  grads_list = _random_grads(params, 4, seed=0)
  optimizer = optim.make_optimizer(config, 1, 4, 64, norm_biases)
  result = _run(optimizer, params, grads_list)
  expected = _nesterov_reference(grads_list, params, 0.1, 0.85, 0.01, {"kernel": 1, "bias": 64})
  for k in params:
    np.testing.assert_allclose(np.asarray(result[k]), expected[k], rtol=1e-5, atol=1e-6)


def _airbench_lookahead(grads_list, w, lr, every, decay, steps_per_epoch, start_epochs):
  """airbench94's training loop around plain SGD: its EMA state, syncs and per-epoch copies."""
  total, step, ema = len(grads_list), 0, None
  for epoch in range(total // steps_per_epoch):
    for _ in range(steps_per_epoch):
      w = w - lr * grads_list[step]
      step += 1
      if epoch >= start_epochs and step % every == 0:
        if ema is None:
          ema = w.copy()
        else:
          rho = decay**every * (step / total) ** 3
          ema = rho * ema + (1 - rho) * w
          w = ema.copy()
    if ema is not None:
      w = ema.copy()
  return w


@pytest.mark.parametrize("start_epochs", [0, 1])
def test_lookahead_matches_airbench_syncs_and_epoch_ends(start_epochs):
  every, decay, steps_per_epoch, epochs = 2, 0.9, 3, 4
  optimizer = optim.lookahead(
      optax.sgd(0.1), every, decay, steps_per_epoch, epochs, start_epochs * steps_per_epoch
  )
  rng = np.random.default_rng(1)
  grads_list = rng.standard_normal((steps_per_epoch * epochs, 2)).astype(np.float32)
  w0 = np.array([1.0, -1.0], np.float32)
  result = _run(optimizer, {"w": jnp.asarray(w0)}, [{"w": jnp.asarray(g)} for g in grads_list])
  expected = _airbench_lookahead(grads_list, w0, 0.1, every, decay, steps_per_epoch, start_epochs)
  np.testing.assert_allclose(np.asarray(result["w"]), expected, rtol=1e-5)

