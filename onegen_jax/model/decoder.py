"""The decoder: one Flax linen module for the Llama family (Llama-2/3.1, Qwen2, Mistral, SmolLM2).

Every parameter carries logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp', 'norm', and
'layers' for the scanned stack); key activations are constrained with logical names ('batch',
'length', 'act_embed', 'act_heads', 'act_kv', 'act_mlp', 'act_vocab'). `onegen_jax.sharding` maps
both to the mesh.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from onegen_jax import sharding
from onegen_jax.model.attention import packed_causal_mask, resolve_impl
from onegen_jax.model.config import ModelConfig
from onegen_jax.model.dense_attention import dense_attention
from onegen_jax.model.lora import LoraDense
from onegen_jax.model.matmul import accumulates_in_float32, dense_dot_general, matmul
from onegen_jax.model.rope import apply_rope, inverse_frequencies
from onegen_jax.model.splash import current_platform, splash_attention

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}
# Logical axes of a KV cache [L, B, C, K, H] (see `cache_sharding`).
CACHE_AXES = ("layers", "batch", "length", "act_kv", None)


def _dense(features: int, names: tuple[str, str], config: ModelConfig, name: str,
           use_bias: bool = False) -> nn.Module:
  """nn.Dense; with `config.lora`, a layer projection is a LoraDense (adapted when `name` is one
  of lora.targets: "q" for q_proj, ...) and lm_head stays nn.Dense."""
  dot_general = dense_dot_general if _f32_dots(config) else None
  init = nn.initializers.normal(0.02)
  if config.lora is not None and name != "lm_head":
    return LoraDense(features, names, config.lora, config.dtype, use_bias,
                     name.removesuffix("_proj") in config.lora.targets, init, dot_general, name=name)
  return nn.Dense(
      features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name,
      dot_general=dot_general, kernel_init=nn.with_logical_partitioning(init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))


def _f32_dots(config: ModelConfig) -> bool:
  """Whether the weight matmuls accumulate in float32 (model/matmul.py) on this platform."""
  return accumulates_in_float32(config.dot_accumulation, config.dtype, current_platform())


def _write_layer(cache: jnp.ndarray, new: jnp.ndarray, layer, index: jnp.ndarray) -> jnp.ndarray:
  """cache [L, B, C, K, H] with new [B, T, K, H] written at (layer, b, index[b] + t): one scatter
  of B x T entries into the (donated) stack, nothing else touched; entries past C are dropped."""
  batch, num_tokens = new.shape[:2]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, num_tokens))
  slots = index[:, None] + jnp.arange(num_tokens)[None, :]
  return cache.at[layer, rows, slots].set(new.astype(cache.dtype), mode="drop")


def _read_layer(cache: jnp.ndarray, layer, window: int) -> jnp.ndarray:
  """Layer `layer`'s first `window` entries of cache [L, B, C, K, H] -> [B, window, K, H]."""
  start = (layer, 0, 0, 0, 0)
  return jax.lax.dynamic_slice(cache, start, (1, *cache.shape[1:2], window, *cache.shape[3:]))[0]


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
               cache: tuple = (), layer: jnp.ndarray | int = 0,
               write_index: jnp.ndarray | None = None):
    """x: [B, T, D]; positions: int32 [B, T]. Returns (out [B, T, D], cache).

    Without a cache (training, encoding), mask is bool [B, 1, T, T] over these tokens, or, when
    the kernel is splash (`resolve_impl`), the packed rows' segment ids int32 [B, T] themselves
    (splash builds no dense mask). With a cache (k, v),
    each the whole stack [L, B, C, K, H], this layer's new keys and values are written into slice
    `layer` at `write_index` int32 [B] (per row), and mask is bool [B, 1, T, W] over the first W
    entries of the updated slice (the window attended). The stack is updated, not rebuilt: under
    a donated buffer each step writes only its T new entries per layer.
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
    impl = resolve_impl(cfg.attention_impl, cfg.dtype, cached=bool(cache))
    if cache:
      cache = tuple(_write_layer(c, new, layer, write_index) for c, new in zip(cache, (k, v)))
      k, v = (_read_layer(c, layer, mask.shape[-1]) for c in cache)
    if impl == "splash":
      out = splash_attention(q, k, v, mask)
    elif impl == "xla" and _f32_dots(cfg):
      out = dense_attention(q, k, v, mask)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
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
  """Pre-norm transformer block over the carry (x [B, T, D], cache): the (carry, output) shape of
  nn.scan, with the whole stacked cache in the carry (each layer updates its own slice)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, carry: tuple, mask: jnp.ndarray, positions: jnp.ndarray,
               write_index: jnp.ndarray | None, layer: jnp.ndarray | int):
    """carry: (x [B, T, D], cache: () or (k, v) each [L, B, C, K, H]); layer: this layer's index
    into the cache. Returns ((x, cache), None)."""
    x, cache = carry
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    attended, cache = Attention(cfg, name="self_attn")(
        norm(name="input_layernorm")(x), mask, positions, cache, layer, write_index)
    x = x + attended
    x = x + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
    return (nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache), None


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
          layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
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
    """Runs every layer; cache (k, v) is stacked per layer, each [L, B, C, K, H], and carried
    through the layer loop (each layer updates its slice in place). Returns (x, cache)."""
    if self.config.scan_layers:
      layers = jnp.arange(self.config.num_layers)
      (x, cache), _ = self.layers((x, cache), mask, positions, write_index, layers)
      return x, cache
    for i, layer in enumerate(self.layers):
      (x, cache), _ = layer((x, cache), mask, positions, write_index, i)
    return x, cache

  def hidden_states(self, tokens: jnp.ndarray, segment_ids: jnp.ndarray,
                    positions: jnp.ndarray) -> jnp.ndarray:
    """tokens, segment_ids, positions: int32 [B, S] -> hidden [B, S, D] after the final norm."""
    cfg = self.config
    splash = resolve_impl(cfg.attention_impl, cfg.dtype) == "splash"
    mask = segment_ids if splash else packed_causal_mask(segment_ids)
    x, _ = self._layers(self._embed(tokens), mask, positions)
    return self.norm(x)

  def extend(self, tokens: jnp.ndarray, cache_len: jnp.ndarray, cache: tuple,
             window: int | None = None):
    """Feeds tokens [B, T] after each row's `cache_len` [B] cached tokens (prefill or decode).

    window (static): attend to the first `window` cache entries only (default: all C); it must
    cover every row's cache_len + T. A few bucketed windows keep attention proportional to the
    used length rather than the capacity.

    cache: (k, v), each [L, B, C, K, H]. Row b's token t sits at position cache_len[b] + t and
    sees cache entries 0..cache_len[b] + t. Rows may use fewer than T tokens: the extra ones are
    written past the row's length and overwritten by the next call (entries past C are
    dropped). The cache is updated in place when the caller donates it (jit donate_argnums): a
    step then costs what its T tokens and the window cost, whatever C. Under a mesh the cache
    keeps `cache_sharding`'s layout. Returns (hidden [B, T, D] after the final norm, new cache).
    """
    num_tokens, window = tokens.shape[1], window or cache[0].shape[2]
    positions = cache_len[:, None] + jnp.arange(num_tokens)[None, :]
    mask = jnp.arange(window)[None, None, :] <= positions[:, :, None]  # [B, T, window]
    x, cache = self._layers(self._embed(tokens), mask[:, None], positions, cache_len,
                            _constrain_cache(cache))
    return self.norm(x), _constrain_cache(cache)

  def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
    """hidden [B, S, D] -> logits [B, S, V] in the compute dtype."""
    if self.config.tie_embeddings and _f32_dots(self.config):
      dtype = self.config.dtype
      logits = matmul(hidden.astype(dtype), self.embed_tokens.embedding.astype(dtype).T)
    elif self.config.tie_embeddings:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jnp.ndarray, segment_ids: jnp.ndarray, positions: jnp.ndarray):
    """Returns (logits [B, S, V], hidden [B, S, D])."""
    hidden = self.hidden_states(tokens, segment_ids, positions)
    return self.logits(hidden), hidden


def cache_sharding(config: ModelConfig, batch: int, capacity: int, mesh: Mesh) -> NamedSharding:
  """Where a cache [L, B, C, K, H] lives on `mesh`: CACHE_AXES under the logical rules (rows over
  ('data', 'fsdp'), kv heads over 'tensor'), an axis that its mesh axes do not divide replicated."""
  return NamedSharding(mesh, _cache_spec(_cache_shape(config, batch, capacity), mesh.shape))


def init_cache(config: ModelConfig, batch: int, capacity: int,
               mesh: Mesh | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Empty (k, v) caches, each [L, B, capacity, K, H] in the compute dtype; with `mesh`, laid out
  by `cache_sharding` (else on the default device)."""
  shape = _cache_shape(config, batch, capacity)
  zeros = lambda: (jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
  if mesh is None:
    return zeros()
  placed = cache_sharding(config, batch, capacity, mesh)
  return jax.jit(zeros, out_shardings=(placed, placed))()


def _cache_shape(config: ModelConfig, batch: int, capacity: int) -> tuple[int, ...]:
  return config.num_layers, batch, capacity, config.num_kv_heads, config.dim_per_head


def _cache_spec(shape: tuple[int, ...], mesh_shape) -> PartitionSpec:
  """Mesh axes for a cache of `shape`: CACHE_AXES by LOGICAL_RULES; a dimension that the product
  of its mesh axes' sizes (mesh_shape: name -> size) does not divide stays replicated."""
  def fits(size, axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return size % math.prod(mesh_shape[a] for a in axes) == 0

  spec = nn.logical_to_mesh_axes(CACHE_AXES, sharding.LOGICAL_RULES)
  return PartitionSpec(*(axes if fits(size, axes) else None for size, axes in zip(shape, spec)))


def _constrain_cache(cache: tuple) -> tuple:
  """Pins (k, v) to `cache_sharding`'s layout under the current mesh (none: unchanged), so a
  donated cache keeps its layout (and buffer) from call to call."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not cache:
    return cache
  return tuple(jax.lax.with_sharding_constraint(c, _cache_spec(c.shape, mesh.shape))
               for c in cache)


def abstract_params(config: ModelConfig):
  """The boxed abstract 'params' tree (ShapeDtypeStructs carrying logical axis names)."""
  tokens = jnp.ones((1, 1), jnp.int32)
  init = functools.partial(Decoder(config).init, tokens=tokens, segment_ids=tokens,
                           positions=jnp.zeros((1, 1), jnp.int32))
  return jax.eval_shape(init, jax.random.key(0))["params"]
