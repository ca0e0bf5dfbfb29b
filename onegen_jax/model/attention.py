"""Attention masks for packed rows."""

from __future__ import annotations

import jax.numpy as jnp


def packed_causal_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
  """bool[B, 1, S, S]: query i sees key j iff j <= i and both lie in the same packed segment.

  Padding (segment 0) attends only to padding, so no softmax row is empty (no NaN) and no real
  token ever sees padding.
  """
  seq_len = segment_ids.shape[1]
  causal = jnp.arange(seq_len)[:, None] >= jnp.arange(seq_len)[None, :]
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same_segment & causal)[:, None, :, :]

