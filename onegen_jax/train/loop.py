"""The fit loop: config -> mesh, model, optimizer, compiled program -> trained state and metrics."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm

from onegen_jax import sharding
from onegen_jax.data import synthetic
from onegen_jax.data.packing import BatchShape, pack_batches, packing_efficiency, stack_micro_batches
from onegen_jax.model.config import ModelConfig, preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.train.optimizer import adamw, learning_rate_schedule
from onegen_jax.train.step import LossConfig, TrainProgram, TrainState, build_train_program


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """`config.model`: a preset name plus overrides of any ModelConfig field."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  overrides = {k: v for k, v in model.items() if k in fields}
  return preset(model.preset, **overrides)


def batch_shape(config: ml_collections.ConfigDict) -> BatchShape:
  """The shape of one micro-batch: `config.batch.rows` rows split over `accum_steps`."""
  b = config.batch
  if b.rows % b.accum_steps:
    raise ValueError(f"batch.rows={b.rows} is not a multiple of batch.accum_steps={b.accum_steps}")
  return BatchShape(b.rows // b.accum_steps, b.seq_len, b.num_queries, b.num_keys, b.num_negatives)


def synthetic_batches(config: ml_collections.ConfigDict):
  """(endless shuffled train batches, held-out batches) of the synthetic task."""
  d = config.data
  task = synthetic.make_task(seed=d.seed, num_train=d.num_train, num_heldout=d.num_heldout,
                             num_negatives=config.batch.num_negatives)
  if task.vocab_size > model_config(config.model).vocab_size:
    raise ValueError(f"the synthetic task needs vocab_size >= {task.vocab_size}")
  shape = batch_shape(config)

  def train() -> Iterator[dict]:
    for epoch in itertools.count():
      order = np.random.default_rng((d.seed, epoch)).permutation(len(task.train))
      yield from pack_batches((task.train[i] for i in order), task.corpus, shape)

  return train(), list(pack_batches(task.heldout, task.corpus, shape))


def group_micro_batches(batches: Iterator[dict], accum_steps: int) -> Iterator[dict]:
  """Stacks every `accum_steps` consecutive batches on a leading micro-batch axis (1: as is)."""
  if accum_steps == 1:
    yield from batches
    return
  while group := list(itertools.islice(batches, accum_steps)):
    if len(group) == accum_steps:
      yield stack_micro_batches(group)


def evaluate(program: TrainProgram, params, batches: Iterable[dict]) -> dict[str, float]:
  """Metrics over many batches, each weighted by its number of targets / valid queries."""
  per_batch = [jax.device_get(program.evaluate(params, b)) for b in batches]
  gen = np.array([m["num_gen_targets"] for m in per_batch])
  ret = np.array([m["num_valid_queries"] for m in per_batch])
  average = lambda name, w: float(np.sum([m[name] for m in per_batch] * w) / max(np.sum(w), 1.0))
  return {"loss_gen": average("loss_gen", gen), "loss_ret": average("loss_ret", ret),
          "retrieval_accuracy": average("retrieval_accuracy", ret),
          "num_valid_queries": float(np.sum(ret))}


def build_program(config: ml_collections.ConfigDict, example_batch: dict,
                  devices: list[jax.Device] | None = None) -> TrainProgram:
  """Mesh (over `devices`, default all), model, optimizer and the compiled program for batches
  like `example_batch`."""
  mesh = sharding.make_mesh(**config.mesh, devices=devices)
  rows = config.batch.rows // config.batch.accum_steps
  batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % batch_axes:
    raise ValueError(f"{rows} rows per micro-batch do not split over data x fsdp = {batch_axes} devices")
  o = config.optim
  schedule = learning_rate_schedule(o.lr, config.train.steps, o.schedule, o.warmup_steps)
  tx = adamw(schedule, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm)
  return build_train_program(Decoder(model_config(config.model)), tx, schedule,
                             LossConfig(**config.loss), mesh, example_batch,
                             config.batch.accum_steps)


def fit(config: ml_collections.ConfigDict, log=print) -> tuple[TrainState, dict[str, float]]:
  """Trains for `config.train.steps` steps; returns the final state and final metrics.

  Logs train metrics every `train.log_every` steps and held-out metrics every `train.eval_every`.
  """
  train_batches, heldout = synthetic_batches(config)
  batches = group_micro_batches(train_batches, config.batch.accum_steps)
  first = next(batches)
  program = build_program(config, first)
  state = program.init_state(config.train.seed)
  log(f"mesh {dict(program.mesh.shape)}, {sum(x.size for x in jax.tree.leaves(state.params)):,} "
      f"parameters, {len(heldout)} held-out batches")
  start, tokens = time.time(), 0
  progress = tqdm.tqdm(range(config.train.steps), disable=jax.process_index() != 0, mininterval=2)
  batch = first
  for step in progress:
    state, metrics = program.step(state, batch)
    metrics = jax.device_get(metrics)  # waits for the step: one program in flight at a time
    tokens += int(np.sum(batch["segment_ids"] > 0))
    if not np.isfinite(metrics["loss"]):
      raise FloatingPointError(f"step {step}: loss is {metrics['loss']}")
    if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.steps:
      metrics.update(packing_efficiency=packing_efficiency(batch),
                     tokens_per_s=tokens / (time.time() - start))
      progress.write(f"step {step + 1}: " + " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items())))
    if config.train.eval_every and (step + 1) % config.train.eval_every == 0:
      progress.write(f"step {step + 1} held-out: {evaluate(program, state.params, heldout)}")
    if step + 1 < config.train.steps:
      batch = next(batches)
  final = {f"train_{k}": float(v) for k, v in metrics.items()}
  final.update({f"heldout_{k}": v for k, v in evaluate(program, state.params, heldout).items()})
  final["steps"] = config.train.steps
  final["wall_s"] = time.time() - start
  return state, final
