"""Top-k accuracy and the report's comparison and seed summaries, against hand-made numbers."""

import numpy as np
import pytest

from kd_jax import evaluate, report


def _naive_topk_accuracy(logits_NxC, labels_N, k):
  """The top-k hit rate by counting: fewer than k classes outrank the label (ties: lower index)."""
  hits = 0
  for logits_C, label in zip(logits_NxC.tolist(), labels_N.tolist()):
    above = sum(
        1
        for c, value in enumerate(logits_C)
        if value > logits_C[label] or (value == logits_C[label] and c < label)
    )
    hits += above < k
  return hits / len(labels_N)


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_topk_accuracy_matches_a_naive_count_with_ties(k):
  rng = np.random.default_rng(0)
  logits_NxC = rng.integers(0, 3, (200, 7)).astype(np.float32)  # many ties
  labels_N = rng.integers(0, 7, 200)
  assert evaluate.topk_accuracy(logits_NxC, labels_N, k) == _naive_topk_accuracy(
      logits_NxC, labels_N, k
  )


def test_topk_accuracy_by_hand():
  logits_NxC = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [1.0, 2.0, 3.0]])
  labels_N = np.array([1, 1, 0, 0])
  # Row 0: label first. Row 1: tied for first, behind class 0. Row 2: second, ahead of
  # its tie. Row 3: last.
  assert evaluate.topk_accuracy(logits_NxC, labels_N, 1) == 0.25
  assert evaluate.topk_accuracy(logits_NxC, labels_N, 2) == 0.75
  assert evaluate.topk_accuracy(logits_NxC, labels_N, 3) == 1.0
  assert evaluate.topk_accuracy(logits_NxC, labels_N, 10) == 1.0


TEACHER = {"top1": 0.9, "param_bytes": 4000, "latency_ms": 2.0, "throughput": 1000.0}
STUDENT = {"top1": 0.8, "param_bytes": 500, "latency_ms": 0.5, "throughput": 5000.0}
BASELINE = {"top1": 0.75, "param_bytes": 500, "latency_ms": 0.5, "throughput": 5000.0}


def test_comparison_of_teacher_student_and_baseline():
  assert report.compare(TEACHER, STUDENT, BASELINE, 0.85) == pytest.approx(
      {
          "size_reduction": 8.0,
          "speedup_latency": 4.0,
          "speedup_throughput": 5.0,
          "agreement": 0.85,
          "kd_gain": 0.05,
      }
  )


def test_comparison_without_teacher_or_baseline_leaves_their_fields_empty():
  assert report.compare(None, STUDENT, None, None) == {
      "size_reduction": None,
      "speedup_latency": None,
      "speedup_throughput": None,
      "agreement": None,
      "kd_gain": None,
  }
  assert report.compare(TEACHER, STUDENT, None, 0.5)["kd_gain"] is None


def test_seed_summary_is_the_mean_and_sample_standard_deviation():
  summary = report.summarise_runs([0.7, 0.8, 0.9], [0.75, 0.85, 0.98], [3, 4, 5])
  assert summary["seeds"] == [3, 4, 5]
  assert summary["top1"] == [0.7, 0.8, 0.9] and summary["best_top1"] == [0.75, 0.85, 0.98]
  # Squared deviations 0.01, 0, 0.01 over n - 1 = 2: variance 0.01.
  assert summary["top1_mean"] == pytest.approx(0.8)
  assert summary["top1_std"] == pytest.approx(0.1)
  # Deviations -0.11, -0.01, 0.12 around 0.86: (0.0121 + 0.0001 + 0.0144) / 2 = 0.0133.
  assert summary["best_top1_mean"] == pytest.approx(0.86)
  assert summary["best_top1_std"] == pytest.approx(0.0133**0.5)


def test_markdown_shows_the_numbers_of_the_report():
  entry = dict(
      params=1000,
      best_top1=0.9,
      best_epoch=3,
      top5=0.99,
      flops=5e6,
      epochs=4,
      batch_size=64,
      learning_rate=0.01,
      devices=1,
      compute_dtype="float32",
      convolutions="oneDNN (CPU)",
      epoch_time_s=1.0,
      wall_time_s=4.0,
  )
  results = {
      "dataset": {"name": "digits", "num_train": 1437, "num_test": 360, "num_classes": 10},
      "devices": "1 x cpu",
      "teacher": {**entry, **TEACHER},
      "student": {**entry, **STUDENT, "exported_latency_ms": 0.75, "exported_throughput": 4000.0},
      "seeds": {"student": report.summarise_runs([0.7, 0.9], [0.8, 0.9], [0, 1])},
      "comparison": report.compare(TEACHER, STUDENT, None, 0.85),
  }
  lines = report.to_markdown(results).splitlines()
  assert "| top-1 (last epoch) | 0.9000 | 0.8000 |" in lines
  # Which convolutions the speeds were timed on; the export's only for the student.
  assert "| convolutions (timed) | oneDNN (CPU) | oneDNN (CPU) |" in lines
  assert "| latency ms (batch 1) | 2.000 | 0.500 |" in lines
  assert "| exported, XLA's convolutions: images/s | n/a | 4,000 |" in lines
  assert "| size reduction (teacher bytes / student bytes) | 8.00x |" in lines
  assert "| KD gain (student top-1 - baseline top-1) | n/a |" in lines
  assert "| student | 0.8000 ± 0.1414 | 0.8500 ± 0.0707 | 0.7000, 0.9000 |" in lines
