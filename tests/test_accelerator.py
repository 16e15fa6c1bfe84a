"""bench/accelerator.sh, the GPU machine's one command, in its smoke mode on the CPU."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT


def _tiny_cifar_tree(root) -> str:
  """Two classes of random 8x8 JPEGs: 8 training and 2 test images each."""
  rng = np.random.default_rng(0)
  for split, count in (("train", 8), ("test", 2)):
    for name in ("cat", "dog"):
      folder = os.path.join(root, split, name)
      os.makedirs(folder)
      for number in range(count):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        cv2.imwrite(os.path.join(folder, f"{number}.jpg"), image)
  return str(root)


@pytest.mark.slow
def test_smoke_run_passes_every_part_and_writes_their_figures(tmp_path):
  results = tmp_path / "results"
  tree = _tiny_cifar_tree(tmp_path / "cifar10")
  env = {**os.environ, "PYTHON": sys.executable, "KD_CIFAR_DIR": tree}
  completed = subprocess.run(
      ["bash", "bench/accelerator.sh", "--smoke", str(results)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
  with open(results / "accelerator.json") as f:
    summary = json.load(f)
  status, figures = summary["status"], summary["figures"]
  for part in ("checks", "throughput_float32", "throughput_bfloat16", "cifar"):
    assert status[part].startswith("ok"), (part, status[part])
  assert all(figures["checks"][name]["passed"] for name in ("bfloat16", "training", "export"))
  assert figures["checks"]["export"]["platforms"] == ["cpu", "cuda"]
  for dtype in ("float32", "bfloat16"):
    assert figures[f"throughput_{dtype}"]["compute_dtype"] == dtype
    assert figures[f"throughput_{dtype}"]["student_offline_img_s"] > 0
  assert figures["cifar"]["dataset"]["num_train"] == 16
  assert 0 <= figures["cifar"]["student"]["top1"] <= 1
  assert status["torch_none"].startswith(("ok", "skipped: torch is not installed"))
  assert summary["versions"]["jax"] and "== versions" in (results / "accelerator.log").read_text()
