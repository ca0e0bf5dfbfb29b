"""The fit loop: config -> compiled program (program.py) -> trained state and metrics.

Checkpoints (when a workdir is given) hold the train state, the data iterator state and the
config: a restarted run resumes from the latest complete step with the same batches. SIGTERM
saves at the next step boundary and returns normally; a non-finite loss stops the run (the last
good checkpoint untouched) or, with `train.nan_policy="skip"`, drops that step's update.
A LoRA run (config.lora.enabled) saves its trainable tree and optimizer state only; the config
item records its base ({"lora": {"base": {"workdir", "step"}}}: model.init_from and the step
read, or none for a random base), from which the frozen tree is rebuilt at start and on resume.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np
import tqdm

from onegen_jax.checkpoint import Checkpointer, dumps_config, restore_target
from onegen_jax.model import lora
from onegen_jax.data.loader import to_global
from onegen_jax.data.packing import packing_efficiency
from onegen_jax.data.records import ConfigError
from onegen_jax.retrieval.encode import Encoder
from onegen_jax.train import metrics as metrics_lib
from onegen_jax.train.data import TrainData, make_train_data
from onegen_jax.train.metrics import say
from onegen_jax.train.preemption import PreemptionWatcher
from onegen_jax.train.program import batch_shape, build_program, run_model_config
from onegen_jax.train.retrieval_eval import dev_recall
from onegen_jax.train.step import TrainProgram, TrainState, batch_shardings
from onegen_jax.train.run_length import BatchFill, with_derived_steps


def _globalize(program: TrainProgram, batch: dict) -> dict:
  """This process's rows (and every host's index fields) -> global arrays on the mesh."""
  micro = batch["tokens"].ndim == 3
  return to_global(batch, batch_shardings(program.mesh, {k: v.ndim for k, v in batch.items()}, micro))


def heldout_metrics(program: TrainProgram, params, batches: Iterable[dict]) -> dict[str, float]:
  """Loss and in-batch retrieval metrics over many batches, each weighted by its number of
  targets / valid queries."""
  per_batch = [jax.device_get(program.evaluate(params, _globalize(program, b))) for b in batches]
  gen = np.array([m["num_gen_targets"] for m in per_batch])
  ret = np.array([m["num_valid_queries"] for m in per_batch])
  average = lambda name, w: float(np.sum([m[name] for m in per_batch] * w) / max(np.sum(w), 1.0))
  return {"loss_gen": average("loss_gen", gen), "loss_ret": average("loss_ret", ret),
          "retrieval_accuracy": average("retrieval_accuracy", ret),
          "num_valid_queries": float(np.sum(ret))}


class Trainer:
  """One training run: the program, its state, checkpoints, metric writers and meters."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None, data: TrainData):
    self.config, self.data = config, data
    self.model_cfg = run_model_config(config)
    self.program = build_program(config, model=self.model_cfg)
    c = config.checkpoint
    self.ckpt = Checkpointer(workdir, c.every_steps, c.keep, c.best_metric or None,
                             c.best_mode) if workdir else None
    self.state = self._initial_state()
    self.writer = metrics_lib.MetricsWriter(workdir)
    self.encoder = None if data.database is None else Encoder(
        self.program.model, self.program.mesh, rows=batch_shape(config).rows,
        seq_len=config.batch.seq_len)
    self.first_step = self.last_saved = int(self.state.step)
    self.saved_config = dumps_config(config)
    if self.model_cfg.lora is not None:
      self.saved_config["lora"]["base"] = self.base
    self.fill = BatchFill(config.batch.num_keys)
    self.flops = metrics_lib.flops_per_token(self.model_cfg, config.batch.seq_len)
    self.peak = metrics_lib.peak_flops_per_device()
    self.start, self.tokens = time.time(), 0

  def _initial_state(self) -> TrainState:
    """The latest checkpoint of this run, else `init_from`'s parameters, else a fresh init.
    LoRA: the frozen tree always comes from the base (init_from, else the seed's init)."""
    latest = self.ckpt.latest_step() if self.ckpt else None
    self.base = {"workdir": self.config.model.get("init_from") or None, "step": None}
    if latest is not None and self.model_cfg.lora is not None:
      self.base = self.ckpt.restore_json(latest, "config")["lora"]["base"]
    state = None
    if latest is None or self.model_cfg.lora is not None:
      state = self.program.init_state(self.config.train.seed)
      if self.base["workdir"]:
        state = self._from_base(state)  # fresh optimizer state (Adam moments are zeros)
    if latest is not None:
      restored, data_state = self.ckpt.restore(latest, self.program.abstract_state)
      if data_state is not None:
        self.data.set_state(data_state)
      say(f"resumed from step {latest} of {self.ckpt.manager.directory}")
      return restored.replace(frozen=None if state is None else state.frozen)
    return state

  def _from_base(self, state: TrainState) -> TrainState:
    """`state` with init_from's parameters (step self.base["step"], default its latest): all of
    them, or for LoRA the base weights (frozen, quantized if so) and the token rows."""
    source = Checkpointer(self.base["workdir"])
    self.base["step"] = step = source.latest_step() if self.base["step"] is None else self.base["step"]
    cfg = self.model_cfg.lora
    if cfg is None:
      params = source.restore_params(step, self.program.abstract_state.params)
      source.close()
      return state.replace(params=params)
    base = source.restore_params(step, restore_target(self.model_cfg.replace(lora=None),
                                                      self.program.mesh))
    source.close()
    params, frozen = lora.split(lora.with_base(self.program.model_params(state), base), cfg)
    return jax.device_put(state.replace(params=params, frozen=frozen), self.program.state_shardings)

  def step(self, step: int) -> dict[str, float]:
    """Trains one step; returns its metrics (with throughput ones on a log step)."""
    batch = next(self.data)
    self.fill.add(self.data.last_step_info)
    self.state, metrics = self.program.step(self.state, _globalize(self.program, batch))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(metrics["loss"]) and self.config.train.nan_policy == "stop":
      if self.ckpt:
        self.ckpt.wait()
      raise FloatingPointError(
          f"step {step + 1}: loss is {metrics['loss']}, grad norm {metrics['grad_norm']}; stopped "
          f"(the last checkpoint is step {self.ckpt.latest_step() if self.ckpt else None}). "
          "Set train.nan_policy='skip' to drop such steps instead.")
    self.tokens += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()  # equal shards
    if (step + 1) % self.config.train.log_every == 0 or step + 1 == self.config.train.steps:
      metrics.update(self._throughput(packing_efficiency(batch)))
      self.writer.write(step + 1, metrics)
      say(f"step {step + 1}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics

  def _throughput(self, efficiency: float) -> dict[str, float]:
    elapsed = time.time() - self.start
    out = {"packing_efficiency": efficiency, "tokens_per_s": self.tokens / elapsed,
           "model_tflops_per_s": self.tokens * self.flops / elapsed / 1e12}
    if self.peak:
      out["mfu"] = self.tokens * self.flops / elapsed / (self.peak * self.program.mesh.devices.size)
    if self.fill.steps:
      out.update(self.fill.log(efficiency))
    return out

  def evaluate(self, step: int) -> dict[str, float]:
    """Held-out loss and in-batch metrics, plus Recall@1/@10 against the db when there is one;
    {} (nothing written) when there is no held-out data."""
    batches = self.data.eval_batches()
    if not batches and not self.data.dev_records:
      return {}
    params = self.program.model_params(self.state)
    metrics = heldout_metrics(self.program, params, batches)
    if self.encoder is not None:
      metrics.update(dev_recall(self.encoder, params, self.data.database,
                                self.data.dev_records))
    self.writer.write(step, metrics, prefix="eval")
    say(f"step {step} eval: {metrics}")
    return metrics

  def save(self, step: int, force: bool = False, eval_metrics: dict | None = None):
    """Saves on the checkpoint interval, when forced, and with eval metrics to rank by."""
    best = self.config.checkpoint.best_metric
    ranked = eval_metrics is not None and bool(best)
    if ranked and best not in eval_metrics:
      raise ValueError(f"checkpoint.best_metric={best!r} is not an eval metric; these are: "
                       f"{sorted(eval_metrics)}")
    if self.ckpt and step != self.last_saved and (
        force or ranked or self.ckpt.manager.should_save(step)):
      self.ckpt.save(step, self.state, self.data.get_state(), self.saved_config, self.model_cfg,
                     force=True, metrics=eval_metrics if ranked else None)
      self.last_saved = step

  def close(self):
    if self.ckpt:
      self.ckpt.wait()
      self.ckpt.close()
    self.writer.close()


def fit(config: ml_collections.ConfigDict, workdir: str | None = None,
        data: TrainData | None = None) -> tuple[TrainState, dict[str, float]]:
  """Trains until `config.train.steps`; returns the final state and final metrics.

  data: overrides the config's data (tests inject batches through it).
  """
  if not config.train.steps and not config.train.get("epochs"):
    raise ConfigError("train.steps and train.epochs are both 0: set one of them")
  data = data or make_train_data(config, batch_shape(config))  # bad data fails before compiling
  config = with_derived_steps(config, data)
  run = Trainer(config, workdir, data)
  train = config.train
  say(f"mesh {dict(run.program.mesh.shape)}, "
      f"{sum(x.size for x in jax.tree.leaves(run.state.params)):,} parameters, start at step "
      f"{run.first_step}")
  say(f"data: {data.stats['counts']}" + "".join(f"\n  warning: {w}" for w in data.stats["warnings"][:20]))
  final, preemption, preempted = {}, PreemptionWatcher(), False
  for step in tqdm.tqdm(range(run.first_step, train.steps), initial=run.first_step,
                        total=train.steps, disable=jax.process_index() != 0, mininterval=2):
    metrics, done = run.step(step), step + 1
    if "tokens_per_s" in metrics:
      final = {f"train_{k}": v for k, v in metrics.items()}
    if done == train.steps:
      break  # the final evaluation and save follow the loop
    heldout = run.evaluate(done) if train.eval_every and done % train.eval_every == 0 else None
    run.save(done, eval_metrics=heldout)
    if preempted := preemption.should_stop(done):
      run.save(done, force=True)
      final["preempted_at_step"] = done
      say(f"preempted: saved step {done}, exiting")
      break
  if not preempted:
    heldout = run.evaluate(int(run.state.step))
    run.save(int(run.state.step), force=True, eval_metrics=heldout)
    final.update({f"eval_{k}": v for k, v in heldout.items()})
  run.close()
  preemption.close()
  final.update(step=int(run.state.step), wall_s=time.time() - run.start)
  return run.state, final
