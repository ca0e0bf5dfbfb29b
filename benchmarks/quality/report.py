"""The run's record: tables and notes, OUT/quality.json and OUT/quality.md, and its section at the
end of benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import time

from benchmarks import common
from benchmarks.quality.arms import BY_NAME
from benchmarks.quality.cli import say
from benchmarks.quality.minilm import WINDOW
from benchmarks.quality.results import ArmResult, Generation, GoldRecall

Results = dict[str, dict[str, ArmResult]]  # mode -> arm name -> figures


@dataclasses.dataclass
class Run:
  """What quality.json holds besides the results."""

  args: argparse.Namespace
  backend: str
  dtype: str
  start: float  # time.time() at the start
  data_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  results: Results = dataclasses.field(default_factory=dict)


def command() -> str:
  """The command of this run (`python -m benchmarks.quality ...`)."""
  return common.command().replace("benchmarks.quality.__main__", "benchmarks.quality", 1)


def _cell(value, pct: bool = True) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "—"
  return f"{100 * value:.1f}" if pct else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def _rows(results: dict[str, ArmResult], figures) -> list[list[str]]:
  """A row per arm: its label, figures(generation, gold) as percentages, then tokens and times."""
  rows = []
  for name, r in results.items():
    cells = figures(r.generation or Generation(), r.gold or GoldRecall())
    if r.skipped:
      rows.append([BY_NAME[name].label, f"skipped ({r.skipped})", *["—"] * (len(cells) + 2)])
      continue
    rows.append([BY_NAME[name].label, *map(_cell, cells), _cell(r.train.tokens, False),
                 _cell(r.train.train_s, False), _cell(r.eval_s, False)])
  return rows


def tables(results: Results) -> str:
  parts = []
  if "rag" in results:
    rows = _rows(results["rag"], lambda g, r: [g.em, g.f1, g.r1, g.r5, r.gold_r1, r.gold_r5])
    parts.append("Multi-hop RAG (dev questions; x100):\n\n" + common.markdown_table(
        ["arm", "EM", "F1", "R@1 (generated)", "R@5 (generated)", "R@1 (gold context)",
         "R@5 (gold context)", "tokens trained", "train s", "eval s"], rows))
  if "el" in results:
    rows = _rows(results["el"], lambda g, r: [g.reference_f1, g.strong_f1, r.gold_r1, r.gold_r5])
    parts.append("Entity linking (dev documents; x100):\n\n" + common.markdown_table(
        ["arm", "micro-F1 (reference)", "micro-F1 (GERBIL strong)",
         "in-KB acc. (gold mentions)", "R@5 (gold mentions)", "tokens trained", "train s",
         "eval s"], rows))
  return "\n\n".join(parts)


def _flag_notes(args: argparse.Namespace, backend: str) -> list[str]:
  notes = []
  if args.force_first_query:
    notes.append("--force_first_query: the first generated token of every request was forced "
                 "to the query RET token (to exercise retrieval during generation); the "
                 "generation metrics are not quality figures.")
  if args.num_layers:
    notes.append(f"--num_layers={args.num_layers}: only the first layers of the model were kept "
                 "(debugging).")
  if backend == "cpu":
    notes.append(f"CPU proof run: {args.steps} steps per trained arm prove that every arm and "
                 "metric path works; the figures say nothing about quality.")
  return notes


def notes(args: argparse.Namespace, data_counts: dict, backend: str, dtype: str,
          start: float) -> list[str]:
  return [
      *_flag_notes(args, backend),
      f"Training per arm: {args.steps} steps x {args.rows} rows x {args.seq_len} tokens "
      f"(accum {args.accum_steps}), lr {args.lr} ({args.schedule}), same seed and batches for "
      f"every arm; RAG {args.rag_n_pos} anchors x {args.rag_n_neg} negatives, EL "
      f"{args.el_n_pos} x {args.el_n_neg}; InfoNCE temperature {args.temperature}.",
      f"Data: {json.dumps(data_counts)} (train/dev/db after subsetting; *_all before).",
      "R@k (generated): fraction of a question's gold paragraphs among the top k of the "
      "retrievals the model made while generating (score_rag); R@k (gold context): a query "
      "RET token fed the gold text hits when a positive is in the top k. In-KB acc.: the same "
      "at each gold mention's [LK], top 1.",
      "Pipeline queries: the question + the sub-question written since the last paragraph (RAG); "
      f"the mention + {WINDOW} characters of source text either side (EL). RIT never learns to "
      "write: retrieval only.",
      f"Whole run {time.time() - start:.0f} s on {backend}, compute dtype {dtype}.",
      *args.note]


def write(run: Run) -> str:
  """Writes OUT/quality.json and OUT/quality.md; returns the tables."""
  table = tables(run.results)
  machine = common.machine(f"compute dtype {run.dtype}")
  args = run.args
  record = {"command": command(), "machine": machine,
            "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            "args": dict(vars(args)), "backend": run.backend, "dtype": run.dtype,
            "data": run.data_counts,
            "results": {mode: {name: r.to_json() for name, r in arms.items()}
                        for mode, arms in run.results.items()},
            "wall_s": time.time() - run.start,
            "notes": notes(args, run.data_counts, run.backend, run.dtype, run.start)}
  with open(os.path.join(args.out, "quality.json"), "w") as f:
    json.dump(record, f, indent=2, default=float)
  with open(os.path.join(args.out, "quality.md"), "w") as f:
    f.write(f"Command: `{command()}`\n\nMachine: {machine}\n\n{table}\n")
  return table


def _read_record(path: str) -> tuple[dict, str, str, list[str]]:
  """(quality.json, its date, its command, its notes), filling in what older files lack."""
  with open(path) as f:
    record = json.load(f)
  modified = datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone()
  date = record.get("date") or f"{modified:%Y-%m-%d %H:%M %Z}"
  command_line = record.get("command")
  if not command_line:  # written before quality.json held it: quality.md's first line has it
    with open(os.path.join(os.path.dirname(path), "quality.md")) as f:
      command_line = f.readline().strip().removeprefix("Command: `").removesuffix("`")
  run_notes = record.get("notes") or notes(argparse.Namespace(**record["args"]), record["data"],
                                           record["backend"], record["dtype"],
                                           time.time() - record["wall_s"])
  return record, date, command_line, run_notes


def append_section(path: str, extra_notes: tuple[str, ...] | list[str] = ()) -> None:
  """Appends a run's section (command, machine, date, tables, notes from its quality.json) at the
  end of benchmarks/RESULTS.md; nothing else in the file changes."""
  record, date, command_line, run_notes = _read_record(path)
  results = {mode: {name: ArmResult.from_json(r) for name, r in arms.items()}
             for mode, arms in record["results"].items()}
  section = "\n".join([
      f'<a id="quality-{re.sub(r"[^0-9]", "", date)[:12]}"></a>',
      f"### quality: OneGen vs GIT + MiniLM pipeline, RIT and no fine-tuning ({date})", "",
      f"Command: `{command_line}`", "", f"Machine: {record['machine']}", "", tables(results), "",
      *[f"- {n}" for n in [*run_notes, *extra_notes]], ""])
  if os.path.exists(common.RESULTS):
    with open(common.RESULTS, "a") as f:
      f.write("\n" + section)
  else:
    with open(common.RESULTS, "w") as f:
      f.write(common._read_results().rstrip() + "\n\n" + section)
  say(f"appended the section to {common.RESULTS}")
