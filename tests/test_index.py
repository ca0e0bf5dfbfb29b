"""Key-vector indexes: exact top k (sharded or not), ScaNN and approx_max_k recall, save/load,
and sentence keys mapped to their documents."""

import time

import jax
import numpy as np
import pytest

from onegen_jax.data.records import document_uid
from onegen_jax.retrieval.index import ApproxIndex, ExactIndex, ScannIndex, load_index


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
  """float32 [n, dim] unit rows: gaussian clusters with noise as large as the centres."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim), np.float32)
  x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim), np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def uids(n: int) -> list[str]:
  return [f"k{i}" for i in range(n)]


def rows_of(ids: list[list[str]]) -> np.ndarray:
  return np.array([[int(u[1:]) for u in row] for row in ids])


def recall(got: list[list[str]], want: list[list[str]]) -> float:
  """Mean over queries of |got & want| / |want|."""
  return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


@pytest.mark.parametrize("num_devices", [1, 8])
def test_exact_is_the_true_top_k(num_devices):
  rng = np.random.default_rng(0)
  vectors, queries, k = clustered(1001, 32, 20, 0), rng.standard_normal((37, 32)), 7
  index = ExactIndex(query_chunk=16, devices=jax.devices()[:num_devices]).build(vectors, uids(1001))
  ids, scores = index.search(queries, k)  # chunks of 16, 16 and 5 (padded to 8) queries
  want = queries @ vectors.T.astype(np.float64)
  order = np.argsort(-want, axis=1)
  sorted_scores = np.take_along_axis(want, order, axis=1)
  clear = sorted_scores[:, k - 1] - sorted_scores[:, k] > 1e-5  # leave out near-ties at the cut
  assert clear.sum() > 30
  np.testing.assert_array_equal(rows_of(ids)[clear], order[clear, :k])
  np.testing.assert_allclose(scores, sorted_scores[:, :k], atol=1e-5)
  assert scores.dtype == np.float32 and scores.shape == (37, k)


def test_exact_ties_put_the_lower_row_first():
  """Small integer vectors score exactly: equal scores must come back in row order, across the
  8 shards (21 rows: 3 per shard, the last shard only padding)."""
  rng = np.random.default_rng(1)
  vectors = rng.integers(-1, 2, (21, 4)).astype(np.float32)
  queries = rng.integers(-1, 2, (5, 4)).astype(np.float32)
  ids, scores = ExactIndex().build(vectors, uids(21)).search(queries, 10)
  want = queries @ vectors.T
  order = np.lexsort((np.broadcast_to(np.arange(21), want.shape), -want), axis=1)[:, :10]
  np.testing.assert_array_equal(rows_of(ids), order)
  np.testing.assert_array_equal(scores, np.take_along_axis(want, order, axis=1))


def test_approx_max_k_reaches_its_recall_target():
  """On TPU approx_max_k approximates, and the recall assertion checks its target. On CPU (and
  GPU) XLA computes approx_max_k exactly, so there the recall says nothing about the
  approximation and only gross errors could break it; on CPU the results must equal the exact
  index's, ids and scores, which guards the per-shard scoring, the padding of the last shard, the
  global row offsets, the merge of the shards' candidates and the query chunking (measured: equal,
  scores bitwise; returning each shard's rows off by one drops the recall to 0)."""
  # 4093 rows: the last of the 8 shards is part padding; 37 queries in chunks of 16, 16 and 5.
  vectors, queries = clustered(4093, 64, 64, 2), clustered(37, 64, 64, 3)
  target = 0.95
  exact, exact_scores = ExactIndex().build(vectors, uids(4093)).search(queries, 10)
  approx, approx_scores = ApproxIndex(recall_target=target, query_chunk=16).build(
      vectors, uids(4093)).search(queries, 10)
  assert recall(approx, exact) >= target
  if jax.default_backend() == "cpu":
    assert approx == exact
    # Default vs highest matmul precision: the same float32 dot products on CPU.
    np.testing.assert_allclose(approx_scores, exact_scores, rtol=0, atol=1e-6)


def _scann_recall(n: int) -> tuple[float, float, float]:
  """(recall@10 against exact, build seconds, queries per second) on n clustered 256-d points."""
  data = clustered(n + 1000, 256, 1000, 4)
  queries, vectors = data[:1000], data[1000:]
  exact, _ = ExactIndex().build(vectors, uids(n)).search(queries, 10)
  start = time.perf_counter()
  index = ScannIndex().build(vectors, uids(n))
  built = time.perf_counter()
  found, _ = index.search(queries, 10)
  qps = len(queries) / (time.perf_counter() - built)
  return recall(found, exact), built - start, qps


def test_scann_recall_20k():
  """20k points: asymmetric hashing + exact rescoring (no partitioning below 100k)."""
  assert _scann_recall(20_000)[0] >= 0.95


@pytest.mark.slow
def test_scann_recall_100k():
  """100k points: k-means tree of 316 leaves + asymmetric hashing + rescoring (~11 s to build)."""
  value, build_s, qps = _scann_recall(100_000)
  print(f"ScaNN 100k x 256: recall@10 {value:.4f}, build {build_s:.1f} s, {qps:.0f} queries/s")
  assert value >= 0.95


def test_scann_small_corpus_is_brute_force():
  vectors, queries = clustered(500, 16, 10, 5), clustered(9, 16, 10, 6)
  want, want_scores = ExactIndex().build(vectors, uids(500)).search(queries, 5)
  got, scores = ScannIndex().build(vectors, uids(500)).search(queries, 5)
  assert got == want
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_scann_missing_neighbours_are_none():
  """One leaf of ~55 points searched for k=100: the slots ScaNN cannot fill are None / -inf."""
  vectors = clustered(3000, 16, 30, 7)
  index = ScannIndex(leaves_fraction=0.001, brute_force_below=0, partition_from=0)
  ids, scores = index.build(vectors, uids(3000)).search(vectors[:4], 100)
  missing = np.array([[u is None for u in row] for row in ids])
  assert missing.any() and not missing[:, 0].any()
  np.testing.assert_array_equal(np.isneginf(scores), missing)


@pytest.mark.parametrize("make", [
    lambda: ExactIndex(query_chunk=8),
    lambda: ApproxIndex(recall_target=0.9),
    lambda: ScannIndex(),  # brute force
    lambda: ScannIndex(brute_force_below=0, partition_from=2000),  # tree + AH + reorder
], ids=["exact", "approx", "scann-bf", "scann-tree-ah"])
def test_save_load_gives_identical_results(make, tmp_path):
  vectors, queries = clustered(3000, 32, 30, 8), clustered(20, 32, 30, 9)
  ids = [f"doc{i // 3}" if i % 3 == 0 else f"doc{i // 3}-{i % 3}" for i in range(3000)]
  index = make().build(vectors, ids)
  index.save(str(tmp_path / "index"))
  loaded = load_index(str(tmp_path / "index"))
  assert type(loaded) is type(index) and loaded.config() == index.config()
  for search in ("search", "search_documents"):
    want_ids, want_scores = getattr(index, search)(queries, 10)
    got_ids, got_scores = getattr(loaded, search)(queries, 10)
    assert got_ids == want_ids
    np.testing.assert_array_equal(got_scores, want_scores)


def test_load_onto_other_devices(tmp_path):
  vectors, queries = clustered(100, 8, 5, 10), clustered(3, 8, 5, 11)
  index = ExactIndex().build(vectors, uids(100))
  index.save(str(tmp_path))
  loaded = load_index(str(tmp_path), devices=jax.devices()[:2])
  assert loaded.devices == jax.devices()[:2]
  (want, want_scores), (got, got_scores) = index.search(queries, 4), loaded.search(queries, 4)
  assert got == want
  np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)


def test_key_uids_map_to_their_documents_by_the_reference_rule():
  keys = ["p", "p-1", "p-12", "x-1", "y", "a-b", "a-b-1", "q-0x", "r-²"]
  # The key rule of the reference format ("doc", "doc-k"); other uids are their own documents.
  assert [document_uid(k) for k in keys] == ["p", "p", "p", "x", "y", "a-b", "a-b-1", "q-0x", "r-²"]


def test_search_documents_ranks_documents_by_their_best_key():
  rng = np.random.default_rng(12)
  ids = ["p", "p-1", "p-2", "a-b", "a-b-1", "x-1", "y", "z"]  # a-b, a-b-1: documents of their own
  vectors = rng.standard_normal((len(ids), 16)).astype(np.float32)
  queries = rng.standard_normal((6, 16)).astype(np.float32)
  index = ExactIndex().build(vectors, ids)
  assert index.num_documents == 6
  docs, scores = index.search_documents(queries, 3)
  key_scores = queries @ vectors.T
  doc_of = {uid: document_uid(uid) for uid in ids}
  for q in range(len(queries)):
    best = {}
    for key, score in zip(ids, key_scores[q]):
      best[doc_of[key]] = max(best.get(doc_of[key], -np.inf), score)
    want = sorted(best, key=best.get, reverse=True)[:3]
    assert docs[q] == want
    np.testing.assert_allclose(scores[q], [best[d] for d in want], atol=1e-5)
  with pytest.raises(ValueError):
    index.search_documents(queries, 7)


def test_bad_inputs_are_refused():
  vectors = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError):
    ExactIndex().build(vectors, ["a", "b", "c", "a"])
  with pytest.raises(ValueError):
    ExactIndex().build(vectors, ["a", "b", "c"])
  index = ExactIndex().build(vectors, ["a", "b", "c", "d"])
  with pytest.raises(ValueError):
    index.search(vectors, 5)
  with pytest.raises(ValueError):
    index.search(vectors[:, :3], 1)
  ids, scores = index.search(np.zeros((0, 4)), 2)
  assert ids == [] and scores.shape == (0, 2)
