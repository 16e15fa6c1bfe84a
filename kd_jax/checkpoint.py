"""Orbax checkpoints of a stage: model arrays, optimizer state and JSON metadata.

Each checkpoint holds three items, so a teacher can be restored without
knowing the optimizer it was trained with:
  model  the Variables (params and batch statistics)
  train  the step and the optimizer state
  meta   JSON: model name, class count, epochs done, per-epoch history, ...

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a run killed mid-write leaves nothing that is taken for whole.
"""

import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from kd_jax import parallel
from kd_jax.errors import UserInputError
from kd_jax.network import Variables

CHECKPOINTS = "checkpoints"
BEST_METRIC = "test_top1"


def _abstract(tree):
  """Shapes, dtypes and shardings of a pytree of arrays: what to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class StageCheckpoints:
  """The checkpoints of one stage, in <stage_dir>/checkpoints/<step>/.

  Keeps the newest `keep` checkpoints plus the best by test accuracy. Saving
  is asynchronous: `save` returns once the arrays are copied off the devices,
  and the files are written while training goes on. Used as a context
  manager, it is closed (pending writes finished) on every way out.
  """

  def __init__(self, stage_dir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(stage_dir), CHECKPOINTS)
    preserve = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=keep),
            policies.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=True, preservation_policy=preserve
        ),
    )

  def save(self, step: int, variables: Variables, train: dict, meta: dict, test_top1=None) -> None:
    """Starts writing a checkpoint of `step`; `test_top1` ranks epoch ends."""
    # Host copies: Orbax writes NumPy arrays in half the time of device arrays (for
    # those it plans shards and replicas, which a replicated state does not need).
    variables, train = parallel.host_copy((variables, train))
    self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=None if test_top1 is None else {BEST_METRIC: test_top1},
    )

  def restore_latest(self, variables: Variables, train: dict):
    """The newest checkpoint that reads back whole, or None if there is none.

    `variables` and `train` are templates giving structure and shardings (the
    current mesh's, so a checkpoint from another device layout fits). A
    damaged checkpoint is named in a warning and the one before it used; the
    damaged folder is then renamed to <step>.damaged, kept for inspection,
    so that training can write that step again. Returns (variables, train, meta).
    """
    failures = {}
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract(variables)),
                train=ocp.args.StandardRestore(_abstract(train)),
                meta=ocp.args.JsonRestore(),
            ),
        )
      except Exception as e:  # pylint: disable=broad-except
        # Truncated or overwritten files fail in many ways (JSON, TensorStore, shapes).
        failures[step] = str(e).splitlines()[0] if str(e) else type(e).__name__
        logging.warning(
            "checkpoint %s/%d cannot be restored (%s); trying the one before it",
            self.directory,
            step,
            failures[step],
        )
        continue
      # An older checkpoint fits, so the newer ones are damaged rather than
      # written by another config; move them aside so their steps can be saved anew.
      if jax.process_index() == 0:
        for bad in failures:
          os.rename(
              os.path.join(self.directory, str(bad)), os.path.join(self.directory, f"{bad}.damaged")
          )
      parallel.sync(f"set aside damaged checkpoints of {self.directory}")
      self._manager.reload()
      return restored.model, restored.train, restored.meta
    if failures:
      step, reason = next(iter(failures.items()))
      raise UserInputError(
          f"no checkpoint in {self.directory} can be restored (step {step}: {reason}); if the "
          f"model or optimizer settings changed, use another workdir, else move the damaged "
          f"folder away"
      )
    return None

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "StageCheckpoints":
    return self

  def __exit__(self, *exc_info) -> None:
    """Closes the checkpoints however the block ends, so no save is left half written."""
    self.close()


def _find_checkpoints(path: str) -> str:
  """A stage folder or its checkpoints/ folder -> the checkpoints/ folder."""
  directory = os.path.abspath(path)
  if os.path.isdir(os.path.join(directory, CHECKPOINTS)):
    directory = os.path.join(directory, CHECKPOINTS)
  if not os.path.isdir(directory):
    raise UserInputError(
        f"checkpoint path {path!r} does not exist; point it at a kd_jax "
        f"stage folder such as WORKDIR/teacher"
    )
  return directory


def restore_variables(path: str, variables: Variables, check_meta) -> tuple[Variables, dict]:
  """Restores only the model arrays of the newest checkpoint under `path`.

  `path` is a stage folder or its checkpoints/ folder; `variables` gives the
  expected structure and shardings. `check_meta(meta)` runs before the arrays
  are read, to refuse a checkpoint of another model with a clear message.
  Returns (variables, meta).
  """
  directory = _find_checkpoints(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise UserInputError(
          f"no complete checkpoint in {directory!r}; point it at a kd_jax "
          f"stage folder such as WORKDIR/teacher"
      )
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_meta(meta)
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(variables)))
      )
    except (ValueError, KeyError) as e:
      raise UserInputError(
          f"checkpoint {directory}/{step} does not fit model "
          f"{meta.get('model')!r}: {str(e).splitlines()[0]}"
      ) from e
  finally:
    manager.close()
  return restored.model, meta
