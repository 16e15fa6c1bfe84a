"""Teacher and student models, and a registry to build them by name.

The CIFAR ResNets and WideResNets follow RepDistiller (HobbitLong/RepDistiller,
models/resnet.py and models/wrn.py), so their parameter counts match the CRD
paper's tables; the ImageNet ResNet-18/34/50 and MobileNetV2 follow
torchvision's layouts. Every model maps float32 images (B, H, W, C), any H, W >= 8, to
logits (B, num_classes), and starts in training mode: call `model.eval()` for
inference (BatchNorm then uses its running statistics) and `model.train()` to
switch back.

Feature-based distillation also needs what a model computes on the way: every
registered model's `with_features(images)` returns its logits and its named
features (`run_stages` says which), while calling the model computes the logits
alone, with nothing extra.
"""

import functools
import importlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax import layers, ops
from kd_jax.errors import UserInputError

Features = dict[str, jax.Array]


def run_stages(
    blocks: Sequence[nnx.Module], blocks_per_stage: Sequence[int], x_BxHxWxC: jax.Array
) -> tuple[jax.Array, Features]:
  """Runs `blocks`, grouped in stages of `blocks_per_stage`; returns the output and features.

  "stage<k>" is stage k's output (1-based), "stage<k>_preact" the same before the ReLU that
  ends its last block, where the distillation papers take it (blocks ending in a ReLU
  have a `preactivation` method). Blocks that end without one (WideResNet's
  pre-activation blocks, MobileNetV2's linear bottlenecks) give their output for both.
  """
  features, blocks = {}, iter(blocks)
  x = x_BxHxWxC
  for stage, count in enumerate(blocks_per_stage, start=1):
    for _ in range(count - 1):
      x = next(blocks)(x)
    last = next(blocks)
    if hasattr(last, "preactivation"):
      preact = last.preactivation(x)
      x = nnx.relu(preact)
    else:
      x = preact = last(x)
    features[f"stage{stage}_preact"], features[f"stage{stage}"] = preact, x
  return x, features


class DSConvStudent(nnx.Module):
  """Small student: three depthwise-separable blocks, average pool, linear."""

  def __init__(
      self,
      *,
      num_classes: int,
      in_channels: int,
      rngs: nnx.Rngs,
      width_multiplier: float = 1.0,
  ):
    """Creates the student.

    Args:
      num_classes: number of output logits.
      in_channels: number of input image channels.
      rngs: random key source for the parameter inits.
      width_multiplier: scales the 64/128/256 block widths (each rounded to
        the nearest int, at least 1).

    Raises:
      UserInputError: if width_multiplier is not positive.
    """
    if width_multiplier <= 0:
      raise UserInputError(f"width_multiplier must be positive, got {width_multiplier}")
    c1, c2, c3 = (max(1, round(c * width_multiplier)) for c in (64, 128, 256))
    self.block1 = layers.DSConv(in_channels, c1, strides=2, rngs=rngs)
    self.block2 = layers.DSConv(c1, c2, rngs=rngs)
    self.block3 = layers.DSConv(c2, c3, rngs=rngs)
    self.fc = nnx.Linear(c3, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the logits (B, num_classes) for images (B, H, W, C)."""
    x = self.block2(self.block1(x_BxHxWxC))
    return self.fc(self.block3(x, pool=True))

  def with_features(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, Features]:
    """The logits and the features: each block a stage (see `run_stages`), and "pooled"."""
    x, features = run_stages((self.block1, self.block2, self.block3), (1, 1, 1), x_BxHxWxC)
    features["pooled"] = ops.global_avg_pool(x)
    return self.fc(features["pooled"]), features


class CifarResNet(nnx.Module):
  """CIFAR ResNet: conv3x3-BN-ReLU stem, three BasicBlock stages, linear."""

  def __init__(
      self,
      *,
      depth: int,
      widths: Sequence[int],
      num_classes: int,
      in_channels: int,
      rngs: nnx.Rngs,
  ):
    """Creates the network.

    Args:
      depth: 6n + 2 for n blocks per stage.
      widths: channels of the stem and of the three stages, e.g. (16, 16, 32,
        64) for resnet20 or (32, 64, 128, 256) for resnet32x4.
      num_classes: number of output logits.
      in_channels: number of input image channels.
      rngs: random key source for the parameter inits.
    """
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    self.blocks_per_stage = (blocks_per_stage,) * 3
    stem_width, *stage_widths = widths
    self.stem_conv = layers.conv3x3(in_channels, stem_width, rngs=rngs)
    self.stem_bn = layers.batch_norm(stem_width, rngs=rngs)
    blocks = []
    cin = stem_width
    for width, stride in zip(stage_widths, (1, 2, 2), strict=True):
      for b in range(blocks_per_stage):
        blocks.append(layers.BasicBlock(cin, width, strides=stride if b == 0 else 1, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the logits (B, num_classes) for images (B, H, W, C)."""
    x = layers.conv_bn(self.stem_conv, self.stem_bn, x_BxHxWxC, activation="relu")
    for block in self.blocks:
      x = block(x)
    return self.fc(ops.global_avg_pool(x))

  def with_features(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, Features]:
    """The logits and the features: stage1-3 (see `run_stages`) and "pooled"."""
    x = layers.conv_bn(self.stem_conv, self.stem_bn, x_BxHxWxC, activation="relu")
    x, features = run_stages(self.blocks, self.blocks_per_stage, x)
    features["pooled"] = ops.global_avg_pool(x)
    return self.fc(features["pooled"]), features


class WideResNet(nnx.Module):
  """WRN-depth-k: conv3x3 stem, three pre-activation stages, BN-ReLU, linear."""

  def __init__(
      self,
      *,
      depth: int,
      widen_factor: int,
      num_classes: int,
      in_channels: int,
      rngs: nnx.Rngs,
  ):
    """Creates the network.

    Args:
      depth: 6n + 4 for n blocks per stage.
      widen_factor: k; the stages have 16k, 32k and 64k channels.
      num_classes: number of output logits.
      in_channels: number of input image channels.
      rngs: random key source for the parameter inits.
    """
    if (depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    self.blocks_per_stage = (blocks_per_stage,) * 3
    cin = 16
    self.stem_conv = layers.conv3x3(in_channels, cin, rngs=rngs)
    blocks = []
    for width, stride in zip(
        (16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
        (1, 2, 2),
        strict=True,
    ):
      for b in range(blocks_per_stage):
        blocks.append(layers.WideBasicBlock(cin, width, strides=stride if b == 0 else 1, rngs=rngs))
        cin = width
    self.blocks = nnx.List(blocks)
    self.final_bn = layers.batch_norm(cin, rngs=rngs)
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the logits (B, num_classes) for images (B, H, W, C)."""
    x = self.stem_conv(x_BxHxWxC)
    for block in self.blocks:
      x = block(x)
    return self.fc(self.final_bn.relu_pool(x))

  def with_features(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, Features]:
    """The logits and the features: stage1-3 (see `run_stages`) and "pooled".

    The stages end in a residual sum without a ReLU, as RepDistiller's features do; "pooled"
    follows the final batch norm and ReLU.
    """
    x, features = run_stages(self.blocks, self.blocks_per_stage, self.stem_conv(x_BxHxWxC))
    features["pooled"] = self.final_bn.relu_pool(x)
    return self.fc(features["pooled"]), features


class ImageNetResNet(nnx.Module):
  """torchvision's ImageNet ResNet: 7x7 stem, max pool, four stages, linear.

  Same layers and parameter counts as torchvision.models.resnet18/34/50, so
  published recipes and weights layouts apply.
  """

  def __init__(
      self,
      *,
      block: type[nnx.Module],
      blocks_per_stage: Sequence[int],
      num_classes: int,
      in_channels: int,
      rngs: nnx.Rngs,
      widths: Sequence[int] = (64, 64, 128, 256, 512),
  ):
    """Creates the network.

    Args:
      block: layers.BasicBlock (resnet18/34) or layers.Bottleneck (resnet50).
      blocks_per_stage: blocks in each of the four stages, e.g. (2, 2, 2, 2).
      num_classes: number of output logits.
      in_channels: number of input image channels.
      rngs: random key source for the parameter inits.
      widths: channels of the stem and of the four stages (a Bottleneck stage
        outputs 4x its width); torchvision's by default.
    """
    stem_width, *stage_widths = widths
    # Kept to name the blocks as torchvision does (layer<stage>.<block>), see kd_jax.pretrained.
    self.blocks_per_stage = tuple(blocks_per_stage)
    self.stem_conv = nnx.Conv(
        in_channels,
        stem_width,
        kernel_size=(7, 7),
        strides=2,
        padding=((3, 3), (3, 3)),
        use_bias=False,
        rngs=rngs,
    )
    self.stem_bn = layers.batch_norm(stem_width, rngs=rngs)
    expansion = getattr(block, "expansion", 1)
    blocks, cin = [], stem_width
    for width, count, stride in zip(stage_widths, blocks_per_stage, (1, 2, 2, 2), strict=True):
      for b in range(count):
        blocks.append(block(cin, width, strides=stride if b == 0 else 1, rngs=rngs))
        cin = width * expansion
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the logits (B, num_classes) for images (B, H, W, C)."""
    x = self._stem(x_BxHxWxC)
    for block in self.blocks:
      x = block(x)
    return self.fc(ops.global_avg_pool(x))

  def with_features(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, Features]:
    """The logits and the features: stage1-4 (see `run_stages`) and "pooled".

    The stages are torchvision's layer1-4.
    """
    x, features = run_stages(self.blocks, self.blocks_per_stage, self._stem(x_BxHxWxC))
    features["pooled"] = ops.global_avg_pool(x)
    return self.fc(features["pooled"]), features

  def _stem(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x = layers.conv_bn(self.stem_conv, self.stem_bn, x_BxHxWxC, activation="relu")
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


# (expansion ratio, channels, blocks, first stride) of each MobileNetV2 stage.
_MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(channels: float, divisor: int = 8) -> int:
  """torchvision's MobileNetV2 channel rounding: to a multiple of 8, at most 10% down."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


class MobileNetV2(nnx.Module):
  """torchvision's MobileNetV2, an ImageNet student: inverted residuals.

  Same layers and parameter count as torchvision.models.mobilenet_v2 (its
  classifier's dropout left out: kd_jax's models have none).
  """

  def __init__(
      self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, width_mult: float = 1.0
  ):
    """Creates the network.

    Args:
      num_classes: number of output logits.
      in_channels: number of input image channels.
      rngs: random key source for the parameter inits.
      width_mult: torchvision's width multiplier; the registry's mobilenet_v2 has 1.0.
    """
    stem_width = _make_divisible(32 * width_mult)
    head_width = _make_divisible(1280 * max(1.0, width_mult))
    self.stem_conv = layers.conv3x3(in_channels, stem_width, strides=2, rngs=rngs)
    self.stem_bn = layers.batch_norm(stem_width, rngs=rngs)
    blocks, cin, blocks_per_stage = [], stem_width, []
    for ratio, stage_channels, count, stride in _MOBILENET_V2_STAGES:
      # Feature stages end where the resolution next halves, as torchvision's feature maps.
      if stride == 2 or not blocks_per_stage:
        blocks_per_stage.append(count)
      else:
        blocks_per_stage[-1] += count
      channels = _make_divisible(stage_channels * width_mult)
      for b in range(count):
        blocks.append(
            layers.InvertedResidual(
                cin, channels, strides=stride if b == 0 else 1, expand_ratio=ratio, rngs=rngs
            )
        )
        cin = channels
    self.blocks = nnx.List(blocks)
    self.blocks_per_stage = tuple(blocks_per_stage)
    self.head_conv = layers.PointwiseConv(cin, head_width, rngs=rngs)
    self.head_bn = layers.batch_norm(head_width, rngs=rngs)
    self.fc = nnx.Linear(head_width, num_classes, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the logits (B, num_classes) for images (B, H, W, C)."""
    x = layers.conv_bn(self.stem_conv, self.stem_bn, x_BxHxWxC, activation="relu6")
    for block in self.blocks:
      x = block(x)
    return self.fc(self._pool(x))

  def with_features(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, Features]:
    """The logits and the features: stage1-5 (see `run_stages`) and "pooled".

    A stage ends at each resolution (1/2 to 1/32 of the input's); "pooled" follows the
    1x1 head convolution.
    """
    x = layers.conv_bn(self.stem_conv, self.stem_bn, x_BxHxWxC, activation="relu6")
    x, features = run_stages(self.blocks, self.blocks_per_stage, x)
    features["pooled"] = self._pool(x)
    return self.fc(features["pooled"]), features

  def _pool(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x = layers.conv_bn(self.head_conv, self.head_bn, x_BxHxWxC, activation="relu6")
    return ops.global_avg_pool(x)


# PyTorch's default init of convolution and linear weights, uniform within 1/sqrt(fan_in):
# airbench's learning rates are tuned to the weight norms it gives.
_TORCH_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _airbench_conv(in_features: int, out_features: int, rngs: nnx.Rngs) -> layers.Conv3x3:
  """airbench's 3x3 convolution: PyTorch's init, its first in_features filters the identity.

  Starting as a partial identity (torch.nn.init.dirac_) lets the input pass through
  the deep layers early in training.
  """
  conv = layers.Conv3x3(
      in_features,
      out_features,
      kernel_size=(3, 3),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      kernel_init=_TORCH_INIT,
      rngs=rngs,
  )
  identity = min(in_features, out_features)
  kernel = conv.kernel[...].at[:, :, :, :identity].set(0.0)
  conv.kernel[...] = kernel.at[1, 1, jnp.arange(identity), jnp.arange(identity)].set(1.0)
  return conv


def _airbench_norm(features: int, rngs: nnx.Rngs) -> layers.BatchNorm:
  """airbench's batch norm: no scale (fixed at 1), a fast running average (PyTorch's 0.4)."""
  return layers.BatchNorm(features, momentum=0.6, epsilon=1e-12, use_scale=False, rngs=rngs)


class AirbenchBlock(nnx.Module):
  """airbench's block: conv3x3, max pool 2, BN, GELU, conv3x3, BN, GELU."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    """Creates the block; it halves the resolution and outputs `out_features` channels."""
    self.conv1 = _airbench_conv(in_features, out_features, rngs)
    self.bn1 = _airbench_norm(out_features, rngs)
    self.conv2 = _airbench_conv(out_features, out_features, rngs)
    self.bn2 = _airbench_norm(out_features, rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Applies the block to channels-last images."""
    x = nnx.max_pool(self.conv1(x_BxHxWxC), window_shape=(2, 2), strides=(2, 2))
    x = nnx.gelu(self.bn1(x), approximate=False)
    return nnx.gelu(layers.conv_bn(self.conv2, self.bn2, x), approximate=False)


class AirbenchNet(nnx.Module):
  """Keller Jordan's airbench94 network (arXiv 2404.00498), a small VGG for 32x32 images.

  A fixed 2x2 whitening layer (`layers.PatchWhitening`) and GELU, three `AirbenchBlock`s of
  64, 256 and 256 channels, a global max pool and a bias-free linear layer whose logits
  are scaled by 1/9. Needs images of at least 9 x 9 pixels (three halvings after the
  whitening's 2x2 windows).
  """

  logit_scale = 1 / 9

  def __init__(
      self,
      *,
      num_classes: int,
      in_channels: int,
      rngs: nnx.Rngs,
      widths: Sequence[int] = (64, 256, 256),
  ):
    """Creates the network.

    Args:
      num_classes: number of output logits.
      in_channels: number of input image channels.
      rngs: random key source for the parameter inits.
      widths: channels of the three blocks.
    """
    self.whiten = layers.PatchWhitening(in_channels, patch=2, rngs=rngs)
    blocks, cin = [], 2 * 2 * 2 * in_channels
    for width in widths:
      blocks.append(AirbenchBlock(cin, width, rngs=rngs))
      cin = width
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, use_bias=False, kernel_init=_TORCH_INIT, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns the logits (B, num_classes) for images (B, H, W, C)."""
    return self.with_features(x_BxHxWxC)[0]

  def with_features(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, Features]:
    """The logits and the features: each block a stage (see `run_stages`), and "pooled"."""
    x = nnx.gelu(self.whiten(x_BxHxWxC), approximate=False)
    x, features = run_stages(self.blocks, (1, 1, 1), x)
    features["pooled"] = x.max(axis=(1, 2))
    return self.fc(features["pooled"]) * self.logit_scale, features


_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)

_MODELS: dict[str, Callable[..., nnx.Module]] = {
    "dsconv_student": DSConvStudent,
    **{
        f"resnet{depth}": functools.partial(CifarResNet, depth=depth, widths=_RESNET_WIDTHS)
        for depth in (8, 14, 20, 32, 44, 56, 110)
    },
    "resnet8x4": functools.partial(CifarResNet, depth=8, widths=_RESNET_X4_WIDTHS),
    "resnet32x4": functools.partial(CifarResNet, depth=32, widths=_RESNET_X4_WIDTHS),
    **{
        f"wrn_{depth}_{k}": functools.partial(WideResNet, depth=depth, widen_factor=k)
        for depth in (16, 40)
        for k in (1, 2)
    },
    # ImageNet models (torchvision layouts).
    "resnet18": functools.partial(
        ImageNetResNet, block=layers.BasicBlock, blocks_per_stage=(2, 2, 2, 2)
    ),
    "resnet34": functools.partial(
        ImageNetResNet, block=layers.BasicBlock, blocks_per_stage=(3, 4, 6, 3)
    ),
    "resnet50": functools.partial(
        ImageNetResNet, block=layers.Bottleneck, blocks_per_stage=(3, 4, 6, 3)
    ),
    "mobilenet_v2": MobileNetV2,
    "airbench": AirbenchNet,
}

# Models whose constructor takes a width_multiplier; the rest have the fixed
# published widths, so their parameter counts stay comparable to the papers.
_SCALABLE = frozenset({"dsconv_student"})


def model_names() -> list[str]:
  """Returns the names `create_model` accepts, sorted."""
  return sorted(_MODELS)


def is_factory(name: str) -> bool:
  """Whether `name` points to a user's factory ("package.module:function"), not the registry."""
  return ":" in name


def resolve(name: str) -> Callable[..., nnx.Module]:
  """The constructor `name` stands for: a registered model, or a user's factory.

  A factory, named "package.module:function", is imported from the user's code
  (on sys.path, e.g. through PYTHONPATH) and called as
  `function(num_classes=..., in_channels=..., rngs=...)`.

  Raises:
    UserInputError: for an unknown name, a module that cannot be imported or a
      function that is not there.
  """
  if not is_factory(name):
    if name not in _MODELS:
      raise UserInputError(f'unknown model {name!r}; known models: {", ".join(model_names())}')
    return _MODELS[name]
  module_name, _, function_name = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # the user's module may fail in any way while importing
    raise UserInputError(
        f"model {name!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
        "check the name and that its folder is on PYTHONPATH"
    ) from None
  factory = getattr(module, function_name, None)
  if not callable(factory):
    raise UserInputError(f"model {name!r}: {module_name} has no function {function_name!r}")
  return factory


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    rngs: nnx.Rngs,
    width_multiplier: float = 1.0,
) -> nnx.Module:
  """Builds a registered model or a user's factory's, in training mode.

  Args:
    name: one of `model_names()`, or "package.module:function" (see `resolve`).
    num_classes: number of output logits.
    in_channels: number of input image channels.
    rngs: random key source for the parameter inits.
    width_multiplier: channel scale; only dsconv_student accepts values other
      than 1.

  Returns:
    The model, mapping float32 images (B, H, W, C) to logits (B, num_classes).

  Raises:
    UserInputError: for a name `resolve` refuses, a factory that fails, or a
      width_multiplier other than 1 for a model with fixed widths.
  """
  constructor = resolve(name)
  check_width_multiplier(name, width_multiplier)
  kwargs = {"width_multiplier": width_multiplier} if name in _SCALABLE else {}
  if not is_factory(name):
    return constructor(num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
  try:
    model = constructor(num_classes=num_classes, in_channels=in_channels, rngs=rngs)
  except Exception as e:  # the user's code may fail in any way
    raise UserInputError(f"model {name!r}: the factory failed: {type(e).__name__}: {e}") from None
  if not isinstance(model, nnx.Module):
    raise UserInputError(
        f"model {name!r}: the factory returned a {type(model).__name__}, not a flax.nnx.Module"
    )
  return model


def check_width_multiplier(name: str, width_multiplier: float) -> None:
  """Rejects a width_multiplier other than 1 for a model with fixed widths."""
  if name not in _SCALABLE and width_multiplier != 1.0:
    raise UserInputError(
        f"model {name!r} has fixed widths; width_multiplier="
        f'{width_multiplier} applies only to: {", ".join(sorted(_SCALABLE))}'
    )


def check_output(name: str, *, num_classes: int, image_shape: Sequence[int]) -> None:
  """Checks, without computing anything, that model `name` maps images to (batch, num_classes).

  Raises:
    UserInputError: if it cannot be built, fails on a batch of `image_shape`
      images, or returns another shape.
  """
  batch = 2

  def logits_shape():
    model = create_model(
        name, num_classes=num_classes, in_channels=image_shape[-1], rngs=nnx.Rngs(0)
    )
    model.eval()
    return model(jax.numpy.zeros((batch, *image_shape), jax.numpy.float32))

  try:
    out = jax.eval_shape(logits_shape)
  except UserInputError:
    raise
  except Exception as e:  # the user's model may fail in any way
    raise UserInputError(
        f"model {name!r} fails on a batch of {tuple(image_shape)} images: {type(e).__name__}: {e}"
    ) from None
  if getattr(out, "shape", None) != (batch, num_classes):
    raise UserInputError(
        f"model {name!r} returns {getattr(out, 'shape', type(out).__name__)} for a batch of "
        f"{batch} images; it must return logits of shape (batch, num_classes) = "
        f"({batch}, {num_classes})"
    )


def count_params(model: nnx.Module) -> int:
  """Returns the number of trainable scalars (nnx.Param), like PyTorch's count.

  BatchNorm running statistics are nnx.BatchStat, not nnx.Param, so they are
  left out, as PyTorch leaves out its buffers. Works on abstract models from
  `nnx.eval_shape` too.
  """
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
