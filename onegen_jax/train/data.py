"""What the fit loop reads: endless host-local training batches with a saveable position, and
evaluation batches. Two sources: reference-format jsonl files (the data pipeline) and the
synthetic task (tests).

Data shards: the global batch is the concatenation of `data.num_shards` shard batches (each packs
rows/num_shards rows from its own share of the examples; onegen_jax.data.loader.Host). Each
process loads the shards it owns, so one process with 2 shards builds exactly the global batches
that 2 processes with one shard each build together.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from onegen_jax.data import generate, synthetic
from onegen_jax.data.packing import BatchShape, pack_batches, stack_micro_batches
from onegen_jax.data.pipeline import build_data
from onegen_jax.data.tokenized import Database


class TrainData(Protocol):
  """Iterator of this process's training batches (micro-batch axis when accumulating).

  stats: {"counts": {"examples": ..., ...}, "warnings": [...]}; database / dev_records: the db
  and the held-out records for Recall@k against it (None / [] where there is no db);
  last_step_info: {"examples", "limited_by"} of each batch of the last step (packing).
  """

  stats: dict
  database: Database | None
  dev_records: list[dict]
  last_step_info: list[dict]

  def __next__(self) -> dict: ...
  def get_state(self) -> dict: ...  # JSON-serialisable position
  def set_state(self, state: dict) -> None: ...
  def eval_batches(self) -> list[dict]: ...  # without a micro-batch axis
  def examples_per_step(self, steps: int) -> float: ...  # measured; the position is kept


def _stack(parts: list[dict]) -> dict:
  return parts[0] if len(parts) == 1 else stack_micro_batches(parts)


def allgather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order (a collective: all must call)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)]))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


class JsonlData:
  """The data pipeline (onegen_jax.data.pipeline) over this process's shards.

  last_step_info: loader.TrainIterator.last_batch_info of every shard batch of the last step
  (micro-batch after micro-batch, shard after shard).
  """

  def __init__(self, config: ml_collections.ConfigDict, shape: BatchShape):
    shards = config.data.get("num_shards") or jax.process_count()
    if shards % jax.process_count():
      raise ValueError(f"data.num_shards={shards} is not a multiple of {jax.process_count()} processes")
    per_process = shards // jax.process_count()
    mine = range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    self._mine = mine
    built = [build_data(config.data, shape, config.data.seed, s, shards) for s in mine]
    self.shards = [b.train for b in built]
    self.stats, self.database, self.dev_records = built[0].stats, built[0].database, built[0].dev_records
    self._dev = [b.dev for b in built]
    self.accum_steps = config.batch.accum_steps
    self.last_step_info: list[dict] = []

  def _one(self) -> dict:
    """One micro-batch: this process's shards' rows, in global order."""
    parts = [next(shard) for shard in self.shards]
    self.last_step_info += [shard.last_batch_info for shard in self.shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __next__(self) -> dict:
    self.last_step_info = []
    return _stack([self._one() for _ in range(self.accum_steps)])

  def examples_per_step(self, steps: int) -> float:
    """Mean examples per optimizer step (every process's shards: a collective) over the first
    `steps` steps from the current position, measured by packing them; the shards are then set
    back, so training still starts at the same batch."""
    states = [shard.get_state() for shard in self.shards]
    examples = 0
    for _ in range(steps * self.accum_steps):
      for shard in self.shards:
        next(shard)
        examples += shard.last_batch_info["examples"]
    for shard, state in zip(self.shards, states):
      shard.set_state(state)
    return sum(allgather_json(examples)) / steps

  def get_state(self) -> dict:
    """Every shard's position, gathered from all processes (a collective)."""
    gathered = allgather_json([shard.get_state() for shard in self.shards])
    return {"shards": [s for process_states in gathered for s in process_states]}

  def set_state(self, state: dict) -> None:
    if len(state["shards"]) != len(self._mine) * jax.process_count():
      raise ValueError(f"the checkpoint holds {len(state['shards'])} data shards; this run has "
                       f"{len(self._mine) * jax.process_count()} (data.num_shards must match)")
    for shard, s in zip(self.shards, [state["shards"][i] for i in self._mine], strict=True):
      shard.set_state(s)

  def eval_batches(self) -> list[dict]:
    return [{k: np.concatenate([b[k] for b in group]) for k in group[0]}
            for group in zip(*self._dev)]


class SyntheticData:
  """The synthetic task (onegen_jax.data.synthetic): examples reshuffled every epoch from
  (seed, epoch); the position is (epoch, batch within the epoch). Single process only; no db."""

  database, dev_records, last_step_info = None, [], []

  def __init__(self, config: ml_collections.ConfigDict, shape: BatchShape):
    d = config.data
    self.task = synthetic.make_task(seed=d.seed, num_train=d.num_train, num_heldout=d.num_heldout,
                                    num_negatives=shape.num_negatives)
    self.shape, self.seed, self.accum_steps = shape, d.seed, config.batch.accum_steps
    self.stats = {"counts": {"examples": len(self.task.train)}, "warnings": []}
    self.set_state({"epoch": 0, "batch": 0})

  def examples_per_step(self, steps: int) -> float:
    """Mean examples per step over the next `steps` steps (the packed segments that hold a query:
    every synthetic example has one); the position is then set back."""
    state, examples = self.get_state(), 0
    for _ in range(steps * self.accum_steps):
      batch = self._next_one()
      rows, cols = batch["query_index"][batch["query_valid"]].T
      examples += len(set(zip(rows.tolist(), batch["segment_ids"][rows, cols].tolist())))
    self.set_state(state)
    return examples / steps

  def _epoch_batches(self, epoch: int) -> list[dict]:
    order = np.random.default_rng((self.seed, epoch)).permutation(len(self.task.train))
    return list(pack_batches((self.task.train[i] for i in order), self.task.corpus, self.shape))

  def set_state(self, state: dict) -> None:
    self.epoch, self.batch = state["epoch"], state["batch"]
    self._batches = self._epoch_batches(self.epoch)

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "batch": self.batch}

  def _next_one(self) -> dict:
    if self.batch == len(self._batches):
      self.set_state({"epoch": self.epoch + 1, "batch": 0})
    self.batch += 1
    return self._batches[self.batch - 1]

  def __next__(self) -> dict:
    return _stack([self._next_one() for _ in range(self.accum_steps)])

  def eval_batches(self) -> list[dict]:
    return list(pack_batches(self.task.heldout, self.task.corpus, self.shape))


def ensure_generated(data: ml_collections.ConfigDict) -> None:
  """With `data.generate` = "el" or "multihop", writes the generated dataset to the directory of
  `data.train_path` unless it is there (the demo's data, made by the project itself)."""
  if data.get("generate") and not os.path.exists(data.train_path):
    out = os.path.dirname(data.train_path)
    logging.info("generating the %s dataset into %s", data.generate, out)
    generate.make_dataset(data.generate, out, seed=data.seed)


def make_train_data(config: ml_collections.ConfigDict, shape: BatchShape) -> TrainData:
  if config.data.kind == "synthetic":
    if jax.process_count() > 1:
      raise ValueError("the synthetic data is single-process; use data.kind='jsonl'")
    return SyntheticData(config, shape)
  if config.data.kind == "jsonl":
    ensure_generated(config.data)
    return JsonlData(config, shape)
  raise ValueError(f"data.kind={config.data.kind!r}; expected 'jsonl' or 'synthetic'")
