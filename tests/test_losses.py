"""Losses against an independent float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_distillation_loss(student, teacher, labels, temperature, alpha):
  """(1-a) CE + a T^2 KL(p_t || p_s), KL summed over classes, batch mean; float64."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  ce = -_log_softmax(student)[np.arange(len(labels)), labels].mean()
  log_p_t = _log_softmax(teacher / temperature)
  log_p_s = _log_softmax(student / temperature)
  kl = (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(-1).mean()
  return (1 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (3.0, 0.0)])
def test_distillation_loss_matches_reference(scale, temperature, alpha):
  rng = np.random.default_rng(0)
  student = (rng.normal(size=(16, 10)) * scale).astype(np.float32)
  teacher = (rng.normal(size=(16, 10)) * scale).astype(np.float32)
  labels = rng.integers(0, 10, 16)
  total, parts = losses.distillation_loss(student, teacher, labels, temperature, alpha)
  want_total, want_ce, want_kl = reference_distillation_loss(
      student, teacher, labels, temperature, alpha
  )
  assert np.isfinite(float(total))
  # float32 arithmetic on values of size ~scale: compare relative to that size.
  tol = 1e-6 * max(1.0, scale)
  np.testing.assert_allclose(float(parts["ce"]), want_ce, rtol=1e-6, atol=tol)
  np.testing.assert_allclose(float(parts["kl"]), want_kl, rtol=1e-6, atol=tol)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-6, atol=tol * temperature**2)


def test_softmax_with_temperature_softens_and_sums_to_one():
  logits = np.array([[1.0, 2.0, 5.0], [1e3, -1e3, 0.0]], np.float32)
  for temperature in (1.0, 4.0):
    probs = np.asarray(losses.softmax_with_temperature(logits, temperature))
    z = logits.astype(np.float64) / temperature
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, want, atol=1e-6)
  assert (
      np.asarray(losses.softmax_with_temperature(logits, 4.0))[0].max()
      < np.asarray(losses.softmax_with_temperature(logits, 1.0))[0].max()
  )


def test_kl_is_zero_when_student_matches_teacher():
  logits = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
  assert abs(float(losses.kl_divergence(logits, logits, 2.0))) < 1e-6


def test_no_gradient_reaches_the_teacher():
  rng = np.random.default_rng(2)
  student, teacher = rng.normal(size=(2, 4, 6)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  grad_teacher = jax.grad(lambda t: losses.distillation_loss(student, t, labels, 2.0, 0.5)[0])(
      teacher
  )
  assert not np.any(np.asarray(grad_teacher))
  grad_student = jax.grad(lambda s: losses.distillation_loss(s, teacher, labels, 2.0, 0.5)[0])(
      student
  )
  assert np.all(np.isfinite(grad_student)) and np.any(np.asarray(grad_student))


def test_traced_temperature_gives_the_same_loss():
  rng = np.random.default_rng(3)
  student, teacher = rng.normal(size=(2, 4, 6)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  eager = losses.distillation_loss(student, teacher, labels, 3.0, 0.5)[0]
  jitted = jax.jit(lambda t: losses.distillation_loss(student, teacher, labels, t, 0.5)[0])
  np.testing.assert_allclose(float(jitted(jnp.float32(3.0))), float(eager), rtol=1e-6)
