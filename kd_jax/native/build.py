"""Compiles kd_jax's oneDNN convolution (onednn_conv.cc) into the library kd_jax loads.

Usage, once per environment after `pip install -r requirements.txt`:
  python -m kd_jax.native.build

Needs a C++17 compiler ($CXX, else c++) and the oneDNN wheels (onednn-cpu-gomp and
onednn-devel-cpu-gomp), which put libdnnl and its headers under the environment's prefix.
"""

import os
import shlex
import subprocess
import sys
import tempfile

import jax

from kd_jax import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")


def compile_command(output: str) -> list[str]:
  """The compiler invocation that builds the library into `output`."""
  include = os.path.join(sys.prefix, "include")
  lib = os.path.join(sys.prefix, "lib")
  return [
      *shlex.split(os.environ.get("CXX", "c++")),
      "-O2",
      "-std=c++17",
      "-shared",
      "-fPIC",
      "-w",  # XLA's FFI headers warn under GCC; none of it is ours
      f"-I{jax.ffi.include_dir()}",
      f"-I{include}",
      _SOURCE,
      f"-L{lib}",
      f"-Wl,-rpath,{lib}",
      "-ldnnl",
      "-o",
      output,
  ]


def main() -> int:
  """Builds the library next to the loader; returns the exit status."""
  os.makedirs(os.path.dirname(native.LIBRARY), exist_ok=True)
  if not os.path.exists(os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp")):
    print(
        f"kd_jax: oneDNN's headers are not under {sys.prefix}/include; "
        "pip install -r requirements.txt first",
        file=sys.stderr,
    )
    return 1
  # Written beside the target and renamed, so a failed build never leaves half a library.
  fd, staging = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(native.LIBRARY))
  os.close(fd)
  try:
    completed = subprocess.run(compile_command(staging), capture_output=True, text=True)
    if completed.returncode:
      print(completed.stderr[-4000:], file=sys.stderr)
      print(f"kd_jax: building {native.LIBRARY} failed (above)", file=sys.stderr)
      return 1
    os.chmod(staging, 0o755)
    os.replace(staging, native.LIBRARY)
  finally:
    if os.path.exists(staging):
      os.remove(staging)
  print(f"built {native.LIBRARY}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
