"""The run's record: tables and notes, OUT/quality.json and OUT/quality.md, and each task's section
of benchmarks/RESULTS.md (replaced in place as each arm finishes)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import time

from benchmarks import results_md
from benchmarks.quality.arms import label
from benchmarks.quality.cli import say
from benchmarks.quality.minilm import WINDOW
from benchmarks.quality.results import ArmResult, Generation, GoldRecall, TrainStats

Results = dict[str, dict[str, ArmResult]]  # mode -> arm key -> figures


def curves_png(mode: str, record_key: str) -> str:
  """The file name of a task's training curves (in OUT, and next to RESULTS.md with --record):
  one per task and --record_key, so a section's image is its own run's."""
  return f"quality_curves_{mode}.png" if record_key == "cpu" else (
      f"quality_curves_{record_key}_{mode}.png")


_MARK = "<!-- quality-study:{key}:{mode}:{end} -->"
_TITLES = {"rag": "multi-hop RAG", "el": "entity linking"}


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
  return results_md.command().replace("benchmarks.quality.__main__", "benchmarks.quality", 1)


def _cell(value, pct: bool = True) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "—"
  return f"{100 * value:.1f}" if pct else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def _queries(g: Generation | None) -> str:
  return f"{g.queries_emitted} / {g.gold_queries}" if g and g.gold_queries else "—"


def _first_query(g: Generation | None) -> str:
  return "—" if g is None or g.first_query_p is None else f"{g.first_query_p:.3f}"


def _loops(g: Generation | None) -> str:
  """Requests run to max_new_tokens, and those the loop stop ended when it was on."""
  if g is None or g.ran_to_limit is None:
    return "—"
  stopped = "" if g.loop_stopped is None else f" (+{g.loop_stopped} ended by the loop stop)"
  return f"{g.ran_to_limit}{stopped}"


def _rows(results: dict[str, ArmResult], figures) -> list[list[str]]:
  """A row per arm: its label, figures(generation, gold) as percentages, queries emitted, then
  tokens and queries trained, steps and times."""
  rows = []
  for name, r in results.items():
    g, t = r.generation, r.train
    cells = figures(g or Generation(), r.gold or GoldRecall())
    if r.skipped:
      rows.append([label(name), f"skipped ({r.skipped})", *["—"] * (len(cells) + 7)])
      continue
    trained = [_cell(v, False) if t.steps else "—"
               for v in (t.tokens, t.queries, t.steps, t.train_s)]
    rows.append([label(name), *map(_cell, cells), _queries(g), _first_query(g),
                 _loops(r.generation),
                 *trained, _cell(r.eval_s, False)])
  return rows


_TAIL = ["query tokens emitted / gold", "P(query token first)", "ran to max_new_tokens", "tokens trained",
         "queries trained", "steps", "train s", "eval s"]


def table(mode: str, results: dict[str, ArmResult], k: int) -> str:
  if mode == "rag":
    rows = _rows(results, lambda g, r: [g.em, g.f1, g.r1, g.rk, r.cand_r1, r.cand_rk, r.pool_r1,
                                        r.pool_rk])
    return "Multi-hop RAG (dev questions; x100):\n\n" + results_md.markdown_table(
        ["arm", "EM", "F1", "R@1 (generated)", f"R@{k} (generated)", "R@1 own paragraphs",
         f"R@{k} own paragraphs", "R@1 pool", f"R@{k} pool", *_TAIL], rows) + _per_set(results)
  rows = _rows(results, lambda g, r: [g.reference_f1, g.strong_f1, r.cand_r1, r.cand_rk,
                                      r.pool_r1, r.pool_rk, r.kb_r1])
  return "Entity linking (dev pieces; x100):\n\n" + results_md.markdown_table(
      ["arm", "micro-F1 (reference)", "micro-F1 (GERBIL strong)", "in-KB acc@1 (candidates)",
       f"R@{k} (candidates)", "acc@1 (pool)", f"R@{k} (pool)", "acc@1 (whole KB)", *_TAIL], rows)


def _per_set(results: dict[str, ArmResult]) -> str:
  """RAG's figures per dev source set (a table after the main one; "" when none has them)."""
  of = lambda r: ((r.generation.by_set if r.generation else {}), (r.gold.by_set if r.gold else {}))
  sets = sorted({s for r in results.values() for part in of(r) for s in part})
  rows = [[label(key), s, *map(_cell, (gen.get(s, {}).get("em"), gen.get(s, {}).get("f1"),
                                       gold.get(s, {}).get("cand_r1"),
                                       gold.get(s, {}).get("pool_r1")))]
          for key, r in results.items() if not r.skipped for gen, gold in [of(r)] for s in sets]
  if not rows:
    return ""
  return "\n\nPer dev set (x100):\n\n" + results_md.markdown_table(
      ["arm", "set", "EM", "F1", "R@1 own paragraphs", "R@1 pool"], rows)


def tables(results: Results, k: int) -> str:
  return "\n\n".join(table(mode, arms, k) for mode, arms in results.items())


def _settings_note(args: argparse.Namespace, mode: str) -> str:
  rows, seq, n_pos, n_neg = (getattr(args, f"{mode}_{f}") for f in ("rows", "seq_len", "n_pos",
                                                                     "n_neg"))
  shaping = (f"EL documents cut into pieces of <= {args.el_chunk_sentences or 'any'} sentences and "
             f"<= {args.el_chunk_tokens or 'any'} text tokens (sentence ends, else word ends, "
             f"never inside a mention); every {args.el_dev_every}th docs_train.jsonl document is "
             "dev" if mode == "el" else
             f"paragraphs cut to <= {args.rag_paragraph_tokens or 'any'} tokens (word end); "
             f"sets {args.qa_sets}, dev: their multi-hop questions; pool: every dev paragraph "
             f"and {'all' if args.rag_pool_distractors < 0 else args.rag_pool_distractors} "
             "distractors of --qa_extra_corpus")
  return (f"Training per arm (sizes {args.sizes}): {args.train_tokens:,} non-padding tokens "
          f"(--steps {args.steps or 'derived'}), {rows} rows x {seq} tokens (accum "
          f"{args.accum_steps}), lr {args.lr} ({args.schedule}, warmup {args.warmup_steps}), "
          f"remat {args.remat}; same seed and batches for every arm; {n_pos} anchors per example "
          f"(every valid one when fewer), {n_neg} own negatives per anchor (0 for the in-batch "
          f"arm; BPR needs its own; InfoNCE also uses "
          f"every in-batch key), loss weights 1:1, InfoNCE temperature 0.02, unless a row names "
          f"its own (arms.with_levers). Data: {shaping}; "
          f"training examples longer than {seq} tokens left out; document rows "
          f"{args.doc_rows}.")


def notes(args: argparse.Namespace, mode: str, data_counts: dict, backend: str,
          start: float) -> list[str]:
  out = [_settings_note(args, mode),
         f"Data: {json.dumps(data_counts.get(mode, {}))} (after subsetting; *_all before).",
         "Gold context: each gold query RET token of a dev answer (teacher-forced; the baselines "
         "embed its query text instead) ranked among its own candidates (RAG: the question's own "
         "paragraphs, HotpotQA's distractor setting; EL: the mention's REL candidates in the KB, "
         "a gold outside them a miss), in the pool (every document the evaluated dev lines list) "
         "and (EL, --el_whole_kb) the whole KB. Generated: free greedy one-pass generation "
         "searching the pool; R@k of score_rag; EL micro-F1 of the reference scorer and GERBIL "
         "strong match. Query tokens emitted: generated query RET tokens vs those of the gold "
         "answers.",
         f"Baseline query texts: the question + the sub-question (RAG); the mention + {WINDOW} "
         "characters of source text either side (EL). BM25: bm25s, stop words removed, ties "
         "broken by uid. Prior: the first REL candidate in the KB.",
         f"Run {time.time() - start:.0f} s on {backend} (compute dtypes: the machine line)."]
  if args.force_first_query:
    out.append("--force_first_query: the first generated token of every request was forced to "
               "the query RET token; the generation metrics are not quality figures.")
  if args.novel_documents and mode == "rag":
    out.append("--novel_documents: in free generation a retrieval inserted the best paragraph its "
               "question had not inserted yet (the R@k columns count what was inserted).")
  if args.num_layers:
    out.append(f"--num_layers={args.num_layers}: only the first layers of the model (debugging).")
  return out + args.note


def write(run: Run) -> str:
  """Writes OUT/quality.json and OUT/quality.md; returns the tables."""
  args = run.args
  text = tables(run.results, args.recall_k)
  machine = results_md.machine(_dtypes(run))
  record = {"command": command(), "machine": machine,
            "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            "args": dict(vars(args)), "backend": run.backend, "dtype": run.dtype,
            "data": run.data_counts,
            "results": {mode: {name: r.to_json() for name, r in arms.items()}
                        for mode, arms in run.results.items()},
            "wall_s": time.time() - run.start,
            "notes": {mode: notes(args, mode, run.data_counts, run.backend, run.start)
                      for mode in run.results}}
  with open(os.path.join(args.out, "quality.json"), "w") as f:
    json.dump(record, f, indent=2, default=float)
  with open(os.path.join(args.out, "quality.md"), "w") as f:
    f.write(f"Command: `{command()}`\n\nMachine: {machine}\n\n{text}\n")
  return text


def _train_lines(results: dict[str, ArmResult]) -> list[str]:
  """Per trained arm: steps, packing, steps without queries/targets, final losses; per arm with
  a fitted candidate prior, the fit."""
  out = []
  for name, r in results.items():
    if r.gold and r.gold.prior:
      p = r.gold.prior
      out.append(f"{label(name)}: prior weight {p['weight']:g} fit on {p['mentions']} training "
                 f"mentions ({p['skipped']} without a gold candidate left out); acc@1 there: "
                 f"cosine {_cell(p['cosine_acc'])}, prior {_cell(p['prior_acc'])}, combined "
                 f"{_cell(p['combined_acc'])}.")
    t: TrainStats = r.train
    if t.steps:
      out.append(f"{label(name)}: {t.steps}/{r.steps_planned} steps, packing "
                 f"{_cell(t.packing)}%, {t.steps_without_query} steps without a query, "
                 f"{t.steps_without_target} without a GEN target, {t.gen_targets:,} GEN targets, "
                 f"{_cell(t.tokens_per_s, False)} tokens/s; last tenth: L_gen "
                 f"{_cell(t.final_loss_gen, False)}, L_ret {_cell(t.final_loss_ret, False)}, "
                 f"in-batch accuracy {_cell(t.final_accuracy)}%.")
  return out


def _dtypes(run: Run) -> str:
  """The compute dtypes of training and evaluation, for the machine line (a study recorded
  before --eval_dtype evaluated in its training dtype)."""
  evaluation = getattr(run.args, "eval_dtype", None) or run.dtype
  return f"compute dtype {run.dtype} (training), {evaluation} (evaluation)"


def section(run: Run, mode: str) -> str:
  """The task's RESULTS.md section: commands, machine, date, table, curves, notes."""
  args, date = run.args, f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
  lines = [f"#### quality study: {_TITLES[mode]} (recorded {date})", "",
           *[f"Command: `{c}`" for c in dict.fromkeys(r.command or command()
                                                     for r in run.results[mode].values())], "",
           f"Machine: {results_md.machine(_dtypes(run))}", "",
           table(mode, run.results[mode], args.recall_k), "",
           f"Training curves: ![training curves]({curves_png(mode, args.record_key)})", "",
           *[f"- {n}" for n in _train_lines(run.results[mode])],
           *[f"- {n}" for n in notes(args, mode, run.data_counts, run.backend,
                                     run.start)]]
  return "\n".join(lines)


def record_task(run: Run, mode: str) -> None:
  """Replaces the task's section (same --record_key) in benchmarks/RESULTS.md, else appends it."""
  start, end = (_MARK.format(key=run.args.record_key, mode=mode, end=e) for e in ("start", "end"))
  text = results_md.read_results()
  block = f"{start}\n{section(run, mode)}\n{end}"
  if start in text and end in text:
    text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  with open(results_md.RESULTS, "w") as f:
    f.write(text)
  say(f"recorded the {mode} section in {results_md.RESULTS}")


def append_section(path: str, extra_notes: tuple[str, ...] | list[str] = ()) -> None:
  """Appends an earlier run's section (command, machine, date, tables, notes from its
  quality.json) at the end of benchmarks/RESULTS.md; nothing else in the file changes."""
  with open(path) as f:
    record = json.load(f)
  results = {mode: {name: ArmResult.from_json(r) for name, r in arms.items()}
             for mode, arms in record["results"].items()}
  run_notes = record.get("notes") or {}
  run_notes = [n for mode in results for n in (run_notes.get(mode, []) if isinstance(
      run_notes, dict) else run_notes)]
  k = record.get("args", {}).get("recall_k", 5)
  lines = [f'<a id="quality-{re.sub(r"[^0-9]", "", record["date"])[:12]}"></a>',
           f"### quality: OneGen vs baselines ({record['date']})", "",
           f"Command: `{record['command']}`", "", f"Machine: {record['machine']}", "",
           tables(results, k), "", *[f"- {n}" for n in [*dict.fromkeys(run_notes), *extra_notes]],
           ""]
  with open(results_md.RESULTS, "a") as f:
    f.write("\n" + "\n".join(lines))
  say(f"appended the section to {results_md.RESULTS}")
