"""Decoder: packed segments behave as separate sequences; presets and config checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onegen_jax.model.config import PRESETS, ModelConfig, preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.model.rope import inverse_frequencies


@pytest.mark.parametrize("scan_layers", [True, False])
def test_packed_row_equals_each_segment_alone(scan_layers):
  config = preset("tiny", scan_layers=scan_layers, qkv_bias=True)
  model = Decoder(config)
  rng = np.random.default_rng(0)
  lengths = [13, 20, 9]
  segments = [rng.integers(1, config.vocab_size, n) for n in lengths]
  seq_len = 48  # 42 real tokens + 6 padding
  tokens = np.zeros((1, seq_len), np.int32)
  segment_ids = np.zeros((1, seq_len), np.int32)
  positions = np.zeros((1, seq_len), np.int32)
  offset = 0
  for i, seg in enumerate(segments):
    tokens[0, offset:offset + len(seg)] = seg
    segment_ids[0, offset:offset + len(seg)] = i + 1
    positions[0, offset:offset + len(seg)] = np.arange(len(seg))
    offset += len(seg)
  params = model.init(jax.random.key(0), tokens, segment_ids, positions)["params"]
  _, packed = model.apply({"params": params}, tokens, segment_ids, positions)
  assert np.all(np.isfinite(np.asarray(packed)))  # padding rows attend to padding, no NaN
  offset = 0
  for seg in segments:
    n = len(seg)
    alone_logits, alone = model.apply({"params": params}, jnp.asarray(seg)[None],
                                      jnp.ones((1, n), jnp.int32), jnp.arange(n)[None])
    np.testing.assert_allclose(packed[0, offset:offset + n], alone[0], atol=1e-5, rtol=1e-5)
    offset += n


def test_hidden_state_depends_only_on_its_own_past():
  model = Decoder(preset("tiny"))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 500, (1, 16)), jnp.int32)
  seg, pos = jnp.ones_like(tokens), jnp.arange(16)[None]
  params = model.init(jax.random.key(0), tokens, seg, pos)["params"]
  _, before = model.apply({"params": params}, tokens, seg, pos)
  _, after = model.apply({"params": params}, tokens.at[0, 10].set(7), seg, pos)
  np.testing.assert_array_equal(before[0, :10], after[0, :10])
  assert not np.allclose(before[0, 10:], after[0, 10:])


def test_llama31_rope_scaling_against_a_float64_recomputation():
  scaling = PRESETS["llama3.1-8b"].rope_scaling
  inv = inverse_frequencies(128, 500000.0, scaling)
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  wavelen = 2 * np.pi / base
  for i, (f, w) in enumerate(zip(base, wavelen)):
    if w < 8192 / 4:  # high frequency: kept
      assert inv[i] == f
    elif w > 8192 / 1:  # low frequency: divided by the factor
      assert inv[i] == pytest.approx(f / 8)
    else:  # interpolated between the two
      smooth = (8192 / w - 1) / (4 - 1)
      assert inv[i] == pytest.approx((1 - smooth) * f / 8 + smooth * f)


def test_tied_embeddings_have_no_lm_head():
  model = Decoder(preset("tiny", tie_embeddings=True))
  tokens = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), tokens, tokens, jnp.arange(4)[None])["params"]
  assert "lm_head" not in params
  logits, hidden = model.apply({"params": params}, tokens, tokens, jnp.arange(4)[None])
  table = nn.unbox(params)["embed_tokens"]["embedding"]
  np.testing.assert_allclose(logits, hidden @ table.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_consistent_shapes(name):
  config = PRESETS[name]
  shapes = jax.eval_shape(lambda: Decoder(config.replace(num_layers=1)).init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
      jnp.arange(4)[None]))
  q = shapes["params"]["layers"]["self_attn"]["q_proj"]["kernel"].value
  assert q.shape == (1, config.hidden_size, config.num_heads * config.dim_per_head)


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match="remat_policy"):
    preset("tiny", remat_policy="sometimes")
  with pytest.raises(ValueError, match="unknown model preset"):
    preset("llama9")
