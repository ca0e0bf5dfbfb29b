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
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               write_index: jnp.ndarray | None = None, cache: tuple = ()):
    """x: [B, T, D]; positions: int32 [B, T]. Returns (out [B, T, D], new cache).

    Without a cache (training), mask is bool [B, 1, T, T] over these tokens. With a cache
    (k, v), each [B, C, K, H], the new keys and values are written at `write_index` int32 [B]
    (per row) and mask is bool [B, 1, T, C] over the updated cache.
    """
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
    if cache:
      write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new, (i, 0, 0)))
      k, v = write(cache[0], k.astype(cache[0].dtype), write_index), write(
          cache[1], v.astype(cache[1].dtype), write_index)
      cache = (k, v)
    window = mask.shape[-1]  # with a cache: attend to its first `window` entries only
    out = jax.nn.dot_product_attention(q, k[:, :window], v[:, :window], mask=mask,
                                       implementation=cfg.attention_impl)
    out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
    out = out.reshape(batch, seq_len, cfg.num_heads * head_dim)
    return _dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj")(out), cache


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
  """Pre-norm transformer block; returns (x, new cache), the (carry, output) shape of nn.scan."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               write_index: jnp.ndarray | None = None, cache: tuple = ()):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    attended, cache = Attention(cfg, name="self_attn")(
        norm(name="input_layernorm")(x), mask, positions, write_index, cache)
    x = x + attended
    x = x + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache


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
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")

  def _embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
    # Gather from a table replicated over 'embed': with the batch on fsdp, a lookup into an
    # fsdp-sharded embed dim forces an involuntary full rematerialisation.
    table = nn.with_logical_constraint(self.embed_tokens.embedding, ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.config.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

  def _layers(self, x, mask, positions, write_index=None, cache=()):
    """Runs every layer; cache (k, v) is stacked per layer: each [L, B, C, K, H]."""
    if self.config.scan_layers:
      return self.layers(x, mask, positions, write_index, cache)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, mask, positions, write_index, tuple(c[i] for c in cache))
      new_cache.append(layer_cache)
    return x, tuple(jnp.stack(c) for c in zip(*new_cache))

  def hidden_states(self, tokens: jnp.ndarray, segment_ids: jnp.ndarray,
                    positions: jnp.ndarray) -> jnp.ndarray:
    """tokens, segment_ids, positions: int32 [B, S] -> hidden [B, S, D] after the final norm."""
    x, _ = self._layers(self._embed(tokens), packed_causal_mask(segment_ids), positions)
    return self.norm(x)

  def extend(self, tokens: jnp.ndarray, cache_len: jnp.ndarray, cache: tuple,
             window: int | None = None):
    """Feeds tokens [B, T] after each row's `cache_len` [B] cached tokens (prefill or decode).

    window (static): attend to the first `window` cache entries only (default: all C); it must
    cover every row's cache_len + T. A few bucketed windows keep attention proportional to the
    used length rather than the capacity.

    cache: (k, v), each [L, B, C, K, H]. Row b's token t sits at position cache_len[b] + t and
    sees cache entries 0..cache_len[b] + t. Rows may use fewer than T tokens: the extra ones are
    written past the row's length and overwritten by the next call. Returns (hidden [B, T, D]
    after the final norm, new cache).
    """
    num_tokens, window = tokens.shape[1], window or cache[0].shape[2]
    positions = cache_len[:, None] + jnp.arange(num_tokens)[None, :]
    mask = jnp.arange(window)[None, None, :] <= positions[:, :, None]  # [B, T, window]
    x, cache = self._layers(self._embed(tokens), mask[:, None], positions, cache_len, cache)
    return self.norm(x), cache

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


def init_cache(config: ModelConfig, batch: int, capacity: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Empty (k, v) caches, each [L, B, capacity, K, H] in the compute dtype."""
  shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.dim_per_head)
  return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)


def abstract_params(config: ModelConfig):
  """The boxed abstract 'params' tree (ShapeDtypeStructs carrying logical axis names)."""
  tokens = jnp.ones((1, 1), jnp.int32)
  init = functools.partial(Decoder(config).init, tokens=tokens, segment_ids=tokens,
                           positions=jnp.zeros((1, 1), jnp.int32))
  return jax.eval_shape(init, jax.random.key(0))["params"]
