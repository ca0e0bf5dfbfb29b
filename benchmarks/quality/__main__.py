"""`python -m benchmarks.quality`: every task, every arm (the package docstring says what)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
from transformers import AutoTokenizer

from benchmarks.quality import report
from benchmarks.quality.arms import BY_NAME, Arm
from benchmarks.quality.cli import TaskSettings, parse_args, say
from benchmarks.quality.data import TaskData, prepare_task
from benchmarks.quality.evaluation import EvalSet, build_eval_set, evaluate_arm
from benchmarks.quality.minilm import MiniLM
from benchmarks.quality.model import arm_model, ensure_hf_dir, import_model
from benchmarks.quality.results import ArmResult
from onegen_jax.data.encoding import TaskTokenizer


@dataclasses.dataclass
class Budget:
  """--budget_s shared equally by the tasks; an arm costs about the costliest finished arm of its
  task (else of any task)."""

  seconds: float
  start: float
  tasks: int
  costs: dict[str, list[float]] = dataclasses.field(default_factory=dict)

  def overrun(self, mode: str, task_index: int) -> float | None:
    """The estimated cost of the next arm of `mode` if it would pass the task's share, else None."""
    if not self.seconds:
      return None
    finished = [c for costs in self.costs.values() for c in costs]
    estimate = max(self.costs.get(mode) or finished or [0.0])
    deadline = self.start + self.seconds * (task_index + 1) / self.tasks
    return estimate if time.time() + estimate > deadline else None

  def spent(self, mode: str, seconds: float) -> None:
    self.costs.setdefault(mode, []).append(seconds)


@dataclasses.dataclass
class Study:
  """The whole run's state: the record being written, the model source and the shared retriever."""

  run: report.Run
  hf_dir: str
  hf_tokenizer: object  # the HF tokenizer of hf_dir (chat template, EOS)
  minilm: MiniLM | None
  budget: Budget

  @property
  def args(self) -> argparse.Namespace:
    return self.run.args


def _start(args: argparse.Namespace) -> Study:
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start, backend = time.time(), jax.default_backend()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  os.makedirs(args.out, exist_ok=True)
  hf_dir = ensure_hf_dir(args)
  minilm = MiniLM(args.minilm_dir) if any(BY_NAME[a].minilm for a in args.arms) else None
  return Study(report.Run(args, backend, dtype, start), hf_dir,
               AutoTokenizer.from_pretrained(hf_dir), minilm,
               Budget(args.budget_s, start, len(args.tasks)))


def _run_arm(study: Study, data: TaskData, eval_set: EvalSet, run_dir: str, arm: Arm,
             tokenizer: TaskTokenizer) -> ArmResult:
  args, mode = study.args, data.settings.mode
  start = time.time()
  say(f"{mode}/{arm.name}: start")
  run, stats = arm_model(args, data, run_dir, arm, study.run.dtype, tokenizer)
  workdir = os.path.join(args.out, "eval", mode, arm.name)
  os.makedirs(workdir, exist_ok=True)
  eval_start = time.time()
  gold, generation = evaluate_arm(eval_set, run, arm, args, workdir)
  done = time.time()
  result = ArmResult(train=stats, gold=gold, generation=generation, eval_s=done - eval_start,
                     arm_s=done - start)
  study.budget.spent(mode, result.arm_s)
  say(f"{mode}/{arm.name}: {json.dumps(result.to_json(), default=float)}")
  return result


def _run_task(study: Study, task_index: int, settings: TaskSettings) -> None:
  """Imports the model for the task, prepares its data and eval set, runs its arms."""
  args, mode = study.args, settings.mode
  suffix = f"-L{args.num_layers}" if args.num_layers else ""
  run_dir = import_model(study.hf_dir, settings.task,
                         os.path.abspath(os.path.join(args.out, "runs", mode + suffix)),
                         args.num_layers)
  tokenizer = TaskTokenizer(os.path.join(run_dir, "tokenizer"), settings.task)
  data = prepare_task(settings, args, study.hf_tokenizer, tokenizer)
  study.run.data_counts[mode] = data.counts
  eval_set = build_eval_set(data, tokenizer, args.seq_len, study.minilm)
  results = study.run.results.setdefault(mode, {})
  for name in args.arms:
    estimate = study.budget.overrun(mode, task_index)
    if estimate is not None:
      say(f"{mode}/{name}: skipped (estimated {estimate:.0f} s would pass this task's share of "
          f"--budget_s={args.budget_s:.0f})")
      results[name] = ArmResult(skipped="budget")
      continue
    results[name] = _run_arm(study, data, eval_set, run_dir, BY_NAME[name], tokenizer)
    report.write(study.run)


def main(argv=None) -> bool:
  args = parse_args(argv)
  if args.record_from:
    report.append_section(args.record_from,
                          [f"Section appended afterwards by `{report.command()}`."])
    return True
  study = _start(args)
  for task_index, mode in enumerate(args.tasks):
    _run_task(study, task_index, TaskSettings.from_args(args, mode))
  print(report.write(study.run))
  if args.record:
    report.append_section(os.path.join(args.out, "quality.json"))
  return True


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
