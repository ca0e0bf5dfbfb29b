"""The model shapes benchmarks use besides the presets of onegen_jax.model.config, and random
parameters for them."""

from __future__ import annotations

from onegen_jax.model.config import PRESETS, ModelConfig, preset

# Model shapes the benchmarks use besides the presets of onegen_jax.model.config.
BENCH_MODELS: dict[str, ModelConfig] = {
    # A ~34M-parameter Llama for CPU runs (float32 compute: bf16 matmuls are slow on CPU).
    "small-34m": ModelConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
        num_kv_heads=4, tie_embeddings=True, max_position_embeddings=8192, dtype="float32"),
    # TinyLlama-1.1B's shapes: the GPU training-throughput model and the ~1B inference model.
    "llama-1.1b": ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
        num_kv_heads=4, max_position_embeddings=2048),
    # The end-to-end smoke configuration of train_throughput on CPU.
    "smoke": ModelConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=2048),
}


def model_config(name: str, **overrides) -> ModelConfig:
  """A benchmark model (BENCH_MODELS) or a preset, with `overrides` applied."""
  if name in BENCH_MODELS:
    return BENCH_MODELS[name].replace(**overrides)
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(BENCH_MODELS) + sorted(PRESETS)}")
  return preset(name, **overrides)


def count_params(params) -> int:
  """Number of parameters in a pytree of arrays."""
  import jax  # noqa: PLC0415  (keeps this module importable before XLA flags are set)
  return sum(x.size for x in jax.tree.leaves(params))


def init_params(model, seed: int):
  """Random, unboxed parameters of a Decoder."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  probe = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda key: nn.unbox(model.init(key, probe, probe + 1, jnp.arange(8)[None])))
  return init(jax.random.key(seed))["params"]
