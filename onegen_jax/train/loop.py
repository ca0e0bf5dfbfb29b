"""The fit loop: config -> mesh, model, optimizer, compiled program -> trained state and metrics.

`train.steps` = 0 derives the steps from `train.epochs` and the data (derive_steps), before the
learning-rate schedule is built; the checkpointed config holds the derived value.

Checkpoints (when a workdir is given) hold the train state, the data iterator state and the
config: a restarted run resumes from the latest complete step with the same batches. SIGTERM
saves at the next step boundary and returns normally; a non-finite loss stops the run (the last
good checkpoint untouched) or, with `train.nan_policy="skip"`, drops that step's update.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import time
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np
import tqdm

from onegen_jax import sharding
from onegen_jax.checkpoint import Checkpointer, dumps_config, read_model_config
from onegen_jax.data.loader import to_global
from onegen_jax.data.packing import BatchPacker, BatchShape, Corpus, packing_efficiency
from onegen_jax.data.records import ConfigError
from onegen_jax.model.config import ModelConfig, preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.encode import Encoder
from onegen_jax.train import metrics as metrics_lib
from onegen_jax.train.data import TrainData, allgather_json, make_train_data
from onegen_jax.train.optimizer import adamw, learning_rate_schedule
from onegen_jax.train.preemption import PreemptionWatcher
from onegen_jax.train.retrieval_eval import dev_recall
from onegen_jax.train.step import (LossConfig, TrainProgram, TrainState, batch_shardings,
                                   build_train_program)

# Fields of ModelConfig that change numerics or speed but not the parameter tree: a config may
# override them on top of a checkpoint's model (init_from); scan_layers comes from the checkpoint.
_NUMERIC_FIELDS = ("param_dtype", "dtype", "remat_policy", "attention_impl")
MEASURED_STEPS = 8  # steps packed to measure examples per step when deriving train.steps


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """`config.model`: a preset name plus overrides of any ModelConfig field; with `init_from`, the
  shapes come from that run's checkpoint and only numeric fields are overridden."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  if model.get("init_from"):
    base, _ = read_model_config(model.init_from)
    return base.replace(**{k: model[k] for k in _NUMERIC_FIELDS if k in model})
  return preset(model.preset, **{k: v for k, v in model.items() if k in fields})


def batch_shape(config: ml_collections.ConfigDict) -> BatchShape:
  """The shape of one micro-batch: `config.batch.rows` rows split over `accum_steps`."""
  b = config.batch
  if b.rows % b.accum_steps:
    raise ValueError(f"batch.rows={b.rows} is not a multiple of batch.accum_steps={b.accum_steps}")
  return BatchShape(b.rows // b.accum_steps, b.seq_len, b.num_queries, b.num_keys, b.num_negatives,
                    b.max_positives)


def example_batch(config: ml_collections.ConfigDict) -> dict:
  """An empty batch with the run's static shapes (leading micro-batch axis when accumulating)."""
  batch = BatchPacker(Corpus({}), batch_shape(config)).emit()
  m = config.batch.accum_steps
  return {k: np.repeat(v[None], m, axis=0) for k, v in batch.items()} if m > 1 else batch


def build_program(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None,
                  model: ModelConfig | None = None) -> TrainProgram:
  """Mesh (over `devices`, default all), model, optimizer and the compiled program."""
  mesh = sharding.make_mesh(**config.mesh, devices=devices)
  rows = config.batch.rows // config.batch.accum_steps
  batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % batch_axes:
    raise ValueError(f"{rows} rows per micro-batch do not split over data x fsdp = {batch_axes} devices")
  o = config.optim
  schedule = learning_rate_schedule(o.lr, config.train.steps, o.schedule, o.warmup_steps)
  tx = adamw(schedule, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm)
  return build_train_program(Decoder(model or model_config(config.model)), tx, schedule,
                             LossConfig(**config.loss), mesh, example_batch(config),
                             config.batch.accum_steps, config.train.nan_policy)


def derive_steps(config: ml_collections.ConfigDict, data: TrainData,
                 measured_steps: int = MEASURED_STEPS) -> tuple[int, str]:
  """(steps, the line that explains them): ceil(train.epochs x training examples / examples per
  step). Batches are packed, so examples per step is measured by packing the first
  `measured_steps` steps (every process's shards), not read from the config."""
  if not hasattr(data, "examples_per_step"):
    raise ConfigError("train.steps: 0 derives it from train.epochs, which needs data.kind='jsonl'; "
                      "set train.steps")
  epochs, examples = config.train.epochs, data.stats["counts"]["examples"]
  per_step = data.examples_per_step(measured_steps)
  steps = math.ceil(epochs * examples / per_step)
  return steps, (f"train.steps = {epochs:g} epochs x {examples:,} examples / {per_step:.1f} "
                 f"examples per step (measured over the first {measured_steps} steps) = {steps}")


def _with_steps(config: ml_collections.ConfigDict, data: TrainData) -> ml_collections.ConfigDict:
  """`config` when train.steps is set, else a copy with the steps derived (and said)."""
  if config.train.steps:
    return config
  steps, line = derive_steps(config, data)
  _say(line)
  config = copy.deepcopy(config)
  config.train.steps = steps
  return config


class _BatchFill:
  """Examples per step and what closed the batches, from the data's `last_step_info` (each shard
  batch's loader.TrainIterator.last_batch_info): `log` gives examples_per_step since the last log
  and warns once when the key budget, not the rows, closed most batches so far."""

  def __init__(self, num_keys: int):
    self.num_keys = num_keys
    self.examples, self.steps, self.closed, self.warned = 0, 0, collections.Counter(), False

  def add(self, infos: list[dict]):
    self.examples += sum(i["examples"] for i in infos)
    self.steps += 1
    self.closed.update(i["limited_by"] for i in infos)

  def log(self, efficiency: float) -> dict[str, float]:
    """{"examples_per_step": global mean since the last log} (a collective over processes)."""
    gathered = allgather_json([self.examples, self.closed["keys"], sum(self.closed.values())])
    examples, by_keys, batches = (sum(g[i] for g in gathered) for i in range(3))
    metrics = {"examples_per_step": examples / self.steps}
    self.examples = self.steps = 0
    if not self.warned and 2 * by_keys > batches:
      self.warned = True
      _say(f"warning: the key budget (batch.num_keys={self.num_keys}) closed {by_keys} of "
           f"{batches} batches so far while rows were left empty (packing efficiency "
           f"{efficiency:.2f}): documents with several keys fill it first; raise batch.num_keys")
    return metrics


def _globalize(program: TrainProgram, batch: dict) -> dict:
  """This process's rows (and every host's index fields) -> global arrays on the mesh."""
  micro = batch["tokens"].ndim == 3
  return to_global(batch, batch_shardings(program.mesh, {k: v.ndim for k, v in batch.items()}, micro))


def evaluate(program: TrainProgram, params, batches: Iterable[dict]) -> dict[str, float]:
  """Metrics over many batches, each weighted by its number of targets / valid queries."""
  per_batch = [jax.device_get(program.evaluate(params, _globalize(program, b))) for b in batches]
  gen = np.array([m["num_gen_targets"] for m in per_batch])
  ret = np.array([m["num_valid_queries"] for m in per_batch])
  average = lambda name, w: float(np.sum([m[name] for m in per_batch] * w) / max(np.sum(w), 1.0))
  return {"loss_gen": average("loss_gen", gen), "loss_ret": average("loss_ret", ret),
          "retrieval_accuracy": average("retrieval_accuracy", ret),
          "num_valid_queries": float(np.sum(ret))}


def _say(message: str):
  """Progress for the user, from process 0 only."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def _evaluate_all(program: TrainProgram, params, data: TrainData, encoder: Encoder | None):
  """Held-out loss and in-batch metrics, plus Recall@1/@10 against the db when there is one."""
  metrics = evaluate(program, params, data.eval_batches())
  if encoder is not None:
    metrics.update(dev_recall(encoder, params, data.database, data.dev_records))
  return metrics


def _initial_state(config, program: TrainProgram, ckpt: Checkpointer | None, data: TrainData):
  """The latest checkpoint of this run, else `init_from`'s parameters, else a fresh init."""
  latest = ckpt.latest_step() if ckpt else None
  if latest is not None:
    state, data_state = ckpt.restore(latest, program.abstract_state)
    if data_state is not None:
      data.set_state(data_state)
    _say(f"resumed from step {latest} of {ckpt.manager.directory}")
    return state
  state = program.init_state(config.train.seed)
  if config.model.get("init_from"):
    source = Checkpointer(config.model.init_from)
    params = source.restore_params(source.latest_step(), program.abstract_state.params)
    source.close()
    state = state.replace(params=params)  # fresh optimizer state (Adam moments are zeros)
  return state


def fit(config: ml_collections.ConfigDict, workdir: str | None = None,
        data: TrainData | None = None) -> tuple[TrainState, dict[str, float]]:
  """Trains until `config.train.steps`; returns the final state and final metrics.

  data: overrides the config's data (tests inject batches through it).
  """
  if not config.train.steps and not config.train.get("epochs"):
    raise ConfigError("train.steps and train.epochs are both 0: set one of them")
  data = data or make_train_data(config, batch_shape(config))  # bad data fails before compiling
  config = _with_steps(config, data)
  model = model_config(config.model)
  program = build_program(config, model=model)
  ckpt = workdir and Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                  config.checkpoint.best_metric or None, config.checkpoint.best_mode)
  state = _initial_state(config, program, ckpt, data)
  writer = metrics_lib.MetricsWriter(workdir)
  preemption = PreemptionWatcher()
  flops = metrics_lib.flops_per_token(model, config.batch.seq_len)
  peak = metrics_lib.peak_flops_per_device()
  encoder = Encoder(program.model, program.mesh, rows=batch_shape(config).rows,
                    seq_len=config.batch.seq_len) if hasattr(data, "database") else None
  first_step = int(state.step)
  _say(f"mesh {dict(program.mesh.shape)}, {sum(x.size for x in jax.tree.leaves(state.params)):,} "
       f"parameters, start at step {first_step}")
  if hasattr(data, "stats"):
    _say(f"data: {data.stats['counts']}" + "".join(f"\n  warning: {w}" for w in data.stats["warnings"][:20]))
  saved_config = dumps_config(config)
  final: dict[str, float] = {}
  last_saved = first_step

  def save(step, force=False, eval_metrics=None):
    """Saves on the checkpoint interval, when forced, and with eval metrics to rank by."""
    nonlocal last_saved
    ranked = eval_metrics is not None and bool(config.checkpoint.best_metric)
    if ranked and config.checkpoint.best_metric not in eval_metrics:
      raise ValueError(f"checkpoint.best_metric={config.checkpoint.best_metric!r} is not an eval "
                       f"metric; these are: {sorted(eval_metrics)}")
    if ckpt and step != last_saved and (force or ranked or ckpt.manager.should_save(step)):
      ckpt.save(step, state, data.get_state(), saved_config, model, force=True,
                metrics=eval_metrics if ranked else None)
      last_saved = step

  progress = tqdm.tqdm(range(first_step, config.train.steps), initial=first_step,
                       total=config.train.steps, disable=jax.process_index() != 0, mininterval=2)
  start, tokens = time.time(), 0
  fill = _BatchFill(config.batch.num_keys)
  for step in progress:
    batch = next(data)
    if hasattr(data, "last_step_info"):
      fill.add(data.last_step_info)
    state, metrics = program.step(state, _globalize(program, batch))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(metrics["loss"]) and config.train.nan_policy == "stop":
      if ckpt:
        ckpt.wait()
      raise FloatingPointError(
          f"step {step + 1}: loss is {metrics['loss']}, grad norm {metrics['grad_norm']}; stopped "
          f"(the last checkpoint is step {ckpt.latest_step() if ckpt else None}). "
          "Set train.nan_policy='skip' to drop such steps instead.")
    done = step + 1
    tokens += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()  # about: equal shards
    if done % config.train.log_every == 0 or done == config.train.steps:
      elapsed = time.time() - start
      metrics.update(packing_efficiency=packing_efficiency(batch), tokens_per_s=tokens / elapsed,
                     model_tflops_per_s=tokens * flops / elapsed / 1e12)
      if peak:
        metrics["mfu"] = tokens * flops / elapsed / (peak * len(program.mesh.devices.flat))
      if fill.steps:
        metrics.update(fill.log(metrics["packing_efficiency"]))
      writer.write(done, metrics)
      _say(f"step {done}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
      final = {f"train_{k}": v for k, v in metrics.items()}
    heldout = None
    if config.train.eval_every and done % config.train.eval_every == 0 and done < config.train.steps:
      heldout = _evaluate_all(program, state.params, data, encoder)
      writer.write(done, heldout, prefix="eval")
      _say(f"step {done} eval: {heldout}")
    save(done, eval_metrics=heldout)
    if preemption.should_stop(done):
      save(done, force=True)
      final["preempted_at_step"] = done
      _say(f"preempted: saved step {done}, exiting")
      break
  else:
    heldout = _evaluate_all(program, state.params, data, encoder)
    writer.write(int(state.step), heldout, prefix="eval")
    final.update({f"eval_{k}": v for k, v in heldout.items()})
    save(int(state.step), force=True, eval_metrics=heldout)
  if ckpt:
    ckpt.wait()
    ckpt.close()
  preemption.close()
  writer.close()
  final["step"] = int(state.step)
  final["wall_s"] = time.time() - start
  return state, final
