"""Data parallelism, declared once: a 1-D device mesh with a 'data' axis.

Batches are split along 'data', and so are the images held in device memory
(each process holds its share); parameters and optimizer state are
replicated. jit then inserts the collectives, so batch-norm statistics and
gradients are over the global batch, exactly as on one device. The same code
runs on one CPU, on many accelerators and on many hosts.
"""

import functools
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kd_jax.errors import UserInputError

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Joins the processes of a multi-host run, before anything else touches JAX.

  With the three settings given, connects to the coordinator at HOST:PORT as
  process `process_id` of `num_processes`. With none, lets JAX detect a
  cluster (Cloud TPU, SLURM, ...) and runs as one process where it finds none.
  CPU devices talk through gloo, so the same runs work on CPU-only hosts.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(value is not None for value in given) and None in given:
    raise UserInputError(
        "a multi-host run needs all of --coordinator_address=HOST:PORT, "
        "--num_processes=N and --process_id=I (or none, to detect a cluster)"
    )
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    if coordinator_address is not None or "coordinator_address" not in str(e):
      raise UserInputError(f"cannot start the multi-host run: {e}") from None
    logging.info("no cluster detected: running as one process")
    return
  logging.info(
      "process %d of %d, %d local devices of %d",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def allgather(x: np.ndarray) -> np.ndarray:
  """Every process's `x` concatenated along axis 0, in process order, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def in_order(fn: Callable) -> Callable:
  """`fn` (a jitted function), made to finish before it returns on multi-host CPU runs.

  The CPU runtime runs programs that do not depend on each other (the next
  batch's gather and this batch's step, say) at the same time, so two
  processes could enter their collectives in different orders and wait on
  each other forever. Accelerators run each device's programs in order, and
  one process has no one to wait for: both keep asynchronous dispatch.
  """
  if jax.process_count() == 1 or jax.devices()[0].platform != "cpu":
    return fn

  @functools.wraps(fn)
  def wait_for(*args, **kwargs):
    return jax.block_until_ready(fn(*args, **kwargs))

  return wait_for


def local_replica(tree):
  """A replicated tree's copy on this process's first device, readable on the host.

  In a multi-host run a replicated array spans devices of other processes,
  which the host cannot read directly. Leaves already on the host stay as they are.
  """
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def host_copy(tree):
  """A replicated tree as NumPy arrays, read from this process's own copy."""
  return jax.device_get(local_replica(tree))


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


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
