"""Anchor, positive and negative sampling with the reference semantics, fused with packing.

For each example of a batch: up to n_pos_per_sent valid anchors (chosen at random, kept in text
order), one positive per anchor (at random from its list). Then, batch-wide and example after
example, n_neg_per_pos negatives per anchor: its listed negatives in order, then random db keys,
skipping any key that is a positive of the batch, already a negative in the batch, or one of the
anchor's own listed positives (the reference does not skip the last; they are false negatives).

The batch's members are not known in advance: an example joins if it fits with its documents.
Negatives are chosen as if the batch were complete (all positives first): when a new member's
positive is already some earlier member's negative, every negative is chosen again and the batch
repacked; otherwise the earlier choices are unchanged (they never reached a key the newcomer
excludes), so growing the batch member by member gives exactly the reference's choice.

Randomness: numpy generators keyed by (seed, stream, step, member index): reproducible from
(seed, step) alone; `stream` separates hosts and the dev set.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onegen_jax.data.packing import BatchPacker, BatchShape, Query, Segment
from onegen_jax.data.tokenized import Database

_RANDOM_TRIES = 64  # random draws per missing negative before giving up (tiny dbs)


@dataclasses.dataclass(frozen=True)
class Sampling:
  n_pos_per_sent: int
  n_neg_per_pos: int
  seed: int = 0
  stream: int = 0


@dataclasses.dataclass(frozen=True)
class _Anchor:
  position: int
  positive: int                 # key id
  positives: frozenset          # every listed positive key id
  negatives: tuple[int, ...]    # listed negative key ids


def _split(keys: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
  return np.split(np.asarray(keys), np.cumsum(counts)[:-1]) if len(counts) else []


def choose_anchors(record: dict, rng: np.random.Generator, n_pos: int) -> list[_Anchor]:
  """Up to n_pos of the record's valid anchors, each with one positive."""
  positions = np.asarray(record["positions"])
  chosen = np.arange(len(positions))
  if len(chosen) > n_pos:
    chosen = np.sort(rng.choice(len(positions), n_pos, replace=False))
  positives = _split(record["positive_keys"], record["positive_counts"])
  negatives = _split(record["negative_keys"], record["negative_counts"])
  return [_Anchor(int(positions[a]), int(rng.choice(positives[a])),
                  frozenset(positives[a].tolist()), tuple(negatives[a].tolist())) for a in chosen]


class BatchBuilder:
  """Builds one batch at a time: `start(step)`, `try_add(record)` until it refuses, `emit()`."""

  def __init__(self, db: Database, shape: BatchShape, sampling: Sampling):
    self.db, self.shape, self.sampling = db, shape, sampling
    self.start(0)

  def start(self, step: int):
    self._step = step
    self._members: list[tuple[dict, list[_Anchor]]] = []
    self._packer = BatchPacker(self.db.corpus, self.shape)
    self._tried = self._packer  # the packer of the latest try_add (a rebuild packs anew)
    self._positives: set[int] = set()
    self._used: set[int] = set()

  @property
  def empty(self) -> bool:
    return not self._members

  @property
  def example_ids(self) -> list[int]:
    return [int(record["index"]) for record, _ in self._members]

  @property
  def refused_by(self) -> str | None:
    """Which budget refused the last example tried: "rows", "queries" or "keys" (None: it fit)."""
    return self._tried.refused_by

  def _rng(self, member: int, purpose: int) -> np.random.Generator:
    s = self.sampling
    return np.random.default_rng([s.seed, s.stream, self._step, member, purpose])

  def _negatives(self, member: int, anchors: list[_Anchor], positives: set[int],
                 used: set[int]) -> list[tuple[int, ...]]:
    """Negatives of one member's anchors; adds them to `used`."""
    rng = self._rng(member, 1)
    out = []
    for anchor in anchors:
      picked = []
      excluded = lambda k: k in positives or k in used or k in anchor.positives
      for k in anchor.negatives:
        if len(picked) == self.sampling.n_neg_per_pos:
          break
        if not excluded(k):
          picked.append(k)
          used.add(k)
      for _ in range(_RANDOM_TRIES * (self.sampling.n_neg_per_pos - len(picked))):
        if len(picked) == self.sampling.n_neg_per_pos:
          break
        doc = rng.integers(len(self.db.doc_num_keys))
        k = int(self.db.doc_first_key[doc] + rng.integers(self.db.doc_num_keys[doc]))
        if not excluded(k):
          picked.append(k)
          used.add(k)
      out.append(tuple(picked))
    return out

  def _sequence(self, record: dict, anchors: list[_Anchor], negatives) -> Segment:
    uid = self.db.key_uids
    queries = tuple(Query(a.position, uid[a.positive], tuple(uid[k] for k in n),
                          tuple(uid[k] for k in sorted(a.positives - {a.positive})))
                    for a, n in zip(anchors, negatives))
    return Segment(np.asarray(record["tokens"]), np.asarray(record["is_target"]), queries)

  def try_add(self, record: dict) -> bool:
    """Adds the example (and its documents) if it fits; all or nothing."""
    member = len(self._members)
    anchors = choose_anchors(record, self._rng(member, 0), self.sampling.n_pos_per_sent)
    positives = self._positives | {a.positive for a in anchors}
    if positives & self._used:
      return self._rebuild(record, anchors, positives)
    used = set(self._used)
    negatives = self._negatives(member, anchors, positives, used)
    self._tried = self._packer
    if not self._packer.try_add(self._sequence(record, anchors, negatives)):
      return False
    self._members.append((record, anchors))
    self._positives, self._used = positives, used
    return True

  def _rebuild(self, record: dict, anchors: list[_Anchor], positives: set[int]) -> bool:
    """Chooses every negative again for the batch plus the new member and repacks it."""
    members = self._members + [(record, anchors)]
    packer = BatchPacker(self.db.corpus, self.shape)
    self._tried = packer
    used: set[int] = set()
    for member, (r, a) in enumerate(members):
      if not packer.try_add(self._sequence(r, a, self._negatives(member, a, positives, used))):
        return False
    self._members, self._packer = members, packer
    self._positives, self._used = positives, used
    return True

  def emit(self) -> dict[str, np.ndarray]:
    """The batch (packing.BatchPacker.emit); the builder then starts the next step."""
    batch = self._packer.emit()
    self.start(self._step + 1)
    return batch
