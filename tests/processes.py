"""Running a launcher as two real processes on localhost (jax.distributed, gloo CPU collectives,
4 CPU devices each), the way every host of a pod runs the same command."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_two_processes(module: str, flags: list[str], logs: str, timeout: int = 600) -> str:
  """Runs `python -m module *flags --distributed ...` as processes 0 and 1; asserts both exit 0;
  returns process 0's stdout. logs: path prefix of the per-process output files (files, not
  pipes: a full pipe would stall one process inside a collective)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  files = [(open(f"{logs}-{i}.out", "w+"), open(f"{logs}-{i}.err", "w+")) for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, *flags, "--distributed",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=out, stderr=err, text=True) for i, (out, err) in enumerate(files)]
  for p, (_, err) in zip(procs, files):
    p.wait(timeout=timeout)
    err.seek(0)
    assert p.returncode == 0, err.read()[-4000:]
  files[0][0].seek(0)
  return files[0][0].read()
