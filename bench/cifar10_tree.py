"""Writes CIFAR-10 as an image-folder tree, ROOT/{train,test}/<class>/<n>.png, from TFDS.

The commands in BENCHMARKS.md and docs/ that read CIFAR-10 from a folder
(`data.source=folder`) take such a tree. TensorFlow Datasets downloads the
dataset once (about 160 MB) into ~/tensorflow_datasets. PNG keeps the pixels;
`--format=jpg` writes JPEGs (OpenCV's quality 95), as the speed figures of
BENCHMARKS.md decoded.

    .venv/bin/python bench/cifar10_tree.py ~/data/cifar10
"""

import argparse
import os

import cv2
import tensorflow_datasets as tfds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("root", help="folder to write the tree into")
  parser.add_argument("--format", choices=("png", "jpg"), default="png")
  args = parser.parse_args()
  builder = tfds.builder("cifar10")
  builder.download_and_prepare()
  class_names = builder.info.features["label"].names
  for split in ("train", "test"):
    examples = tfds.as_numpy(builder.as_dataset(split=split))
    for number, example in enumerate(examples):
      folder = os.path.join(args.root, split, class_names[example["label"]])
      os.makedirs(folder, exist_ok=True)
      image_bgr = cv2.cvtColor(example["image"], cv2.COLOR_RGB2BGR)
      cv2.imwrite(os.path.join(folder, f"{number}.{args.format}"), image_bgr)
    print(f"wrote {number + 1} {split} images under {os.path.join(args.root, split)}")


if __name__ == "__main__":
  main()
