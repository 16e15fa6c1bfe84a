"""The run's report: report.json for machines, report.md for people."""

import json
import os

import numpy as np

MODEL_FIELDS = (  # (key, column title, format)
    ("top1", "top-1 (last epoch)", "{:.4f}"),
    ("best_top1", "top-1 (best epoch)", "{:.4f}"),
    ("best_epoch", "best epoch", "{}"),
    ("top5", "top-5", "{:.4f}"),
    ("tta", "test-time augmentation (top-1, top-5)", "{}"),
    ("params", "params", "{:,}"),
    ("param_bytes", "param bytes", "{:,}"),
    ("macs", "MACs/image", "{:,.0f}"),
    ("flops", "FLOPs/image (XLA)", "{:,.0f}"),
    ("convolutions", "convolutions (timed)", "{}"),
    ("latency_ms", "latency ms (batch 1)", "{:.3f}"),
    ("throughput", "images/s", "{:,.0f}"),
    ("exported_latency_ms", "exported, XLA's convolutions: latency ms (batch 1)", "{:.3f}"),
    ("exported_throughput", "exported, XLA's convolutions: images/s", "{:,.0f}"),
    ("epochs", "epochs", "{}"),
    ("batch_size", "global batch", "{}"),
    ("learning_rate", "peak learning rate", "{:g}"),
    ("devices", "devices", "{}"),
    ("compute_dtype", "compute dtype", "{}"),
    ("epoch_time_s", "time per epoch s", "{:.1f}"),
    ("wall_time_s", "train time s", "{:.1f}"),
)
COMPARISON_FIELDS = (
    ("size_reduction", "size reduction (teacher bytes / student bytes)", "{:.2f}x"),
    ("speedup_latency", "latency speedup (teacher / student)", "{:.2f}x"),
    ("speedup_throughput", "throughput speedup (student / teacher)", "{:.2f}x"),
    ("agreement", "student-teacher top-1 agreement", "{:.4f}"),
    ("kd_gain", "KD gain (student top-1 - baseline top-1)", "{:+.4f}"),
)


def compare(
    teacher: dict | None, student: dict, baseline: dict | None, agreement: float | None
) -> dict:
  """The "comparison" section: what the student costs and keeps of the teacher.

  Without a teacher entry (its logits came from another tool) the teacher's
  side is unknown and those fields are None.
  """
  costs = dict.fromkeys(("size_reduction", "speedup_latency", "speedup_throughput"))
  if teacher:
    costs = {
        "size_reduction": teacher["param_bytes"] / student["param_bytes"],
        "speedup_latency": teacher["latency_ms"] / student["latency_ms"],
        "speedup_throughput": student["throughput"] / teacher["throughput"],
    }
  return {
      **costs,
      "agreement": agreement,
      "kd_gain": student["top1"] - baseline["top1"] if baseline else None,
  }


def model_entry(summary: dict, run, model: str) -> dict:
  """One model's entry: its test `summary` (top-1, top-5, size, speed), then how it trained.

  `run` is the stage's result (`train.StageResult`): its history gives the
  best epoch and the time per epoch, its settings the batch, learning rate
  and devices.
  """
  # A stage of zero epochs (weights taken as they are) has no history: n/a.
  best = max(run.history, key=lambda epoch: epoch["test_top1"], default={})
  epoch_times = [epoch["epoch_time_s"] for epoch in run.history]
  return {
      **summary,
      "best_top1": best.get("test_top1"),
      "best_epoch": best.get("epoch"),
      "epochs": len(run.history),
      "epoch_time_s": float(np.mean(epoch_times)) if epoch_times else None,
      "wall_time_s": run.wall_time_s,
      "model": model,
      **run.settings,
  }


def seed_summaries(runs: dict[str, list], seeds: list[int]) -> dict:
  """The "seeds" section: per stage name, `summarise_runs` of its runs (one per seed, in order)."""
  return {
      name: summarise_runs(
          [run.history[-1]["test_top1"] for run in stage_runs],
          [max(epoch["test_top1"] for epoch in run.history) for run in stage_runs],
          seeds,
      )
      for name, stage_runs in runs.items()
  }


def assemble(
    dataset: dict,
    devices: str,
    models: dict[str, dict],
    agreement: float | None,
    teacher_logits: dict | None,
    seeds: dict | None,
) -> dict:
  """The whole report: the dataset, the devices, each model's entry (`model_entry`), the
  stored teacher logits (offline), the seed summaries (several seeds) and the comparison."""
  report = {"dataset": dataset, "devices": devices, **models}
  if teacher_logits is not None:
    report["teacher_logits"] = teacher_logits
  if seeds is not None:
    report["seeds"] = seeds
  report["comparison"] = compare(
      models.get("teacher"), models["student"], models.get("baseline"), agreement
  )
  return report


def summarise_runs(top1s: list[float], best_top1s: list[float], seeds: list[int]) -> dict:
  """Mean and standard deviation (ddof 1) of last- and best-epoch top-1 over seeds."""
  return {
      "seeds": seeds,
      "top1": top1s,
      "top1_mean": float(np.mean(top1s)),
      "top1_std": float(np.std(top1s, ddof=1)),
      "best_top1": best_top1s,
      "best_top1_mean": float(np.mean(best_top1s)),
      "best_top1_std": float(np.std(best_top1s, ddof=1)),
  }


def _format(template: str, value) -> str:
  return "n/a" if value is None else template.format(value)


def to_markdown(report: dict) -> str:
  """report.md: the models side by side, then the comparison."""
  names = [name for name in ("teacher", "student", "baseline") if name in report]
  lines = [
      "# kd_jax report",
      "",
      f"Dataset: {report['dataset']['name']} ({report['dataset']['num_train']} train, "
      f"{report['dataset']['num_test']} test, {report['dataset']['num_classes']} classes). "
      f"Devices: {report['devices']}.",
      "",
      "| | " + " | ".join(names) + " |",
      "|---" * (len(names) + 1) + "|",
  ]
  for key, title, template in MODEL_FIELDS:
    cells = [_format(template, report[name].get(key)) for name in names]
    lines.append(f"| {title} | " + " | ".join(cells) + " |")
  if "teacher_logits" in report:
    cache = report["teacher_logits"]
    kept = f"top {cache['top_k']} logits" if cache["top_k"] else "all logits"
    lines += [
        "",
        f"Offline distillation from stored teacher logits ({cache['kind']}, {cache['dtype']}, "
        f"{kept}): {cache['bytes'] / 2**20:.1f} MiB in {cache['folder']}, "
        f"{cache['time_s']:.1f} s to compute or load.",
    ]
  lines += ["", "| comparison | |", "|---|---|"]
  for key, title, template in COMPARISON_FIELDS:
    lines.append(f"| {title} | {_format(template, report['comparison'][key])} |")
  if "seeds" in report:
    lines += [
        "",
        f"Over seeds {report['seeds']['student']['seeds']}:",
        "",
        "| | top-1 (last) mean ± std | top-1 (best) mean ± std | runs (last) |",
        "|---|---|---|---|",
    ]
    for name, runs in report["seeds"].items():
      lines.append(
          f"| {name} | {runs['top1_mean']:.4f} ± {runs['top1_std']:.4f} | "
          f"{runs['best_top1_mean']:.4f} ± {runs['best_top1_std']:.4f} | "
          + ", ".join(f"{t:.4f}" for t in runs["top1"])
          + " |"
      )
  lines += ["", "![training curves](training_curves.png)", "", "![trade-offs](tradeoffs.png)"]
  return "\n".join(lines) + "\n"


def write_report(report: dict, workdir: str) -> None:
  """Writes <workdir>/report.json and <workdir>/report.md."""
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(to_markdown(report))
