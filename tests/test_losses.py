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


def _logsumexp(z):
  m = z.max(-1, keepdims=True)
  return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def _standardize(z):
  z = z.astype(np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def reference_dkd_loss(student, teacher, labels, alpha, beta, temperature):
  """alpha T^2 TCKD + beta T^2 NCKD from the paper's definitions, batch mean; float64.

  b = [p_t, p_\\t] with p_\\t = sum of the non-target probabilities is the softmax
  of the two "logits" [z_t, log sum_{k != t} exp(z_k)]; NCKD's distribution is
  the softmax of the logits with the target column deleted.
  """
  losses_per_sample = []
  for z_s, z_t, y in zip(student.astype(np.float64), teacher.astype(np.float64), labels):
    z_s, z_t = z_s / temperature, z_t / temperature
    rest_s, rest_t = np.delete(z_s, y), np.delete(z_t, y)
    log_b_s = _log_softmax(np.array([z_s[y], _logsumexp(rest_s)]))
    log_b_t = _log_softmax(np.array([z_t[y], _logsumexp(rest_t)]))
    tckd = (np.exp(log_b_t) * (log_b_t - log_b_s)).sum()
    log_hat_s, log_hat_t = _log_softmax(rest_s), _log_softmax(rest_t)
    nckd = (np.exp(log_hat_t) * (log_hat_t - log_hat_s)).sum()
    losses_per_sample.append(temperature**2 * (alpha * tckd + beta * nckd))
  return np.mean(losses_per_sample)


def official_dkd_loss(student, teacher, labels, alpha, beta, temperature):
  """NumPy port of mdistiller's dkd_loss: target masked by subtracting 1000; float64."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  gt_mask = np.eye(student.shape[1])[labels]

  def binary(probs):
    return np.stack([(probs * gt_mask).sum(1), (probs * (1 - gt_mask)).sum(1)], axis=1)

  p_s = np.exp(_log_softmax(student / temperature))
  p_t = np.exp(_log_softmax(teacher / temperature))
  b_s, b_t = binary(p_s), binary(p_t)
  tckd = (b_t * (np.log(b_t) - np.log(b_s))).sum() * temperature**2 / len(labels)
  log_p2_t = _log_softmax(teacher / temperature - 1000.0 * gt_mask)
  log_p2_s = _log_softmax(student / temperature - 1000.0 * gt_mask)
  nckd = (np.exp(log_p2_t) * (log_p2_t - log_p2_s)).sum() * temperature**2 / len(labels)
  return alpha * tckd + beta * nckd


def _random_logits(seed, scale, batch=16, num_classes=10):
  rng = np.random.default_rng(seed)
  student = (rng.normal(size=(batch, num_classes)) * scale).astype(np.float32)
  teacher = (rng.normal(size=(batch, num_classes)) * scale).astype(np.float32)
  return student, teacher, rng.integers(0, num_classes, batch)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
@pytest.mark.parametrize(
    "alpha,beta,temperature", [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (0.5, 1.0, 1.0), (9.0, 72.0, 2.0)]
)
def test_dkd_loss_matches_reference(num_classes, scale, alpha, beta, temperature):
  student, teacher, labels = _random_logits(4, scale, num_classes=num_classes)
  got = losses.dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=temperature)
  want = reference_dkd_loss(student, teacher, labels, alpha, beta, temperature)
  # An absolute floor for small losses: float32 log-probabilities of size ~1 carry
  # errors ~1e-7, which the weights alpha T^2 and beta T^2 then multiply.
  atol = 1e-6 * (alpha + beta) * temperature**2
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
def test_dkd_loss_with_logit_standardization_matches_reference(scale):
  student, teacher, labels = _random_logits(5, scale, num_classes=100)
  teacher += 500.0  # a shifted range, which standardisation removes
  got = losses.dkd_loss(
      student, teacher, labels, alpha=9.0, beta=72.0, temperature=2.0, logit_standardization=True
  )
  want = reference_dkd_loss(_standardize(student), _standardize(teacher), labels, 9.0, 72.0, 2.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_dkd_loss_matches_official_code_on_ordinary_logits(scale):
  student, teacher, labels = _random_logits(6, scale, num_classes=100)
  got = losses.dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=4.0)
  want = official_dkd_loss(student, teacher, labels, 1.0, 8.0, 4.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("scale,temperature", [(1.0, 1.0), (3.0, 4.0), (30.0, 2.0)])
def test_dkd_decomposes_classic_kd(scale, temperature):
  """Zhao et al.'s Eq. (5): KD = TCKD + (1 - p_t^teacher) NCKD, per sample, at temperature T.

  So DKD with alpha = 1 and beta = 1 - p_t^teacher is exactly T^2 KL(teacher || student).
  """
  student, teacher, labels = _random_logits(7, scale, batch=8)
  log_p_teacher = _log_softmax(teacher.astype(np.float64) / temperature)
  beta_B = 1.0 - np.exp(log_p_teacher[np.arange(len(labels)), labels])

  def per_sample_dkd(s_C, t_C, y, beta):
    return losses.dkd_loss(
        s_C[None], t_C[None], y[None], alpha=1.0, beta=beta, temperature=temperature
    )

  def per_sample_kd(s_C, t_C):
    return temperature**2 * losses.kl_divergence(t_C[None], s_C[None], temperature)

  dkd_B = jax.vmap(per_sample_dkd)(student, teacher, labels, beta_B.astype(np.float32))
  kd_B = jax.vmap(per_sample_kd)(student, teacher)
  np.testing.assert_allclose(np.asarray(dkd_B), np.asarray(kd_B), rtol=1e-5, atol=1e-6)
  _, parts = losses.distillation_loss(student, teacher, labels, temperature, 1.0)
  np.testing.assert_allclose(
      float(dkd_B.mean()), temperature**2 * float(parts["kl"]), rtol=1e-5, atol=1e-6
  )


def test_dkd_nckd_ignores_the_target_logit():
  """The target class is masked exactly, even where subtracting 1000 would not hide it."""
  student, teacher, labels = _random_logits(8, 10.0)
  rows = np.arange(len(labels))
  shifted_student, shifted_teacher = student.copy(), teacher.copy()
  shifted_student[rows, labels] += 3000.0
  shifted_teacher[rows, labels] -= 3000.0
  nckd = lambda s, t: float(losses.dkd_loss(s, t, labels, alpha=0.0, beta=1.0, temperature=1.0))
  np.testing.assert_allclose(
      nckd(shifted_student, shifted_teacher), nckd(student, teacher), rtol=1e-6
  )


@pytest.mark.parametrize("logit_standardization", [False, True])
def test_dkd_no_gradient_reaches_the_teacher(logit_standardization):
  student, teacher, labels = _random_logits(9, 1e3)
  # A target logit far above the rest: p_target rounds to 1 in float32.
  teacher[np.arange(len(labels)), labels] = 5e3
  loss = lambda s, t: losses.dkd_loss(
      s,
      t,
      labels,
      alpha=1.0,
      beta=8.0,
      temperature=4.0,
      logit_standardization=logit_standardization,
  )
  grad_teacher = jax.grad(loss, argnums=1)(student, teacher)
  assert not np.any(np.asarray(grad_teacher))
  grad_student = jax.grad(loss)(student, teacher)
  assert np.all(np.isfinite(grad_student)) and np.any(np.asarray(grad_student))


def test_dkd_traced_hyperparameters_give_the_same_loss():
  student, teacher, labels = _random_logits(10, 1.0)
  eager = losses.dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=4.0)
  jitted = jax.jit(
      lambda a, b, t: losses.dkd_loss(student, teacher, labels, alpha=a, beta=b, temperature=t)
  )
  np.testing.assert_allclose(
      float(jitted(jnp.float32(1.0), jnp.float32(8.0), jnp.float32(4.0))), float(eager), rtol=1e-6
  )


@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (30.0, -7.0), (1e3, 500.0)])
def test_logit_standardize_matches_numpy(scale, offset):
  student, _, _ = _random_logits(11, scale, num_classes=100)
  logits = student + np.float32(offset)
  got = np.asarray(losses.logit_standardize(logits))
  np.testing.assert_allclose(got, _standardize(logits), atol=1e-5)
  np.testing.assert_allclose(got.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(got.std(-1, ddof=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.9), (4.0, 0.5)])
def test_standardized_distillation_loss_matches_reference(scale, temperature, alpha):
  student, teacher, labels = _random_logits(12, scale, num_classes=100)
  total, parts = losses.distillation_loss(
      student, teacher, labels, temperature, alpha, logit_standardization=True
  )
  _, want_ce, _ = reference_distillation_loss(student, teacher, labels, temperature, alpha)
  _, _, want_kl = reference_distillation_loss(
      _standardize(student), _standardize(teacher), labels, temperature, alpha
  )
  want_total = (1 - alpha) * want_ce + alpha * temperature**2 * want_kl
  tol = 1e-6 * max(1.0, scale)
  np.testing.assert_allclose(float(parts["ce"]), want_ce, rtol=1e-6, atol=tol)
  np.testing.assert_allclose(float(parts["kl"]), want_kl, rtol=1e-5)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5, atol=tol)


def test_dkd_with_beta_zero_is_its_target_class_term():
  rng = np.random.default_rng(7)
  student, teacher = rng.normal(size=(2, 16, 1000)).astype(np.float32) * 5
  labels = rng.integers(0, 1000, 16)
  temperature = 4.0

  # TCKD alone, from the paper: KL between the binary (target, rest) distributions.
  def binary(logits):
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    p_target = p[np.arange(16), labels]
    return np.stack([p_target, 1 - p_target], -1)

  b_t, b_s = binary(teacher), binary(student)
  tckd = (b_t * (np.log(b_t) - np.log(b_s))).sum(-1).mean() * temperature**2
  got = losses.dkd_loss(student, teacher, labels, alpha=1.0, beta=0.0, temperature=temperature)
  np.testing.assert_allclose(float(got), tckd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_standardised_losses_ignore_shifts_and_scales_of_the_logits(method):
  rng = np.random.default_rng(8)
  student, teacher = rng.normal(size=(2, 8, 100)).astype(np.float32)
  labels = rng.integers(0, 100, 8)

  def soft_term(s, t):
    if method == "kd":
      return losses.distillation_loss(s, t, labels, 2.0, 1.0, logit_standardization=True)[0]
    return losses.dkd_loss(
        s, t, labels, alpha=1.0, beta=8.0, temperature=2.0, logit_standardization=True
    )

  base = float(soft_term(student, teacher))
  moved = float(soft_term(3.0 * student + 7.0, 0.5 * teacher - 20.0))
  np.testing.assert_allclose(moved, base, rtol=1e-4)


# Feature losses, against float64 NumPy written from the papers' definitions.


def reference_adaptive_pool(x, height, width):
  """PyTorch's adaptive average pooling: window i spans [floor(i H / h), ceil((i + 1) H / h))."""
  in_h, in_w = x.shape[1:3]
  out = np.empty((x.shape[0], height, width, x.shape[3]))
  for i in range(height):
    for j in range(width):
      rows = slice(int(np.floor(i * in_h / height)), int(np.ceil((i + 1) * in_h / height)))
      cols = slice(int(np.floor(j * in_w / width)), int(np.ceil((j + 1) * in_w / width)))
      out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  return out


def reference_attention_transfer(student_features, teacher_features, p):
  """Zagoruyko and Komodakis: ||Q_s/||Q_s|| - Q_t/||Q_t|| ||^2 per position, Q = mean_c |f|^p."""
  total = 0.0
  for s, t in zip(student_features, teacher_features):
    s, t = s.astype(np.float64), t.astype(np.float64)
    height, width = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
    s, t = reference_adaptive_pool(s, height, width), reference_adaptive_pool(t, height, width)
    maps = []
    for f in (s, t):
      q = (np.abs(f) ** p).mean(-1).reshape(len(f), -1)
      maps.append(q / np.sqrt((q**2).sum(-1, keepdims=True)))
    total += ((maps[0] - maps[1]) ** 2).mean()
  return total


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize(
    "student_hw,teacher_hw",
    [((8, 8), (8, 8)), ((8, 8), (4, 4)), ((2, 2), (4, 4)), ((7, 7), (4, 4))],
)
def test_attention_transfer_loss_matches_reference(p, student_hw, teacher_hw):
  rng = np.random.default_rng(20)
  # Two pairs, channel counts differing within each: the loss sums over them.
  student = [rng.normal(size=(3, *student_hw, 5)), rng.normal(size=(3, 4, 4, 6))]
  teacher = [rng.normal(size=(3, *teacher_hw, 7)), rng.normal(size=(3, 4, 4, 2))]
  student, teacher = ([f.astype(np.float32) for f in fs] for fs in (student, teacher))
  got = losses.attention_transfer_loss(student, teacher, p=p)
  np.testing.assert_allclose(
      float(got), reference_attention_transfer(student, teacher, p), rtol=1e-5
  )


def reference_hierarchical_context(student_features, teacher_features):
  """Per pair: (MSE + sum_l w_l MSE(pool_l)) / (1 + sum_l w_l), l among 4, 2, 1 below the map."""
  total = 0.0
  for s, t in zip(student_features, teacher_features):
    s, t = s.astype(np.float64), t.astype(np.float64)
    loss, weights = ((s - t) ** 2).mean(), 1.0
    for size, weight in ((4, 0.5), (2, 0.25), (1, 0.125)):
      if size < min(s.shape[1:3]):
        pooled_s, pooled_t = (reference_adaptive_pool(f, size, size) for f in (s, t))
        loss += weight * ((pooled_s - pooled_t) ** 2).mean()
        weights += weight
    total += loss / weights
  return total


def test_hierarchical_context_loss_matches_reference():
  rng = np.random.default_rng(21)
  # Every level, two of them, one, none (a pooled embedding), and overlapping windows (7 -> 4).
  shapes = [(2, 8, 8, 3), (2, 4, 4, 5), (2, 2, 2, 4), (2, 1, 1, 6), (2, 7, 7, 2)]
  student = [rng.normal(size=s).astype(np.float32) for s in shapes]
  teacher = [rng.normal(size=s).astype(np.float32) + 0.5 for s in shapes]
  got = losses.hierarchical_context_loss(student, teacher)
  np.testing.assert_allclose(
      float(got), reference_hierarchical_context(student, teacher), rtol=1e-5
  )
  # ReviewKD's weights on an 8x8 map: 1, 1/2, 1/4, 1/8; a map equal to the teacher's costs 0.
  assert float(losses.hierarchical_context_loss(teacher, teacher)) == 0.0


def test_fitnet_loss_is_the_mean_squared_error():
  rng = np.random.default_rng(22)
  student, teacher = rng.normal(size=(2, 3, 4, 4, 8)).astype(np.float32)
  want = ((student.astype(np.float64) - teacher) ** 2).mean()
  np.testing.assert_allclose(float(losses.fitnet_loss(student, teacher)), want, rtol=1e-6)


def _unit_rows(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference_crd(anchor, candidates, num_data, temperature):
  """Tian et al., Eqs. (18)-(19): h = P / (P + N/M), P = exp(a.c / T) / Z, Z = M mean exp(a.c / T).

  Returns (loss, Z): the batch mean of -log h(positive) - sum over negatives of log(1 - h).
  """
  anchor, candidates = anchor.astype(np.float64), candidates.astype(np.float64)
  exp_scores = np.exp(np.einsum("bd,bkd->bk", anchor, candidates) / temperature)
  z = num_data * exp_scores.mean()
  num_negatives = candidates.shape[1] - 1
  per_example = []
  for row in exp_scores / z:
    h = row / (row + num_negatives / num_data)
    per_example.append(-np.log(h[0]) - np.log(1 - h[1:]).sum())
  return np.mean(per_example), z


@pytest.mark.parametrize("num_data,temperature", [(1000, 0.07), (50, 0.5)])
def test_crd_loss_matches_reference(num_data, temperature):
  rng = np.random.default_rng(23)
  anchor = _unit_rows(rng.normal(size=(4, 16)))
  candidates = _unit_rows(rng.normal(size=(4, 9, 16)))  # a positive and 8 negatives each
  candidates[:, 0] = _unit_rows(anchor + 0.3 * rng.normal(size=anchor.shape))
  want_loss, want_z = reference_crd(anchor, candidates, num_data, temperature)
  z = losses.crd_normalizer(anchor, candidates, num_data=num_data, temperature=temperature)
  np.testing.assert_allclose(float(z), want_z, rtol=1e-5)
  got = losses.crd_loss(
      anchor, candidates, num_data=num_data, normalizer=z, temperature=temperature
  )
  np.testing.assert_allclose(float(got), want_loss, rtol=1e-5)


@pytest.mark.parametrize("name", ["at", "hcl", "fitnet", "crd"])
def test_no_gradient_reaches_the_teacher_features(name):
  rng = np.random.default_rng(24)
  student, teacher = rng.normal(size=(2, 2, 4, 4, 3)).astype(np.float32)
  bank = _unit_rows(rng.normal(size=(2, 5, 3)))
  loss = {
      "at": lambda s, t: losses.attention_transfer_loss([s], [t]),
      "hcl": lambda s, t: losses.hierarchical_context_loss([s], [t]),
      "fitnet": losses.fitnet_loss,
      "crd": lambda s, bank: losses.crd_loss(s[:, 0, 0], bank, num_data=10, normalizer=2.0),
  }[name]
  teacher_side = bank if name == "crd" else teacher
  grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher_side)
  assert not np.any(np.asarray(grad_teacher))
  assert np.all(np.isfinite(grad_student)) and np.any(np.asarray(grad_student))


def test_feature_losses_refuse_unpaired_features():
  maps = [np.zeros((2, 4, 4, 3), np.float32)]
  with pytest.raises(ValueError, match="1 student and 2 teacher"):
    losses.attention_transfer_loss(maps, maps * 2)
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\).*\(2, 2, 2, 3\)"):
    losses.hierarchical_context_loss(maps, [np.zeros((2, 2, 2, 3), np.float32)])


@pytest.mark.parametrize("smoothing", [0.0, 0.2, 0.9])
def test_label_smoothing_matches_numpy(smoothing):
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 6)
  targets = np.full((6, 5), smoothing / 5)
  targets[np.arange(6), labels] += 1 - smoothing
  expected = -(targets * _log_softmax(logits.astype(np.float64))).sum(-1).mean()
  loss = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
