"""The run's figures: written as PNG, and showing the data they were given."""

import numpy as np
import pytest

from kd_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def _history(losses, accuracies, distilled=False):
  extra = {"ce": 1.0, "kl": 0.1} if distilled else {}
  return [
      {"epoch": epoch, "loss": loss, "test_top1": top1, **extra}
      for epoch, (loss, top1) in enumerate(zip(losses, accuracies), start=1)
  ]


def _entry(top1, param_bytes, latency_ms, model):
  return {"top1": top1, "param_bytes": param_bytes, "latency_ms": latency_ms, "model": model}


@pytest.fixture
def report():
  return {
      "dataset": {"name": "digits"},
      "teacher": _entry(0.97, 311_016, 0.30, "resnet8"),
      "student": _entry(0.91, 52_308, 0.098, "dsconv_student"),
      "baseline": _entry(0.90, 52_308, 0.099, "dsconv_student"),
      "comparison": {},
  }


def test_training_curves_plot_each_stage_loss_and_accuracy(tmp_path):
  histories = {
      "teacher": _history([1.4, 0.5, 0.2], [0.90, 0.95, 0.97]),
      "student": _history([3.4, 2.5, 2.0], [0.30, 0.60, 0.70], distilled=True),
      "baseline": _history([2.0, 1.2, 0.9], [0.40, 0.55, 0.65]),
  }
  path = tmp_path / "curves.png"
  fig = plots.plot_training_curves(histories, str(path))

  _assert_png(path)
  loss_ax, accuracy_ax = fig.axes
  for ax, key in ((loss_ax, "loss"), (accuracy_ax, "test_top1")):
    lines = ax.get_lines()
    assert len(lines) == 3
    for line, history in zip(lines, histories.values()):
      np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
      np.testing.assert_array_equal(line.get_ydata(), [record[key] for record in history])
  labels = [text.get_text() for text in loss_ax.get_legend().get_texts()]
  assert labels == ["teacher", "student (distillation loss)", "baseline"]


def test_tradeoffs_plot_each_model_against_size_and_latency(tmp_path, report):
  path = tmp_path / "tradeoffs.png"
  fig = plots.plot_tradeoffs(report, str(path))

  _assert_png(path)
  size_ax, latency_ax = fig.axes
  for ax, key in ((size_ax, "param_bytes"), (latency_ax, "latency_ms")):
    points = np.concatenate([points.get_offsets() for points in ax.collections])
    expected = [(report[name][key], report[name]["top1"]) for name in plots.STAGE_COLORS]
    np.testing.assert_allclose(points, expected)
    labels = [text.get_text() for text in ax.texts]
    assert labels == [
        "teacher (resnet8)",
        "student (dsconv_student)",
        "baseline (dsconv_student)",
    ]
    # Student and baseline share a size: the better one's label above, the
    # other's below, so they cannot overlap.
    _, student_label, baseline_label = ax.texts
    assert student_label.xyann[1] > 0 > baseline_label.xyann[1]


def test_tradeoffs_without_a_baseline(tmp_path, report):
  del report["baseline"]
  fig = plots.plot_tradeoffs(report, str(tmp_path / "tradeoffs.png"))
  assert all(len(ax.collections) == 2 for ax in fig.axes)
