"""Decoder configuration and named presets of real architectures.

One frozen dataclass describes every member of the Llama family we support (Llama-2/3.1, Qwen2,
Mistral, SmolLM2): they differ only in sizes, qkv bias, tied embeddings and RoPE settings.
Presets carry shapes only; weights come from a Hugging Face import.
"""

from __future__ import annotations

import dataclasses

REMAT_POLICIES = (
    "none",  # no rematerialisation: keep every activation (fastest, most memory)
    "full",  # save nothing inside a layer: recompute it in the backward pass
    "dots_with_no_batch_dims",  # save weight matmul outputs, recompute the rest
    "dots",  # save every matmul output
)
# "auto": splash on TPU, cuDNN on GPU (bf16/fp16 compute), XLA otherwise; see model/decoder.py.
ATTENTION_IMPLS = ("auto", "splash", "cudnn", "xla")
DOT_ACCUMULATIONS = ("auto", "float32", "native")  # see model/matmul.py
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA may adapt
LORA_BASE_DTYPES = ("float32", "bfloat16", "int8")  # int8: weight-only, per output channel


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama-3.1 frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters over a frozen base (model/lora.py): y = x W + (alpha / rank) dropout(x) A B.

  targets: projections with adapters (q_proj ... down_proj by their short names); every other
  parameter is frozen except the rows `token_ids` of embed_tokens (and of an untied lm_head:
  PEFT's trainable_token_indices) and the top-level modules in `modules_to_save` (trained whole).
  base_dtype: the frozen weights' storage; "int8" stores the projections' kernels as int8 with a
  float32 scale per output channel (model/quant.py), the other frozen weights in bfloat16.
  """

  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = LORA_TARGETS
  base_dtype: str = "bfloat16"
  token_ids: tuple[int, ...] = ()
  modules_to_save: tuple[str, ...] = ()

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora rank={self.rank}; expected >= 1")
    if not set(self.targets) <= set(LORA_TARGETS) or not self.targets:
      raise ValueError(f"lora targets={self.targets}; expected a subset of {LORA_TARGETS}")
    if self.base_dtype not in LORA_BASE_DTYPES:
      raise ValueError(f"lora base_dtype={self.base_dtype!r}; expected one of {LORA_BASE_DTYPES}")
    if not set(self.modules_to_save) <= {"embed_tokens", "lm_head"}:
      raise ValueError(f"lora modules_to_save={self.modules_to_save}; expected embed_tokens "
                       "and/or lm_head")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def frozen_dtype(self) -> str:
    """The storage dtype of frozen floating-point weights (int8 kernels aside)."""
    return "float32" if self.base_dtype == "float32" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of one decoder.

  `dtype` is the compute dtype (activations, matmuls); `param_dtype` the master-weight dtype.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  scan_layers: bool = True
  remat_policy: str = "full"
  attention_impl: str = "auto"
  # Weight matmuls with a low-precision dtype: "float32" accumulation forward and backward
  # (model/matmul.py), "native" (XLA's own dot), "auto" (float32 on CPU, native elsewhere).
  dot_accumulation: str = "native"
  lora: LoraConfig | None = None  # None: every parameter trains (no adapters)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if self.dot_accumulation not in DOT_ACCUMULATIONS:
      raise ValueError(f"dot_accumulation={self.dot_accumulation!r}; expected one of "
                       f"{DOT_ACCUMULATIONS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


# Fields of ModelConfig that change numerics or speed but not the parameter tree (its structure
# and shapes): a run may set them on top of a stored model (train: `model.init_from`; import:
# `launch.import_hf --config`). scan_layers is not one: it decides the tree's layout ('layers'
# stacked [num_layers, ...] vs 'layers_{i}'), so it comes with the stored parameters.
NUMERIC_FIELDS = ("param_dtype", "dtype", "remat_policy", "attention_impl", "dot_accumulation")


PRESETS: dict[str, ModelConfig] = {
    # For tests and the CPU demo: every dimension distinct so shapes are easy to tell apart in HLO.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, dtype="float32"),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, rope_theta=100000.0, tie_embeddings=True, max_position_embeddings=8192),
    "qwen2-1.5b": ModelConfig(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True, max_position_embeddings=32768),
    "qwen2-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
        max_position_embeddings=32768),
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, max_position_embeddings=4096),
    "llama3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(),
        max_position_embeddings=131072),
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, rope_theta=1000000.0, max_position_embeddings=32768),
}


def preset(name: str, **overrides) -> ModelConfig:
  """The named preset with `overrides` applied (e.g. `dtype="float32"`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
