"""What the fit loop reads: endless training batches with a saveable position, and eval batches."""

from __future__ import annotations

from typing import Protocol

import ml_collections
import numpy as np

from onegen_jax.data import synthetic
from onegen_jax.data.packing import BatchShape, pack_batches, stack_micro_batches


class TrainData(Protocol):
  """Iterator of training batches (with the micro-batch axis when accumulating)."""

  def __next__(self) -> dict: ...
  def get_state(self) -> dict: ...  # JSON-serialisable position
  def set_state(self, state: dict) -> None: ...
  def eval_batches(self) -> list[dict]: ...  # without a micro-batch axis


class SyntheticData:
  """The synthetic task (onegen_jax.data.synthetic): examples reshuffled every epoch from
  (seed, epoch); the position is (epoch, batch within the epoch)."""

  def __init__(self, config: ml_collections.ConfigDict, shape: BatchShape):
    d = config.data
    self.task = synthetic.make_task(seed=d.seed, num_train=d.num_train, num_heldout=d.num_heldout,
                                    num_negatives=shape.num_negatives)
    self.shape, self.seed, self.accum_steps = shape, d.seed, config.batch.accum_steps
    self.set_state({"epoch": 0, "batch": 0})

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
    if self.accum_steps == 1:
      return self._next_one()
    return stack_micro_batches([self._next_one() for _ in range(self.accum_steps)])

  def eval_batches(self) -> list[dict]:
    return list(pack_batches(self.task.heldout, self.task.corpus, self.shape))


def make_train_data(config: ml_collections.ConfigDict, shape: BatchShape) -> TrainData:
  if config.data.kind == "synthetic":
    return SyntheticData(config, shape)
  raise ValueError(f"data.kind={config.data.kind!r}; expected 'synthetic'")
