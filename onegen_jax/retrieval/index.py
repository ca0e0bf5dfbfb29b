"""Top-k search over key vectors: one interface, three backends.

Scores are dot products; the encoder L2-normalises every vector, so they are cosine similarities.

  index = ExactIndex().build(vectors, ids)       # vectors float32 [N, D], ids: N unique key uids
  ids, scores = index.search(queries, k)          # ids [Q][k] (best first), scores float32 [Q, k]
  docs, scores = index.search_documents(queries, k)  # the top-k distinct documents
  index.save(path); index = load_index(path)       # same results after loading

Backends:
- "exact" (`ExactIndex`): matmul + `jax.lax.top_k` on the accelerator. The rows are sharded over a
  1-D mesh of devices; each shard keeps its own top k and the shards' candidates are merged.
  Queries go in chunks, padded to a power of two (few shapes compile). Ties: the lower row first.
- "approx" (`ApproxIndex`): the same, with `jax.lax.approx_max_k` (TPU-KNN) per shard.
- "scann" (`ScannIndex`): ScaNN on the host CPU (numpy in and out).

Document keys: a document with several RET tokens has keys "doc" (its first) and "doc-1", "doc-2",
... (`records.document_uid`). `search_documents` ranks documents by their best key's score.

On disk, DIR/index.json holds {"backend", "config", "dim", "ids"}, next to DIR/vectors.npy
(exact, approx) or the ScaNN assets in DIR/scann/.
"""

from __future__ import annotations

import abc
import collections
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scann.scann_ops.py import scann_ops_pybind

from onegen_jax.data.records import document_uid
from onegen_jax.retrieval.topk import approx_top_k, exact_top_k, sharded_top_k

KB_AXIS = "kb"


class Index(abc.ABC):
  """Key vectors and their uids; `build` or `load_index` before searching."""

  backend: ClassVar[str]

  def build(self, vectors: np.ndarray, ids: Sequence[str]) -> Index:
    """Indexes vectors float32 [N, D] under unique `ids` (N of them); returns self."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids) or not len(ids):
      raise ValueError(f"need vectors [N, D] with N = len(ids) > 0, got {vectors.shape} and "
                       f"{len(ids)} ids")
    self._set_ids(list(ids), vectors.shape[1])
    self._build(vectors)
    return self

  def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str | None]], np.ndarray]:
    """queries float32 [Q, D] -> (ids [Q][k], scores float32 [Q, k]), best first.

    Only ScaNN can find fewer than k keys (when its searched partitions hold fewer); the missing
    slots have id None and score -inf.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [Q, {self.dim}], got {queries.shape}")
    if not 1 <= k <= len(self.ids):
      raise ValueError(f"k={k} is not in [1, {len(self.ids)}] (the number of keys)")
    rows, scores = self._search(queries, k)
    ids = [[self.ids[j] if j >= 0 else None for j in row] for row in rows.tolist()]
    return ids, scores

  def search_documents(self, queries: np.ndarray,
                       k: int) -> tuple[list[list[str | None]], np.ndarray]:
    """queries float32 [Q, D] -> (document uids [Q][k], scores float32 [Q, k]): the k distinct
    documents with the best scores, a document scored by its best key.

    Searches the top k * M keys, M = the most keys of one document: they hold at least k
    documents, and with an exact backend every top-k document's best key (ties aside). ScaNN can
    return fewer documents; the missing slots have uid None and score -inf (as in `search`).
    """
    if k > self.num_documents:
      raise ValueError(f"k={k} exceeds the {self.num_documents} documents")
    key_ids, key_scores = self.search(queries, min(len(self.ids), k * self._max_keys))
    docs = np.full((len(key_ids), k), None, object)
    scores = np.full((len(key_ids), k), -np.inf, np.float32)
    for q, (row, row_scores) in enumerate(zip(key_ids, key_scores)):
      best = _best_documents(row, row_scores, self._doc_of, k)
      docs[q, :len(best)] = list(best)
      scores[q, :len(best)] = list(best.values())
    return docs.tolist(), scores

  def save(self, path: str) -> None:
    """Writes the index to directory `path` (created if missing)."""
    os.makedirs(path, exist_ok=True)
    self._save(path)
    meta = {"backend": self.backend, "config": self.config(), "dim": self.dim, "ids": self.ids}
    with open(os.path.join(path, "index.json"), "w") as f:
      json.dump(meta, f)

  @abc.abstractmethod
  def config(self) -> dict[str, Any]:
    """The constructor arguments that `load_index` restores (JSON values)."""

  @abc.abstractmethod
  def _build(self, vectors: np.ndarray) -> None:
    """Indexes float32 [N, D] vectors (rows in id order)."""

  @abc.abstractmethod
  def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [Q, D] -> (rows int [Q, k], -1 where missing; scores float32 [Q, k])."""

  @abc.abstractmethod
  def _save(self, path: str) -> None:
    """Writes the vectors or searcher into directory `path`."""

  @abc.abstractmethod
  def _load(self, path: str) -> None:
    """Reads what `_save` wrote; ids and dim are already set."""

  def _set_ids(self, ids: list[str], dim: int) -> None:
    if len(set(ids)) != len(ids):
      raise ValueError("key ids must be unique")
    self.ids, self.dim = ids, dim
    self._doc_of = {uid: document_uid(uid) for uid in ids}
    keys_per_doc = collections.Counter(self._doc_of.values())
    self.num_documents, self._max_keys = len(keys_per_doc), max(keys_per_doc.values())


def _best_documents(key_ids: list[str | None], scores: np.ndarray, doc_of: dict[str, str],
                    k: int) -> dict[str, float]:
  """The first k distinct documents of keys sorted best first -> {document uid: best score}."""
  best: dict[str, float] = {}
  for uid, score in zip(key_ids, scores):
    if uid is None or len(best) == k:
      break
    best.setdefault(doc_of[uid], float(score))
  return best


class _DeviceIndex(Index):
  """Vectors on a 1-D device mesh, rows sharded; per-shard top k, then a merge."""

  _precision: ClassVar[jax.lax.Precision]

  def __init__(self, query_chunk: int = 256, devices: Sequence[jax.Device] | None = None):
    """query_chunk: queries scored at once (scores [query_chunk, N / devices] per device);
    devices: where the rows go (default: this process's devices; in a multi-process run each
    process holds and searches its own copy, as with ScaNN)."""
    self.query_chunk = query_chunk
    self.devices = list(jax.local_devices() if devices is None else devices)
    self._mesh = Mesh(np.asarray(self.devices), (KB_AXIS,))

  def _build(self, vectors: np.ndarray) -> None:
    n, d = vectors.shape
    shards = len(self.devices)
    padded = np.zeros((-(-n // shards) * shards, d), np.float32)
    padded[:n] = vectors
    self._vectors = jax.device_put(padded, NamedSharding(self._mesh, P(KB_AXIS, None)))
    self._top_k = jax.jit(functools.partial(self._sharded_top_k, n), static_argnames="k")

  @abc.abstractmethod
  def _local_top_k(self, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """scores float32 [C, n] of one shard -> (values [C, k], local indices int32 [C, k])."""

  def _sharded_top_k(self, n: int, queries: jax.Array, vectors: jax.Array, k: int):
    return sharded_top_k(queries, vectors, n, k, self._mesh, (KB_AXIS,), self._local_top_k,
                         self._precision)

  def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    chunks = [self._search_chunk(queries[i:i + self.query_chunk], k)
              for i in range(0, len(queries), self.query_chunk)]
    if not chunks:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

  def _search_chunk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads [C, D] queries to a power of two (at most query_chunk) so that few shapes compile."""
    count = len(queries)
    padded = np.zeros((min(self.query_chunk, 1 << (count - 1).bit_length()), self.dim), np.float32)
    padded[:count] = queries
    placed = jax.device_put(padded, NamedSharding(self._mesh, P()))
    values, rows = jax.device_get(self._top_k(placed, self._vectors, k=k))
    return np.asarray(rows[:count], np.int64), np.asarray(values[:count])

  def _save(self, path: str) -> None:
    vectors = np.asarray(jax.device_get(self._vectors))[:len(self.ids)]
    np.save(os.path.join(path, "vectors.npy"), vectors)

  def _load(self, path: str) -> None:
    self._build(np.load(os.path.join(path, "vectors.npy")))


class ExactIndex(_DeviceIndex):
  """Exact top k: float32 scores at the highest matmul precision, `jax.lax.top_k`."""

  backend = "exact"
  _precision = jax.lax.Precision.HIGHEST

  def config(self) -> dict[str, Any]:
    return {"query_chunk": self.query_chunk}

  def _local_top_k(self, scores, k):
    return exact_top_k(scores, k)


class ApproxIndex(_DeviceIndex):
  """`jax.lax.approx_max_k` (TPU-KNN, arXiv 2206.14286) per shard, then an exact merge.

  The approximation exists on TPU only; on other devices (CPU, GPU) XLA falls back to sorting,
  so the result there is exact. Scores use the default matmul precision (bfloat16 passes on TPU).
  """

  backend = "approx"
  _precision = jax.lax.Precision.DEFAULT

  def __init__(self, recall_target: float = 0.95, query_chunk: int = 256,
               devices: Sequence[jax.Device] | None = None):
    super().__init__(query_chunk, devices)
    self.recall_target = recall_target

  def config(self) -> dict[str, Any]:
    return {"query_chunk": self.query_chunk, "recall_target": self.recall_target}

  def _local_top_k(self, scores, k):
    return approx_top_k(self.recall_target, self._vectors.shape[0], scores, k)


class ScannIndex(Index):
  """ScaNN on the host CPU, configured by corpus size after ScaNN's docs/algorithms.md.

  N < `brute_force_below`: exact brute force. Otherwise asymmetric hashing (2 dimensions per
  block, anisotropic threshold 0.2) rescored exactly over the best `reorder_factor` * k; from
  `partition_from` points on, first a k-means tree of ~sqrt(N) leaves, of which a
  `leaves_fraction` is searched, trained on at most `training_sample_size` points.
  `leaves_fraction` and `reorder_factor` are read at search time: set them on a built or loaded
  index (or pass them to `load_index`) to trade recall for speed without rebuilding.
  """

  backend = "scann"

  def __init__(self, leaves_fraction: float = 0.1, reorder_factor: int = 10,
               training_sample_size: int = 250_000, brute_force_below: int = 20_000,
               partition_from: int = 100_000):
    self.leaves_fraction = leaves_fraction
    self.reorder_factor = reorder_factor
    self.training_sample_size = training_sample_size
    self.brute_force_below = brute_force_below
    self.partition_from = partition_from

  def config(self) -> dict[str, Any]:
    return {"leaves_fraction": self.leaves_fraction, "reorder_factor": self.reorder_factor,
            "training_sample_size": self.training_sample_size,
            "brute_force_below": self.brute_force_below, "partition_from": self.partition_from}

  def _build(self, vectors: np.ndarray) -> None:
    n = len(vectors)
    builder = scann_ops_pybind.builder(vectors, 10, "dot_product")
    if n < self.brute_force_below:
      self._searcher = builder.score_brute_force().build()
      return
    if n >= self.partition_from:
      builder = builder.tree(num_leaves=round(math.sqrt(n)),
                             num_leaves_to_search=self._leaves_to_search(n),
                             training_sample_size=min(n, self.training_sample_size))
    # 10: the builder's default k; every search passes its own k and reorder_factor * k.
    self._searcher = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(
        10 * self.reorder_factor).build()

  def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if not len(queries):
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    rows, scores = self._searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=self.reorder_factor * k,
        leaves_to_search=self._leaves_to_search(len(self.ids)))
    missing = np.isnan(scores)  # ScaNN pads with row 0 and NaN when it finds fewer than k
    rows = np.where(missing, -1, rows.astype(np.int64))
    return rows, np.where(missing, -np.inf, scores).astype(np.float32)

  def _leaves_to_search(self, n: int) -> int | None:
    """Leaves searched among the ~sqrt(n) of the tree at the current `leaves_fraction` (None
    without a tree); read at every search, so the fraction can change after the build."""
    if n < max(self.partition_from, self.brute_force_below):
      return None
    return max(1, math.ceil(round(math.sqrt(n)) * self.leaves_fraction))

  def _save(self, path: str) -> None:
    assets = os.path.join(path, "scann")
    os.makedirs(assets, exist_ok=True)
    self._searcher.serialize(assets, relative_path=True)

  def _load(self, path: str) -> None:
    self._searcher = scann_ops_pybind.load_searcher(os.path.join(path, "scann"))


BACKENDS: dict[str, type[Index]] = {c.backend: c for c in (ExactIndex, ApproxIndex, ScannIndex)}


def load_index(path: str, **options) -> Index:
  """Reads an index that `Index.save` wrote; `options` override its saved constructor arguments
  (e.g. devices=... for the device backends)."""
  with open(os.path.join(path, "index.json")) as f:
    meta = json.load(f)
  index = BACKENDS[meta["backend"]](**{**meta["config"], **options})
  index._set_ids(meta["ids"], meta["dim"])
  index._load(path)
  return index
