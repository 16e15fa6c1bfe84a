"""Data parallelism, declared once: a 1-D device mesh with a 'data' axis.

Batches are split along 'data'; parameters, optimizer state and the dataset
held in device memory are replicated. jit then inserts the collectives, so
batch-norm statistics and gradients are over the global batch, exactly as on
one device. The same code runs on one CPU and on many accelerators.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax.errors import UserInputError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A mesh over all devices with one axis, 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, key: str, mesh: Mesh) -> None:
  """A global batch must split evenly over the devices; else name valid sizes."""
  devices = mesh.size
  if batch_size <= 0 or batch_size % devices:
    lower = max(devices, batch_size // devices * devices)
    raise UserInputError(
        f"{key}={batch_size} does not split evenly over {devices} devices; "
        f"use a multiple of {devices}, e.g. {lower} or {lower + devices}"
    )
