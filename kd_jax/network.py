"""A Flax NNX model split at the jit boundary: static graphs plus arrays."""

import dataclasses

import flax.struct
import jax
from flax import nnx

from kd_jax import models


@flax.struct.dataclass
class Variables:
  """A model's arrays: trainable parameters and batch-norm statistics."""

  params: nnx.State
  batch_stats: nnx.State


@dataclasses.dataclass(frozen=True)
class Network:
  """A model's static graphs, one per mode; the arrays travel separately.

  Keeping arrays out of the graph lets jitted functions take them as plain
  pytrees, so steps stay pure and the teacher can be an argument.
  """

  name: str
  train_graph: nnx.GraphDef
  eval_graph: nnx.GraphDef

  def apply(self, variables: Variables, images_BxHxWxC: jax.Array, *, train: bool):
    """Runs the model; returns (logits, batch statistics after the pass)."""
    graph = self.train_graph if train else self.eval_graph
    model = nnx.merge(graph, variables.params, variables.batch_stats, copy=True)
    logits = model(images_BxHxWxC)
    return logits, nnx.state(model, nnx.BatchStat)


def create_network(
    model_name: str, *, num_classes: int, in_channels: int, seed: int, width_multiplier: float = 1.0
) -> tuple[Network, Variables]:
  """Builds a registered model, initialised from `seed`, split for jit."""
  model = models.create_model(
      model_name,
      num_classes=num_classes,
      in_channels=in_channels,
      rngs=nnx.Rngs(seed),
      width_multiplier=width_multiplier,
  )
  model.eval()
  eval_graph, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.train()
  train_graph, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return Network(model_name, train_graph, eval_graph), Variables(params, batch_stats)
