"""Disambiguation among given candidates: exact cosine scores of a query against the stored
vectors of the candidate keys (an EL request that names its candidate entities)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class CandidateScorer:
  """vectors float32 [N, D] (normalised, e.g. launch.build_index's memory-mapped vectors.npy),
  uids [N]: the key of each row."""

  def __init__(self, vectors: np.ndarray, uids: Sequence[str]):
    if len(vectors) != len(uids):
      raise ValueError(f"{len(vectors)} vectors for {len(uids)} uids")
    self.vectors = vectors
    self.row = {uid: i for i, uid in enumerate(uids)}

  def search(self, query: np.ndarray, candidates: Sequence[str], k: int) -> tuple[list[str], np.ndarray]:
    """The best k of the candidates that are keys (others are skipped) for query float32 [D]:
    (uids best first, scores float32 [<= k]); ties keep the candidates' order."""
    known = [c for c in dict.fromkeys(candidates) if c in self.row]
    if not known:
      return [], np.zeros((0,), np.float32)
    scores = np.asarray(self.vectors[[self.row[c] for c in known]], np.float32) @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [known[i] for i in order], scores[order].astype(np.float32)
