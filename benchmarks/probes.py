"""Running a measurement: wall time of a call, this process's memory, worker processes (clean
peak memory per configuration), flag lists."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

def rss_bytes() -> int:
  """This process's resident set size now."""
  return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
  """This process's peak resident set size (since start or the last `reset_peak_rss`)."""
  return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
  """Resets the kernel's peak-RSS counter of this process (Linux: clear_refs 5)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(re.findall(r"\d+", line)[0])
  raise KeyError(f"{field} is not in /proc/self/status")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
  """(seconds, result) of one call of `fn`; `fn` must block until its result is ready."""
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def parse_ints(text: str) -> list[int]:
  """"32,64,128" -> [32, 64, 128]."""
  return [int(x) for x in text.split(",") if x]


WORKER_RESULT = "RESULT "  # prefix of the JSON line a worker process prints


def spawn_worker(module: str, job: dict, argv: Sequence[str], env: dict | None = None) -> dict:
  """Runs `python -m module *argv --worker JOB` in a fresh process (clean memory figures; `env`:
  its environment, default this one's); returns the worker's result, or the job with "error":
  the last lines of its output."""
  cmd = [sys.executable, "-m", module, *argv, "--worker", json.dumps(job)]
  print("running", job, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith(WORKER_RESULT):
      return json.loads(line[len(WORKER_RESULT):])
  return {**job, "error": (proc.stdout + proc.stderr).strip().splitlines()[-3:]}


def worker_result(result: dict) -> None:
  """Prints a worker's result for `spawn_worker`."""
  print(WORKER_RESULT + json.dumps(result), flush=True)
