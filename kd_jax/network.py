"""A Flax NNX model split at the jit boundary: static graphs plus arrays."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax import layers, models, native
from kd_jax.errors import UserInputError


@flax.struct.dataclass
class Variables:
  """A model's arrays: trainable parameters and batch-norm statistics."""

  params: nnx.State
  batch_stats: nnx.State


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_compute_dtype(name: str) -> str:
  """config.compute_dtype as a dtype name; 'auto' picks by the devices.

  bfloat16 on GPUs and TPUs, whose matrix units run it at several times the
  float32 rate; float32 on CPUs, which only emulate bfloat16.
  """
  if name not in COMPUTE_DTYPES:
    raise UserInputError(f"unknown compute_dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}")
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


# How the log and the report name each way to run convolutions (`layers.use_convolutions`).
CONVOLUTION_NAMES = {"onednn": "oneDNN (CPU)", "xla": "XLA"}


def choose_convolutions(model: nnx.Module, compute_dtype: str) -> str:
  """The 3x3 convolutions `model` runs here in `compute_dtype`, "onednn" or "xla".

  oneDNN's (`kd_jax.native`) for float32 on a single CPU device where the library is
  built and the model has kd_jax's 3x3 layers (`layers.use_convolutions`): XLA:CPU's own
  run 1.4-4x slower (BENCHMARKS.md), and the native call has no rule for splitting a batch
  over devices. XLA's own everywhere else.
  """
  if (
      any(isinstance(m, layers.CONV3X3_LAYERS) for _, m in nnx.iter_modules(model))
      and compute_dtype == "float32"
      and jax.default_backend() == "cpu"
      and jax.device_count() == 1
      and native.available()
  ):
    return "onednn"
  return "xla"


@dataclasses.dataclass(frozen=True)
class Network:
  """A model's static graphs, one per mode; the arrays travel separately.

  Keeping arrays out of the graph lets jitted functions take them as plain
  pytrees, so steps stay pure and the teacher can be an argument. Its layers
  compute in `compute_dtype` and run `convolutions` (`layers.use_convolutions`).
  """

  name: str
  train_graph: nnx.GraphDef
  eval_graph: nnx.GraphDef
  compute_dtype: str = "float32"
  convolutions: str = "xla"

  def apply(self, variables: Variables, inputs, *, train: bool):
    """Runs the model on images, or a connector (kd_jax.connectors) on the arrays it takes.

    Returns:
      (the outputs in float32: a model's logits, a connector's arrays; batch statistics
      after the pass).
    """
    model = self._merge(variables, train)
    outputs = model(jax.tree.map(lambda x: x.astype(self.compute_dtype), inputs))
    return jax.tree.map(lambda y: y.astype(jnp.float32), outputs), nnx.state(model, nnx.BatchStat)

  def apply_with_features(self, variables: Variables, images_BxHxWxC: jax.Array, *, train: bool):
    """Runs the model's `with_features` (kd_jax.models), for feature-based distillation.

    Returns:
      (float32 logits, the named features in the compute dtype, batch statistics after the
      pass).
    """
    model = self._merge(variables, train)
    logits, features = model.with_features(images_BxHxWxC.astype(self.compute_dtype))
    return logits.astype(jnp.float32), features, nnx.state(model, nnx.BatchStat)

  def portable(self) -> "Network":
    """This network on XLA's convolutions, as an exported model holds it.

    XLA's cost analysis sees into it, where it cannot into oneDNN's calls.
    """
    return dataclasses.replace(self, convolutions="xla")

  def biases_of(self, variables: Variables, module_type: type):
    """Which of `variables.params` are biases of `module_type` modules (e.g. nnx.BatchNorm).

    A tree of bools shaped as the parameters, for an optimiser's masks.
    """
    model = self._merge(variables, train=True)
    owners = {path for path, module in nnx.iter_modules(model) if isinstance(module, module_type)}

    def is_owned_bias(key_path, _) -> bool:
      names = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
      return names[-1] == "bias" and names[:-1] in owners

    return jax.tree_util.tree_map_with_path(is_owned_bias, variables.params)

  def _merge(self, variables: Variables, train: bool) -> nnx.Module:
    graph = self.train_graph if train else self.eval_graph
    model = nnx.merge(graph, variables.params, variables.batch_stats, copy=True)
    layers.use_convolutions(model, self.convolutions)
    return model


def create_network(
    model_name: str,
    *,
    num_classes: int,
    in_channels: int,
    seed: int,
    width_multiplier: float = 1.0,
    compute_dtype: str = "float32",
) -> tuple[Network, Variables]:
  """Builds a registered model (or a user's factory's), initialised from `seed`, split for jit."""
  model = models.create_model(
      model_name,
      num_classes=num_classes,
      in_channels=in_channels,
      rngs=nnx.Rngs(seed),
      width_multiplier=width_multiplier,
  )
  return split_model(model_name, model, compute_dtype)


def split_model(
    name: str, model: nnx.Module, compute_dtype: str = "float32"
) -> tuple[Network, Variables]:
  """A built model as a Network named `name` and its Variables.

  With `compute_dtype` bfloat16, layers compute in bfloat16 while parameters
  and batch statistics stay float32 (mixed precision: the optimizer updates
  float32 master weights, and batch-norm statistics reduce in float32). Its
  convolutions are chosen here, once (`choose_convolutions`).
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.Conv, nnx.Linear, nnx.BatchNorm)):
      module.dtype = jnp.dtype(compute_dtype)
  model.eval()
  eval_graph, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.train()
  train_graph, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  network = Network(
      name, train_graph, eval_graph, compute_dtype, choose_convolutions(model, compute_dtype)
  )
  return network, Variables(params, batch_stats)
