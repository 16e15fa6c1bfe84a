"""Orbax checkpoints of a stage: model arrays, optimizer state and JSON metadata.

Each checkpoint holds three items, so a teacher can be restored without
knowing the optimizer it was trained with:
  model  the Variables (params and batch statistics)
  train  the step and the optimizer state
  meta   JSON: model name, class count, epochs done, per-epoch history
"""

import os

import jax
import orbax.checkpoint as ocp

from kd_jax.errors import UserInputError
from kd_jax.network import Variables

CHECKPOINTS = "checkpoints"


def _abstract(tree):
  """Shapes, dtypes and shardings of a pytree of arrays: what to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class StageCheckpoints:
  """The checkpoints of one stage, in <stage_dir>/checkpoints/<step>/.

  Saving is asynchronous: `save` returns once the arrays are copied off the
  devices, and the files are written while training goes on.
  """

  def __init__(self, stage_dir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(stage_dir), CHECKPOINTS)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
        ),
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, variables: Variables, train: dict, meta: dict) -> None:
    """Starts writing a checkpoint of `step`."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        ),
    )

  def restore(self, step: int, variables: Variables, train: dict):
    """Restores `step` into the structure and shardings of the given templates.

    Returns (variables, train, meta).
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(variables)),
            train=ocp.args.StandardRestore(_abstract(train)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored.model, restored.train, restored.meta

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def read_meta(path: str) -> tuple[str, int, dict]:
  """Finds a stage's newest checkpoint under `path`; returns (dir, step, meta).

  `path` may be a stage folder or its checkpoints/ folder.
  """
  directory = os.path.abspath(path)
  if os.path.isdir(os.path.join(directory, CHECKPOINTS)):
    directory = os.path.join(directory, CHECKPOINTS)
  if not os.path.isdir(directory):
    raise UserInputError(
        f"checkpoint path {path!r} does not exist; point it at a kd_jax "
        f"stage folder such as WORKDIR/teacher"
    )
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    raise UserInputError(
        f"no complete checkpoint in {directory!r}; point it at a kd_jax "
        f"stage folder such as WORKDIR/teacher"
    )
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  manager.close()
  return directory, step, meta


def restore_variables(path: str, variables: Variables) -> tuple[Variables, dict]:
  """Restores only the model arrays of a stage's newest checkpoint.

  `variables` gives the expected structure and shardings. Returns
  (variables, meta).
  """
  directory, step, meta = read_meta(path)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
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
