"""The model of every arm: the HF checkpoint imported once per task with the task's tokens, then
trained (or not) into a LoadedRun the evaluation serves.

A trained arm is an ordinary training run in OUT/train/MODE/ARM-<training fingerprint>:
checkpoints every --checkpoint_every steps (a rerun resumes from the latest one, data position
included), metrics.jsonl with one line per step (L_gen, L_ret, in-batch accuracy, valid queries,
GEN targets, packing), wall.jsonl with the duration of each completed fit call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np

from benchmarks.quality.arms import Arm
from benchmarks.quality.cli import say
from benchmarks.quality.data import TaskData
from benchmarks.quality.results import TrainStats, read_json_lines
from onegen_jax import hf
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.data.tasks import Task
from onegen_jax.inference.run_dir import LoadedRun, load_run
from onegen_jax.model.decoder import Decoder
from onegen_jax.train import loop
from onegen_jax.train.config import base_config
from onegen_jax.train.data import TrainData, make_train_data
from onegen_jax.train.program import batch_shape

PAD_VOCAB_TO = 128
# Per micro-batch budgets, generous: a query takes at least ~8 tokens of its example (EL markup:
# <MENTION>m</MENTION>[LK][_CONTINUE_]), a key at least ~16 tokens of its document row.
TOKENS_PER_QUERY, TOKENS_PER_KEY = 8, 16


def ensure_hf_dir(args: argparse.Namespace) -> str:
  """--hf_dir, or OUT/hf converted from --gguf (default: the SmolLM2 GGUF) when missing."""
  hf_dir = args.hf_dir or os.path.join(args.out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    gguf = args.gguf or hf.smollm2_gguf_path()
    say(f"converting {gguf} into {hf_dir}")
    hf.convert_gguf(gguf, hf_dir)
  return hf_dir


def layout_suffix(args: argparse.Namespace) -> str:
  """The directory suffix of an import and its training runs: "-unrolled" without scan_layers
  (the parameter tree's layout differs, so such runs never resume one another)."""
  return "" if args.scan_layers else "-unrolled"


def import_model(hf_dir: str, task: Task, run_dir: str, num_layers: int = 0,
                 scan_layers: bool = True) -> str:
  """Writes step 0 of `run_dir` from `hf_dir` with the task's tokens added (hf.add_task_tokens:
  rows from their descriptions, vocab padded to a multiple of 128) and the tokenizer in
  RUN/tokenizer; an existing import is kept. num_layers > 0 keeps only the first layers
  (debugging); scan_layers False: the unrolled layout ('layers_{i}')."""
  ckpt = Checkpointer(run_dir, async_save=False)
  if ckpt.latest_step() is not None:
    ckpt.close()
    return run_dir
  config = hf.config_from_hf(hf_dir, param_dtype="float32").replace(scan_layers=scan_layers)
  params = hf.load_hf_params(hf_dir, config)
  if num_layers and num_layers < config.num_layers:
    if scan_layers:
      params = {**params, "layers": jax.tree.map(lambda x: x[:num_layers], params["layers"])}
    else:
      params = {k: v for k, v in params.items()
                if not k.startswith("layers_") or int(k.split("_")[1]) < num_layers}
    config = config.replace(num_layers=num_layers)
  added = hf.add_task_tokens(params, config, hf_dir, task.name, PAD_VOCAB_TO)
  saved = {"task": task.name, "data": {"task": task.name},
           "hf": {"vocab_size": added.vocab_size, "source": os.path.abspath(hf_dir)}}
  ckpt.save_params(0, added.params, saved, added.model_config)
  ckpt.wait()
  ckpt.close()
  added.tokenizer.hf.save_pretrained(os.path.join(run_dir, "tokenizer"))
  say(f"imported {hf_dir} into {run_dir} for {task.name}: tokens {added.tokenizer.ids}, vocab "
      f"{added.vocab_size} padded to {added.model_config.vocab_size}")
  return run_dir


def train_config(args: argparse.Namespace, data: TaskData, run_dir: str, arm: Arm,
                 dtype: str) -> ml_collections.ConfigDict:
  """The config of one trained arm: everything but config.loss (and an arm's own n_neg) is the
  same for every arm."""
  s = data.settings
  n_neg = s.n_neg if arm.n_neg is None else arm.n_neg
  micro_tokens = s.rows // args.accum_steps * s.seq_len
  c = base_config(data.task.name)
  c.model.update(init_from=run_dir, dtype=dtype, remat_policy=args.remat,
                 dot_accumulation="auto")
  c.mesh.update(data=-1, fsdp=1)
  c.loss.update(negatives_across_micro_batches=arm.batch_scale > 1,
                **dataclasses.asdict(arm.loss))
  c.optim.update(lr=args.lr * arm.lr_scale, schedule=args.schedule, warmup_steps=args.warmup_steps)
  c.batch.update(rows=s.rows * arm.batch_scale, seq_len=s.seq_len,
                 accum_steps=args.accum_steps * arm.batch_scale,
                 num_queries=max(micro_tokens // TOKENS_PER_QUERY, s.n_pos),
                 num_keys=max(micro_tokens // TOKENS_PER_KEY, s.n_pos * (1 + n_neg)),
                 num_negatives=max(n_neg, 1))
  if arm.lora_rank:  # the run's base is model.init_from (the imported model)
    c.lora.update(enabled=True, rank=arm.lora_rank, alpha=2.0 * arm.lora_rank,
                  base_dtype="bfloat16")
  c.train.update(steps=args.steps, seed=args.seed, log_every=1, eval_every=0)
  c.checkpoint.update(every_steps=args.checkpoint_every, keep=1)
  c.data.update(train_path=data.train_path, db_path=data.db_path, dev_path="",
                tokenizer_path=os.path.join(run_dir, "tokenizer"), max_len=s.seq_len,
                seed=args.seed, n_pos_per_sent=s.n_pos, n_neg_per_pos=n_neg,
                document_text_weight=arm.document_text_weight)
  return c


def derive_steps(data: TrainData, train_tokens: int) -> tuple[int, float]:
  """(the steps whose batches hold at least `train_tokens` non-padding tokens, tokens per step),
  measured by packing those very batches (the same for every arm); the data position is then set
  back."""
  state, total, steps = data.get_state(), 0, 0
  while total < train_tokens:
    total += int(np.sum(next(data)["segment_ids"] > 0))
    steps += 1
  data.set_state(state)
  return max(steps, 1), total / max(steps, 1)


def train_stats(workdir: str, rows: int, seq_len: int) -> TrainStats:
  """The figures of a training run from its metrics.jsonl (the last line of each step wins) and
  wall.jsonl."""
  by_step = {m["step"]: m for m in read_json_lines(os.path.join(workdir, "metrics.jsonl"))
             if m.get("split") == "train"}
  steps = [by_step[k] for k in sorted(by_step)]
  if not steps:
    return TrainStats()
  column = lambda name: np.asarray([m.get(name, np.nan) for m in steps], np.float64)
  tail = slice(len(steps) - max(1, len(steps) // 10), None)
  queries, targets, packing = (column(n) for n in
                               ("num_valid_queries", "num_gen_targets", "packing_efficiency"))
  return TrainStats(
      train_s=float(sum(w["seconds"] for w in read_json_lines(os.path.join(workdir,
                                                                           "wall.jsonl")))),
      tokens=int(np.nansum(packing) * rows * seq_len), gen_targets=int(np.sum(targets)),
      queries=int(np.sum(queries)), steps=len(steps),
      steps_without_query=int(np.sum(queries == 0)),
      steps_without_target=int(np.sum(targets == 0)), packing=float(np.nanmean(packing)),
      tokens_per_s=steps[-1].get("tokens_per_s"),
      final_loss_gen=float(np.mean(column("loss_gen")[tail])),
      final_loss_ret=float(np.mean(column("loss_ret")[tail])),
      final_accuracy=float(np.mean(column("retrieval_accuracy")[tail])))


def train_arm(args: argparse.Namespace, data: TaskData, run_dir: str, arm: Arm, dtype: str,
              workdir: str) -> tuple[TrainStats, int]:
  """(stats, planned steps) after training the arm in `workdir` (resumed there; its final
  checkpoint saved)."""
  config = train_config(args, data, run_dir, arm, dtype)
  train_data = make_train_data(config, batch_shape(config))
  if not config.train.steps:
    config.train.steps, per_step = derive_steps(train_data, args.train_tokens)
    say(f"{data.settings.mode}/{arm.key}: train.steps = {config.train.steps} (their batches hold "
        f">= {args.train_tokens:,} non-padding tokens, {per_step:,.0f} a step)")
  metrics = read_json_lines(os.path.join(workdir, "metrics.jsonl"))
  first = max((m["step"] for m in metrics), default=0)
  start = time.time()
  _, final = loop.fit(config, workdir, data=train_data)
  last = final.get("preempted_at_step", config.train.steps)
  with open(os.path.join(workdir, "wall.jsonl"), "a") as f:
    f.write(json.dumps({"from_step": first, "to_step": last,
                        "seconds": time.time() - start}) + "\n")
  if "preempted_at_step" in final:  # SIGTERM: fit saved the step; the arm is not done
    say(f"{data.settings.mode}/{arm.key}: stopped at step {last} of {config.train.steps} "
        f"(SIGTERM; checkpoint saved in {workdir}); rerun the same command to resume")
    raise SystemExit(0)
  return train_stats(workdir, config.batch.rows, data.settings.seq_len), config.train.steps


def arm_model(args: argparse.Namespace, data: TaskData, run_dir: str, arm: Arm, dtype: str,
              workdir: str) -> tuple[LoadedRun, TrainStats, int]:
  """The arm's model for its evaluation, computing in --eval_dtype, as launch.infer would load
  it: the imported run as is when arm.loss is None, else the arm's final checkpoint after
  training it from the imported run in `dtype` (a LoRA arm's merged into its base); its stats
  and planned steps."""
  stats, steps, source = TrainStats(), 0, run_dir
  if arm.loss is not None:
    stats, steps = train_arm(args, data, run_dir, arm, dtype, workdir)
    say(f"{data.settings.mode}/{arm.key}: trained {stats}")
    source = workdir
  loaded = load_run(source, task=data.task.name)
  evaluated = Decoder(loaded.model.config.replace(dtype=args.eval_dtype,
                                                  dot_accumulation="auto"))
  return dataclasses.replace(loaded, model=evaluated, config={}), stats, steps
