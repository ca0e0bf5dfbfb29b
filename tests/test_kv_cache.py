"""Cached prefill/decode equals a full forward over the same tokens (float32, 1e-4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder, init_cache


@pytest.mark.parametrize("scan_layers,window", [(True, None), (False, None), (True, 32)])
def test_ragged_prefill_decode_and_insertion_match_full_forward(scan_layers, window):
  config = preset("tiny", scan_layers=scan_layers, qkv_bias=True)
  model = Decoder(config)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 500, n) for n in (9, 5)]
  inserted = rng.integers(1, 500, 7)  # e.g. "<paragraph> ... </paragraph>" into row 0 only
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                      jnp.arange(4)[None])["params"]
  # window: attend to the first 32 of the 64 cache entries (enough for this text).
  extend = jax.jit(functools.partial(model.apply, method=Decoder.extend, window=window))
  cache = init_cache(config, 2, 64)
  lengths = np.zeros(2, np.int32)
  sequences = [[], []]
  logits_seen = []  # (row, token count so far, logits of the last token)

  def feed(chunks):
    nonlocal cache, lengths
    width = max(len(c) for c in chunks)
    tokens = np.zeros((2, width), np.int32)
    for b, c in enumerate(chunks):
      tokens[b, :len(c)] = c
    hidden, cache = extend({"params": params}, jnp.asarray(tokens), jnp.asarray(lengths), cache)
    logits = model.apply({"params": params}, hidden, method=Decoder.logits)
    for b, c in enumerate(chunks):
      if len(c):
        sequences[b] += list(c)
        logits_seen.append((b, len(sequences[b]), np.asarray(logits[b, len(c) - 1])))
    lengths = lengths + np.array([len(c) for c in chunks], np.int32)
    return logits

  logits = feed(prompts)
  for step in range(6):
    next_tokens = [[int(np.argmax(logits[b, (len(prompts[b]) if step == 0 else 1) - 1]))]
                   for b in range(2)]
    if step == 2:
      next_tokens[0] = list(inserted)  # row 0 prefills a chunk while row 1 decodes one token
    logits = feed(next_tokens)
    prompts = [np.array(t) for t in next_tokens]
  full = {}
  for b in range(2):  # causal: one forward over the final text gives every prefix's logits
    seq = jnp.asarray(sequences[b])[None]
    full[b] = np.asarray(model.apply({"params": params}, seq, jnp.ones_like(seq),
                                     jnp.arange(seq.shape[1])[None])[0][0])
  for b, n, got in logits_seen:
    np.testing.assert_allclose(got, full[b][n - 1], atol=1e-4, rtol=1e-4)
  assert len(logits_seen) == 14
