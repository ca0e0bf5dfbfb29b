"""LoRA adapters <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

Tensor names are PEFT's for a *ForCausalLM model: each adapted projection's
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] (our lora_a [in, r]
transposed) and `...lora_B.weight` [out, r] (lora_b transposed); the trained token rows as
`base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta` [n, D] (and
`base_model.model.lm_head.token_adapter...` for an untied head: our [D, n] transposed), with their
ids in trainable_token_indices; modules_to_save as `base_model.model.model.embed_tokens.weight`
[V, D] and `base_model.model.lm_head.weight` [V, D]. `peft.PeftModel.from_pretrained(base, DIR)`
over the base's HF export then computes what our LoRA model computes (up to the base's storage:
PEFT adds the adapters to the float base, we trained over its bfloat16 or int8 copy).
`read_lora_config` and `load_peft_adapter` read such a directory back (a LoRA trained elsewhere).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import safetensors.numpy

from onegen_jax.hf.weights import _hf_layout, _leaves
from onegen_jax.model.config import LoraConfig, ModelConfig
from onegen_jax.model.lora import TOKEN_TABLES, TOKENS

_PREFIX = "base_model.model."
_ADAPTER_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}
_TOKENS_SUFFIX = "token_adapter.trainable_tokens_delta"
_HF_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}


def _layout(path: tuple[str, ...], num_layers: int) -> tuple[list[str], bool, bool]:
  """A trainable leaf's path -> (PEFT tensor names, stacked: one name per layer along the leaf's
  axis 0, transposed: PEFT's tensor is the transpose of the leaf or of its layer slice)."""
  if path[0] == TOKENS:  # [n, D] embedding rows, or an untied head's [D, n] columns
    return [f"{_PREFIX}{_HF_MODULES[path[1]]}.{_TOKENS_SUFFIX}"], False, TOKEN_TABLES[path[1]][1] == 1
  if path[-1] in _ADAPTER_NAMES:
    names, stacked, _ = _hf_layout((*path[:-1], "kernel"), num_layers)
    suffix = f".{_ADAPTER_NAMES[path[-1]]}.weight"
    return [_PREFIX + n.removesuffix(".weight") + suffix for n in names], stacked, True
  # modules_to_save: a whole table, vocab rows first in PEFT
  return [f"{_PREFIX}{_HF_MODULES[path[0]]}.weight"], False, TOKEN_TABLES[path[0]][1] == 1


def _peft_tensors(trainable, model_config: ModelConfig, vocab_size: int) -> dict[str, np.ndarray]:
  """PEFT tensor name -> float32 array in PEFT's layout for every leaf of a trainable tree
  (modules_to_save tables cut to `vocab_size` rows)."""
  tensors = {}
  for path, leaf in _leaves(trainable):
    value = np.asarray(jax.device_get(leaf), np.float32)
    names, stacked, transpose = _layout(path, model_config.num_layers)
    for layer, name in enumerate(names):
      tensor = value[layer] if stacked else value
      tensor = tensor.T if transpose else tensor
      tensors[name] = tensor[:vocab_size] if path[0] in model_config.lora.modules_to_save else tensor
  return tensors


def _leaf_paths(tree) -> set[tuple[str, ...]]:
  return {path for path, _ in _leaves(tree)}


def save_peft_adapter(trainable, model_config: ModelConfig, out_dir: str | os.PathLike,
                      vocab_size: int | None = None, base_model: str | None = None) -> None:
  """Writes a LoRA run's trainable tree (model/lora.py `split`) as a PEFT LoRA adapter in float32.

  vocab_size: the real vocabulary (modules_to_save tables lose the padding rows beyond it);
  base_model: adapter_config's base_model_name_or_path (the base's HF export)."""
  lora = model_config.lora
  tensors = _peft_tensors(trainable, model_config, vocab_size or model_config.vocab_size)
  tables = [m for m in TOKEN_TABLES if (TOKENS, m) in _leaf_paths(trainable)]
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False,
      "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
      "target_modules": sorted(f"{t}_proj" for t in lora.targets),
      "modules_to_save": list(lora.modules_to_save) or None,
      "trainable_token_indices": {m: list(lora.token_ids) for m in tables} or None,
      "base_model_name_or_path": base_model,
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              os.path.join(out_dir, "adapter_model.safetensors"),
                              metadata={"format": "pt"})


def read_lora_config(adapter_dir: str | os.PathLike) -> LoraConfig:
  """The LoraConfig of a PEFT LoRA adapter directory (plain LoRA: no DoRA, rsLoRA, per-layer
  patterns or biases); base_dtype is LoraConfig's default."""
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
  unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                             "layers_to_transform", "target_parameters") if config.get(k)]
  if config.get("peft_type") != "LORA" or unsupported or config.get("bias", "none") != "none":
    raise ValueError(f"{adapter_dir}: only plain LoRA adapters are supported (peft_type "
                     f"{config.get('peft_type')}, bias {config.get('bias')}, set: {unsupported})")
  targets = config["target_modules"]
  targets = [targets] if isinstance(targets, str) else targets
  if not all(t.endswith("_proj") for t in targets):
    raise ValueError(f"{adapter_dir}: target_modules {targets}: only the *_proj projections")
  tokens = config.get("trainable_token_indices") or {}
  tokens = {"embed_tokens": tokens} if isinstance(tokens, list) else tokens
  if len({tuple(ids) for ids in tokens.values()}) > 1:
    raise ValueError(f"{adapter_dir}: trainable_token_indices differ between tables: {tokens}")
  return LoraConfig(rank=config["r"], alpha=float(config["lora_alpha"]),
                    dropout=float(config.get("lora_dropout") or 0.0),
                    targets=tuple(t.removesuffix("_proj") for t in targets),
                    token_ids=tuple(next(iter(tokens.values()), ())),
                    modules_to_save=tuple(config.get("modules_to_save") or ()))


def load_peft_adapter(adapter_dir: str | os.PathLike, template, model_config: ModelConfig):
  """The trainable tree of a PEFT adapter: `template` (the trainable tree of `model_config`'s LoRA
  model, ShapeDtypeStructs that may carry shardings) with every leaf read from its PEFT tensors;
  modules_to_save tables zero-padded to the template's vocabulary. ValueError names a missing,
  misshapen or unexpected tensor."""
  path = os.path.join(adapter_dir, "adapter_model.safetensors")
  tensors = {k.replace(".default.", "."): v for k, v in safetensors.numpy.load_file(path).items()}
  used, leaves = set(), []
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  for keys, leaf in flat:
    leaf_path = tuple(k.key for k in keys)
    names, stacked, transpose = _layout(leaf_path, model_config.num_layers)
    parts = []
    for name in names:
      if name not in tensors:
        raise ValueError(f"{path}: tensor {name} is missing")
      parts.append(tensors[name].T if transpose else tensors[name])
    used.update(names)
    value = np.stack(parts) if stacked else parts[0]
    if leaf_path[0] in model_config.lora.modules_to_save:  # the vocab padding rows
      axis = TOKEN_TABLES[leaf_path[0]][1]
      pad = [(0, 0)] * value.ndim
      pad[axis] = (0, leaf.shape[axis] - value.shape[axis])
      value = np.pad(value, pad)
    if value.shape != leaf.shape:
      raise ValueError(f"{path}: tensors {names[0]}... give shape {value.shape}, expected "
                       f"{leaf.shape}")
    value = value.astype(leaf.dtype)
    leaves.append(jax.device_put(value, getattr(leaf, "sharding", None)))
  if unexpected := sorted(set(tensors) - used):
    raise ValueError(f"{path}: tensors the LoRA model has no place for: {unexpected[:5]}")
  return jax.tree_util.tree_unflatten(treedef, leaves)
