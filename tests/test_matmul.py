"""model/matmul.py: bfloat16 matmuls accumulated in float32, forward and backward, against a float64
numpy reference; the decoder under dot_accumulation float32 against XLA's own bf16 dots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.model.matmul import accumulates_in_float32, dense_dot_general, matmul

BF16_RTOL = 2 ** -7  # one bfloat16 rounding of each output


def _bf16(rng, shape) -> jnp.ndarray:
  return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)


def test_forward_and_gradients_equal_a_float64_reference():
  rng = np.random.default_rng(0)
  x, w = _bf16(rng, (2, 5, 24)), _bf16(rng, (24, 16))
  c = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.bfloat16)  # the output's cotangent
  y, vjp = jax.vjp(matmul, x, w)
  dx, dw = vjp(c)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, c))
  for got, want in ((y, x64 @ w64), (dx, c64 @ w64.T),
                    (dw, np.einsum("bsk,bsn->kn", x64, c64))):
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               rtol=BF16_RTOL, atol=BF16_RTOL * np.abs(want).max())


def test_gradients_equal_jax_own_transpose_of_the_float32_accumulating_dot():
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, (3, 32)), _bf16(rng, (32, 8))
  c = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  reference = lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32).astype(x.dtype)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * c)
  got = jax.grad(loss(matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(reference), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=BF16_RTOL, atol=1e-6)


def test_weight_gradient_of_a_token_sharded_input_equals_the_unsharded_one():
  """The backward pass's row-major x^T copy keeps working when the token axis is sharded."""
  rng = np.random.default_rng(3)
  x, w = _bf16(rng, (8, 6, 24)), _bf16(rng, (24, 16))
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) ** 2), (0, 1)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  for got, want in zip(grads(sharded, w), grads(x, w)):  # sums in another order: one rounding
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=BF16_RTOL,
                               atol=BF16_RTOL * np.abs(want).max())


def test_other_contractions_go_to_lax_dot_general():
  rng = np.random.default_rng(2)
  a, b = _bf16(rng, (4, 6)), _bf16(rng, (5, 6))
  dims = (((1,), (1,)), ((), ()))
  np.testing.assert_array_equal(dense_dot_general(a, b, dims), lax.dot_general(a, b, dims))


@pytest.mark.parametrize("setting,dtype,backend,expected", [
    ("auto", "bfloat16", "cpu", True), ("auto", "bfloat16", "tpu", False),
    ("auto", "float32", "cpu", False), ("float32", "bfloat16", "gpu", True),
    ("float32", "float32", "cpu", False), ("native", "bfloat16", "cpu", False)])
def test_which_settings_accumulate_in_float32(setting, dtype, backend, expected):
  assert accumulates_in_float32(setting, dtype, backend) is expected


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_decoder_logits_and_gradients_match_native_bf16_dots(tie_embeddings):
  """The same bf16 model with float32-accumulated dots and with XLA's own: outputs and parameter
  gradients agree to bfloat16 precision; only the float32 setting goes through `matmul`."""
  rng = np.random.default_rng(3)
  native = preset("tiny", dtype="bfloat16", tie_embeddings=tie_embeddings,
                  dot_accumulation="native")
  tokens = jnp.asarray(rng.integers(1, native.vocab_size, (2, 12)), jnp.int32)
  segments, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(12), (2, 12))
  params = Decoder(native).init(jax.random.key(0), tokens, segments, positions)["params"]

  def loss_and_grads(config):
    def loss(p):
      logits, _ = Decoder(config).apply({"params": p}, tokens, segments, positions)
      return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]), logits
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    uses_matmul = "custom_vjp_call" in str(jax.make_jaxpr(loss)(params))
    assert uses_matmul == (config.dot_accumulation == "float32")
    return value, logits, grads

  ours = loss_and_grads(native.replace(dot_accumulation="float32"))
  theirs = loss_and_grads(native)
  np.testing.assert_allclose(float(ours[0]), float(theirs[0]), rtol=1e-2)
  np.testing.assert_allclose(np.asarray(ours[1], np.float32), np.asarray(theirs[1], np.float32),
                             atol=0.05)
  for g, r in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(theirs[2])):
    scale = float(jnp.abs(r).max()) + 1e-12
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=0.05 * scale)
