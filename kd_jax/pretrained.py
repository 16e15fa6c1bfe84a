"""Pretrained weights: PyTorch state dicts with torchvision's names, read from safetensors.

A torchvision (or timm) ResNet-18/34/50 or MobileNetV2 state dict, saved with
`safetensors.torch.save_file`, loads into kd_jax's model of the same name:
convolution kernels go from PyTorch's (out, in, h, w) to (h, w, in, out), linear
weights are transposed, and batch-norm running statistics become kd_jax's batch
statistics. Files are data, never code: pickled PyTorch files are refused.
"""

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from flax import nnx

from kd_jax import models
from kd_jax.errors import UserInputError
from kd_jax.network import Network, Variables, split_model

# The models a weights file loads into, each with its classifier's weight name.
HEAD_WEIGHTS = {
    "resnet18": "fc.weight",
    "resnet34": "fc.weight",
    "resnet50": "fc.weight",
    "mobilenet_v2": "classifier.1.weight",
}
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")
# PyTorch's batch-norm step counters: in every state dict, read by nothing here.
_IGNORED_SUFFIX = ".num_batches_tracked"
_SHOWN = 3  # names shown per kind of mismatch

# torch name -> (the model's variable, the axes permutation from PyTorch's layout or None)
Targets = dict[str, tuple[nnx.Variable, tuple[int, ...] | None]]


def _conv(prefix: str, conv: nnx.Module) -> Targets:
  return {f"{prefix}.weight": (conv.kernel, (2, 3, 1, 0))}  # OIHW -> HWIO


def _bn(prefix: str, bn: nnx.BatchNorm) -> Targets:
  return {
      f"{prefix}.weight": (bn.scale, None),
      f"{prefix}.bias": (bn.bias, None),
      f"{prefix}.running_mean": (bn.mean, None),
      f"{prefix}.running_var": (bn.var, None),
  }


def _linear(prefix: str, fc: nnx.Linear) -> Targets:
  return {f"{prefix}.weight": (fc.kernel, (1, 0)), f"{prefix}.bias": (fc.bias, None)}


def _resnet_targets(model: models.ImageNetResNet) -> Targets:
  """torchvision.models.resnet's names: conv1, bn1, layer<s>.<b>.conv<k>/bn<k>/downsample, fc."""
  targets = {**_conv("conv1", model.stem_conv), **_bn("bn1", model.stem_bn)}
  blocks = iter(model.blocks)
  for stage, count in enumerate(model.blocks_per_stage, start=1):
    for index in range(count):
      block, prefix = next(blocks), f"layer{stage}.{index}"
      for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        layer = getattr(block, name, None)  # conv3 and bn3: Bottleneck only
        if layer is not None:
          targets.update((_bn if name.startswith("bn") else _conv)(f"{prefix}.{name}", layer))
      if block.shortcut is not None:
        conv, bn = block.shortcut.layers
        targets.update(_conv(f"{prefix}.downsample.0", conv))
        targets.update(_bn(f"{prefix}.downsample.1", bn))
  return targets


def _mobilenet_targets(model: models.MobileNetV2) -> Targets:
  """torchvision.models.mobilenetv2's names: features.<i>..., classifier.1."""
  targets = {**_conv("features.0.0", model.stem_conv), **_bn("features.0.1", model.stem_bn)}
  for index, block in enumerate(model.blocks, start=1):
    # conv.<k>.0/1: the conv-BN-ReLU6 pairs (expansion, if any, then depthwise);
    # conv.<k> and conv.<k+1>: the projection and its batch norm.
    pairs = [] if block.expand is None else [tuple(block.expand.layers)]
    pairs.append((block.depthwise, block.bn))
    prefix = f"features.{index}.conv"
    for k, (conv, bn) in enumerate(pairs):
      targets.update(_conv(f"{prefix}.{k}.0", conv))
      targets.update(_bn(f"{prefix}.{k}.1", bn))
    targets.update(_conv(f"{prefix}.{len(pairs)}", block.project))
    targets.update(_bn(f"{prefix}.{len(pairs) + 1}", block.project_bn))
  last = len(model.blocks) + 1
  targets.update(_conv(f"features.{last}.0", model.head_conv))
  targets.update(_bn(f"features.{last}.1", model.head_bn))
  return targets


def _targets(model: nnx.Module) -> tuple[Targets, set[str]]:
  """The torch names of `model`'s variables, and those of its classifier head."""
  if isinstance(model, models.ImageNetResNet):
    body, head = _resnet_targets(model), _linear("fc", model.fc)
  elif isinstance(model, models.MobileNetV2):
    body, head = _mobilenet_targets(model), _linear("classifier.1", model.fc)
  else:
    raise UserInputError(
        f"weights files load into {', '.join(HEAD_WEIGHTS)} only, not a {type(model).__name__}"
    )
  return {**body, **head}, set(head)


def _torch_shape(variable: nnx.Variable, axes: tuple[int, ...] | None) -> tuple[int, ...]:
  """The shape PyTorch gives the tensor that becomes `variable`."""
  shape = tuple(variable.shape)
  return shape if axes is None else tuple(shape[axes.index(i)] for i in range(len(shape)))


def _shown(names: list[str]) -> str:
  more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def _match(model: nnx.Module, shapes: Mapping[str, tuple[int, ...]], source: str) -> bool:
  """Checks a file's tensor names and shapes against `model`; returns whether the head differs.

  The classifier head may differ in its class count alone: it then keeps its
  fresh initialisation. Any other difference is an error naming the first few.
  """
  targets, head = _targets(model)
  wanted = {name: _torch_shape(variable, axes) for name, (variable, axes) in targets.items()}
  missing = [name for name in wanted if name not in shapes]
  unexpected = [n for n in shapes if n not in wanted and not n.endswith(_IGNORED_SUFFIX)]
  wrong = [n for n in wanted if n in shapes and tuple(shapes[n]) != wanted[n]]
  # A head for another class count differs in its first (class) axis only.
  fresh_head = head <= set(wrong) and all(tuple(shapes[n][1:]) == wanted[n][1:] for n in head)
  if fresh_head:
    wrong = [n for n in wrong if n not in head]
  problems = [
      f"{kind} {_shown(names)}"
      for kind, names in (("missing", missing), ("unexpected", unexpected))
      if names
  ]
  if wrong:
    problems.append(
        "wrong shape " + _shown([f"{n} {tuple(shapes[n])} (wants {wanted[n]})" for n in wrong])
    )
  if problems:
    raise UserInputError(
        f"{source} does not fit a {type(model).__name__} of this config: {'; '.join(problems)}; "
        f"it must be a torchvision (or timm) state dict of the same model"
    )
  return fresh_head


def _check_file(path: str, source: str) -> None:
  if path.lower().endswith(_PICKLE_SUFFIXES):
    out = os.path.splitext(path)[0] + ".safetensors"
    raise UserInputError(
        f"{source} is a pickled PyTorch file, which kd_jax never opens (unpickling runs code); "
        f"convert it once in your PyTorch: import torch, safetensors.torch; "
        f"safetensors.torch.save_file(torch.load({path!r}, map_location='cpu'), {out!r})"
    )
  if not os.path.isfile(path):
    raise UserInputError(f"{source}: no such file")


def read_shapes(path: str, source: str = "") -> dict[str, tuple[int, ...]]:
  """The tensor shapes a safetensors file holds, by name, from its header alone."""
  source = source or repr(path)
  _check_file(path, source)
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
  except Exception as e:  # a damaged or foreign file may fail in any way
    raise UserInputError(f"{source} is not a readable safetensors file: {e}") from None


def read_state_dict(path: str, source: str = "") -> dict[str, np.ndarray]:
  """The tensors of a safetensors file, by name, as NumPy arrays (no torch needed)."""
  source = source or repr(path)
  _check_file(path, source)
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # a damaged or foreign file may fail in any way
    raise UserInputError(f"{source} is not a readable safetensors file: {e}") from None


def assign(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> bool:
  """Copies a torchvision state dict into `model` in place; returns whether the head kept its init.

  Checks every name and shape first, so a file that does not fit changes nothing.
  """
  fresh_head = _match(model, {name: a.shape for name, a in tensors.items()}, source)
  targets, head = _targets(model)
  for name, (variable, axes) in targets.items():
    if not (fresh_head and name in head):
      array = tensors[name] if axes is None else np.transpose(tensors[name], axes)
      variable.set_value(jnp.asarray(array, jnp.float32))
  return fresh_head


def load(
    model_name: str, path: str, num_classes: int | None = None, *, seed: int = 0
) -> tuple[Network, Variables]:
  """A model initialised from a torchvision state dict in a safetensors file.

  Args:
    model_name: one of HEAD_WEIGHTS' names (resnet18, resnet34, resnet50, mobilenet_v2).
    path: the safetensors file.
    num_classes: logits of the model; None takes the file's class count. Another
      count than the file's gives a freshly initialised head (from `seed`).
    seed: random seed of the initialisation that a fresh head keeps.

  Returns:
    (network, variables): `network.apply(variables, images_BxHxWxC, train=False)[0]`
    are the logits of normalised float32 images (B, H, W, 3).
  """
  if model_name not in HEAD_WEIGHTS:
    raise UserInputError(
        f"weights files load into {', '.join(HEAD_WEIGHTS)}, not model {model_name!r}"
    )
  tensors = read_state_dict(path)
  head = HEAD_WEIGHTS[model_name]
  if num_classes is None:
    # Without a head in the file, any count does: `assign` then names the missing head.
    num_classes = tensors[head].shape[0] if head in tensors else 1
  model, _ = _model_with(
      tensors, repr(path), model_name, num_classes=num_classes, in_channels=3, seed=seed
  )
  return split_model(model_name, model)


def _model_with(
    tensors: Mapping[str, np.ndarray], source: str, model_name: str, *, seed: int, **shape
) -> tuple[nnx.Module, bool]:
  """(the model holding `tensors`, whether its head is for another class count).

  Only a head for another class count needs an initialisation (from `seed`); else every
  variable comes from the file, so the model is built as shapes alone and filled.
  """

  def build():
    return models.create_model(model_name, rngs=nnx.Rngs(seed), **shape)

  model = nnx.eval_shape(build)
  if _match(model, {name: a.shape for name, a in tensors.items()}, source):
    model = build()
  return model, assign(model, tensors, source)


def create_network(
    stage: str, stage_config, *, seed: int, num_classes: int, in_channels: int, compute_dtype: str
) -> tuple[Network, Variables]:
  """A stage's network: `stage_config.model` from its weights file if it has one, else from `seed`.

  `stage_config.weights` (if set) is a torchvision state dict in a safetensors
  file; a head for another class count is initialised from `seed`.
  """
  shape = dict(
      num_classes=num_classes,
      in_channels=in_channels,
      width_multiplier=stage_config.get("width_multiplier", 1.0),
  )
  path = stage_config.get("weights", "")
  if not path:
    model = models.create_model(stage_config.model, rngs=nnx.Rngs(seed), **shape)
  else:
    source = f"{stage}.weights={path!r}"
    tensors = read_state_dict(path, source)
    model, fresh_head = _model_with(tensors, source, stage_config.model, seed=seed, **shape)
    if fresh_head:
      logging.info(
          "%s: the classifier of %s is for another class count; it starts afresh for the "
          "%d classes of the data",
          stage,
          path,
          num_classes,
      )
  return split_model(stage_config.model, model, compute_dtype)


def check_settings(stage: str, stage_config) -> None:
  """Checks what a stage's weights setting can be checked for without the data.

  Raises:
    UserInputError: for weights given to a model they cannot load into, a
      pickled or missing file, or (teacher) weights together with a checkpoint.
  """
  path = stage_config.get("weights", "")
  if not path:
    return
  source = f"{stage}.weights={path!r}"
  if stage_config.model not in HEAD_WEIGHTS:
    raise UserInputError(
        f"{source}: weights files load into {', '.join(HEAD_WEIGHTS)}, not "
        f"{stage}.model={stage_config.model!r}"
    )
  if stage_config.get("checkpoint", ""):
    raise UserInputError(
        f"{stage}.weights and {stage}.checkpoint both give the {stage}'s weights; set one"
    )
  read_shapes(path, source)


def abstract_model(stage_config, *, num_classes: int, in_channels: int) -> nnx.Module:
  """A stage's model as its config builds it, shapes only: nothing allocated or computed."""
  return nnx.eval_shape(
      lambda: models.create_model(
          stage_config.model,
          num_classes=num_classes,
          in_channels=in_channels,
          rngs=nnx.Rngs(0),
          width_multiplier=stage_config.get("width_multiplier", 1.0),
      )
  )


def check_stage(stage: str, stage_config, *, num_classes: int, image_shape) -> None:
  """Checks a stage's model and weights against the data, computing nothing.

  Raises:
    UserInputError: for a model that cannot be built as configured, a user's
      model that does not map images to (batch, num_classes), a weights file
      whose tensors do not fit the model, or a head that starts afresh in a
      stage that trains for no epochs.
  """
  model = abstract_model(stage_config, num_classes=num_classes, in_channels=image_shape[-1])
  if models.is_factory(stage_config.model):
    models.check_output(stage_config.model, num_classes=num_classes, image_shape=image_shape)
  path = stage_config.get("weights", "")
  if not path:
    return
  source = f"{stage}.weights={path!r}"
  if _match(model, read_shapes(path, source), source) and stage_config.epochs == 0:
    raise UserInputError(
        f"{source} has a classifier for another class count than the data's {num_classes}, so "
        f"its head starts afresh and must be trained: set {stage}.epochs above 0"
    )
