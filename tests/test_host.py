"""The host allocator setting: big per-step buffers stop page-faulting on the CPU backend."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # two Python processes

# A 32 MiB elementwise op: glibc's default mmaps and unmaps its output each
# time, so each call page-faults all 8,192 of its pages in again; with freed
# memory kept, the calls after the first few fault none (the median call: the
# heap may still grow once in a while).
_PROBE = """
import json, resource, sys
from kd_jax import host
applied = host.reuse_freed_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
relu = jax.jit(jax.nn.relu)
x = jnp.ones((128, 16, 16, 256), jnp.float32)
for _ in range(20):  # until the heap has grown to what the calls need
  jax.block_until_ready(relu(x))
faults = []
for _ in range(21):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(relu(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_call": sorted(faults)[10]}))
"""


def _probe(mode: str) -> dict:
  result = subprocess.run(
      [sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_reusing_freed_memory_stops_the_page_faults():
  default, reused = _probe("default"), _probe("reuse")
  assert default["faults_per_call"] > 4000  # what the setting is for
  assert reused["applied"] and reused["faults_per_call"] < 100
