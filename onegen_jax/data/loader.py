"""The grain pipeline: host-sharded, per-epoch shuffled examples -> packed batches; global arrays.

Each host reads only its shard of the examples (`ShardOptions(process_index, process_count)`) in
an order reshuffled every epoch, and packs host-local batches of rows/P rows, Q/P queries, K/P
keys. Their row and key indices are offset by the host's place, so the hosts' local batches
concatenated along the first axis form the global batch of the contract (docs/architecture.md);
`to_global` builds those global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping

import grain.python as grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from onegen_jax.data.packing import ROW_FIELDS, BatchShape, packing_efficiency
from onegen_jax.data.tokenized import Database
from onegen_jax.data.retrieval_sampling import BatchBuilder, Sampling


@dataclasses.dataclass(frozen=True)
class Host:
  """This process's place among `count` data-loading processes."""

  index: int = 0
  count: int = 1

  def local_shape(self, shape: BatchShape) -> BatchShape:
    """The per-host part of a global micro-batch shape."""
    for name in ("rows", "num_queries", "num_keys"):
      if getattr(shape, name) % self.count:
        raise ValueError(f"batch {name}={getattr(shape, name)} does not split over "
                         f"{self.count} data-loading processes")
    return dataclasses.replace(shape, rows=shape.rows // self.count,
                               num_queries=shape.num_queries // self.count,
                               num_keys=shape.num_keys // self.count)

  def offset(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shifts a local batch's row indices and key slots to their place in the global batch
    (document and key ids are global already)."""
    rows, keys = batch["tokens"].shape[0] * self.index, batch["key_valid"].shape[0] * self.index
    batch["query_index"][:, 0] += rows
    batch["key_index"][:, 0] += rows
    for name in ("positive", "negatives"):
      batch[name] = np.where(batch[name] >= 0, batch[name] + keys, batch[name]).astype(np.int32)
    return batch


class TrainIterator(Iterator[dict]):
  """Endless host-local train batches; `get_state()`/`set_state()` checkpoint it (JSON).

  After a batch is emitted, the example that did not fit is pending: the saved state is the grain
  state from before that example was read, so a restored iterator reads it again.
  `last_example_ids` holds the example ids (line numbers) packed into the last batch;
  `last_batch_info` = {"examples": how many, "limited_by": the budget that refused the next
  example and so closed the batch: "rows", "queries" or "keys" (packing.BatchPacker)}.
  """

  def __init__(self, source, db: Database, shape: BatchShape, sampling: Sampling, host: Host,
               seed: int):
    if len(source) < host.count:
      raise ValueError(f"{len(source)} examples cannot be shared by {host.count} hosts")
    sampler = grain.IndexSampler(
        num_records=len(source), shuffle=True, num_epochs=None, seed=seed,
        shard_options=grain.ShardOptions(host.index, host.count, drop_remainder=False))
    self._loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=0,
                                    read_options=grain.ReadOptions(num_threads=2,
                                                                   prefetch_buffer_size=256))
    self._examples = iter(self._loader)
    self._builder = BatchBuilder(db, host.local_shape(shape), sampling)
    self._host = host
    self._step = 0
    self._pending: tuple[dict, bytes] | None = None
    self.last_example_ids: list[int] = []
    self.last_batch_info: dict = {}

  def __next__(self) -> dict[str, np.ndarray]:
    self._builder.start(self._step)
    while True:
      if self._pending is None:
        state = self._examples.get_state()
        self._pending = (next(self._examples), state)
      if not self._builder.try_add(self._pending[0]):
        break
      self._pending = None
    self.last_example_ids = self._builder.example_ids
    self.last_batch_info = {"examples": len(self.last_example_ids),
                            "limited_by": self._builder.refused_by}
    self._step += 1
    return self._host.offset(self._builder.emit())

  def get_state(self) -> dict:
    """JSON-serialisable position: the step and the grain state of the next example to read."""
    state = self._pending[1] if self._pending else self._examples.get_state()
    return {"step": self._step, "grain": json.loads(state.decode())}

  def set_state(self, state: Mapping):
    self._examples.set_state(json.dumps(state["grain"]).encode())
    self._step = int(state["step"])
    self._pending = None


def pack_all(records: list[dict], db: Database, shape: BatchShape, sampling: Sampling) -> list[dict]:
  """Packs records in order into batches (steps 0, 1, ...); the last partial batch included."""
  builder = BatchBuilder(db, shape, sampling)
  batches = []
  for record in records:
    if not builder.try_add(record):
      batches.append(builder.emit())
      builder.try_add(record)  # an empty batch takes it or raises
  if not builder.empty:
    batches.append(builder.emit())
  return batches


def heldout_batches(records: list[dict], db: Database, shape: BatchShape, sampling: Sampling,
                    host: Host) -> list[dict]:
  """This host's part of every held-out batch: the records split into `host.count` contiguous
  shards, each packed in order; shorter lists are padded with empty batches so every host has
  as many (hosts must call the evaluation step together)."""
  local = host.local_shape(shape)
  shards = np.array_split(np.arange(len(records)), host.count)
  packed = [pack_all([records[i] for i in shard], db, local,
                     dataclasses.replace(sampling, stream=sampling.stream + h))
            for h, shard in enumerate(shards)]
  mine = packed[host.index]
  empty = BatchBuilder(db, local, sampling).emit()
  mine += [{k: v.copy() for k, v in empty.items()} for _ in range(max(map(len, packed)) - len(mine))]
  return [host.offset(b) for b in mine]


def mean_efficiency(batches: list[dict]) -> float:
  """Mean fraction of non-padding tokens over batches."""
  return float(np.mean([packing_efficiency(b) for b in batches])) if batches else 0.0


def to_global(batch: Mapping[str, np.ndarray], shardings: Mapping) -> dict:
  """Host-local batch (offset by `Host.offset`) -> global jax.Arrays with the given shardings.

  Row fields are split over hosts: each host contributes its rows. The small index fields are
  gathered from every host and then placed as the shardings say (replicated in the train step).
  With a leading micro-batch axis [M, ...], hosts are concatenated along axis 1.
  """
  axis = np.ndim(batch["tokens"]) - 2
  out = {}
  for name, local in batch.items():
    if name not in ROW_FIELDS and jax.process_count() > 1:
      gathered = multihost_utils.process_allgather(np.asarray(local), tiled=False)
      local = np.concatenate(list(gathered), axis=axis)
    out[name] = jax.make_array_from_process_local_data(shardings[name], np.asarray(local))
  return out
