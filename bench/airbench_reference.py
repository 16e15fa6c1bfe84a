"""airbench94's own PyTorch code on an image-folder CIFAR-10 tree: the reference for cifar_fast.

configs/cifar_fast.py's teacher reimplements Keller Jordan's airbench94. This script
runs the published package's training function (`airbench.train94`, pip's airbench
0.1.8, unchanged) on the tree kd_jax reads, decoded with the same OpenCV, so the two
accuracies compare on the same images. The package is written for a CUDA GPU in
half precision; without one, four of its device calls are replaced for the run
(`.cuda()` and `.half()` on the network do nothing, CUDA timing events read the
wall clock) and it trains in float32 on the CPU. It prints the package's own table:
per-epoch accuracy, and the final one with its test-time augmentation.

    ~/torchref/bin/pip install --no-deps airbench==0.1.8
    ~/torchref/bin/pip install torchvision opencv-python-headless
    ~/torchref/bin/python bench/airbench_reference.py --tree=/path/to/cifar10

About 40 minutes on 2 CPU cores. `--tree` holds train/<class>/* and test/<class>/*.
"""

import argparse
import contextlib
import os
import time
from unittest import mock

import airbench
import airbench.utils
import cv2
import numpy as np
import torch


def read_split(tree: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All images of tree/split/<class>/ as (N, 32, 32, 3) RGB uint8, and their labels.

  Its own reader, not kd_jax.data's: this runs in the PyTorch environment, without jax.
  """
  root = os.path.join(tree, split)
  images, labels = [], []
  for label, name in enumerate(sorted(os.listdir(root))):
    for file in sorted(os.listdir(os.path.join(root, name))):
      bgr = cv2.imread(os.path.join(root, name, file), cv2.IMREAD_COLOR)
      images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int64)


def tree_loader(tree: str, device: torch.device) -> type:
  """airbench's CifarLoader, reading `tree` instead of torchvision's download."""

  class TreeLoader(airbench.utils.CifarLoader):
    """Its batching, augmentation and alternating flip; the images from the tree."""

    def __init__(self, path, train=True, batch_size=500, aug=None, altflip=False, **_):
      del path  # the package's own data folder; the tree replaces it
      self.epoch = 0
      images, labels = read_split(tree, "train" if train else "test")
      # The package's precision: half on a GPU; float32 on a CPU (see `on_cpu`).
      dtype = torch.half if device.type == "cuda" else torch.float
      images_NxCxHxW = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).to(dtype) / 255
      self.images = images_NxCxHxW.contiguous(memory_format=torch.channels_last)
      self.labels = torch.from_numpy(labels).to(device)
      self.normalize = airbench.utils.T.Normalize(
          airbench.utils.CIFAR_MEAN, airbench.utils.CIFAR_STD
      )
      self.proc_images = {}
      self.aug = aug or {}
      self.batch_size = batch_size
      self.drop_last = self.shuffle = train
      self.altflip = altflip

  return TreeLoader


class WallClockEvent:
  """torch.cuda.Event's timing, from the wall clock, for a run without CUDA."""

  def __init__(self, **_):
    self.time = 0.0

  def record(self):
    self.time = time.perf_counter()

  def elapsed_time(self, end: "WallClockEvent") -> float:
    return 1e3 * (end.time - self.time)


def on_cpu():
  """The package's CUDA-only calls replaced: the network stays float32 on the CPU."""
  stack = contextlib.ExitStack()
  for name in ("cuda", "half"):
    stack.enter_context(mock.patch.object(torch.nn.Module, name, lambda self, *a, **k: self))
  stack.enter_context(mock.patch.object(torch.cuda, "Event", WallClockEvent))
  stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
  return stack


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--tree", required=True, help="CIFAR-10 as train/<class>/*, test/<class>/*")
  parser.add_argument("--epochs", type=float, default=9.9, help="airbench94's 9.9 by default")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  for split in ("train", "test"):
    if not os.path.isdir(os.path.join(args.tree, split)):
      parser.error(f"--tree={args.tree} has no {split}/ folder of class folders")
  torch.manual_seed(args.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  loader = tree_loader(args.tree, device)
  train_loader = loader(None, train=True, batch_size=1024, aug={"flip": True, "translate": 2},
                        altflip=True)
  with contextlib.ExitStack() as stack:
    if device.type == "cpu":
      stack.enter_context(on_cpu())
    stack.enter_context(mock.patch.object(airbench.utils, "CifarLoader", loader))
    airbench.train94(train_loader=train_loader, epochs=args.epochs)


if __name__ == "__main__":
  main()
