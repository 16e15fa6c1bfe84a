"""Per-epoch metrics of a stage: metrics.jsonl and TensorBoard event files."""

import json
import os

import jax
from tensorboardX import SummaryWriter


class StageLog:
  """Appends one record per epoch to <stage_dir>/metrics.jsonl and TensorBoard.

  Only process 0 writes, so a multi-host run logs once.
  """

  def __init__(self, stage_dir: str):
    self._writes = jax.process_index() == 0
    if self._writes:
      os.makedirs(stage_dir, exist_ok=True)
      self._jsonl = open(os.path.join(stage_dir, "metrics.jsonl"), "a")
      self._tensorboard = SummaryWriter(os.path.join(stage_dir, "tensorboard"))

  def write(self, epoch: int, metrics: dict) -> None:
    """Records one epoch's metrics (flat dict of floats)."""
    if not self._writes:
      return
    self._jsonl.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, value, epoch)
    self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._writes:
      self._jsonl.close()
      self._tensorboard.close()
