"""Launchers as real processes on localhost: a launcher as two processes (jax.distributed, gloo
CPU collectives, 4 CPU devices each), the way every host of a pod runs the same command; the HTTP
server on a free port."""

import os
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
  """The tests' XLA_FLAGS: DEVICES emulated CPU devices, and
  - the collective timeout raised: XLA:CPU aborts a process when one device thread has not joined
    an all-reduce within 40 s, and on 2 loaded cores (two xdist workers, a server, its long
    sampled requests) that killed a server once (`rendezvous.cc: Termination timeout ... only 7
    of them arrived`);
  - LLVM at -O1 for the CPU code (XLA's default: -O3): the suite compiles hundreds of small
    programs and runs most of them a few times; the same HLO passes run. test_model.py and
    test_sharding.py with an empty cache: 52.5 s against 63.7 s at -O3 (at -O0, 48.2 s, but
    the numbers change enough to fail a sharding tolerance)."""
  return (f"--xla_force_host_platform_device_count={devices} "
          "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
          "--xla_backend_optimization_level=1")


def run_two_processes(module: str, flags: list[str], logs: str, timeout: int = 600) -> str:
  """Runs `python -m module *flags --distributed ...` as processes 0 and 1; asserts both exit 0;
  returns process 0's stdout. logs: path prefix of the per-process output files (files, not
  pipes: a full pipe would stall one process inside a collective)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
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


def serve(workdir, index, log_path, *flags) -> tuple[str, subprocess.Popen]:
  """(base url, process) of `launch.serve --workdir --index *flags` on a free localhost port,
  once its /health answers (output to log_path)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = open(log_path, "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--workdir={workdir}", f"--index={index}",
       f"--port={port}", *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    assert proc.poll() is None, open(log_path).read()[-3000:]
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return url, proc
    except httpx.TransportError:
      pass
    time.sleep(0.3)
  proc.kill()
  raise AssertionError(f"no /health in 180 s: {open(log_path).read()[-3000:]}")
