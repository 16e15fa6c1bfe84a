"""Shared test fixtures and helpers: a small quickstart run, random arrays, conv gradients,
torchvision weights files."""

import contextlib
import fcntl
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs import quickstart
from kd_jax import models, native, pipeline, pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's programs run a few steps each, so compiling them fast matters more than
# running them fast. Without LLVM's optimisations XLA compiles in about half the time;
# with XLA:CPU's older fusion emitters, and in one piece rather than split for parallel
# code generation, a small run's programs then compile in 7 s instead of 17. Results
# differ only in float rounding. Set before JAX starts its backend; launch.py processes
# inherit it.
FAST_COMPILES = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *FAST_COMPILES)).strip()

# The quickstart shrunk to seconds. Labels carry no weight (alpha = 1): whatever
# the student learns, it learns from the teacher. The teacher's one epoch at its full
# learning rate, without warm-up, reaches 96% top-1, as two epochs with warm-up do.
SMALL_OVERRIDES = {
    "teacher.epochs": 1,
    "teacher.optimizer.warmup_epochs": 0,
    "student.epochs": 4,
    "distill.alpha": 1.0,
    "eval.latency_repeats": 3,
    "eval.throughput_repeats": 2,
    "export.enabled": False,
}

# Checkpoints every 15 steps, mid-epoch, give resumption something to prove; other
# runs save at epoch ends only, as each save costs more than the steps between.
MID_EPOCH_SAVES = {"checkpoint.every_steps": 15}

# Tests of kd_jax's native oneDNN convolution; without the built library (no C++ compiler)
# kd_jax runs on XLA's convolutions and these are skipped, saying why.
requires_native = pytest.mark.skipif(
    not native.available(),
    reason="kd_jax's native library is not built (needs a C++ compiler; `make` builds it): "
    "CPU convolutions stay XLA's",
)


# The files that take longest, longest first. pytest-xdist hands whole files to its
# workers in collection order (the Makefile turns off its reordering by test count, which
# put one-test files such as test_accelerator.py last): started first, the long files
# leave the short ones to even out the workers' ends.
LONGEST_FILES = (
    "test_parallel.py",
    "test_checkpoint.py",
    "test_methods.py",
    "test_pipeline.py",
    "test_teacher_cache.py",
    "test_accelerator.py",
)


def pytest_collection_modifyitems(items):
  """Puts the LONGEST_FILES first, in that order; the other files keep theirs."""
  rank = {name: index for index, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def small_config(**overrides):
  """The quickstart config with SMALL_OVERRIDES and then `overrides` applied."""
  config = quickstart.get_config()
  for key, value in {**SMALL_OVERRIDES, **overrides}.items():
    *sections, field = key.split(".")
    holder = config
    for section in sections:
      holder = holder[section]
    holder[field] = value
  return config


def small_config_flags(**overrides) -> list[str]:
  """The same config as launch.py flags."""
  return ["--config=configs/quickstart.py"] + [
      f"--config.{key}={value}" for key, value in {**SMALL_OVERRIDES, **overrides}.items()
  ]


def _session_folder(tmp_path_factory) -> pathlib.Path:
  """A folder of this session that all its xdist workers share."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@contextlib.contextmanager
def _one_worker_at_a_time(lock_path: pathlib.Path):
  """Holds an exclusive lock on `lock_path` (a file) while the block runs."""
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One JAX compilation cache for the session, its workers and the launch.py processes.

  Pipeline runs and launch.py processes build their jitted functions afresh,
  so the suite compiled the same small models dozens of times; with a
  persistent cache each is compiled once. A JAX_COMPILATION_CACHE_DIR set
  beforehand (`make test-fast` sets one) keeps the programs for the next run too.
  """
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not cache:
    cache = _session_folder(tmp_path_factory) / "compilation_cache"
    cache.mkdir(exist_ok=True)
    cache = str(cache)
  settings = {
      "jax_compilation_cache_dir": cache,
      "jax_persistent_cache_min_compile_time_secs": 0,
  }
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
  """(workdir, report) of one uninterrupted small quickstart run, saved mid-epoch.

  Made once per session: the first worker to need it runs it, the others read it.
  Tests only read it.
  """
  session = _session_folder(tmp_path_factory)
  workdir = session / "quickstart"
  with _one_worker_at_a_time(session / "quickstart.lock"):
    if not (workdir / "report.json").exists():
      config = small_config(**MID_EPOCH_SAVES, **{"export.enabled": True})
      pipeline.train_and_evaluate(config, str(workdir))
  with open(workdir / "report.json") as f:
    return str(workdir), json.load(f)


def env_with_devices(count: int) -> dict[str, str]:
  """os.environ for a process that sees `count` CPU devices."""
  flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={count}"
  return {**os.environ, "XLA_FLAGS": flags}


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """`model`'s variables under torchvision's names and layouts (the inverse of loading)."""
  targets, _ = pretrained._targets(model)
  return {
      # Contiguous: safetensors writes an array's buffer in memory order.
      name: np.ascontiguousarray(np.transpose(v[...], np.argsort(axes) if axes else None))
      for name, (v, axes) in targets.items()
  }


def save_torch_state_dict(model_name: str, num_classes: int, path) -> nnx.Module:
  """Writes random weights of `model_name` as a torchvision state dict; returns the model.

  NumPy draws them (He-scaled kernels, batch norms near the identity): the model's own
  initialisation would compile a program per layer shape of a full-size network.
  """
  model = nnx.eval_shape(
      lambda: models.create_model(model_name, num_classes=num_classes, rngs=nnx.Rngs(0))
  )
  rng = np.random.default_rng(3)
  for name, (variable, _) in pretrained._targets(model)[0].items():
    shape = tuple(variable.shape)
    if len(shape) > 1:  # a kernel, its fan-in on every axis but the last
      value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))
    elif name.endswith(("weight", "running_var")):  # a batch norm's scale or variance
      value = rng.uniform(0.5, 1.5, shape)
    else:  # a bias or a running mean
      value = rng.uniform(-0.1, 0.1, shape)
    variable.set_value(jnp.asarray(value, jnp.float32))
  safetensors.numpy.save_file(torch_state_dict(model), str(path))
  return model


def normal(shape, seed=0):
  """Standard-normal float32 test data; NumPy, not jax.random, whose per-shape compile dominates."""
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def random_cotangent(shape):
  """A fixed random output weighting, so grads test every output element."""
  return normal(shape, seed=2)


@functools.partial(jax.jit, static_argnums=(0, 3))
def values_and_grads(conv, x, kernel, stride):
  """Returns conv's output and the grads of a random projection of it."""
  out = conv(x, kernel, stride)
  cotangent = random_cotangent(out.shape)
  grads = jax.grad(lambda x, k: jnp.sum(conv(x, k, stride) * cotangent), argnums=(0, 1))(x, kernel)
  return out, grads
