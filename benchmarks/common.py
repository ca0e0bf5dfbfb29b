"""What every benchmark shares: model configs, the machine, memory probes and RESULTS.md.

Each benchmark prints one markdown table and `record`s it: a section is appended to
benchmarks/RESULTS.md (the exact command, the machine, the date, the table, notes) and the
benchmark's rows of the summary table at the top of that file are replaced by its latest figures,
each linked to its section.

Run every benchmark from the repository root as a module, e.g.
  .venv/bin/python -m benchmarks.inference_onepass
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from onegen_jax.model.config import PRESETS, ModelConfig, preset

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
_SUMMARY_START, _SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
_SUMMARY_HEADER = "| benchmark | figure | value | run |\n|---|---|---|---|"
_PREAMBLE = """# Benchmark results

Each script in `benchmarks/` appends a section below (exact command, machine, date, table, notes)
and refreshes its rows of this summary. Timings on the shared 2-core CPU machine are noisy (other
jobs run beside them): compare the ratios, whose baselines ran in the same invocation.

GPU: no accelerator was lent to the session that produced these figures; every GPU figure
(the full-size training throughput, the ~1B inference run) is **not measured**.

## Summary (latest figures)

"""

# Model shapes the benchmarks use besides the presets of onegen_jax.model.config.
BENCH_MODELS: dict[str, ModelConfig] = {
    # A ~34M-parameter Llama for CPU runs (float32 compute: bf16 matmuls are slow on CPU).
    "small-34m": ModelConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
        num_kv_heads=4, tie_embeddings=True, max_position_embeddings=8192, dtype="float32"),
    # TinyLlama-1.1B's shapes: the GPU training-throughput model and the ~1B inference model.
    "llama-1.1b": ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
        num_kv_heads=4, max_position_embeddings=2048),
    # The end-to-end smoke configuration of train_throughput on CPU.
    "smoke": ModelConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=2048),
}


def model_config(name: str, **overrides) -> ModelConfig:
  """A benchmark model (BENCH_MODELS) or a preset, with `overrides` applied."""
  if name in BENCH_MODELS:
    return BENCH_MODELS[name].replace(**overrides)
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(BENCH_MODELS) + sorted(PRESETS)}")
  return preset(name, **overrides)


def count_params(params) -> int:
  """Number of parameters in a pytree of arrays."""
  import jax  # noqa: PLC0415  (keeps this module importable before XLA flags are set)
  return sum(x.size for x in jax.tree.leaves(params))


def init_params(model, seed: int):
  """Random, unboxed parameters of a Decoder."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  probe = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda key: nn.unbox(model.init(key, probe, probe + 1, jnp.arange(8)[None])))
  return init(jax.random.key(seed))["params"]


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine(extra: str = "") -> str:
  """One line: CPU model, cores, RAM, load average (other jobs share this machine), jax version
  and devices (+ `extra`, e.g. torch)."""
  import jax  # noqa: PLC0415
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  load = "/".join(f"{x:.1f}" for x in os.getloadavg())
  line = (f"{cpu_model()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, load average {load} "
          f"(1/5/15 min, at the end); jax {jax.__version__}, {len(devices)} x {'/'.join(kinds)} "
          f"({jax.default_backend()})")
  return f"{line}; {extra}" if extra else line


def command() -> str:
  """The command that runs this process again, relative to the repository root."""
  python = sys.executable
  if python.startswith(os.getcwd()):
    python = os.path.relpath(python)
  module = os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace(os.sep, ".")
  return shlex.join([python, "-m", module, *sys.argv[1:]])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A GitHub markdown table; floats are printed with 4 significant digits."""
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def record(name: str, title: str, table: str, notes: Sequence[str],
           summary: Sequence[tuple[str, str]], extra_machine: str = "") -> None:
  """Appends a section to RESULTS.md and replaces this benchmark's summary rows.

  summary: (figure, value) pairs; a row with the same benchmark and figure is replaced in place.
  """
  now = datetime.datetime.now().astimezone()
  anchor = f"{name}-{now:%Y%m%d-%H%M%S}"
  section = "\n".join([
      f'<a id="{anchor}"></a>', f"### {name}: {title} ({now:%Y-%m-%d %H:%M %Z})", "",
      f"Command: `{command()}`", "", f"Machine: {machine(extra_machine)}", "", table, "",
      *[f"- {n}" for n in notes], ""])
  text = _read_results()
  head, rest = text.split(_SUMMARY_START, 1)
  rows_text, tail = rest.split(_SUMMARY_END, 1)
  rows = _summary_rows(rows_text)
  for figure, value in summary:
    rows[(name, figure)] = f"| {name} | {figure} | {value} | [{now:%Y-%m-%d %H:%M}](#{anchor}) |"
  body = "\n".join([_SUMMARY_HEADER, *rows.values()])
  with open(RESULTS, "w") as f:
    f.write(f"{head}{_SUMMARY_START}\n{body}\n{_SUMMARY_END}{tail.rstrip()}\n\n{section}")


def _read_results() -> str:
  if os.path.exists(RESULTS):
    with open(RESULTS) as f:
      return f.read()
  return f"{_PREAMBLE}{_SUMMARY_START}\n{_SUMMARY_HEADER}\n{_SUMMARY_END}\n\n## Runs\n"


def _summary_rows(text: str) -> dict[tuple[str, str], str]:
  """The summary's data rows keyed by (benchmark, figure), in order."""
  rows = {}
  for line in text.strip().splitlines()[2:]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[(cells[0], cells[1])] = line.strip()
  return rows


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
