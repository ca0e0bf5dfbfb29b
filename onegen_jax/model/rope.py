"""Rotary position embeddings in the Hugging Face rotate-half layout.

HF Llama/Qwen2/Mistral q and k projections are stored for this layout, so their weights convert by
transpose and reshape only (no permutation of the head dimension).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from onegen_jax.model.config import Llama3RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> np.ndarray:
  """float64[head_dim // 2] inverse frequencies, with Llama-3.1 scaling applied when given."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv_freq
  old_len = scaling.original_max_position_embeddings
  low_freq_wavelen = old_len / scaling.low_freq_factor
  high_freq_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept; in between,
  # a smooth interpolation of the two.
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates `x` [B, S, N, H] by `positions` [B, S]; computed in float32, returned in x.dtype."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B,S,H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, S, 1, H]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
