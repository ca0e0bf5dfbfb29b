"""The RET embedding: the final hidden state at a RET token, L2-normalised. One home for what
training's losses, the encoder (documents, gold queries) and the engine's decode step read."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """Each row of x [..., D] scaled to unit L2 norm, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def gather_vectors(hidden: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """hidden [B, S, D], index int32 [M, 2] of (row, col) -> [M, D]."""
  return hidden[index[:, 0], index[:, 1]]
