"""Encoding with the model itself: the L2-normalised last hidden state at chosen positions.

Documents are embedded at their document-side RET tokens; for evaluation, examples are embedded at
their query-side RET tokens (teacher-forced). Sequences are packed several to a row (segment ids,
restarting positions), so a 40-token document costs 40 tokens, not a padded row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from onegen_jax import sharding
from onegen_jax.data.packing import first_fit, write_segment
from onegen_jax.model.decoder import Decoder
from onegen_jax.model.ret_vectors import gather_vectors, l2_normalize


@dataclasses.dataclass(frozen=True)
class EncodeItem:
  """tokens int32 [n]; read: positions whose hidden states are wanted (in order)."""

  tokens: np.ndarray
  read: tuple[int, ...]


def pack_for_encoding(items: Sequence[EncodeItem], rows: int, seq_len: int,
                      max_reads: int) -> Iterator[tuple[dict, int, int]]:
  """Packs items in order into batches of `rows` x `seq_len` with at most `max_reads` read
  positions, each item into the first row of the current batch with room for it (first fit);
  yields (batch, number of valid reads, number of items). A batch holds tokens, segment_ids,
  positions [rows, seq_len] and read_index int32 [max_reads, 2]; reads are in item order."""

  def empty():
    zeros = lambda: np.zeros((rows, seq_len), np.int32)
    return {"tokens": zeros(), "segment_ids": zeros(), "positions": zeros(),
            "read_index": np.zeros((max_reads, 2), np.int32)}, [0] * rows, 0

  batch, fill, reads = empty()
  count = 0
  for item in items:
    n = len(item.tokens)
    if n > seq_len or len(item.read) > max_reads:
      raise ValueError(f"a sequence of {n} tokens with {len(item.read)} reads does not fit rows of "
                       f"{seq_len} tokens and {max_reads} reads")
    placed = first_fit(fill, [n], seq_len)
    if placed is None or reads + len(item.read) > max_reads:
      yield batch, reads, count
      (batch, fill, reads), count = empty(), 0
      placed = first_fit(fill, [n], seq_len)
    [(row, start)], fill = placed
    write_segment(batch, row, start, batch["segment_ids"][row].max() + 1, item.tokens)
    for p in item.read:
      batch["read_index"][reads] = (row, start + p)
      reads += 1
    count += 1
  if count:
    yield batch, reads, count


class Encoder:
  """A jitted forward over packed batches that returns [max_reads, D] normalised float32 vectors.

  Parameters keep the shardings they have; batch rows are split over ('data', 'fsdp'). Works
  across processes: each holds the same items and gets every vector.
  """

  def __init__(self, model: Decoder, mesh: Mesh, rows: int = 8, seq_len: int = 512,
               max_reads: int = 256):
    self.mesh, self.rows, self.seq_len, self.max_reads = mesh, rows, seq_len, max_reads
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % split:
      raise ValueError(f"encoding rows={rows} do not split over data x fsdp = {split} devices")

    def forward(params, batch):
      hidden = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                           batch["positions"], method=Decoder.hidden_states)
      return l2_normalize(gather_vectors(hidden, batch["read_index"]))

    self._forward = jax.jit(forward, out_shardings=sharding.replicated(mesh))
    self._shardings = {"tokens": sharding.batch_sharding(mesh, 2),
                       "segment_ids": sharding.batch_sharding(mesh, 2),
                       "positions": sharding.batch_sharding(mesh, 2),
                       "read_index": sharding.replicated(mesh)}

  def encode(self, params, items: Sequence[EncodeItem], progress: bool = False) -> np.ndarray:
    """float32 [sum of reads, D]: one vector per read position, in item order."""
    out = []
    bar = tqdm.tqdm(total=len(items), disable=not progress, unit="seq", mininterval=2)
    with sharding.activate(self.mesh):
      for batch, reads, count in pack_for_encoding(items, self.rows, self.seq_len, self.max_reads):
        # Every process holds the whole batch and supplies its devices' slices.
        placed = {k: jax.make_array_from_callback(v.shape, self._shardings[k], v.__getitem__)
                  for k, v in batch.items()}
        vectors = sharding.wait_on_cpu(self._forward(params, placed))
        out.append(np.asarray(jax.device_get(vectors))[:reads])
        bar.update(count)
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
