"""Gold queries ranked against documents: hits at k among each query's own candidates, in the
pool, in the whole db, for every retriever alike (its scores as a [queries, documents] matrix).

Ties (BM25 scores 0 for a query without a known word) are broken by document uid, never by the
candidates' order, so no retriever inherits the candidate prior by accident."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onegen_jax.data.records import document_uid


@dataclasses.dataclass(frozen=True)
class GoldAnchor:
  """A query RET token of a dev answer whose gold document is in the pool."""

  line: int  # dev line
  position: int  # token position of the query RET token in the teacher-forced sequence
  gold: frozenset[str]  # gold document uids
  candidates: tuple[str, ...]  # its own candidates, in the data's order (the prior's first)
  query_text: str  # the text-retriever baselines' query


@dataclasses.dataclass(frozen=True)
class DocScores:
  """Scores of the gold queries (rows) against documents (columns, by uid)."""

  uids: list[str]
  matrix: np.ndarray  # float32 [queries, documents]


def from_keys(queries: np.ndarray, vectors: np.ndarray, key_uids: Sequence[str]) -> DocScores:
  """Cosine scores of query vectors against key vectors, a document scored by its best key."""
  docs = [document_uid(u) for u in key_uids]
  uids = list(dict.fromkeys(docs))
  column = {u: i for i, u in enumerate(uids)}
  key_scores = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T
  matrix = np.full((len(uids), len(queries)), -np.inf, np.float32)
  np.maximum.at(matrix, np.asarray([column[d] for d in docs], np.int64), key_scores.T)
  return DocScores(uids, matrix.T)


def with_prior(scores: DocScores, anchors: Sequence[GoldAnchor], prior) -> DocScores:
  """The scores with each anchor's candidates raised by the candidate prior of their rank
  (prior: onegen_jax.retrieval.candidates.RankPrior; rank: place among the distinct candidates
  as the data orders them, as CandidateScorer ranks them). Only among-candidates figures read
  it: other documents are left as they are."""
  column = {u: i for i, u in enumerate(scores.uids)}
  matrix = np.array(scores.matrix, np.float32)
  for i, anchor in enumerate(anchors):
    ranked = list(dict.fromkeys(anchor.candidates))
    bonus = prior.bonus(len(ranked))
    for r, uid in enumerate(ranked):
      if uid in column:
        matrix[i, column[uid]] += bonus[r]
  return DocScores(scores.uids, matrix)


def rows(scores: DocScores, queries: Sequence[int]) -> DocScores:
  """The scores of some queries only (rows, in the given order)."""
  return DocScores(scores.uids, scores.matrix[np.asarray(queries, np.int64)])


def _ranked(row: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """`columns` (in uid order) best first; equal scores keep uid order."""
  return columns[np.argsort(-row[columns], kind="stable")]


def hits(scores: DocScores, anchors: Sequence[GoldAnchor], k: int,
         among_candidates: bool) -> float | None:
  """Fraction of the anchors with a gold document among their top k: of their candidates in
  `scores` (a gold outside them is a miss), or of every document of `scores`."""
  if not anchors:
    return None
  column = {u: i for i, u in enumerate(scores.uids)}
  everything = np.asarray(sorted(range(len(scores.uids)), key=lambda i: scores.uids[i]), np.int64)
  hit = []
  for i, anchor in enumerate(anchors):
    columns = (np.asarray([column[u] for u in sorted(set(anchor.candidates)) if u in column],
                          np.int64) if among_candidates else everything)
    top = _ranked(scores.matrix[i], columns)[:k] if len(columns) else []
    hit.append(any(scores.uids[c] in anchor.gold for c in top))
  return float(np.mean(hit))


def prior_hits(anchors: Sequence[GoldAnchor], k: int) -> float | None:
  """The candidate prior: the first k candidates in the data's order."""
  if not anchors:
    return None
  return float(np.mean([bool(set(a.candidates[:k]) & a.gold) for a in anchors]))


def gold_in_candidates(anchors: Sequence[GoldAnchor]) -> float | None:
  if not anchors:
    return None
  return float(np.mean([bool(set(a.candidates) & a.gold) for a in anchors]))
