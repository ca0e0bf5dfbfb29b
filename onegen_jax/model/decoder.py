"""The decoder: one Flax linen module for the Llama family (Llama-2/3.1, Qwen2, Mistral, SmolLM2).

Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp', 'norm', and
'layers' for the scanned stack); key activations are constrained with logical names ('batch',
'length', 'act_embed', 'act_heads', 'act_kv', 'act_mlp', 'act_vocab'). `onegen_jax.sharding` maps
both to the mesh.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from onegen_jax.model.attention import packed_causal_mask
from onegen_jax.model.config import ModelConfig
from onegen_jax.model.rope import apply_rope, inverse_frequencies

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


def _dense(features: int, names: tuple[str, str], config: ModelConfig, name: str,
           use_bias: bool = False) -> nn.Dense:
  return nn.Dense(
      features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))


class RMSNorm(nn.Module):
  """x / rms(x) * scale, normalised in float32 as Hugging Face does, returned in `dtype`."""

  eps: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE over packed rows."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """x: [B, S, D]; mask: bool [B, 1, S, S]; positions: int32 [B, S]. Returns [B, S, D]."""
    cfg = self.config
    batch, seq_len, _ = x.shape
    head_dim = cfg.dim_per_head
    q = _dense(cfg.num_heads * head_dim, ("embed", "heads"), cfg, "q_proj", cfg.qkv_bias)(x)
    k = _dense(cfg.num_kv_heads * head_dim, ("embed", "kv"), cfg, "k_proj", cfg.qkv_bias)(x)
    v = _dense(cfg.num_kv_heads * head_dim, ("embed", "kv"), cfg, "v_proj", cfg.qkv_bias)(x)
    q = q.reshape(batch, seq_len, cfg.num_heads, head_dim)
    k = k.reshape(batch, seq_len, cfg.num_kv_heads, head_dim)
    v = v.reshape(batch, seq_len, cfg.num_kv_heads, head_dim)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
    k = nn.with_logical_constraint(k, ("batch", "length", "act_kv", None))
    v = nn.with_logical_constraint(v, ("batch", "length", "act_kv", None))
    inv_freq = inverse_frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
    out = out.reshape(batch, seq_len, cfg.num_heads * head_dim)
    return _dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj")(out)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    gate = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj")(x)
    up = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm transformer block. The (carry, None) return makes it usable under nn.scan."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    x = x + Attention(cfg, name="self_attn")(norm(name="input_layernorm")(x), mask, positions)
    x = x + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


class Decoder(nn.Module):
  """Token ids -> (logits, last hidden states after the final norm).

  The hidden state at a retrieval token is OneGen's embedding, so both come out of one call.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    layer = DecoderLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")

  def hidden_states(self, tokens: jnp.ndarray, segment_ids: jnp.ndarray,
                    positions: jnp.ndarray) -> jnp.ndarray:
    """tokens, segment_ids, positions: int32 [B, S] -> hidden [B, S, D] after the final norm."""
    # Gather from a table replicated over 'embed': with the batch on fsdp, a lookup into an
    # fsdp-sharded embed dim forces an involuntary full rematerialisation.
    table = nn.with_logical_constraint(self.embed_tokens.embedding, ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.config.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    mask = packed_causal_mask(segment_ids)
    if self.config.scan_layers:
      x, _ = self.layers(x, mask, positions)
    else:
      for layer in self.layers:
        x, _ = layer(x, mask, positions)
    return self.norm(x)

  def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
    """hidden [B, S, D] -> logits [B, S, V] in the compute dtype."""
    if self.config.tie_embeddings:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jnp.ndarray, segment_ids: jnp.ndarray, positions: jnp.ndarray):
    """Returns (logits [B, S, V], hidden [B, S, D])."""
    hidden = self.hidden_states(tokens, segment_ids, positions)
    return self.logits(hidden), hidden
