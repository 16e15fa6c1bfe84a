"""Your own models: factories named "package.module:function", checked before any stage trains."""

import json
import os
import re
import textwrap

import pytest
from flax import nnx

from conftest import ROOT, small_config
from kd_jax import models, pipeline
from kd_jax.errors import UserInputError

EXAMPLES = os.path.join(ROOT, "examples")

BAD_FACTORIES = textwrap.dedent(
    """
    from flax import nnx

    def failing(*, num_classes, in_channels, rngs):
      raise RuntimeError("no such layer")

    def flat_output(*, num_classes, in_channels, rngs):
      return nnx.Linear(in_channels, num_classes, rngs=rngs)  # (B, H, W, classes)
    """
)


@pytest.mark.slow
def test_distils_into_the_example_student(quickstart_run, tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(EXAMPLES)
  name = "my_student:make_student"
  config = small_config(
      **{
          "student.model": name,
          "student.width_multiplier": 1.0,
          "baseline.enabled": False,
          "teacher.checkpoint": os.path.join(quickstart_run[0], "teacher"),  # trained already
      }
  )
  report = pipeline.train_and_evaluate(config, str(tmp_path))
  import my_student  # pylint: disable=g-import-not-at-top  # importable only from examples/

  expected_params = models.count_params(
      my_student.make_student(num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  )
  assert report["student"]["model"] == name
  assert report["student"]["params"] == expected_params
  assert report["student"]["epochs"] == config.student.epochs
  # Ten digit classes: chance is 0.1; the teacher's knowledge must have come through.
  assert report["student"]["top1"] > 0.3


@pytest.mark.parametrize(
    "model, message",
    [
        ("no_such_module_kd:make", "cannot import 'no_such_module_kd'"),
        ("bad_factories:missing", "has no function 'missing'"),
        ("bad_factories:failing", "the factory failed: RuntimeError: no such layer"),
        ("bad_factories:flat_output", r"returns \(2, 8, 8, 10\)"),
    ],
)
def test_bad_factory_is_one_line_before_any_training(tmp_path, monkeypatch, model, message):
  (tmp_path / "bad_factories.py").write_text(BAD_FACTORIES)
  monkeypatch.syspath_prepend(str(tmp_path))
  workdir = tmp_path / "run"
  with pytest.raises(UserInputError, match=message) as error:
    config = small_config(**{"student.model": model, "student.width_multiplier": 1.0})
    pipeline.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(error.value)
  assert not (workdir / "teacher").exists()


@pytest.mark.slow
def test_notebook_snippet_runs_outside_the_repository(tmp_path, monkeypatch, capsys):
  """docs/own_models.md's Python snippet, run as a notebook would, in another directory."""
  with open(os.path.join(ROOT, "docs", "own_models.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  (snippet,) = [block for block in blocks if "train_and_evaluate" in block]
  monkeypatch.chdir(tmp_path)
  exec(snippet, {})  # pylint: disable=exec-used  # the documentation's own code
  top1, kd_gain = map(float, capsys.readouterr().out.split()[-2:])
  with open(tmp_path / "kd_notebook_run" / "report.json") as f:
    report = json.load(f)
  assert (top1, kd_gain) == (report["student"]["top1"], report["comparison"]["kd_gain"])


def test_a_feature_method_with_a_model_without_features_is_one_line_up_front(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(EXAMPLES)
  workdir = tmp_path / "run"
  overrides = {"student.model": "my_student:make_student", "student.width_multiplier": 1.0}
  with pytest.raises(UserInputError, match="'my_student:make_student' provides no features"):
    pipeline.train_and_evaluate(small_config(**overrides, **{"distill.method": "at"}), str(workdir))
  assert not (workdir / "teacher").exists()
