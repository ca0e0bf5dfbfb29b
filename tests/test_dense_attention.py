"""model/dense_attention.py: bfloat16 attention with float32-accumulated dots and its custom VJP,
against a float64 reference (jax under jax.enable_x64) on grouped-query heads and a packed mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onegen_jax.model.attention import packed_causal_mask
from onegen_jax.model.dense_attention import dense_attention

BF16_RTOL = 2 ** -7


def _reference(q, k, v, mask):
  """softmax(q k^T / sqrt(D)) v with key head h // (H / K) for query head h, plain jnp."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhst,bthd->bshd", probs, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_output_and_gradients_equal_a_float64_reference(heads, kv_heads):
  rng = np.random.default_rng(heads)
  batch, seq, dim = 2, 10, 8
  q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, h, dim)), jnp.bfloat16)
             for h in (heads, kv_heads, kv_heads))
  segments = jnp.asarray([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], jnp.int32)  # packed, padding
  mask = packed_causal_mask(segments)
  cotangent = rng.normal(size=(batch, seq, heads, dim))
  out, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v)
  grads = vjp(jnp.asarray(cotangent, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  with jax.enable_x64(True):
    q64, k64, v64 = (jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v))
    want_out, vjp64 = jax.vjp(lambda q, k, v: _reference(q, k, v, mask), q64, k64, v64)
    want_grads = vjp64(jnp.asarray(cotangent))
    pairs = [(out, want_out), *zip(grads, want_grads)]
    for got, want in ((np.asarray(g, np.float64), np.asarray(w)) for g, w in pairs):
      # bf16 operands of each dot and a bf16 result: a few roundings of the largest entry
      np.testing.assert_allclose(got, want, rtol=4 * BF16_RTOL,
                                 atol=4 * BF16_RTOL * np.abs(want).max())
