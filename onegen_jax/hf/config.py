"""Hugging Face config.json <-> ModelConfig.

Supported architectures: LlamaForCausalLM (SmolLM2 included), Qwen2ForCausalLM, MistralForCausalLM.
A config our Decoder cannot reproduce (another activation, MLP or o_proj biases, a sliding window
in use, a RoPE type other than default or llama3) raises ValueError naming the field.
"""

from __future__ import annotations

import json
import logging
import os

import transformers

from onegen_jax.model.config import Llama3RopeScaling, ModelConfig

ARCHITECTURES = {  # class name -> model_type
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# Fields whose transformers default our Decoder does not implement.
_ARCH_DEFAULTS = {"MistralForCausalLM": {"sliding_window": None}}


def architecture(hf_config: dict) -> str:
  """The supported class name of `hf_config` (from `architectures`, else `model_type`); raises
  ValueError naming an unsupported one."""
  names = hf_config.get("architectures") or []
  by_type = {t: a for a, t in ARCHITECTURES.items()}
  arch = names[0] if names else by_type.get(hf_config.get("model_type"))
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch or hf_config.get('model_type')!r}; "
                     f"supported: {sorted(ARCHITECTURES)}")
  return arch


def _rope(hf_config: dict) -> tuple[float, Llama3RopeScaling | None]:
  """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
  rope = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
  theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: 'default', 'llama3'")
  return theta, Llama3RopeScaling(
      factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_position_embeddings=int(rope["original_max_position_embeddings"]))


def _check_supported(arch: str, hf_config: dict):
  """Raises on features our Decoder lacks; warns on a sliding window (we attend to everything)."""
  unsupported = {
      "hidden_act": hf_config.get("hidden_act", "silu") != "silu",
      "mlp_bias": hf_config.get("mlp_bias", False),
      # Llama's attention_bias also puts a bias on o_proj, which the Decoder does not have.
      "attention_bias": arch == "LlamaForCausalLM" and hf_config.get("attention_bias", False),
      "use_sliding_window": hf_config.get("use_sliding_window", False),
  }
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"{arch} with {key}={hf_config[key]!r} is not supported")
  if arch == "MistralForCausalLM" and hf_config.get("sliding_window"):
    logging.warning("sliding_window=%s ignored: sequences longer than it attend differently "
                    "from Hugging Face", hf_config["sliding_window"])


def config_from_hf(hf_config: dict | str | os.PathLike, **overrides) -> ModelConfig:
  """A Hugging Face config (dict, or a model directory holding config.json) -> ModelConfig.

  `overrides` replace fields afterwards (e.g. dtype="float32", scan_layers=False).
  """
  if not isinstance(hf_config, dict):
    with open(os.path.join(hf_config, "config.json")) as f:
      hf_config = json.load(f)
  arch = architecture(hf_config)
  _check_supported(arch, hf_config)
  theta, scaling = _rope(hf_config)
  num_heads = hf_config["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf_config["vocab_size"],
      hidden_size=hf_config["hidden_size"],
      intermediate_size=hf_config["intermediate_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
      head_dim=hf_config.get("head_dim"),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      qkv_bias=arch == "Qwen2ForCausalLM",
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
  ).replace(**overrides)


def to_hf_config(model_config: ModelConfig, architecture: str,
                 **extra) -> transformers.PretrainedConfig:
  """The transformers config of `architecture` for `model_config`; `extra` adds fields."""
  cfg = model_config
  if architecture not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {architecture!r}; "
                     f"supported: {sorted(ARCHITECTURES)}")
  if cfg.qkv_bias != (architecture == "Qwen2ForCausalLM"):
    raise ValueError(f"qkv_bias={cfg.qkv_bias} cannot be written as {architecture} "
                     "(only Qwen2ForCausalLM has q/k/v biases and no o_proj bias)")
  rope_scaling = None if cfg.rope_scaling is None else {
      "rope_type": "llama3", "factor": cfg.rope_scaling.factor,
      "low_freq_factor": cfg.rope_scaling.low_freq_factor,
      "high_freq_factor": cfg.rope_scaling.high_freq_factor,
      "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
  return transformers.AutoConfig.for_model(
      ARCHITECTURES[architecture], architectures=[architecture], vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head, hidden_act="silu",
      rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position_embeddings,
      **_ARCH_DEFAULTS.get(architecture, {}), **extra)
