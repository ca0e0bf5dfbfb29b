"""Packing of tokenised examples and their documents into the static batch contract.

An example and the documents its queries need (positive and negatives) go into rows of length S as
separate segments: segment ids per row, positions restarting at 0. Documents already in the batch
are shared. An example that does not fit (rows, Q or K exhausted) is refused whole and goes into
the next batch; nothing is ever cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

ROW_FIELDS = ("tokens", "targets", "loss_weight", "segment_ids", "positions")


def first_fit(fill: list[int], lengths: Iterable[int], seq_len: int
              ) -> tuple[list[tuple[int, int]], list[int]] | None:
  """The one placement rule of every packer here (training batches, encoding batches): each
  sequence, in order, goes to the first row with room after what the rows hold (fill: tokens
  used per row). Returns ((row, offset) of each sequence, the new fills), or None if one does not
  fit."""
  fill, places = list(fill), []
  for n in lengths:
    row = next((r for r, used in enumerate(fill) if used + n <= seq_len), None)
    if row is None:
      return None
    places.append((row, fill[row]))
    fill[row] += n
  return places, fill


def write_segment(batch: dict[str, np.ndarray], row: int, offset: int, segment: int,
                  tokens: np.ndarray) -> None:
  """Writes one sequence as segment `segment` of `row` at `offset`: its tokens, segment id and
  positions restarting at 0 (the layout the packed causal mask reads)."""
  span = slice(offset, offset + len(tokens))
  batch["tokens"][row, span] = tokens
  batch["segment_ids"][row, span] = segment
  batch["positions"][row, span] = np.arange(len(tokens))


@dataclasses.dataclass(frozen=True)
class Query:
  """A query-side RET token: its position in the sequence and the key uids it is trained against.

  positive: the key it is trained to retrieve; other_positives: its other listed positives, never
  negatives (InfoNCE masks their documents); negatives: its own negatives (BPR).
  """

  position: int
  positive: str
  negatives: tuple[str, ...] = ()
  other_positives: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Key:
  """A document-side RET token: its position and its uid ("doc" first key, "doc-k" k-th key)."""

  position: int
  uid: str


@dataclasses.dataclass(frozen=True)
class Segment:
  """One tokenised example or document: one segment of a packed row.

  tokens: int32 [n]. is_target: bool [n], True where the token is a GEN target, i.e. its
  prediction from the previous position is trained (is_target[0] is never used).
  target_weight: the loss weight of each of its GEN targets (L_gen is their weighted mean).
  """

  tokens: np.ndarray
  is_target: np.ndarray
  queries: tuple[Query, ...] = ()
  keys: tuple[Key, ...] = ()
  target_weight: float = 1.0

  def __post_init__(self):
    if self.tokens.ndim != 1 or not len(self.tokens):
      raise ValueError(f"a sequence needs a non-empty 1-D token array, got shape {self.tokens.shape}")
    if self.tokens.shape != self.is_target.shape:
      raise ValueError(f"tokens {self.tokens.shape} and is_target {self.is_target.shape} differ")
    for item in self.queries + self.keys:
      if not 0 <= item.position < len(self.tokens):
        raise ValueError(f"{item} points outside a sequence of {len(self.tokens)} tokens")

  def __len__(self) -> int:
    return len(self.tokens)


class Corpus:
  """Documents by id, which document owns each key uid, and global ids.

  doc_index: document id -> its place in the corpus; key_ids: key uid -> global key id (document
  after document, key after key). Every host builds the same corpus, so these ids mean the same
  document and key in every host's part of a global batch.
  """

  def __init__(self, documents: Mapping[str, Segment]):
    self.documents = dict(documents)
    self.key_owner = {key.uid: doc_id for doc_id, doc in self.documents.items() for key in doc.keys}
    self.doc_index = {doc_id: i for i, doc_id in enumerate(self.documents)}
    self.key_ids = {uid: i for i, uid in enumerate(self.key_owner)}


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """Static sizes of one batch: rows B, row length S, queries Q, keys K, negatives per query N,
  listed positives per query P (the trained one and those masked out of its InfoNCE denominator)."""

  rows: int
  seq_len: int
  num_queries: int
  num_keys: int
  num_negatives: int
  max_positives: int = 4


class BatchPacker:
  """Accumulates examples (with their documents) into one batch of fixed shape.

  `try_add` is all-or-nothing; `emit` returns the numpy batch and starts an empty one.
  `refused_by`: which budget refused the last example tried ("rows", "queries" or "keys", in
  that order of precedence: "keys" means the rows had room), None after an accepted one.
  """

  def __init__(self, corpus: Corpus, shape: BatchShape):
    self.corpus = corpus
    self.shape = shape
    self.refused_by: str | None = None
    self._reset()

  def _reset(self):
    self._rows: list[list[Segment]] = [[] for _ in range(self.shape.rows)]
    self._fill = [0] * self.shape.rows
    self._queries: list[tuple[int, int, Query]] = []  # (row, offset, query)
    self._doc_place: dict[str, tuple[int, int]] = {}  # doc id -> (row, offset)
    self._num_keys = 0

  @property
  def empty(self) -> bool:
    return not any(self._fill)

  def _check_fits_alone(self, example: Segment, docs: list[str]):
    s = self.shape
    for seq in [example] + [self.corpus.documents[d] for d in docs]:
      if len(seq) > s.seq_len:
        raise ValueError(f"a sequence of {len(seq)} tokens exceeds the row length {s.seq_len}; "
                         "truncate it when tokenising or raise seq_len")
    if len(example.queries) > s.num_queries:
      raise ValueError(f"an example with {len(example.queries)} queries exceeds num_queries={s.num_queries}")
    for q in example.queries:
      if len(q.negatives) > s.num_negatives:
        raise ValueError(f"a query with {len(q.negatives)} negatives exceeds num_negatives={s.num_negatives}")
      if 1 + len(q.other_positives) > s.max_positives:
        raise ValueError(f"a query with {1 + len(q.other_positives)} listed positives exceeds "
                         f"max_positives={s.max_positives}")

  def try_add(self, example: Segment) -> bool:
    """Adds the example and its missing documents if all fit; returns whether it did."""
    needed = []
    for query in example.queries:
      for uid in (query.positive, *query.negatives):
        doc_id = self.corpus.key_owner.get(uid)
        if doc_id is not None and doc_id not in self._doc_place and doc_id not in needed:
          needed.append(doc_id)
    if self.empty:
      self._check_fits_alone(example, needed)
    new_keys = sum(len(self.corpus.documents[d].keys) for d in needed)
    items = [example] + [self.corpus.documents[d] for d in needed]
    placed = first_fit(self._fill, map(len, items), self.shape.seq_len)
    queries = len(self._queries) + len(example.queries)
    self.refused_by = ("rows" if placed is None else "queries" if queries > self.shape.num_queries
                       else "keys" if self._num_keys + new_keys > self.shape.num_keys else None)
    if self.refused_by:
      if self.empty:
        raise ValueError(f"an example with {len(needed)} documents ({new_keys} keys) does not fit "
                         f"into an empty batch of {self.shape}; raise rows, seq_len or num_keys")
      return False
    places, self._fill = placed
    for seq, (row, _) in zip(items, places):
      self._rows[row].append(seq)
    self._queries += [(places[0][0], places[0][1], q) for q in example.queries]
    for doc_id, place in zip(needed, places[1:]):
      self._doc_place[doc_id] = place
    self._num_keys += new_keys
    return True

  def emit(self) -> dict[str, np.ndarray]:
    """The batch in the contract of docs/architecture.md; resets the packer."""
    s = self.shape
    batch = {
        "tokens": np.zeros((s.rows, s.seq_len), np.int32),
        "targets": np.zeros((s.rows, s.seq_len), np.int32),
        "loss_weight": np.zeros((s.rows, s.seq_len), np.float32),
        "segment_ids": np.zeros((s.rows, s.seq_len), np.int32),
        "positions": np.zeros((s.rows, s.seq_len), np.int32),
        "query_index": np.zeros((s.num_queries, 2), np.int32),
        "query_valid": np.zeros((s.num_queries,), bool),
        "key_index": np.zeros((s.num_keys, 2), np.int32),
        "key_valid": np.zeros((s.num_keys,), bool),
        "positive": np.full((s.num_queries,), -1, np.int32),
        "negatives": np.full((s.num_queries, s.num_negatives), -1, np.int32),
        "key_group": np.full((s.num_keys,), -1, np.int32),
        "key_id": np.full((s.num_keys,), -1, np.int32),
        "positive_groups": np.full((s.num_queries, s.max_positives), -1, np.int32),
    }
    for row, seqs in enumerate(self._rows):
      offset = 0
      for segment, seq in enumerate(seqs, start=1):
        n = len(seq)
        write_segment(batch, row, offset, segment, seq.tokens)
        batch["targets"][row, offset:offset + n - 1] = seq.tokens[1:]
        batch["loss_weight"][row, offset:offset + n - 1] = seq.is_target[1:] * seq.target_weight
        offset += n
    key_slot: dict[str, int] = {}
    for doc_id, (row, offset) in self._doc_place.items():
      for key in self.corpus.documents[doc_id].keys:
        slot = len(key_slot)
        key_slot[key.uid] = slot
        batch["key_index"][slot] = (row, offset + key.position)
        batch["key_valid"][slot] = True
        batch["key_group"][slot] = self.corpus.doc_index[doc_id]
        batch["key_id"][slot] = self.corpus.key_ids[key.uid]
    for slot, (row, offset, query) in enumerate(self._queries):
      batch["query_index"][slot] = (row, offset + query.position)
      batch["positive"][slot] = key_slot.get(query.positive, -1)
      batch["query_valid"][slot] = query.positive in key_slot
      negatives = [key_slot[u] for u in query.negatives if u in key_slot]
      batch["negatives"][slot, :len(negatives)] = negatives
      groups = [self.corpus.doc_index[self.corpus.key_owner[u]]
                for u in (query.positive, *query.other_positives) if u in self.corpus.key_owner]
      batch["positive_groups"][slot, :len(groups)] = groups
    self._reset()
    return batch


def pack_batches(examples: Iterable[Segment], corpus: Corpus,
                 shape: BatchShape) -> Iterator[dict[str, np.ndarray]]:
  """Packs examples in order into full batches; the last partial batch is emitted too."""
  packer = BatchPacker(corpus, shape)
  for example in examples:
    if not packer.try_add(example):
      yield packer.emit()
      packer.try_add(example)  # an empty batch takes it or raises
  if not packer.empty:
    yield packer.emit()


def stack_micro_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """M batches -> one batch whose every field has a leading micro-batch axis of size M."""
  return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


def merge_micro_batches(batch: dict) -> dict:
  """A batch with a leading micro-batch axis [M, ...] -> the one batch of M x rows it stands for:
  rows, query slots (M x Q) and key slots (M x K) concatenated in micro-batch order, query and
  key positions moved to the merged rows, `positive` and `negatives` (-1 stays -1) to the merged
  key slots. Numpy arrays or jax arrays (inside jit) alike."""
  m, rows = batch["tokens"].shape[:2]
  num_keys = batch["key_valid"].shape[1]
  flat = lambda x: x.reshape(m * x.shape[1], *x.shape[2:])
  row_shift = np.stack([np.arange(m) * rows, np.zeros(m, int)], -1)[:, None, :].astype(np.int32)
  key_shift = lambda ref: ref + (np.arange(m, dtype=np.int32) * num_keys).reshape(
      m, *[1] * (ref.ndim - 1)) * (ref >= 0)
  merged = {name: flat(value) for name, value in batch.items()}
  merged.update(query_index=flat(batch["query_index"] + row_shift),
                key_index=flat(batch["key_index"] + row_shift),
                positive=flat(key_shift(batch["positive"])),
                negatives=flat(key_shift(batch["negatives"])))
  return merged


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
  """Fraction of the batch's token slots that hold real (non-padding) tokens."""
  return float(np.mean(np.asarray(batch["segment_ids"]) > 0))
