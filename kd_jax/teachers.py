"""Where a distilling student's step gets its teacher's logits: one object per kind.

All kinds have one interface, `Teacher`: `batches` gives the training data's
batches with whatever the teacher needs beside them, and `logits`, traced
inside the train step, gives a batch's teacher logits. `variables` is the
step's teacher argument, passed to it rather than closed over, so that one
teacher serves every student without being compiled into it.

  OnlineTeacher  a network run in inference mode inside the step, on the
                 student's own view of each batch; it alone also gives its
                 features, for feature methods.
  StoredLogits   one stored prediction per training example (offline
                 distillation, plain cache or another tool's logits).
  StoredViews    the stored predictions for exactly the views a student of
                 one seed sees at each step (offline, consistent cache).
"""

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np

from kd_jax import evaluate, parallel, teacher_cache
from kd_jax.data.placement import TrainingData
from kd_jax.network import Network, Variables


class Teacher(Protocol):
  """A teacher as the train step sees it."""

  variables: Variables | None

  def batches(
      self, data: TrainingData, seed: int, epoch: int, start: int, batch_size: int
  ) -> Iterator[dict]:
    """The batches of steps `start`.. of `epoch`, each with what `logits` reads from it."""

  def logits(self, variables: Variables | None, batch: dict, x_BxHxWxC: jax.Array) -> jax.Array:
    """The float32 teacher logits of `batch`, whose student view is `x_BxHxWxC` (traced)."""


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
  """A trained network that runs inside the student's step, frozen, on the student's view."""

  network: Network
  variables: Variables

  def batches(self, data, seed, epoch, start, batch_size) -> Iterator[dict]:
    """The data's own batches: the teacher needs nothing stored."""
    return data.train_batches(seed, epoch, start, batch_size)

  def logits(self, variables, batch, x_BxHxWxC):
    """The network's inference-mode logits of the student's view."""
    del batch
    return self.network.apply(variables, x_BxHxWxC, train=False)[0]

  def logits_and_features(self, variables, batch, x_BxHxWxC):
    """The network's inference-mode logits and named features of the student's view."""
    del batch
    return self.network.apply_with_features(variables, x_BxHxWxC, train=False)[:2]


@dataclasses.dataclass(frozen=True)
class StoredLogits:
  """One stored prediction per training example, in `teacher_cache.encode`'s form.

  `per_example` is placed by the data's `put_per_example` once, and every
  student that distils from it shares that copy.
  """

  per_example: Any
  num_classes: int
  variables = None

  @classmethod
  def place(cls, data: TrainingData, stored: dict[str, np.ndarray]) -> "StoredLogits":
    """`stored` (every example, one-process order) placed where `data`'s batches find it."""
    return cls(data.put_per_example(stored), data.num_classes)

  def batches(self, data, seed, epoch, start, batch_size) -> Iterator[dict]:
    """The data's batches, each with its examples' stored rows as "teacher_logits"."""
    return data.train_batches(seed, epoch, start, batch_size, self.per_example)

  def logits(self, variables, batch, x_BxHxWxC):
    """The batch's stored logits, decoded."""
    del variables, x_BxHxWxC
    return teacher_cache.decode(batch["teacher_logits"], self.num_classes)


@dataclasses.dataclass(frozen=True)
class StoredViews:
  """The stored logits of every view the student of `seed` sees, epoch by epoch.

  `read_epoch(epoch)` gives that epoch's, steps x batch x classes in
  `teacher_cache.encode`'s form; they hold for that seed's batch order and
  augmentation draws alone.
  """

  read_epoch: Callable[[int], dict[str, np.ndarray]]
  seed: int
  num_classes: int
  mesh: Any
  variables = None

  def batches(self, data, seed, epoch, start, batch_size) -> Iterator[dict]:
    """The data's batches, each with the stored logits of its step as "teacher_logits"."""
    if seed != self.seed:
      raise ValueError(f"these teacher views are of seed {self.seed}'s student, not seed {seed}'s")
    views = self.read_epoch(epoch)
    steps = data.steps_per_epoch(batch_size)
    view_logits = jax.device_put(
        [jax.tree.map(lambda a: a[p], views) for p in range(start, steps)],
        parallel.batch_sharding(self.mesh),
    )
    for batch, logits in zip(data.train_batches(seed, epoch, start, batch_size), view_logits):
      yield {**batch, "teacher_logits": logits}

  def logits(self, variables, batch, x_BxHxWxC):
    """The step's stored logits, decoded."""
    del variables, x_BxHxWxC
    return teacher_cache.decode(batch["teacher_logits"], self.num_classes)


def plain_logits(
    teacher: OnlineTeacher, data: TrainingData, cache: "CacheSpec", batch_size: int, mesh
) -> tuple[StoredLogits, str]:
  """The teacher's logits of every unaugmented training image, from the cache or computed.

  Returns (the teacher for the student's step, the cache folder).
  """
  key = teacher_cache.fingerprint(
      teacher.variables,
      cache.data_digest,
      cache.dtype,
      "plain",
      cache.top_k,
      data.mean_C.tolist(),  # the teacher's input: data.mean/std may be given
      data.std_C.tolist(),
  )
  forward = evaluate.jit_forward(teacher.network, data.mean_C, data.std_C, mesh)
  stored, folder = teacher_cache.load_or_compute(
      cache.root,
      key,
      data.num_train,
      data.num_classes,
      lambda: data.predict(forward, teacher.variables, "train", batch_size)[0],
      dtype=cache.dtype,
      top_k=cache.top_k,
  )
  return StoredLogits.place(data, stored), folder


def consistent_views(
    teacher: OnlineTeacher, data: TrainingData, cache: "CacheSpec", seed: int, stage_config, mesh
) -> tuple[StoredViews, str]:
  """The teacher's logits of every view the student of `seed` will see, from the cache or computed.

  Each view is a pure function of (seed, step): they are made now exactly as
  the student's step will make them, from the data's batches and its
  `student_view`. Returns (the teacher for that student's step, the cache folder).
  """
  batch_size, epochs = stage_config.batch_size, stage_config.epochs
  steps = data.steps_per_epoch(batch_size)
  key = teacher_cache.fingerprint(
      teacher.variables,
      cache.data_digest,
      cache.dtype,
      "consistent",
      cache.augment,
      seed,
      batch_size,
      epochs,
      cache.top_k,
      data.mean_C.tolist(),
      data.std_C.tolist(),
  )

  def view_logits(variables, images_BxHxWxC, step):
    return teacher.logits(variables, {}, data.student_view(seed, step, images_BxHxWxC))

  teacher_on_view = parallel.in_order(jax.jit(view_logits, out_shardings=parallel.replicated(mesh)))

  def compute_epoch(epoch):
    batches = data.train_batches(seed, epoch, 0, batch_size)
    logits = [
        teacher_on_view(teacher.variables, batch["image"], epoch * steps + position)
        for position, batch in enumerate(batches)
    ]
    return np.stack(jax.device_get(logits))

  read_epoch, folder = teacher_cache.load_or_compute_views(
      cache.root,
      key,
      epochs,
      (steps, batch_size, data.num_classes),
      compute_epoch,
      dtype=cache.dtype,
      top_k=cache.top_k,
  )
  return StoredViews(read_epoch, seed, data.num_classes, mesh), folder


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Where and how the teacher's logits are stored, and what names the data they are of."""

  root: str  # teacher_cache.cache_root's
  dtype: str
  top_k: int
  data_digest: bytes  # the dataset's `digest()`
  augment: str  # data.augment
