"""A run's config -> its model config, batch shape and compiled program (mesh, model, optimizer).

The pieces `fit`, the AOT compile (aot.py) and tests share.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import logging
import ml_collections
import numpy as np

from onegen_jax import sharding
from onegen_jax.checkpoint import read_model_config
from onegen_jax.data.packing import BatchPacker, BatchShape, Corpus
from onegen_jax.data import synthetic
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import ConfigError
from onegen_jax.data.tasks import get_task
from onegen_jax.model.config import NUMERIC_FIELDS, LoraConfig, ModelConfig, preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.train.optimizer import adamw, learning_rate_schedule
from onegen_jax.train import remat_auto
from onegen_jax.train.step import LossConfig, TrainProgram, batch_shardings, build_train_program


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """`config.model`: a preset name plus overrides of any ModelConfig field; with `init_from`, the
  shapes come from that run's checkpoint and only numeric fields are overridden."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  # remat_policy "auto" is resolved by build_program (remat_auto); the config keeps the default.
  given = {k: v for k, v in model.items() if not (k == "remat_policy" and v == "auto")}
  if model.get("init_from"):
    base, _ = read_model_config(model.init_from)
    return base.replace(**{k: given[k] for k in NUMERIC_FIELDS if k in given})
  return preset(model.preset, **{k: v for k, v in given.items() if k in fields})


def run_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """`model_config(config.model)`, with `config.lora.enabled` its LoraConfig: targets, rank,
  alpha, dropout, base_dtype, modules_to_save, and with trainable_tokens="added" the rows of the
  task's special tokens (`task_token_ids`)."""
  model = model_config(config.model)
  c = config.get("lora")
  if model.lora is not None:
    raise ConfigError(f"model.init_from={config.model.init_from} is a LoRA run: start from its "
                      "base, or export it merged (launch.export_hf --merge) and import that")
  if not c or not c.enabled:
    return model
  if c.trainable_tokens not in ("added", "none"):
    raise ConfigError(f"lora.trainable_tokens={c.trainable_tokens!r}; expected 'added' or 'none'")
  if model.tie_embeddings and "lm_head" in c.modules_to_save:
    raise ConfigError("lora.modules_to_save names lm_head, but the model ties it to "
                      "embed_tokens: name embed_tokens")
  ids = task_token_ids(config) if c.trainable_tokens == "added" else ()
  return model.replace(lora=LoraConfig(
      rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets),
      base_dtype=c.base_dtype, token_ids=ids, modules_to_save=tuple(c.modules_to_save)))


def task_token_ids(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ids of the task's special tokens (RET, CTX tags, markup): by name through the run's
  tokenizer, or the synthetic task's own."""
  if config.data.kind == "synthetic":
    return tuple(range(synthetic.RET_QUERY, synthetic.DOC_PROMPT + 1))
  if not config.data.tokenizer_path:
    raise ConfigError("lora.trainable_tokens='added' reads the task tokens' ids through "
                      "data.tokenizer_path: set it (or lora.trainable_tokens='none')")
  tokenizer = TaskTokenizer(config.data.tokenizer_path, get_task(config.data.task))
  return tuple(sorted(set(tokenizer.ids.values())))


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
  model = model or run_model_config(config)

  def build(remat_policy: str) -> TrainProgram:
    return build_train_program(Decoder(model.replace(remat_policy=remat_policy)), tx, schedule,
                               LossConfig(**config.loss), mesh, example_batch(config),
                               config.batch.accum_steps, config.train.nan_policy,
                               config.train.seed)

  if config.model.get("remat_policy") != "auto":
    return build(model.remat_policy)
  choice = remat_auto.choose_remat(build, lambda program: compile_step(config, program),
                                   remat_auto.device_budget(list(mesh.devices.flat)))
  logging.info("%s", choice.describe())
  return choice.program


def abstract_batch(config: ml_collections.ConfigDict, program: TrainProgram) -> dict:
  """ShapeDtypeStructs of the run's training batch, with the program's batch shardings."""
  batch = example_batch(config)
  shardings = batch_shardings(program.mesh, {k: v.ndim for k, v in batch.items()},
                              config.batch.accum_steps > 1)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
          for k, v in batch.items()}


def compile_step(config: ml_collections.ConfigDict, program: TrainProgram):
  """The program's train step compiled ahead of time for the run's batch (jax Compiled)."""
  with sharding.activate(program.mesh):
    return program.train_step.lower(program.abstract_state, abstract_batch(config, program)).compile()
