"""Top-k predictions of a trained workdir's student (and teacher) on image files."""

import json
import os

import jax
import numpy as np
from absl import logging

from kd_jax import checkpoint, evaluate
from kd_jax.data import folder
from kd_jax.errors import UserInputError
from kd_jax.network import create_network

DATASET_FILE = "dataset.json"


def write_dataset_info(workdir: str, class_names, image_shape, mean_C, std_C) -> None:
  """Records what prediction needs to preprocess new images as training did."""
  with open(os.path.join(workdir, DATASET_FILE), "w") as f:
    json.dump(
        {
            "class_names": list(class_names),
            "image_shape": list(image_shape),
            "mean": [float(m) for m in mean_C],
            "std": [float(s) for s in std_C],
        },
        f,
        indent=2,
    )


def _image_files(paths: list[str]) -> list[str]:
  """Files as given, and the image files inside folders, sorted."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      files += sorted(
          os.path.join(path, name)
          for name in os.listdir(path)
          if name.lower().endswith(folder.IMAGE_SUFFIXES)
      )
    else:
      files.append(path)
  return files


def _restore(stage_dir: str, model: str, width_multiplier: float, info: dict):
  network, template = create_network(
      model,
      num_classes=len(info["class_names"]),
      in_channels=info["image_shape"][-1],
      seed=0,
      width_multiplier=width_multiplier,
  )
  variables, _ = checkpoint.restore_variables(stage_dir, template, lambda meta: None)
  forward = jax.jit(
      evaluate.make_forward(network, np.float32(info["mean"]), np.float32(info["std"]))
  )
  return lambda images: jax.nn.softmax(forward(variables, images))


def predict(workdir: str, paths: list[str], top_k: int = 5) -> list[dict]:
  """The student's top-k classes and the teacher's top-1 for each image.

  Images go through the same decoding, resizing and normalisation as the
  training data. Unreadable files are named in a warning and skipped.
  Returns one dict per readable image: path, "student" [(class, p)...],
  "teacher" (class, p).
  """
  info_path = os.path.join(workdir, DATASET_FILE)
  if not os.path.exists(info_path):
    raise UserInputError(f"{workdir} holds no trained run ({DATASET_FILE} missing); train first")
  with open(info_path) as f:
    info = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  height, width, channels = info["image_shape"]
  images, readable = [], []
  for path in _image_files(paths):
    image = folder.read_image(path, height, width, channels)
    if image is None:
      logging.warning("cannot read %s as an image; skipped", path)
      continue
    images.append(image)
    readable.append(path)
  if not images:
    raise UserInputError(f"no readable image among {', '.join(paths)}")

  student = _restore(
      os.path.join(workdir, "student"),
      config["student"]["model"],
      config["student"]["width_multiplier"],
      info,
  )
  teacher = _restore(
      config["teacher"]["checkpoint"] or os.path.join(workdir, "teacher"),
      config["teacher"]["model"],
      1.0,
      info,
  )
  batch = np.stack(images)
  student_probs, teacher_probs = np.asarray(student(batch)), np.asarray(teacher(batch))
  names = info["class_names"]
  results = []
  for path, s_probs, t_probs in zip(readable, student_probs, teacher_probs):
    top = np.argsort(-s_probs, kind="stable")[:top_k]
    best_teacher = int(np.argmax(t_probs))
    results.append(
        {
            "path": path,
            "student": [(names[i], float(s_probs[i])) for i in top],
            "teacher": (names[best_teacher], float(t_probs[best_teacher])),
        }
    )
  return results


def format_prediction(result: dict) -> str:
  """One line per image: the student's top classes, then the teacher's top-1."""
  student = ", ".join(f"{name} {p:.3f}" for name, p in result["student"])
  name, p = result["teacher"]
  return f"{result['path']}: student {student} | teacher {name} {p:.3f}"
