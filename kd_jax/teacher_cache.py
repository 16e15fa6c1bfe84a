"""Offline distillation: the teacher's logits on the training set, computed once.

The cache lives in <root>/teacher_logits/<fingerprint>/ (see `cache_root`), where the
fingerprint hashes the teacher's variables, the training images and labels
and the storage dtype: students trained later on the same teacher and data
reuse it without running the teacher, and a cache of another teacher or other
data is never taken for this one. It is written into a temporary folder and
renamed when whole, so a killed run never leaves a partial cache behind.
Two kinds: `plain`, the guide's, one prediction per unaugmented image; and
`consistent`, the predictions for exactly the augmented views the student
will see in each step of each epoch, which the augmentation, a pure function
of (seed, step), lets us compute ahead.
"""

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kd_jax import parallel
from kd_jax.errors import UserInputError

CACHE_DIR = "teacher_logits"
DTYPES = ("float16", "float32")
KINDS = ("plain", "consistent")  # distill.cache


def fingerprint(teacher_variables, data_digest: bytes, dtype: str, *settings) -> str:
  """A hash of everything the cached logits depend on, the same on every process.

  `data_digest` is this process's share of the training data's
  (`Dataset.digest`); `settings` add what else decides the logits (for
  consistent views: the augmentation, seed, batch size and epochs).
  """
  digest = hashlib.sha256(json.dumps([dtype, *settings]).encode())
  for leaf in jax.tree.leaves(jax.device_get(teacher_variables)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  # Each process hashes its share of the data; the key covers all of them.
  digest.update(parallel.allgather(np.frombuffer(data_digest, np.uint8)[None]).tobytes())
  return digest.hexdigest()[:20]


def cache_root(workdir: str, teacher_checkpoint: str) -> str:
  """Where a teacher's logits are kept: beside the teacher, so others find them.

  A teacher trained in this workdir keeps them here; a teacher restored from
  another run's stage folder keeps them in that run's workdir (if writable),
  so that every student distilled from it reuses one cache.
  """
  if not teacher_checkpoint:
    return workdir
  stage = os.path.abspath(teacher_checkpoint).rstrip(os.sep)
  if os.path.basename(stage) == "checkpoints":
    stage = os.path.dirname(stage)
  root = os.path.dirname(stage)
  return root if os.access(root, os.W_OK) else workdir


def _keeps_all(top_k: int, num_classes: int) -> bool:
  """Whether `top_k` asks for every logit (0, or at least the class count)."""
  return not top_k or top_k >= num_classes


def encode(logits: np.ndarray, top_k: int, dtype: str) -> dict[str, np.ndarray]:
  """The stored form of teacher logits (classes on the last axis).

  With `top_k` 0 (or not below the class count): {"logits"}, all of them in
  `dtype`. Otherwise the k largest logits exactly, and one number for the
  rest, their mean: {"top_logits", "top_indices", "rest_mean"}. For many
  classes that stores k + 1 values per example instead of C; `decode` puts the
  mean back in every other class, which keeps each row's mean (so logit
  standardisation still centres it) and errs towards too little mass outside
  the top k (the mean of exponentials exceeds the exponential of the mean).
  """
  num_classes = logits.shape[-1]
  if _keeps_all(top_k, num_classes):
    return {"logits": np.asarray(logits, dtype)}
  indices = np.argpartition(-logits, top_k - 1, axis=-1)[..., :top_k]
  top = np.take_along_axis(logits, indices, axis=-1)
  rest_mean = (logits.sum(-1, dtype=np.float64) - top.sum(-1, dtype=np.float64)) / (
      num_classes - top_k
  )
  return {
      "top_logits": top.astype(dtype),
      "top_indices": indices.astype(np.min_scalar_type(num_classes - 1)),
      "rest_mean": rest_mean.astype(dtype),
  }


def decode(stored: dict, num_classes: int) -> jax.Array:
  """Float32 logits, classes on the last axis, from what `encode` stored."""
  if "logits" in stored:
    return stored["logits"].astype(jnp.float32)
  rest = stored["rest_mean"].astype(jnp.float32)[..., None]
  dense = jnp.broadcast_to(rest, (*rest.shape[:-1], num_classes))
  return jnp.put_along_axis(
      dense,
      stored["top_indices"].astype(jnp.int32),
      stored["top_logits"].astype(jnp.float32),
      axis=-1,
      inplace=False,
  )


def _expected_shapes(leading: tuple, num_classes: int, top_k: int) -> dict[str, tuple]:
  """The array shapes `encode` gives for logits of shape leading + (num_classes,)."""
  if _keeps_all(top_k, num_classes):
    return {"logits": (*leading, num_classes)}
  return {
      "top_logits": (*leading, top_k),
      "top_indices": (*leading, top_k),
      "rest_mean": tuple(leading),
  }


def check_settings(dtype: str, top_k: int) -> None:
  """Rejects a storage dtype or top-k that the cache cannot hold."""
  if dtype not in DTYPES:
    raise UserInputError(f"distill.cache_dtype={dtype!r}; use one of {', '.join(DTYPES)}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise UserInputError(
        f"distill.cache_top_k={top_k!r}; give the number of largest logits to keep, or 0 for all"
    )


def _read(folder: str, prefix: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  """Loads `prefix + name + .npy` for each expected array, checking its shape."""
  arrays = {}
  for name, shape in shapes.items():
    path = os.path.join(folder, f"{prefix}{name}.npy")
    if not os.path.exists(path):
      raise UserInputError(
          f"teacher-logit cache {folder} lacks {os.path.basename(path)}; "
          f"delete {folder} to rebuild it"
      )
    arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    if arrays[name].shape != shape:
      raise UserInputError(
          f"teacher-logit cache {path} holds {arrays[name].shape}, not {shape}; "
          f"delete {folder} to rebuild it"
      )
  return arrays


def _write(folder: str, prefix: str, arrays: dict[str, np.ndarray]) -> None:
  for name, array in arrays.items():
    np.save(os.path.join(folder, f"{prefix}{name}.npy"), array, allow_pickle=False)


def load_or_compute(
    root: str,
    key: str,
    num_examples: int,
    num_classes: int,
    compute,
    *,
    dtype: str,
    top_k: int = 0,
) -> tuple[dict[str, np.ndarray], str]:
  """The cached logits for `key`, computing and storing them if absent.

  `compute()` returns float32 logits (num_examples x num_classes). Returns
  (the arrays as `encode` stores them, the cache folder).
  """
  folder = os.path.join(os.path.abspath(root), CACHE_DIR, key)
  shapes = _expected_shapes((num_examples,), num_classes, top_k)
  if _exists(folder):
    stored = _read(folder, "", shapes)
    logging.info("reusing the teacher's logits from %s", folder)
    return {name: np.asarray(array) for name, array in stored.items()}, folder
  stored = encode(np.asarray(compute(), np.float32), top_k, dtype)
  if jax.process_index() == 0:
    staging = _staging_folder(root, key)
    _write(staging, "", stored)
    _publish(staging, folder, {"kind": "plain", "examples": num_examples, "top_k": top_k})
  return stored, folder


def load_or_compute_views(
    root: str,
    key: str,
    epochs: int,
    shape: tuple,
    compute_epoch,
    *,
    dtype: str,
    top_k: int = 0,
) -> tuple[Callable[[int], dict[str, np.ndarray]], str]:
  """Consistent views: the teacher's logits for each step's augmented batch.

  `compute_epoch(epoch)` returns float32 logits of shape `shape` (steps x
  batch x classes). All epochs are computed and stored at once, when absent.
  Returns (a reader epoch -> the arrays as `encode` stores them, the cache
  folder).
  """
  folder = os.path.join(os.path.abspath(root), CACHE_DIR, key)
  shapes = _expected_shapes(tuple(shape[:-1]), shape[-1], top_k)
  prefixes = [f"epoch_{epoch:04d}." for epoch in range(epochs)]
  if _exists(folder):
    for prefix in prefixes:
      _read(folder, prefix, shapes)
    logging.info("reusing the teacher's logits of every view from %s", folder)
  else:
    # Every process runs the teacher (its steps are collective); process 0
    # writes, and the others read what it wrote.
    primary = jax.process_index() == 0
    staging = _staging_folder(root, key) if primary else None
    for epoch, prefix in enumerate(prefixes):
      stored = encode(np.asarray(compute_epoch(epoch)), top_k, dtype)
      if primary:
        _write(staging, prefix, stored)
    if primary:
      _publish(staging, folder, {"kind": "consistent", "epochs": epochs, "top_k": top_k})
    parallel.sync(f"teacher-logit cache {key} written")

  def read_epoch(epoch: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(a) for name, a in _read(folder, prefixes[epoch], shapes).items()}

  return read_epoch, folder


def _exists(folder: str) -> bool:
  """Whether a cache is there, as every process sees it before any writes one.

  All processes must agree, since computing a cache runs collective steps;
  multi-host runs need the workdir on a filesystem they share.
  """
  exists = os.path.isdir(folder)
  parallel.sync(f"looked for {folder}")
  return exists


def _staging_folder(root: str, key: str) -> str:
  """A temporary folder beside the cache, renamed into place when whole."""
  parent = os.path.join(os.path.abspath(root), CACHE_DIR)
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{key}-", dir=parent)


def _publish(staging: str, folder: str, meta: dict) -> None:
  """Renames a whole staging folder into place (atomic on one filesystem)."""
  with open(os.path.join(staging, "meta.json"), "w") as f:
    json.dump(meta, f)
  try:
    os.rename(staging, folder)
  except OSError:  # another process finished the same cache first
    shutil.rmtree(staging)
  logging.info("stored the teacher's logits in %s", folder)


def size_on_disk(folder: str) -> int:
  """Bytes of the files under a folder."""
  return sum(
      os.path.getsize(os.path.join(parent, name))
      for parent, _, names in os.walk(folder)
      for name in names
  )


def load_foreign(logits_dir: str, train_files: tuple[str, ...], num_classes: int) -> np.ndarray:
  """Teacher logits made by another tool: one .npy per training image.

  The logits of data.dir/train/cat/0001.jpg are read from
  logits_dir/train/cat/0001.npy (the image's path relative to data.dir, with
  .npy for its suffix), each holding `num_classes` numbers. Only plain numeric
  arrays load (no pickles). Returns float32 logits, one row per training image.
  """
  logits_dir = os.path.expanduser(logits_dir)
  if not os.path.isdir(logits_dir):
    raise UserInputError(f"data.teacher_logits_dir {logits_dir} does not exist or is not a folder")
  paths = [os.path.join(logits_dir, os.path.splitext(f)[0] + ".npy") for f in train_files]
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise UserInputError(
        f"{len(missing)} of {len(paths)} teacher-logit files are missing from "
        f"{logits_dir}, e.g. {', '.join(missing[:3])}: write one .npy of "
        f"{num_classes} logits per training image"
    )
  logits = np.empty((len(paths), num_classes), np.float32)
  for row, path in enumerate(paths):
    try:
      array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise UserInputError(f"teacher-logit file {path} is not a plain .npy array ({e})") from None
    if array.size != num_classes or array.dtype.kind not in "fiu":
      raise UserInputError(
          f"teacher-logit file {path} holds {array.dtype} {array.shape}, not "
          f"{num_classes} logits (one per class, in sorted class-folder order)"
      )
    logits[row] = array.reshape(num_classes)
  if not np.isfinite(logits).all():
    bad = paths[int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])]
    raise UserInputError(f"teacher-logit file {bad} holds NaN or infinite values")
  return logits
