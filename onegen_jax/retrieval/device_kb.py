"""The knowledge base on the devices: keys and RAG insertion tokens searched and read inside
compiled code (the decode loop of issue 24), with no trip to the host.

  table = insertion_table(key_uids, documents)          # RAG's insertions, built on the host
  kb = build(vectors, key_uids, mesh, table=table)       # placed on the mesh
  ids, scores = search(kb, queries, k)                   # key rows [B, k], -1: no hit
  ids, scores = search(kb, queries, k, candidate_rows(key_uids, lists))  # EL candidates
  docs, scores = search_documents(kb, queries, k)        # document rows (RAG)
  tokens, lengths = insertion(kb, docs[:, 0])            # what follows the query RET token
  kb.footprint().summary(budget)                         # "device KB: X MiB per device of ..."

Layout: the key matrix [N, D] (float32, or bfloat16 for large KBs) has its rows sharded over
EVERY axis of the mesh the model runs on (default `mesh.axis_names`, e.g. ('data', 'fsdp',
'tensor')), so each of the P devices holds N / P rows and nothing is replicated. Why all axes:
the KB's size is what decides between the device and ScaNN (10M x 4096 bfloat16 keys are 80 GB:
1.25 GB per device over 64 chips, 10 GB if split over an axis of 8 and replicated over the
rest), while the query side is tiny: the B x D queries are replicated to every shard and the
merge moves B x k candidates per shard. The RAG token table [num_docs, L] int32 and the key ->
document map are sharded by rows over the same axes for the same reason. Rows are padded to a
multiple of P; a padded row never scores.

Search: exact scores (float32 at the highest matmul precision) and `lax.top_k` per shard under
`shard_map`, then one merge (`topk.sharded_top_k`, which `ExactIndex` uses too, so results equal
it: ties take the lower row); with `recall_target` set, `lax.approx_max_k` per shard instead (TPU
KNN; exact off TPU) at default precision, as `ApproxIndex`. Candidates (EL): each shard scores
the candidates it holds, the others give -inf, and a max over the shards joins them; the best k
of a query's candidates, ties in the candidates' order, the prior's bonus added by rank (as
`CandidateScorer.search`); the unrestricted queries of the same batch take the whole search.
Every function here is pure and jit-able: callable inside `jax.jit` and a `lax.while_loop` body
(k, and the KB's static fields, are compile-time).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from onegen_jax.data.records import document_uid
from onegen_jax.retrieval.candidates import RankPrior
from onegen_jax.retrieval.topk import approx_top_k, exact_top_k, sharded_top_k

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes per device a device KB keeps resident: the keys, the key -> document map, the token
  table (with its lengths). A search adds its transient scores, float32 [B, N / P] per device."""

  keys: int
  key_docs: int = 0
  tokens: int = 0

  @property
  def total(self) -> int:
    return self.keys + self.key_docs + self.tokens

  def fits(self, budget: int) -> bool:
    """Whether it fits `budget` bytes per device (else: ScaNN on the host)."""
    return self.total <= budget

  def summary(self, budget: int) -> str:
    """The line build_index / launch.infer / launch.serve print, budget in bytes per device."""
    verdict = "fits" if self.fits(budget) else "does not fit: ScaNN on the host"
    return (f"device KB: {self.total / MIB:.1f} MiB per device of budget {budget / MIB:.1f} MiB "
            f"({verdict})")


@dataclasses.dataclass(frozen=True)
class InsertionTable:
  """RAG's documents on the host, before placement: documents (uids, in row order, one per
  distinct `records.document_uid` of the keys, in the keys' order), key_docs int32 [N] (each
  key's document row), tokens int32 [num_docs, L] (each document's insertion, left-aligned,
  0-padded) and lengths int32 [num_docs]."""

  documents: list[str]
  key_docs: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray

  @property
  def keys_per_doc(self) -> int:
    return int(np.bincount(self.key_docs).max())


def insertion_table(key_uids: Sequence[str],
                    insertion: Callable[[str], Sequence[int]]) -> InsertionTable:
  """The InsertionTable of the keys `key_uids` (the index's key order): each document's
  `insertion(uid)`, the host engine's `documents` (retrieval_policy.task_documents: a run's
  `insertion_tokens(texts[uid])`). KeyError naming the documents whose insertion raised it (a
  documents.json without them)."""
  doc_of = [document_uid(uid) for uid in key_uids]
  documents = list(dict.fromkeys(doc_of))
  inserted, missing = [], []
  for uid in documents:
    try:
      inserted.append(insertion(uid))
    except KeyError:
      missing.append(uid)
  if missing:
    raise KeyError(f"{len(missing)} documents of the index's keys are not in its documents.json, "
                   f"e.g. {missing[:3]}")
  row_of = {uid: i for i, uid in enumerate(documents)}
  tokens = np.zeros((len(documents), max(map(len, inserted))), np.int32)
  for i, ids in enumerate(inserted):
    tokens[i, :len(ids)] = ids
  return InsertionTable(documents, np.array([row_of[d] for d in doc_of], np.int32), tokens,
                        np.array(list(map(len, inserted)), np.int32))


def footprint(num_keys: int, dim: int, dtype, shards: int, num_docs: int = 0,
              max_len: int = 0) -> Footprint:
  """The Footprint of a KB of `num_keys` keys [dim] in `dtype` over `shards` devices, with a
  token table of `num_docs` x `max_len` (RAG; 0: none), computed from the sizes alone (nothing is
  allocated: the device-or-ScaNN decision comes first)."""
  rows = -(-num_keys // shards)
  doc_rows = -(-num_docs // shards)
  table = 4 * doc_rows * (max_len + 1) if num_docs else 0  # int32 tokens and lengths
  return Footprint(keys=rows * dim * np.dtype(dtype).itemsize,
                   key_docs=4 * rows if num_docs else 0, tokens=table)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("keys", "key_docs", "tokens", "lengths"),
                   meta_fields=("num_keys", "num_docs", "keys_per_doc", "mesh", "axes",
                                "recall_target"))
@dataclasses.dataclass(frozen=True)
class DeviceKB:
  """The arrays (rows sharded over `axes` of `mesh`) and their static shape facts.

  keys [Npad, D]; key_docs int32 [Npad]: the document row of each key (-1: padding), tokens int32
  [Dpad, L] and lengths int32 [Dpad]: each document's insertion, left-aligned, 0-padded (RAG; for
  EL key_docs, tokens and lengths are None); keys_per_doc: the most keys of one document;
  recall_target: None for exact search, else approx_max_k's."""

  keys: jax.Array
  key_docs: jax.Array | None
  tokens: jax.Array | None
  lengths: jax.Array | None
  num_keys: int
  num_docs: int
  keys_per_doc: int
  mesh: Mesh
  axes: tuple[str, ...]
  recall_target: float | None = None

  @property
  def shards(self) -> int:
    return _shards(self.mesh, self.axes)

  def footprint(self) -> Footprint:
    max_len = 0 if self.tokens is None else self.tokens.shape[1]
    return footprint(self.num_keys, self.keys.shape[1], self.keys.dtype, self.shards,
                     self.num_docs, max_len)


def build(vectors: np.ndarray, key_uids: Sequence[str], mesh: Mesh,
          axes: Sequence[str] | None = None, dtype=np.float32,
          table: InsertionTable | None = None,
          recall_target: float | None = None) -> DeviceKB:
  """Places a KB on `mesh`: vectors [N, D] (key row i is key_uids[i], the index's key order),
  rows sharded over `axes` (default: all of the mesh's), with RAG's `table` (insertion_table of
  the same keys; None: EL, no table)."""
  axes = tuple(mesh.axis_names if axes is None else axes)
  shards = _shards(mesh, axes)

  def place(array: np.ndarray, fill: int = 0) -> jax.Array:
    return jax.device_put(_pad_rows(array, shards, fill), NamedSharding(
        mesh, P(axes, *[None] * (array.ndim - 1))))

  keys = place(np.asarray(vectors, dtype))
  if table is None:
    return DeviceKB(keys, None, None, None, len(key_uids), 0, 1, mesh, axes, recall_target)
  return DeviceKB(keys, place(table.key_docs, fill=-1), place(table.tokens), place(table.lengths),
                  len(key_uids), len(table.documents), table.keys_per_doc, mesh, axes,
                  recall_target)


def _shards(mesh: Mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _pad_rows(array: np.ndarray, shards: int, fill: int = 0) -> np.ndarray:
  """array [n, ...] -> [n rounded up to a multiple of shards, ...], rows of `fill` appended."""
  padded = np.full((-(-len(array) // shards) * shards, *array.shape[1:]), fill, array.dtype)
  padded[:len(array)] = array
  return padded


def _precision(kb: DeviceKB) -> jax.lax.Precision:
  """ExactIndex's and ApproxIndex's matmul precision."""
  return jax.lax.Precision.HIGHEST if kb.recall_target is None else jax.lax.Precision.DEFAULT


def _pad_to(values: jax.Array, rows: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(scores [B, k'], rows [B, k']) with k' <= k -> [B, k] each: -inf / -1 appended."""
  missing = k - values.shape[1]
  return (jnp.pad(values, ((0, 0), (0, missing)), constant_values=-jnp.inf),
          jnp.pad(rows, ((0, 0), (0, missing)), constant_values=-1))


def search(kb: DeviceKB, queries: jax.Array, k: int,
           candidates: CandidateRows | None = None) -> tuple[jax.Array, jax.Array]:
  """queries float32 [B, D] -> (key rows int32 [B, k], scores float32 [B, k]), best first; a slot
  without a hit (k over the keys, or over a query's candidates) has row -1 and score -inf.

  candidates (`candidate_rows`): the queries it restricts search only their own candidates
  (exact scores plus the prior's bonus), the others the whole KB."""
  queries = queries.astype(jnp.float32)
  local = (exact_top_k if kb.recall_target is None
           else functools.partial(approx_top_k, kb.recall_target, kb.keys.shape[0]))
  values, rows = _pad_to(*sharded_top_k(queries, kb.keys, kb.num_keys, k, kb.mesh, kb.axes,
                                        local, _precision(kb)), k)
  if candidates is not None:
    among, among_rows = _pad_to(*_candidate_top_k(kb, queries, candidates, k), k)
    values = jnp.where(candidates.restricted[:, None], among, values)
    rows = jnp.where(candidates.restricted[:, None], among_rows, rows)
  return jnp.where(values > -jnp.inf, rows, -1).astype(jnp.int32), values


def _candidate_top_k(kb: DeviceKB, queries: jax.Array, candidates: CandidateRows,
                     k: int) -> tuple[jax.Array, jax.Array]:
  """The best min(k, C) of each query's candidates: (scores [B, k'], key rows [B, k'])."""

  def shard_scores(q, cand, shard):
    rows = shard.shape[0]
    local = cand - jax.lax.axis_index(kb.axes) * rows
    held = (cand >= 0) & (cand < kb.num_keys) & (local >= 0) & (local < rows)
    picked = shard[jnp.clip(local, 0, rows - 1)]  # [B, C, D]
    scores = jnp.einsum("bd,bcd->bc", q.astype(shard.dtype), picked,
                        precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    return jax.lax.pmax(jnp.where(held, scores, -jnp.inf), kb.axes)

  scores = jax.shard_map(shard_scores, mesh=kb.mesh, in_specs=(P(), P(), P(kb.axes, None)),
                         out_specs=P())(queries, candidates.rows, kb.keys) + candidates.bonus
  values, best = jax.lax.top_k(scores, min(k, scores.shape[1]))  # ties: the candidates' order
  return values, jnp.take_along_axis(candidates.rows, best, axis=1)


def search_documents(kb: DeviceKB, queries: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """queries float32 [B, D] -> (document rows int32 [B, k], scores float32 [B, k]): the k
  distinct documents with the best scores, a document scored by its best key, as
  `Index.search_documents` (the top k x keys_per_doc keys hold them); -1 / -inf past the hits."""
  keys, scores = search(kb, queries, k * kb.keys_per_doc)
  docs = jnp.where(keys >= 0, _rows_of(kb.key_docs, keys, kb), -1)
  width = docs.shape[1]
  seen = (docs[:, :, None] == docs[:, None, :]) & jnp.tril(jnp.ones((width, width), bool), -1)
  first = (docs >= 0) & ~seen.any(axis=2)  # a document's best key
  order = jnp.argsort(jnp.where(first, 0, 1), axis=1, stable=True)[:, :k]
  hit = jnp.take_along_axis(first, order, axis=1)
  return (jnp.where(hit, jnp.take_along_axis(docs, order, axis=1), -1),
          jnp.where(hit, jnp.take_along_axis(scores, order, axis=1), -jnp.inf))


def insertion(kb: DeviceKB, docs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """document rows int32 [B] (-1: none) -> (tokens int32 [B, L], lengths int32 [B]): each
  document's insertion tokens (0-padded), length 0 for -1."""
  return _rows_of(kb.tokens, docs, kb), _rows_of(kb.lengths, docs, kb)


def _rows_of(table: jax.Array, rows: jax.Array, kb: DeviceKB) -> jax.Array:
  """table [Rpad, ...] (rows sharded over kb.axes) read at int32 rows [...] -> [..., ...]: each
  shard reads the rows it holds, zeros elsewhere (and for -1), summed over the shards."""
  spec = P(kb.axes, *([None] * (table.ndim - 1)))

  def shard_rows(index, shard):
    held = shard.shape[0]
    local = index - jax.lax.axis_index(kb.axes) * held
    inside = (index >= 0) & (local >= 0) & (local < held)
    values = shard[jnp.clip(local, 0, held - 1)]
    mask = inside.reshape(inside.shape + (1,) * (table.ndim - 1))
    return jax.lax.psum(jnp.where(mask, values, 0), kb.axes)

  return jax.shard_map(shard_rows, mesh=kb.mesh, in_specs=(P(), spec), out_specs=P())(
      rows.astype(jnp.int32), table)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("rows", "restricted", "bonus"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class CandidateRows:
  """EL candidates of a batch of queries, on device.

  rows int32 [B, C]: each query's distinct candidates in the given order as key rows (-1: a uid
  that is no key, kept in its place so that a column is the candidate's rank, and padding);
  restricted bool [B]: whether the query is restricted (False: it searches the whole KB, as a
  request without candidates for that query); bonus float32 [C]: the prior's term per rank
  (`RankPrior.bonus`; zeros without a prior)."""

  rows: jax.Array
  restricted: jax.Array
  bonus: jax.Array


def candidate_rows(key_uids: Sequence[str], candidates: Sequence[Sequence[str] | None],
                   width: int | None = None, prior: RankPrior | None = None) -> CandidateRows:
  """Each query's candidate uids (None: unrestricted) -> CandidateRows, as CandidateScorer ranks
  them: the distinct uids in the given order, a uid that is no key never found. C: `width`
  (default: the longest list, at least 1)."""
  row = {uid: i for i, uid in enumerate(key_uids)}
  lists = [[row.get(c, -1) for c in dict.fromkeys(cands or ())] for cands in candidates]
  width = max(max(map(len, lists), default=0), 1) if width is None else width
  rows = np.full((len(lists), width), -1, np.int32)
  for i, ranked in enumerate(lists):
    if len(ranked) > width:
      raise ValueError(f"query {i} has {len(ranked)} candidates, over width={width}")
    rows[i, :len(ranked)] = ranked
  bonus = np.zeros(width, np.float32) if prior is None else prior.bonus(width)
  return CandidateRows(jnp.asarray(rows), jnp.asarray([c is not None for c in candidates]),
                       jnp.asarray(bonus, jnp.float32))
