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
import numpy as np
from absl import logging

from kd_jax.errors import UserInputError

CACHE_DIR = "teacher_logits"
LOGITS_FILE = "logits.npy"
DTYPES = ("float16", "float32")


def fingerprint(
    teacher_variables, images: np.ndarray, labels: np.ndarray, dtype: str, *settings
) -> str:
  """A hash of everything the cached logits depend on.

  `settings` add what else decides them (for consistent views: the
  augmentation, seed, batch size and epochs).
  """
  digest = hashlib.sha256(json.dumps([dtype, *settings]).encode())
  for leaf in jax.tree.leaves(jax.device_get(teacher_variables)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(np.ascontiguousarray(labels).tobytes())
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


def load_or_compute(
    root: str, key: str, num_examples: int, num_classes: int, dtype: str, compute
) -> tuple[np.ndarray, str]:
  """The cached logits for `key`, computing and storing them if absent.

  `compute()` returns float32 logits (num_examples x num_classes). Returns
  (logits as stored, the cache folder).
  """
  if dtype not in DTYPES:
    raise UserInputError(f"distill.cache_dtype={dtype!r}; use one of {', '.join(DTYPES)}")
  folder = os.path.join(os.path.abspath(root), CACHE_DIR, key)
  path = os.path.join(folder, LOGITS_FILE)
  if os.path.exists(path):
    logits = np.load(path, allow_pickle=False)
    if logits.shape != (num_examples, num_classes):
      raise UserInputError(
          f"teacher-logit cache {path} holds {logits.shape}, not ({num_examples}, "
          f"{num_classes}); delete {folder} to rebuild it"
      )
    logging.info("reusing the teacher's logits from %s", folder)
    return logits, folder
  logits = np.asarray(compute(), dtype=dtype)
  staging = _staging_folder(root, key)
  np.save(os.path.join(staging, LOGITS_FILE), logits, allow_pickle=False)
  _publish(staging, folder, {"shape": list(logits.shape), "dtype": dtype, "kind": "plain"})
  return logits, folder


def load_or_compute_views(
    root: str, key: str, epochs: int, shape: tuple, dtype: str, compute_epoch
) -> tuple[Callable[[int], np.ndarray], str]:
  """Consistent views: the teacher's logits for each step's augmented batch.

  `compute_epoch(epoch)` returns float32 logits of shape `shape` (steps x
  batch x classes). All epochs are computed and stored at once, when absent.
  Returns (a reader epoch -> logits, the cache folder).
  """
  if dtype not in DTYPES:
    raise UserInputError(f"distill.cache_dtype={dtype!r}; use one of {', '.join(DTYPES)}")
  folder = os.path.join(os.path.abspath(root), CACHE_DIR, key)
  paths = [os.path.join(folder, f"epoch_{epoch:04d}.npy") for epoch in range(epochs)]
  if os.path.isdir(folder):
    for path in paths:
      if not os.path.exists(path):
        raise UserInputError(
            f"teacher-logit cache {folder} lacks {os.path.basename(path)}; "
            f"delete {folder} to rebuild it"
        )
      stored = np.load(path, mmap_mode="r", allow_pickle=False).shape
      if stored != tuple(shape):
        raise UserInputError(
            f"teacher-logit cache {path} holds {stored}, not {tuple(shape)}; "
            f"delete {folder} to rebuild it"
        )
    logging.info("reusing the teacher's logits of every view from %s", folder)
  else:
    staging = _staging_folder(root, key)
    for epoch in range(epochs):
      np.save(
          os.path.join(staging, os.path.basename(paths[epoch])),
          np.asarray(compute_epoch(epoch), dtype=dtype),
          allow_pickle=False,
      )
    _publish(
        staging,
        folder,
        {"shape": list(shape), "dtype": dtype, "kind": "consistent", "epochs": epochs},
    )
  return (lambda epoch: np.load(paths[epoch], allow_pickle=False)), folder


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
  """Bytes of the files in a cache folder."""
  return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
