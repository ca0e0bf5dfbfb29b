"""Pallas splash attention over packed rows (TPU; Pallas interpret mode elsewhere, for tests).

Splash attention takes the packed rows' segment ids directly: a block of the score matrix whose
query and key segments cannot meet (or that lies above the diagonal) is skipped, and no dense
[B, 1, S, S] mask or [B, H, S, S] score tensor is ever built. The kernel works on one row
([heads, S, head_dim]); it is `vmap`ped over the rows of a device and run under `shard_map` with
the model's own layout (LOGICAL_RULES: rows over ('data', 'fsdp'), heads over 'tensor').

Numerics equal `jax.nn.dot_product_attention` with `attention.packed_causal_mask`: causal within a
segment, padding (segment 0) sees only padding. The kernel does not scale q: we scale by
1/sqrt(head_dim) first. Grouped-query attention is native (the MHA kernel maps q head h to kv
head h // (H / K)).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from onegen_jax import sharding

LANES = 128  # the kernel's key blocks are multiples of the TPU lane width
BLOCKS = (512, 256, 128)  # largest first: 512 is MaxText's default and the sweet spot on v5p


def padded_length(seq_len: int) -> int:
  """The sequence length the kernel runs at: `seq_len` rounded up to a multiple of 128."""
  return -(-seq_len // LANES) * LANES


def block_size(seq_len: int) -> int:
  """Query/key block of every kernel (forward, dq, dkv) for a (padded) length: the largest of
  512, 256, 128 that divides it."""
  return next(b for b in BLOCKS if seq_len % b == 0)


def make_kernel(num_heads: int, seq_len: int, interpret: bool):
  """The splash kernel of `num_heads` causal heads over `seq_len` (a multiple of 128) tokens:
  kernel(q [H, S, D], k [K, S, D], v [K, S, D], segment_ids=SegmentIds(q [S], kv [S])).

  Built where it is called (its block tables become arrays of the trace that builds it; jax caches
  the numpy mask processing itself)."""
  b = block_size(seq_len)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def current_platform() -> str:
  """Platform of the current mesh's devices ('tpu', 'gpu', 'cpu'): under an AOT compile for a TPU
  slice on a CPU machine this is 'tpu'. Without a mesh: the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None) or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


def _spec(names: tuple, shape: tuple, mesh_shape) -> PartitionSpec:
  """Mesh axes of `names` by LOGICAL_RULES; a dimension they do not divide stays replicated."""
  def fits(size, axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return size % math.prod(mesh_shape[a] for a in axes) == 0

  spec = nn.logical_to_mesh_axes(names, sharding.LOGICAL_RULES)
  return PartitionSpec(*(axes if fits(size, axes) else None for size, axes in zip(shape, spec)))


def _local_attention(q, k, v, segment_ids, interpret: bool):
  """One device's rows: q [b, S, h, D], k/v [b, S, k, D], segment_ids [b, S] -> [b, S, h, D]."""
  seq_len = q.shape[1]
  padded = padded_length(seq_len)
  if padded != seq_len:
    # Trailing pad tokens: causal, so no real token sees them; sliced off below.
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - seq_len)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
  kernel = make_kernel(q.shape[2], padded, interpret)
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [b, heads, S, D]
  segment_ids = segment_ids.astype(jnp.int32)
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
      q, k, v, segment_ids)
  return jnp.swapaxes(out, 1, 2)[:, :seq_len]


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray,
                     interpret: bool | None = None) -> jnp.ndarray:
  """Packed causal attention by the splash kernel.

  q [B, S, H, D], k and v [B, S, K, D] (K divides H), segment_ids int32 [B, S] (0 = padding) ->
  [B, S, H, D] in q's dtype. Under a mesh the kernel runs per device by `shard_map`: rows over
  the 'batch' axes, q and kv heads over 'act_heads'/'act_kv' (LOGICAL_RULES); when the mesh does
  not divide the kv heads, kv is repeated to H heads first. interpret (default: unless the mesh's
  devices are TPUs) runs the kernel in Pallas interpret mode.
  """
  if interpret is None:
    interpret = current_platform() != "tpu"
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _local_attention(q, k, v, segment_ids, interpret)
  q_spec = _spec(("batch", "length", "act_heads", None), q.shape, mesh.shape)
  kv_spec = _spec(("batch", "length", "act_kv", None), k.shape, mesh.shape)
  if kv_spec[2] != q_spec[2]:
    # The kv heads do not split like the q heads: give every q head its own kv head.
    repeat = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, repeat, axis=2) for x in (k, v))
    kv_spec = q_spec
  seg_spec = PartitionSpec(q_spec[0], None)
  run = jax.shard_map(functools.partial(_local_attention, interpret=interpret), mesh=mesh,
                      in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                      check_vma=False)
  return run(q, k, v, segment_ids)
