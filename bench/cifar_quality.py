"""CIFAR-10 distillation quality: a cheap recipe sweep, and the multi-seed table.

    # the sweep: each variant distils the student on a 1,000-per-class subset
    # of the tree from one trained teacher, and trains its baseline
    python bench/cifar_quality.py sweep --tree=/path/to/cifar10 --out=/tmp/kd-sweep \
        --teacher_checkpoint=/tmp/kd-q/teacher/teacher

    # the table: configs/cifar.py:budget on the whole tree, the teacher once
    # (in /tmp/kd-q/teacher), then student and baseline for 3 seeds from it
    # (in /tmp/kd-q/students); a rerun resumes where it stopped
    python bench/cifar_quality.py table --tree=/path/to/cifar10 --out=/tmp/kd-q

`--tree` is CIFAR-10 as an image folder (train/<class>/*, test/<class>/*);
docs/data.md says how to write one from TFDS. Each prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant: the overrides it applies to configs/cifar.py:budget. The first
# is the reference the others change one thing of; variants that change only
# the distillation share its baseline.
SWEEP = {
    "shipped": {},
    "adamw 2e-3 (before)": {
        "student.optimizer.name": "adamw",
        "student.optimizer.learning_rate": 2e-3,
        "student.optimizer.warmup_epochs": 1,
        "student.optimizer.grad_clip_norm": 1.0,
    },
    "sgd lr 0.05": {"student.optimizer.learning_rate": 0.05},
    "T 2": {"distill.temperature": 2.0},
    "alpha 0.5": {"distill.alpha": 0.5},
}
SUBSET_PER_CLASS = 1000
SWEEP_EPOCHS = 6


def _launch(workdir: str, tree: str, overrides: dict) -> dict:
  """Runs launch.py with configs/cifar.py:budget on `tree`; returns its report."""
  flags = {"data.source": "folder", "data.dir": tree, "export.enabled": False, **overrides}
  command = [
      sys.executable,
      os.path.join(ROOT, "launch.py"),
      "--config=" + os.path.join(ROOT, "configs", "cifar.py") + ":budget",
      f"--workdir={workdir}",
  ] + [f"--config.{key}={value}" for key, value in flags.items()]
  if subprocess.run(command, cwd=ROOT).returncode:
    sys.exit(f"launch.py stopped in {workdir}; the same command resumes it")
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def make_subset(tree: str, out: str, per_class: int) -> str:
  """A tree of the first `per_class` training images of each class (links) and every test image."""
  subset = os.path.join(out, f"subset{per_class}")
  for class_name in sorted(os.listdir(os.path.join(tree, "train"))):
    folder = os.path.join(subset, "train", class_name)
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(os.path.join(tree, "train", class_name)))[:per_class]:
      link = os.path.join(folder, name)
      if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(tree, "train", class_name, name)), link)
  if not os.path.lexists(os.path.join(subset, "test")):
    os.symlink(os.path.abspath(os.path.join(tree, "test")), os.path.join(subset, "test"))
  return subset


def sweep(args) -> str:
  """Distils each SWEEP variant on the subset, with its baseline; a markdown table."""
  subset = make_subset(args.tree, args.out, SUBSET_PER_CLASS)
  rows = ["| variant | distilled top-1 | baseline top-1 | KD gain |", "|---|---|---|---|"]
  baselines = {}
  for name, overrides in SWEEP.items():
    distill_only = all(key.startswith("distill.") for key in overrides)
    report = _launch(
        os.path.join(args.out, "".join(c if c.isalnum() else "_" for c in name)),
        subset,
        {
            "teacher.checkpoint": args.teacher_checkpoint,
            "student.epochs": SWEEP_EPOCHS,
            "baseline.enabled": not (distill_only and baselines),
            **overrides,
        },
    )
    baseline = report["baseline"]["top1"] if "baseline" in report else baselines["shipped"]
    baselines[name] = baseline
    student = report["student"]["top1"]
    rows.append(f"| {name} | {student:.4f} | {baseline:.4f} | {student - baseline:+.4f} |")
    print("\n".join(rows), flush=True)
  return "\n".join(rows)


def table(args) -> str:
  """Teacher once, student and baseline for 3 seeds; mean ± std and stage times."""
  teacher = args.teacher_checkpoint
  if not teacher:
    workdir = os.path.join(args.out, "teacher")
    _launch(workdir, args.tree, {"student.epochs": 0, "baseline.enabled": False})
    teacher = os.path.join(workdir, "teacher")
  report = _launch(
      os.path.join(args.out, "students"), args.tree, {"seeds": 3, "teacher.checkpoint": teacher}
  )
  seeds = report["seeds"]
  gains = [s - b for s, b in zip(seeds["student"]["top1"], seeds["baseline"]["top1"])]
  mean_gain = sum(gains) / len(gains)
  std_gain = (sum((g - mean_gain) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5

  def stage_time(name):
    return f"{report[name]['wall_time_s'] / 60:.0f} min"

  rows = [
      "| | top-1 (last epoch) | per seed | train time (one run) |",
      "|---|---|---|---|",
      f"| teacher ({report['teacher']['model']}) | {report['teacher']['top1']:.4f} | "
      f"| {stage_time('teacher')} |",
  ]
  for name, title in (("student", "distilled student"), ("baseline", "baseline (labels only)")):
    runs = seeds[name]
    per_seed = " / ".join(f"{t:.4f}" for t in runs["top1"])
    rows.append(
        f"| {title} | {runs['top1_mean']:.4f} ± {runs['top1_std']:.4f} | {per_seed} "
        f"| {stage_time(name)} |"
    )
  per_seed = " / ".join(f"{g:+.4f}" for g in gains)
  rows.append(f"| KD gain | {mean_gain:+.4f} ± {std_gain:.4f} | {per_seed} | |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=["sweep", "table"])
  parser.add_argument("--tree", required=True, help="CIFAR-10 image folder tree")
  parser.add_argument("--out", required=True, help="folder for the runs")
  parser.add_argument(
      "--teacher_checkpoint",
      help="a trained teacher's stage folder (the sweep needs one; the table trains one without)",
  )
  args = parser.parse_args()
  if args.what == "sweep" and not args.teacher_checkpoint:
    parser.error("sweep needs --teacher_checkpoint")
  print(sweep(args) if args.what == "sweep" else table(args))


if __name__ == "__main__":
  main()
