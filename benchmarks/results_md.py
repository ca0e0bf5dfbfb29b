"""benchmarks/RESULTS.md: each benchmark's section and its summary rows, and what a section names
(the command, the machine).

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
import shlex
import sys
from collections.abc import Sequence

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
  text = read_results()
  head, rest = text.split(_SUMMARY_START, 1)
  rows_text, tail = rest.split(_SUMMARY_END, 1)
  rows = _summary_rows(rows_text)
  for figure, value in summary:
    rows[(name, figure)] = f"| {name} | {figure} | {value} | [{now:%Y-%m-%d %H:%M}](#{anchor}) |"
  body = "\n".join([_SUMMARY_HEADER, *rows.values()])
  with open(RESULTS, "w") as f:
    f.write(f"{head}{_SUMMARY_START}\n{body}\n{_SUMMARY_END}{tail.rstrip()}\n\n{section}")


def read_results() -> str:
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
