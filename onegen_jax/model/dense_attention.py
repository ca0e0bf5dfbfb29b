"""Attention with a dense mask whose dots accumulate in float32, forward and backward, for the
`dot_accumulation` float32 setting (model/matmul.py) on the XLA path.

Why: `jax.nn.dot_product_attention(implementation="xla")` differentiated by JAX runs its
backward dots on XLA:CPU's generic kernels (bfloat16 outputs; contractions over the query axis
in place), about 2x the time of this custom VJP on the benchmark machine (finding 14). Here every
dot takes bfloat16 operands and a float32 result (the library kernel), the softmax is float32,
and the two backward dots that contract the query axis (dK, dV) read row-major copies with that
axis last.

Shapes: q [B, S, H, D], k and v [B, T, K, D] with H a multiple of K (grouped-query: query head h
reads key head h // (H / K)), mask bool [B, 1, S, T]. Saved for the backward pass: the float32
probabilities [B, K, H/K, S, T] (as XLA's own autodiff of the reference saves them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_MASKED = -1e30  # a masked score: exp underflows to exactly 0 (every row keeps one real key)


def _einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _grouped(x: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
  """[B, S, H, D] -> [B, S, K, H/K, D]."""
  b, s, h, d = x.shape
  return x.reshape(b, s, kv_heads, h // kv_heads, d)


def _row_major(x: jnp.ndarray, axes: tuple[int, ...]) -> jnp.ndarray:
  """x transposed to `axes` as a physical copy (an optimization barrier keeps XLA from folding
  the transpose back into the consuming dot's operand layout)."""
  return lax.optimization_barrier(jnp.transpose(x, axes))


def _forward(q, k, v, mask):
  """-> (out [B, S, H, D] in q's dtype, residuals)."""
  kv_heads, scale = k.shape[2], q.shape[-1] ** -0.5
  scores = _einsum("bskgd,btkd->bkgst", _grouped(q, kv_heads), k) * scale
  probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores, _MASKED), axis=-1)
  out = _einsum("bkgst,btkd->bskgd", probs.astype(q.dtype), v).astype(q.dtype)
  return out.reshape(q.shape), (q, k, v, probs, out)


@jax.custom_vjp
def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    mask: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T / sqrt(D), masked) v -> [B, S, H, D] in q's dtype (see the module docstring)."""
  return _forward(q, k, v, mask)[0]


def _backward(residuals, d_out):
  """d_out [B, S, H, D] -> (dq, dk, dv, no cotangent for the mask)."""
  q, k, v, probs, out = residuals  # out: [B, S, K, G, D]
  kv_heads, scale, dtype = k.shape[2], q.shape[-1] ** -0.5, q.dtype
  d_out = _grouped(d_out.astype(dtype), kv_heads)  # [B, S, K, G, D]
  q_grouped = _grouped(q, kv_heads)
  d_probs = _einsum("bskgd,btkd->bkgst", d_out, v)
  row_dot = jnp.einsum("bskgd,bskgd->bkgs", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_scores = (probs * (d_probs - row_dot[..., None]) * scale).astype(dtype)  # [B, K, G, S, T]
  dq = _einsum("bkgst,btkd->bskgd", d_scores, k).reshape(q.shape)
  # dK and dV contract (G, S): both operands as row-major copies with (G, S) last / first.
  d_scores_t = _row_major(d_scores, (0, 1, 4, 2, 3))  # [B, K, T, G, S]
  probs_t = _row_major(probs.astype(dtype), (0, 1, 4, 2, 3))
  dk = _einsum("bktgs,bkgsd->btkd", d_scores_t, _row_major(q_grouped, (0, 2, 3, 1, 4)))
  dv = _einsum("bktgs,bkgsd->btkd", probs_t, _row_major(d_out, (0, 2, 3, 1, 4)))
  return dq.astype(dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


dense_attention.defvjp(_forward, _backward)
