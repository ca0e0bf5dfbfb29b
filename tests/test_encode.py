"""Packed encoding equals encoding each sequence alone."""

import jax
import jax.numpy as jnp
import numpy as np

from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.encode import EncodeItem, Encoder, pack_for_encoding


def test_pack_for_encoding_places_every_read():
  items = [EncodeItem(np.arange(1, n + 1, dtype=np.int32), (n - 1,)) for n in (5, 9, 3, 7, 8)]
  batches = list(pack_for_encoding(items, rows=2, seq_len=12, max_reads=3))
  assert [count for _, _, count in batches] == [3, 2]
  reads = [tuple(b["tokens"][r, c] for r, c in b["read_index"][:n]) for b, n, _ in batches]
  assert sum(reads, ()) == (5, 9, 3, 7, 8)  # the last token of each item


def test_packed_vectors_equal_each_sequence_alone(program):
  model = Decoder(preset("tiny"))
  params = program(mesh=(2, 2, 2)).init_state(seed=0).params
  rng = np.random.default_rng(0)
  items = [EncodeItem(rng.integers(1, 500, n).astype(np.int32), (n - 1, n // 2)) for n in
           (11, 30, 7, 19, 25, 4)]
  encoder = Encoder(model, program(mesh=(2, 2, 2)).mesh, rows=4, seq_len=32, max_reads=4)
  vectors = encoder.encode(params, items)
  assert vectors.shape == (12, 64)
  host_params = jax.device_get(params)
  for i, item in enumerate(items):
    n = len(item.tokens)
    hidden = model.apply({"params": host_params}, jnp.asarray(item.tokens)[None],
                         jnp.ones((1, n), jnp.int32), jnp.arange(n)[None], method=Decoder.hidden_states)
    want = np.array(hidden[0, list(item.read)])
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(vectors[2 * i:2 * i + 2], want, atol=1e-5)
