"""Weight-only int8 quantization, symmetric, one float32 scale per output channel.

A kernel w [..., in, out] (a scanned stack has a leading layers axis) is stored as
q = round(w / s) in int8 [..., in, out] with s = max_i |w[..., i, o]| / 127 [..., out]; the
forward uses q * s. The round-trip error of an element is at most s / 2 (half a step of its
channel).
"""

from __future__ import annotations

import jax.numpy as jnp

INT8_MAX = 127.0


def quantize(kernel: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """kernel [..., in, out] -> (int8 [..., in, out], float32 scale [..., out]); an all-zero
  channel gets scale 1."""
  kernel = kernel.astype(jnp.float32)
  scale = jnp.max(jnp.abs(kernel), axis=-2) / INT8_MAX
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(kernel / scale[..., None, :]), -INT8_MAX, INT8_MAX)
  return q.astype(jnp.int8), scale


def dequantize(q: jnp.ndarray, scale: jnp.ndarray, dtype) -> jnp.ndarray:
  """int8 [..., in, out] and float32 scale [..., out] -> q * scale in `dtype`."""
  return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)
