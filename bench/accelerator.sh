#!/usr/bin/env bash
# One command for a GPU machine, offline, in at most 8 minutes (bench/README.md):
#
#   bash bench/accelerator.sh RESULTS_DIR            on a GPU: fails at once if JAX sees none
#   bash bench/accelerator.sh --smoke RESULTS_DIR    the same steps at tiny sizes on any device
#                                                    (or KD_SMOKE=1)
#
# 1. prints the versions it finds, then installs the small pure-Python packages kd_jax needs
#    that the machine lacks, from the wheels in bench/wheels/ (no network);
# 2. bench/gpu_checks.py: bfloat16 keeps float32 weights and logits, a short training run, its
#    export run on the device;
# 3. bench/throughput.py in float32 and bfloat16, and bench/torch_peer.py on the same device
#    (eager, channels_last, torch.compile; fp32 and bf16 autocast) where torch is installed;
# 4. a CIFAR-10 recipe on the JPEG tree in bench/data/cifar10 (or $KD_CIFAR_DIR), if present.
#
# RESULTS_DIR gets accelerator.json (every figure, and how each part went), accelerator.log,
# parts/ (each part's output) and runs/ (the training runs' workdirs). Exits 1 if a part failed.
set -euo pipefail

SMOKE=${KD_SMOKE:-0}
if [[ ${1:-} == --smoke ]]; then
  SMOKE=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash bench/accelerator.sh [--smoke] RESULTS_DIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=$(mkdir -p "$1" && cd "$1" && pwd)
PARTS=$RESULTS/parts
RUNS=$RESULTS/runs
mkdir -p "$PARTS" "$RUNS"
PYTHON=${PYTHON:-python3}
# Every part together ends this many seconds after the start; on a GPU each part also has its
# own cap. The smoke mode checks the script, not the timings: it has a generous budget alone.
if ((SMOKE)); then
  DEADLINE=$((SECONDS + ${KD_BUDGET_S:-3600}))
else
  DEADLINE=$((SECONDS + ${KD_BUDGET_S:-420}))
fi
CIFAR_DIR=${KD_CIFAR_DIR:-$REPO/bench/data/cifar10}
# The packages kd_jax needs that a GPU machine may lack (module, then wheel name), all pure Python.
WHEELS=(ml_collections:ml-collections absl:absl-py flatbuffers:flatbuffers)
cd "$REPO"
exec > >(tee "$RESULTS/accelerator.log") 2>&1
export TQDM_DISABLE=1 # progress bars would fill the log
# One compilation cache for all the parts: each process would otherwise compile again the
# programs that initialise the same models (seconds each on a CPU).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

echo "== versions"
"$PYTHON" - "$PARTS/versions.json" <<'EOF'
import importlib.metadata, json, platform, sys

names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax",
         "optax", "orbax-checkpoint", "numpy", "opencv-python-headless", "opencv-python",
         "scikit-learn", "matplotlib", "safetensors", "torch", "torchvision", "ml-collections",
         "absl-py", "flatbuffers", "tensorboardX", "tensorflow", "tensorflow-cpu",
         "tensorflow-datasets", "grain"]
versions = {"python": platform.python_version()}
for name in names:
  try:
    versions[name] = importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    versions[name] = None
for name, version in versions.items():
  print(f"  {name:24} {version or '-'}")
json.dump(versions, open(sys.argv[1], "w"))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "  (no nvidia-smi)"

echo "== packages"
missing=()
for entry in "${WHEELS[@]}"; do
  "$PYTHON" -c "import ${entry%%:*}" 2>/dev/null || missing+=("${entry#*:}")
done
if ((${#missing[@]})); then
  if ! compgen -G "bench/wheels/*.whl" >/dev/null; then
    echo "FAILED: ${missing[*]} missing and bench/wheels/ holds no wheels: fill it beforehand" \
      "(bench/README.md) and send it along" >&2
    exit 1
  fi
  # Into a folder of their own: the machine's environment stays as it was.
  SITE=$(mktemp -d)
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links bench/wheels \
    --target "$SITE" "${missing[@]}"; then
    echo "FAILED: could not install ${missing[*]} from bench/wheels/: fill it again" \
      "(bench/README.md)" >&2
    exit 1
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "  installed from bench/wheels: ${missing[*]}"
fi
echo "${missing[*]}" >"$PARTS/installed.txt"
"$PYTHON" - "$SMOKE" <<'EOF'
import importlib, sys

needed = ["jax", "flax", "optax", "orbax.checkpoint", "cv2", "numpy", "sklearn", "tqdm",
          "matplotlib", "safetensors", "ml_collections", "absl", "flatbuffers"]
missing = []
for name in needed:
  try:
    importlib.import_module(name)
  except ImportError as e:
    missing.append(f"{name} ({e})")
if missing:
  sys.exit("FAILED: kd_jax cannot run here, missing: " + "; ".join(missing))
print("  kd_jax's packages all import")

import jax

print(f"== devices\n  {jax.default_backend()}: {jax.devices()}")
if sys.argv[1] != "1" and jax.default_backend() != "gpu":
  sys.exit("FAILED: JAX sees no GPU: is its CUDA plugin installed (jax-cuda13-plugin)? "
           "For the CPU, run with --smoke")
EOF

STATUS=()
# run_part NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds (fewer when the
# budget runs out), its output in the log and in parts/NAME.out, and notes how it went.
run_part() {
  local name=$1 cap=$2 rc=0
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((SMOKE || left < cap)); then cap=$left; fi
  if ((cap < 20)); then
    STATUS+=("$name=skipped: the time budget was spent")
    return
  fi
  echo "== $name (at most $cap s): $*"
  local start=$SECONDS
  timeout --kill-after=20 "$cap" "$@" 2>&1 | tee "$PARTS/$name.out" || rc=$?
  if ((rc == 0)); then
    STATUS+=("$name=ok in $((SECONDS - start)) s")
  elif ((rc == 124 || rc == 137)); then
    STATUS+=("$name=FAILED: stopped after $cap s")
  else
    STATUS+=("$name=FAILED: exit status $rc after $((SECONDS - start)) s")
  fi
}

if ((SMOKE)); then
  THROUGHPUT_SIZES=(--steps=1 --warmup=0 --batch=8 --only=student_offline)
  TORCH_ARGS=(--device cpu --steps 1 --batch 8 --variants eager)
  # The recipe shrunk to seconds: one epoch each of small models on small images.
  CIFAR_ARGS=(--config=configs/cifar.py --config.teacher.model=resnet8
    --config.student.width_multiplier=0.25 --config.teacher.epochs=1 --config.student.epochs=1
    --config.teacher.batch_size=8 --config.student.batch_size=8 --config.baseline.enabled=false
    --config.teacher.optimizer.warmup_epochs=0 --config.student.optimizer.warmup_epochs=0
    --config.data.image_size=8 --config.eval.latency_repeats=1 --config.eval.throughput_repeats=1
    --config.export.enabled=false)
  CHECKS_ARGS=(--smoke)
else
  THROUGHPUT_SIZES=()
  TORCH_ARGS=(--device cuda)
  # configs/cifar.py's CPU-sized variant, until the fast recipe replaces it.
  CIFAR_ARGS=(--config=configs/cifar.py:budget)
  CHECKS_ARGS=()
fi

run_part checks 150 "$PYTHON" bench/gpu_checks.py --workdir="$RUNS/checks" "${CHECKS_ARGS[@]}"
for dtype in float32 bfloat16; do
  run_part "throughput_$dtype" 90 "$PYTHON" bench/throughput.py --compute_dtype=$dtype \
    "${THROUGHPUT_SIZES[@]}"
done
if "$PYTHON" -c "import torch" 2>/dev/null; then
  for autocast in none bf16; do
    run_part "torch_$autocast" 100 "$PYTHON" bench/torch_peer.py --autocast $autocast \
      "${TORCH_ARGS[@]}"
  done
else
  STATUS+=("torch_none=skipped: torch is not installed")
  STATUS+=("torch_bf16=skipped: torch is not installed")
fi
if [[ -d $CIFAR_DIR/train && -d $CIFAR_DIR/test ]]; then
  run_part cifar $((DEADLINE - SECONDS)) "$PYTHON" launch.py "${CIFAR_ARGS[@]}" \
    --workdir="$RUNS/cifar" --config.data.source=folder --config.data.dir="$CIFAR_DIR"
else
  STATUS+=("cifar=skipped: no CIFAR-10 tree at $CIFAR_DIR (train/ and test/; bench/README.md)")
fi

echo "== summary"
"$PYTHON" - "$RESULTS" "$SMOKE" "$SECONDS" "${STATUS[@]}" <<'EOF'
import json, os, sys

results, smoke, seconds, *statuses = sys.argv[1:]
parts = os.path.join(results, "parts")


def last_json(name):
  """The part's last output line, where it is the JSON object the bench scripts end with."""
  try:
    with open(os.path.join(parts, f"{name}.out")) as f:
      return json.loads(f.read().strip().splitlines()[-1])
  except (OSError, IndexError, ValueError):
    return None


summary = {"smoke": smoke == "1", "seconds": int(seconds), "status": {}, "figures": {}}
summary["versions"] = json.load(open(os.path.join(parts, "versions.json")))
summary["installed_from_wheels"] = open(os.path.join(parts, "installed.txt")).read().split()
for entry in statuses:
  name, status = entry.split("=", 1)
  summary["status"][name] = status
  summary["figures"][name] = last_json(name)
report = os.path.join(results, "runs", "cifar", "report.json")
if os.path.exists(report):
  summary["figures"]["cifar"] = json.load(open(report))
with open(os.path.join(results, "accelerator.json"), "w") as f:
  json.dump(summary, f, indent=2)
for name, status in summary["status"].items():
  print(f"  {name:20} {status}")
print(f"  {int(seconds)} s in all; figures in {results}/accelerator.json")
sys.exit(any(s.startswith("FAILED") for s in summary["status"].values()))
EOF
