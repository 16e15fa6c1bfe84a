"""Writes a copy of an image-folder tree with every image resized, as JPEG (for bench/streaming.py).

ImageNet-sized inputs from the CIFAR-10 tree: the decode and augmentation
costs of 224 x 224 JPEGs, without ImageNet.

    .venv/bin/python bench/upscale_tree.py ~/data/cifar10 ~/data/cifar10-224 --size=224 --per_class=500
"""

import argparse
import os
from concurrent import futures

import cv2


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("source")
  parser.add_argument("destination")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--per_class", type=int, default=0, help="images per class and split; 0: all")
  args = parser.parse_args()
  jobs = []
  for split in ("train", "test"):
    for name in sorted(os.listdir(os.path.join(args.source, split))):
      files = sorted(os.listdir(os.path.join(args.source, split, name)))
      os.makedirs(os.path.join(args.destination, split, name), exist_ok=True)
      for file in files[: args.per_class or None]:
        jobs.append((os.path.join(split, name, file), os.path.splitext(file)[0] + ".jpg"))

  def convert(job):
    relative, target = job
    image = cv2.imread(os.path.join(args.source, relative))
    image = cv2.resize(image, (args.size, args.size), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(os.path.join(args.destination, os.path.dirname(relative), target), image)

  with futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    list(pool.map(convert, jobs, chunksize=256))
  print(f"wrote {len(jobs)} images of {args.size}x{args.size} to {args.destination}")


if __name__ == "__main__":
  main()
