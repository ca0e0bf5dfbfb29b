"""The model of every arm: the HF checkpoint imported once per task with the task's tokens, then
trained (or not) into a LoadedRun the evaluation serves."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np

from benchmarks.quality.arms import Arm
from benchmarks.quality.cli import say
from benchmarks.quality.data import TaskData
from benchmarks.quality.results import TrainStats
from onegen_jax import hf, sharding
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.tasks import Task
from onegen_jax.inference.run import LoadedRun, load_run
from onegen_jax.model.decoder import Decoder
from onegen_jax.train import loop
from onegen_jax.train.config import base_config
from onegen_jax.train.data import TrainData, make_train_data
from onegen_jax.train.program import batch_shape, model_config

PAD_VOCAB_TO = 128


def ensure_hf_dir(args: argparse.Namespace) -> str:
  """--hf_dir, or OUT/hf converted from --gguf (default: the SmolLM2 GGUF) when missing."""
  hf_dir = args.hf_dir or os.path.join(args.out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    gguf = args.gguf or hf.smollm2_gguf_path()
    say(f"converting {gguf} into {hf_dir}")
    hf.convert_gguf(gguf, hf_dir)
  return hf_dir


def import_model(hf_dir: str, task: Task, run_dir: str, num_layers: int = 0) -> str:
  """Writes step 0 of `run_dir` from `hf_dir` with the task's tokens added (hf.add_task_tokens:
  rows from their descriptions, vocab padded to a multiple of 128) and the tokenizer in
  RUN/tokenizer; an existing import is kept. num_layers > 0 keeps only the first layers
  (debugging)."""
  ckpt = Checkpointer(run_dir, async_save=False)
  if ckpt.latest_step() is not None:
    ckpt.close()
    return run_dir
  config = hf.config_from_hf(hf_dir, param_dtype="float32")
  params = hf.load_hf_params(hf_dir, config)
  if num_layers and num_layers < config.num_layers:
    params = {**params, "layers": jax.tree.map(lambda x: x[:num_layers], params["layers"])}
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


class CountingData:
  """The fit loop's data (a TrainData), counting what the train steps consume."""

  def __init__(self, data: TrainData):
    self._data = data
    self.tokens = self.gen_targets = self.queries = self.batches = 0

  def __next__(self) -> dict:
    batch = next(self._data)
    self.tokens += int(np.sum(batch["segment_ids"] > 0))
    self.gen_targets += int(np.sum(batch["loss_weight"]))
    self.queries += int(np.sum(batch["query_valid"]))
    self.batches += 1
    return batch

  def __getattr__(self, name):
    return getattr(self._data, name)


def train_config(args: argparse.Namespace, data: TaskData, run_dir: str, arm: Arm,
                 dtype: str) -> ml_collections.ConfigDict:
  """The config of one trained arm: everything but config.loss is the same for every arm."""
  s = data.settings
  micro = args.rows // args.accum_steps
  c = base_config(data.task.name)
  c.model.update(init_from=run_dir, dtype=dtype, remat_policy="full")
  c.mesh.update(data=-1, fsdp=1)
  c.loss.update(temperature=args.temperature, **dataclasses.asdict(arm.loss))
  c.optim.update(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps)
  # Queries and keys per micro-batch: generous bounds (examples are packed until one is full).
  c.batch.update(rows=args.rows, seq_len=args.seq_len, accum_steps=args.accum_steps,
                 num_queries=8 * micro * s.n_pos, num_keys=8 * micro * s.n_pos * (1 + s.n_neg),
                 num_negatives=max(s.n_neg, 1))
  c.train.update(steps=args.steps, seed=args.seed, log_every=max(args.steps // 4, 1),
                 eval_every=0)
  c.checkpoint.update(every_steps=10**9)
  c.data.update(train_path=data.train_path, db_path=data.db_path, dev_path="",
                tokenizer_path=os.path.join(run_dir, "tokenizer"), max_len=args.seq_len,
                seed=args.seed, n_pos_per_sent=s.n_pos, n_neg_per_pos=s.n_neg)
  return c


def _train(config: ml_collections.ConfigDict) -> tuple[dict, TrainStats]:
  """(parameters, stats) after `config`'s training from its init_from run."""
  start = time.time()
  counting = CountingData(make_train_data(config, batch_shape(config)))
  state, final = loop.fit(config, None, data=counting)
  params = jax.block_until_ready(state.params)
  del state
  return params, TrainStats(
      train_s=time.time() - start, train_loop_s=final.get("wall_s"), tokens=counting.tokens,
      gen_targets=counting.gen_targets, queries=counting.queries, steps=counting.batches,
      final_loss=final.get("train_loss"), final_loss_gen=final.get("train_loss_gen"),
      final_loss_ret=final.get("train_loss_ret"))


def arm_model(args: argparse.Namespace, data: TaskData, run_dir: str, arm: Arm, dtype: str,
              tokenizer: TaskTokenizer) -> tuple[LoadedRun, TrainStats]:
  """The arm's model (compute dtype `dtype`): the imported run as is when arm.loss is None, else
  the parameters after training the arm from it."""
  if arm.loss is None:
    loaded = load_run(run_dir, task=data.task.name)
    model = Decoder(loaded.model.config.replace(dtype=dtype))
    return dataclasses.replace(loaded, model=model, config={}), TrainStats()
  config = train_config(args, data, run_dir, arm, dtype)
  params, stats = _train(config)
  say(f"{data.settings.mode}/{arm.name}: trained {stats}")
  return LoadedRun(Decoder(model_config(config.model)), params, sharding.make_mesh(data=-1),
                   tokenizer, data.task, {}), stats
