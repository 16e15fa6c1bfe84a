"""Online against offline distillation (plain and consistent caches) on a real dataset.

Distils the same student from the same trained teacher three ways and prints,
per way, the student's time per epoch, the time to build its teacher-logit
cache, the cache's size and the student's accuracy; the last line is JSON.

    .venv/bin/python bench/offline_modes.py --teacher=runs/cifar-3ep/teacher \
        --data_dir=$HOME/data/cifar10 --epochs=2 --out=/tmp/runs/offline-modes

--teacher is a finished kd_jax teacher stage folder (e.g. from
`launch.py --config=configs/cifar.py`). Every cache is built afresh: caches
already beside that teacher are moved aside first.
"""

import json
import os
import shutil
import sys
import time

from absl import app, flags

# bench/ is not a package and kd_jax is not installed: import it from the
# checkout this script lives in, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import cifar
from kd_jax import pipeline, teacher_cache

_TEACHER = flags.DEFINE_string("teacher", None, "a finished kd_jax teacher stage folder")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "the CIFAR-10 image-folder tree")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "student epochs per way")
_OUT = flags.DEFINE_string("out", "/tmp/runs/offline-modes", "where the runs' workdirs go")

WAYS = {  # name: (distill.mode, distill.cache)
    "online": ("online", "plain"),
    "offline-plain": ("offline", "plain"),
    "offline-consistent": ("offline", "consistent"),
}


def main(argv):
  del argv
  existing = os.path.join(os.path.dirname(os.path.abspath(_TEACHER.value)), teacher_cache.CACHE_DIR)
  if os.path.isdir(existing):
    shutil.move(existing, f"{existing}.before-{int(time.time())}")
  results = {}
  for name, (mode, cache) in WAYS.items():
    config = cifar.get_config()
    config.data.update(source="folder", dir=_DATA_DIR.value)
    config.teacher.checkpoint = _TEACHER.value
    config.student.epochs = _EPOCHS.value
    config.baseline.enabled = False
    config.export.enabled = False
    config.distill.update(mode=mode, cache=cache)
    workdir = os.path.join(_OUT.value, name)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    report = pipeline.train_and_evaluate(config, workdir)
    student, cache_entry = report["student"], report.get("teacher_logits", {})
    results[name] = {
        "student_epoch_time_s": student["epoch_time_s"],
        "cache_time_s": cache_entry.get("time_s", 0.0),
        "cache_mib": cache_entry.get("bytes", 0) / 2**20,
        "student_top1": student["top1"],
        "teacher_top1": report["teacher"]["top1"],
        "wall_time_s": time.perf_counter() - start,
    }
  print("| way | student s/epoch | cache build s | cache MiB | student top-1 |")
  print("|---|---|---|---|---|")
  for name, r in results.items():
    print(
        f"| {name} | {r['student_epoch_time_s']:.1f} | {r['cache_time_s']:.1f} | "
        f"{r['cache_mib']:.1f} | {r['student_top1']:.4f} |"
    )
  print(json.dumps(results))


if __name__ == "__main__":
  flags.mark_flags_as_required(["teacher", "data_dir"])
  app.run(main)
