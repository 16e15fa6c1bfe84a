"""Figures of a run, as PNG: training curves, and accuracy against model cost.

Figures are built as plain `matplotlib.figure.Figure` objects, which render
through the Agg backend, rather than through pyplot: that needs no display,
keeps no global figure list to leak, and leaves the process's backend alone.
"""

import math

from matplotlib import ticker
from matplotlib.figure import Figure

STAGE_COLORS = {"teacher": "tab:blue", "student": "tab:orange", "baseline": "tab:green"}
_DPI = 120
_FIGSIZE = (11, 4.2)
# Points this close in x (as a ratio) get their labels stacked so they don't overlap.
_NEAR_RATIO = 2.0
_LABEL_GAP_PT = 6
_LABEL_LINE_PT = 11
# Beyond this many epochs, markers would hide the line.
_MAX_MARKED_EPOCHS = 30


def _color(name: str, index: int) -> str:
  """A stage's colour, the same in every figure; other names take the cycle's."""
  return STAGE_COLORS.get(name, f"C{index}")


def _label_log_axis(axis, formatter: ticker.Formatter) -> None:
  """Labels a log axis at 1, 2 and 5 times each power of ten, and nowhere else.

  Values often span less than a decade, where labels at powers of ten alone
  would leave the axis nearly bare; matplotlib's own minor labels then crowd.
  """
  axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(formatter)
  axis.set_minor_formatter(ticker.NullFormatter())


def plot_training_curves(histories: dict[str, list[dict]], path: str) -> Figure:
  """Training loss and test top-1 accuracy per epoch, one line per stage.

  Args:
    histories: stage name ("teacher", "student", "baseline") to its per-epoch
      records, as in metrics.jsonl: {"epoch": 1, "loss": ..., "test_top1": ...}.
    path: the PNG file to write.

  Returns:
    The figure, for inspection; it is already saved.
  """
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  loss_ax, accuracy_ax = fig.subplots(1, 2)
  for index, (name, history) in enumerate(histories.items()):
    # A distilled stage's loss mixes cross-entropy with the teacher term, so it
    # is not comparable with the others' cross-entropy; the legend says so.
    label = f"{name} (distillation loss)" if any("kl" in r for r in history) else name
    for ax, key, line_label in ((loss_ax, "loss", label), (accuracy_ax, "test_top1", name)):
      points = [(record["epoch"], record[key]) for record in history if key in record]
      if not points:
        continue
      epochs, values = zip(*points)
      ax.plot(
          epochs,
          values,
          color=_color(name, index),
          marker="o" if len(points) <= _MAX_MARKED_EPOCHS else None,
          markersize=4,
          label=line_label,
      )
  loss_ax.set(title="Training loss", xlabel="epoch", ylabel="loss (log scale)", yscale="log")
  accuracy_ax.set(title="Test accuracy", xlabel="epoch", ylabel="top-1 accuracy")
  _label_log_axis(loss_ax.yaxis, ticker.FormatStrFormatter("%g"))
  for ax in (loss_ax, accuracy_ax):
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.savefig(path, dpi=_DPI)
  return fig


def _label_offsets(xs: list[float], ys: list[float]) -> list[float]:
  """Vertical offset in points of each point's label.

  Among points at about the same x, the most accurate one's label goes just
  above it and the others' below, one line further down for each.
  """
  offsets = []
  for i, (x, y) in enumerate(zip(xs, ys)):
    near = [j for j, other in enumerate(xs) if abs(math.log(other / x)) < math.log(_NEAR_RATIO)]
    rank = sum(1 for j in near if (ys[j], -j) > (y, -i))
    offsets.append(_LABEL_GAP_PT if rank == 0 else -_LABEL_GAP_PT - _LABEL_LINE_PT * rank)
  return offsets


def plot_tradeoffs(report: dict, path: str) -> Figure:
  """Test top-1 accuracy against parameter bytes and against latency, per model.

  Args:
    report: the run's report (report.json); its "teacher", "student" and
      "baseline" entries, those present, are plotted.
    path: the PNG file to write.

  Returns:
    The figure, for inspection; it is already saved.
  """
  names = [name for name in STAGE_COLORS if name in report]  # in stage order
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  panels = (
      ("param_bytes", "parameter size (log scale)", ticker.EngFormatter(unit="B")),
      ("latency_ms", "latency at batch 1, ms (log scale)", ticker.FormatStrFormatter("%g")),
  )
  ys = [report[name]["top1"] for name in names]
  for ax, (key, xlabel, formatter) in zip(axes, panels):
    xs = [report[name][key] for name in names]
    for index, (name, x, y, offset) in enumerate(zip(names, xs, ys, _label_offsets(xs, ys))):
      ax.scatter([x], [y], s=50, color=_color(name, index), zorder=3)
      ax.annotate(
          f"{name} ({report[name]['model']})",
          (x, y),
          xytext=(7, offset),
          textcoords="offset points",
          va="bottom" if offset > 0 else "top",
          fontsize=9,
      )
    ax.set_xscale("log")
    # Room on the right for the labels and around the points.
    low, high = min(xs), max(xs)
    ax.set_xlim(low / 1.6, high * 3.0)
    _label_log_axis(ax.xaxis, formatter)
    ax.set(xlabel=xlabel)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("test top-1 accuracy")
  spread = max(ys) - min(ys)
  axes[0].set_ylim(min(ys) - 0.15 * spread - 0.02, max(ys) + 0.15 * spread + 0.02)
  title = "Accuracy against model cost"
  if "dataset" in report:
    title += f" ({report['dataset']['name']})"
  fig.suptitle(title)
  fig.savefig(path, dpi=_DPI)
  return fig
