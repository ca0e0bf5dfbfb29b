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
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import safetensors.numpy

from onegen_jax.hf.weights import _hf_layout, _leaves
from onegen_jax.model.config import ModelConfig
from onegen_jax.model.lora import TOKEN_TABLES, TOKENS

_PREFIX = "base_model.model."
_ADAPTER_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}
_TOKENS_SUFFIX = "token_adapter.trainable_tokens_delta"
_HF_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}


def _peft_tensors(trainable, model_config: ModelConfig, vocab_size: int) -> dict[str, np.ndarray]:
  """PEFT tensor name -> float32 array in PEFT's layout for every leaf of a trainable tree."""
  tensors = {}
  for path, leaf in _leaves(trainable):
    value = np.asarray(jax.device_get(leaf), np.float32)
    if path[0] == TOKENS:  # [n, D] embedding rows, or an untied head's [D, n] columns
      rows = value if TOKEN_TABLES[path[1]][1] == 0 else value.T
      tensors[f"{_PREFIX}{_HF_MODULES[path[1]]}.{_TOKENS_SUFFIX}"] = rows
    elif path[-1] in _ADAPTER_NAMES:
      names, stacked, _ = _hf_layout((*path[:-1], "kernel"), model_config.num_layers)
      for layer, name in enumerate(names):
        name = name.removesuffix(".weight") + f".{_ADAPTER_NAMES[path[-1]]}.weight"
        tensors[_PREFIX + name] = (value[layer] if stacked else value).T
    else:  # modules_to_save: a whole table, vocab rows first, padding dropped
      table = value if TOKEN_TABLES[path[0]][1] == 0 else value.T
      tensors[f"{_PREFIX}{_HF_MODULES[path[0]]}.weight"] = table[:vocab_size]
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
