"""How long a run is and how full its batches are.

`train.steps` = 0 derives the steps from `train.epochs` and the data (`derive_steps`), before the
learning-rate schedule is built; the checkpointed config holds the derived value. `BatchFill`
reports examples per step and warns when the key budget, not the rows, closes the batches.
"""

from __future__ import annotations

import collections
import copy
import math

import ml_collections

from onegen_jax.train.data import TrainData, allgather_json
from onegen_jax.train.metrics import say

MEASURED_STEPS = 8  # steps packed to measure examples per step when deriving train.steps


def derive_steps(config: ml_collections.ConfigDict, data: TrainData,
                 measured_steps: int = MEASURED_STEPS) -> tuple[int, str]:
  """(steps, the line that explains them): ceil(train.epochs x training examples / examples per
  step). Batches are packed, so examples per step is measured by packing the first
  `measured_steps` steps (every process's shards), not read from the config."""
  epochs, examples = config.train.epochs, data.stats["counts"]["examples"]
  per_step = data.examples_per_step(measured_steps)
  steps = math.ceil(epochs * examples / per_step)
  return steps, (f"train.steps = {epochs:g} epochs x {examples:,} examples / {per_step:.1f} "
                 f"examples per step (measured over the first {measured_steps} steps) = {steps}")


def with_derived_steps(config: ml_collections.ConfigDict, data: TrainData) -> ml_collections.ConfigDict:
  """`config` when train.steps is set, else a copy with the steps derived (and said)."""
  if config.train.steps:
    return config
  steps, line = derive_steps(config, data)
  say(line)
  config = copy.deepcopy(config)
  config.train.steps = steps
  return config


class BatchFill:
  """Examples per step and what closed the batches, from the data's `last_step_info` (each shard
  batch's loader.TrainIterator.last_batch_info): `log` gives examples_per_step since the last log
  and warns once when the key budget, not the rows, closed most batches so far."""

  def __init__(self, num_keys: int):
    self.num_keys = num_keys
    self.examples, self.steps, self.closed, self.warned = 0, 0, collections.Counter(), False

  def add(self, infos: list[dict]):
    """One step's batch infos; data that reports none (the synthetic task) leaves no figure."""
    if not infos:
      return
    self.examples += sum(i["examples"] for i in infos)
    self.steps += 1
    self.closed.update(i["limited_by"] for i in infos)

  def log(self, efficiency: float) -> dict[str, float]:
    """{"examples_per_step": global mean since the last log} (a collective over processes)."""
    gathered = allgather_json([self.examples, self.closed["keys"], sum(self.closed.values())])
    examples, by_keys, batches = (sum(g[i] for g in gathered) for i in range(3))
    metrics = {"examples_per_step": examples / self.steps}
    self.examples = self.steps = 0
    if not self.warned and 2 * by_keys > batches:
      self.warned = True
      say(f"warning: the key budget (batch.num_keys={self.num_keys}) closed {by_keys} of "
           f"{batches} batches so far while rows were left empty (packing efficiency "
           f"{efficiency:.2f}): documents with several keys fill it first; raise batch.num_keys")
    return metrics
