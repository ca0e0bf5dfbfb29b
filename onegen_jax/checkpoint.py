"""Orbax checkpoints of a run directory (any path Orbax accepts: local, gs://...).

A step directory holds these items:
  params     the parameter tree (sharded arrays)
  optimizer  {"step", "opt_state"} of the TrainState
  data       the data iterator's state (JSON), so a resumed run sees the same batches
  config     the run's full ml_collections config (JSON)
  model      the ModelConfig (JSON): enough to rebuild the decoder without the task config
A training step is written by `save`; an import (launch.import_hf) writes step 0 with params,
model and config only (`save_params`). A LoRA run's params item is its trainable tree only
(model/lora.py) and its config item names its base ({"lora": {"base": {"workdir", "step"}}});
`restore_lora` reads both, `restore_merged` folds them into the plain Decoder's parameters.
Saves are asynchronous; Orbax writes each step into a temporary directory and renames it when
complete, so a crash during a save leaves the previous complete step as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from orbax.checkpoint import checkpoint_managers

from onegen_jax import sharding
from onegen_jax.model import lora as lora_lib
from onegen_jax.model.config import Llama3RopeScaling, LoraConfig, ModelConfig
from onegen_jax.model.decoder import abstract_params

if TYPE_CHECKING:  # an annotation only: checkpoints do not depend on the train step
  from onegen_jax.train.step import TrainState


def model_config_to_json(config: ModelConfig) -> dict:
  return dataclasses.asdict(config)


def model_config_from_json(data: dict) -> ModelConfig:
  data = dict(data)
  if data.get("rope_scaling"):
    data["rope_scaling"] = Llama3RopeScaling(**data["rope_scaling"])
  if data.get("lora"):  # JSON lists back to the dataclass's (hashable) tuples
    data["lora"] = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in data["lora"].items()})
  return ModelConfig(**data)


class Checkpointer:
  """Saves every `every_steps` steps and keeps the last `keep`; with `best_metric`, also the step
  whose saved metrics are best ("min" or "max" by `best_mode`)."""

  def __init__(self, workdir: str, every_steps: int = 1000, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "min", async_save: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode={best_mode!r}; expected 'min' or 'max'")
    policy = checkpoint_managers.LatestN(keep)
    if best_metric:
      best = checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                       reverse=best_mode == "min",
                                       keep_checkpoints_without_metrics=False)
      policy = checkpoint_managers.AnyPreservationPolicy([policy, best])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, preservation_policy=policy,
        enable_async_checkpointing=async_save)
    if "://" not in workdir:
      workdir = os.path.abspath(workdir)  # Orbax takes absolute paths only
    self.manager = ocp.CheckpointManager(
        workdir, options=options,
        item_names=("params", "optimizer", "data", "config", "model"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict | None, config: dict,
           model_config: ModelConfig, metrics: dict | None = None, force: bool = False) -> bool:
    """Starts saving a training step: `state`'s params and {"step", "opt_state"}, the data
    iterator's state (None: no data item), the run's config and model; returns whether it did
    (a step off `every_steps` is skipped unless `force`)."""
    items = {"params": ocp.args.StandardSave(state.params),
             "optimizer": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state})}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    return self._save(step, items, config, model_config, metrics, force)

  def save_params(self, step: int, params, config: dict, model_config: ModelConfig) -> bool:
    """Starts saving parameters alone (an import's step: no optimizer or data item) at `step`,
    whatever `every_steps`; `params` is the Decoder's 'params' tree. Returns whether it did."""
    items = {"params": ocp.args.StandardSave(params)}
    return self._save(step, items, config, model_config, None, force=True)

  def _save(self, step: int, items: dict, config: dict, model_config: ModelConfig,
            metrics: dict | None, force: bool) -> bool:
    """Adds the config and model items to `items` and starts the save."""
    items = {**items, "config": ocp.args.JsonSave(config),
             "model": ocp.args.JsonSave(model_config_to_json(model_config))}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict | None]:
    """(TrainState-like restored onto the shardings in `abstract_state`, data state or None)."""
    items = {"params": ocp.args.StandardRestore(abstract_state.params),
             "optimizer": ocp.args.StandardRestore(
                 {"step": abstract_state.step, "opt_state": abstract_state.opt_state})}
    has_data = "data" in self._item_names(step)
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = abstract_state.replace(params=restored["params"], step=restored["optimizer"]["step"],
                                   opt_state=restored["optimizer"]["opt_state"])
    return state, (restored["data"] if has_data else None)

  def restore_params(self, step: int, abstract_params=None):
    """Only the parameters (e.g. `init_from` a pretrained import), onto `abstract_params`'
    shardings (None: the shardings they were saved with)."""
    return self.manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]

  def restore_json(self, step: int, item: str) -> dict:
    """A JSON item ("config", "model", "data") of a step."""
    return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def _item_names(self, step: int) -> set[str]:
    return {p.name for p in (self.manager.directory / str(step)).iterdir()}

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def read_model_config(workdir: str, step: int | None = None) -> tuple[ModelConfig, int]:
  """The ModelConfig stored in a run directory, and the step read (default: the latest)."""
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir}")
  config = model_config_from_json(ckpt.restore_json(step, "model"))
  ckpt.close()
  return config, step


def restore_target(model_config: ModelConfig, mesh: Mesh, part=None):
  """ShapeDtypeStructs of the Decoder's params (or of `part(boxed params)`, e.g. LoRA's trainable
  tree) carrying their shardings on `mesh` by the logical rules: what a restore reads onto."""
  boxed = abstract_params(model_config)
  if part is not None:
    boxed = jax.eval_shape(part, boxed)
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  return sharding.with_shardings(nn.unbox(boxed), shardings)


def restore_lora(ckpt: Checkpointer, step: int, model_config: ModelConfig, mesh: Mesh):
  """A LoRA run's step: (its trainable tree on `mesh`, its base reference {"workdir", "step"})."""
  lora = model_config.lora
  trainable = ckpt.restore_params(
      step, restore_target(model_config, mesh, lambda p: lora_lib.split(p, lora)[0]))
  return trainable, ckpt.restore_json(step, "config")["lora"]["base"]


def restore_merged(ckpt: Checkpointer, step: int, model_config: ModelConfig, mesh: Mesh):
  """The plain Decoder's params of a LoRA run's step on `mesh`, in model_config.param_dtype: its
  base (restored from the run the reference names) as it trained, bfloat16-rounded or int8, plus
  (alpha / r) A B, the trained token rows written in. ValueError for a run on a random base (no
  model.init_from: nothing to restore it from)."""
  lora = model_config.lora
  trainable, ref = restore_lora(ckpt, step, model_config, mesh)
  if not ref["workdir"]:
    raise ValueError("this LoRA run trained on a random base (no model.init_from): there is no "
                     "base to merge its adapters into")
  source = Checkpointer(ref["workdir"])
  base = source.restore_params(ref["step"], restore_target(model_config.replace(lora=None), mesh))
  source.close()
  template = nn.unbox(abstract_params(model_config))
  _, frozen = lora_lib.split(lora_lib.with_base(template, base), lora)
  return lora_lib.merge_adapters(lora_lib.merge(trainable, frozen, lora), lora,
                                 model_config.param_dtype)


def dumps_config(config) -> dict:
  """An ml_collections ConfigDict as a JSON-ready dict."""
  return json.loads(config.to_json_best_effort())
