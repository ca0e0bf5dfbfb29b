"""Attention over packed rows: the dense mask (XLA, cuDNN) and which kernel runs where."""

from __future__ import annotations

import jax.numpy as jnp

from onegen_jax.model.splash import current_platform


def packed_causal_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
  """bool[B, 1, S, S]: query i sees key j iff j <= i and both lie in the same packed segment.

  Padding (segment 0) attends only to padding, so no softmax row is empty (no NaN) and no real
  token ever sees padding.
  """
  seq_len = segment_ids.shape[1]
  causal = jnp.arange(seq_len)[:, None] >= jnp.arange(seq_len)[None, :]
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same_segment & causal)[:, None, :, :]


def resolve_impl(impl: str, dtype: str, platform: str | None = None, cached: bool = False) -> str:
  """The kernel `attention_impl` runs as: "splash", "cudnn" or "xla".

  auto: splash on TPU; cuDNN on GPU when computing in bfloat16/float16 (cuDNN has no float32
  attention); XLA otherwise (CPU). Over a KV cache (`cached`: one or a few query rows per step)
  splash and auto take the XLA path; an explicit "cudnn" stays cuDNN. platform: default that of
  the current mesh's devices (onegen_jax.model.splash.current_platform).
  """
  if cached:
    return "cudnn" if impl == "cudnn" else "xla"
  if impl == "auto":
    platform = platform or current_platform()
    if platform == "tpu":
      impl = "splash"
    elif platform == "gpu" and dtype in ("bfloat16", "float16"):
      impl = "cudnn"
    else:
      impl = "xla"
  return impl
