"""Disambiguation among given candidates: exact cosine scores of a query against the stored
vectors of the candidate keys (an EL request that names its candidate entities), optionally
combined with the candidate generator's prior (the candidates' order) in one log-linear score."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RankPrior:
  """The candidate prior as a log-linear term: a candidate's score is
  cos(query, candidate) + weight * log_prior[rank], rank being its position in the request's
  candidate list (the generator's order, e.g. REL's p(e|m)); ranks past the table take its last
  entry. Fit on training mentions by `fit_rank_prior`, never on the evaluated ones."""

  weight: float
  log_prior: tuple[float, ...]  # log P(the gold is at rank r), r = 0, 1, ...
  fitted_on: int = 0  # training mentions the weight and table come from

  def bonus(self, num: int) -> np.ndarray:
    """float32 [num]: the prior term of ranks 0 .. num - 1."""
    table = np.asarray(self.log_prior, np.float32)
    return self.weight * table[np.minimum(np.arange(num), len(table) - 1)]

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)

  @classmethod
  def load(cls, path: str) -> RankPrior:
    """Reads `save`'s JSON; a missing or malformed field is an error naming the file."""
    with open(path) as f:
      values = json.load(f)
    try:
      prior = cls(float(values["weight"]), tuple(float(v) for v in values["log_prior"]),
                  int(values.get("fitted_on", 0)))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: not a candidate prior ({{weight, log_prior}}): {e!r}") from None
    if not prior.log_prior:
      raise ValueError(f"{path}: log_prior is empty")
    return prior


def fit_rank_prior(scores: Sequence[np.ndarray], gold: Sequence[int],
                   weights: np.ndarray = np.linspace(0.0, 1.0, 201)) -> RankPrior:
  """The prior of training mentions: scores[i] float [n_i] are mention i's candidates' cosine
  scores in candidate order (CandidateScorer.cosines: -inf for a candidate that is no key),
  gold[i] the gold's rank among them (mentions without a gold candidate are left out by the
  caller). log_prior: the add-one-smoothed log frequency of each
  gold rank up to the longest list; weight: the grid value with the most mentions right at rank 1
  after combining (ties: the smallest weight, i.e. the least prior)."""
  if len(scores) != len(gold) or not len(scores):
    raise ValueError(f"{len(scores)} score lists for {len(gold)} gold ranks")
  longest = max(len(s) for s in scores)
  counts = np.bincount(np.asarray(gold), minlength=longest)[:longest] + 1.0
  log_prior = np.log(counts / counts.sum())
  right = [sum(int(np.argmax(np.asarray(s, np.float64) + w * log_prior[:len(s)]) == g)
               for s, g in zip(scores, gold)) for w in weights]
  return RankPrior(float(weights[int(np.argmax(right))]), tuple(log_prior.tolist()), len(gold))


class CandidateScorer:
  """vectors float32 [N, D] (normalised, e.g. launch.build_index's memory-mapped vectors.npy),
  uids [N]: the key of each row; prior: combined with the cosine scores when given."""

  def __init__(self, vectors: np.ndarray, uids: Sequence[str], prior: RankPrior | None = None):
    if len(vectors) != len(uids):
      raise ValueError(f"{len(vectors)} vectors for {len(uids)} uids")
    self.vectors = vectors
    self.row = {uid: i for i, uid in enumerate(uids)}
    self.prior = prior

  def cosines(self, query: np.ndarray, candidates: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(the distinct candidates in the given order, float32 [n] their cosine scores against
    query float32 [D]; -inf for a candidate that is no key)."""
    ranked = list(dict.fromkeys(candidates))
    known = [r for r, c in enumerate(ranked) if c in self.row]
    scores = np.full((len(ranked),), -np.inf, np.float32)
    if known:
      scores[known] = np.asarray(self.vectors[[self.row[ranked[r]] for r in known]],
                                 np.float32) @ query
    return ranked, scores

  def search(self, query: np.ndarray, candidates: Sequence[str], k: int) -> tuple[list[str], np.ndarray]:
    """The best k of the candidates that are keys (others are skipped) for query float32 [D]:
    (uids best first, scores float32 [<= k]); ties keep the candidates' order. With a prior, a
    candidate's rank is its position among the distinct candidates as given."""
    ranked, scores = self.cosines(query, candidates)
    if self.prior is not None:
      scores = scores + self.prior.bonus(len(ranked))
    known = np.flatnonzero(np.isfinite(scores))
    order = known[np.argsort(-scores[known], kind="stable")][:k]
    return [ranked[i] for i in order], scores[order].astype(np.float32)
