"""The EL candidate prior (retrieval/candidates.py): combined scores against a float64
recomputation, the fit on synthetic mentions, its file."""

import json

import numpy as np
import pytest

from onegen_jax.retrieval.candidates import CandidateScorer, RankPrior, fit_rank_prior


def _unit(rng, n, d=16):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_combined_scores_equal_cosine_plus_weighted_log_prior_of_the_given_rank():
  """A candidate's rank is its place among the distinct candidates as given (unknown ones
  included); the ranking and scores equal a float64 recomputation."""
  rng = np.random.default_rng(0)
  keys, uids = _unit(rng, 6), [f"e{i}" for i in range(6)]
  prior = RankPrior(0.3, (-0.2, -1.5, -2.5))
  scorer = CandidateScorer(keys, uids, prior)
  query = _unit(rng, 1)[0]
  candidates = ["e4", "unknown", "e1", "e4", "e0", "e5"]  # distinct: e4 0, unknown 1, e1 2, ...
  ids, scores = scorer.search(query, candidates, k=3)
  ranks = {"e4": 0, "e1": 2, "e0": 3, "e5": 4}
  want = {u: float(keys[uids.index(u)].astype(np.float64) @ query) + 0.3 * (-0.2, -1.5, -2.5)[
      min(r, 2)] for u, r in ranks.items()}
  assert ids == sorted(want, key=want.get, reverse=True)[:3]
  np.testing.assert_allclose(scores, [want[u] for u in ids], atol=1e-6)
  plain_ids, _ = CandidateScorer(keys, uids).search(query, candidates, k=3)
  cos = {u: float(keys[uids.index(u)] @ query) for u in ranks}
  assert plain_ids == sorted(cos, key=cos.get, reverse=True)[:3]


def test_fit_learns_the_rank_frequencies_and_a_weight_that_helps_a_noisy_cosine():
  """Gold at rank 0 for 70% of mentions, a cosine that is right half the time: the table is the
  smoothed log frequency of the gold ranks, and the fitted weight beats both signals alone."""
  rng = np.random.default_rng(1)
  scores, gold = [], []
  for i in range(400):
    g = 0 if rng.random() < 0.7 else int(rng.integers(1, 5))
    s = rng.normal(0.3, 0.05, size=5)
    if rng.random() < 0.5:
      s[g] += 0.15
    scores.append(s)
    gold.append(g)
  prior = fit_rank_prior(scores, gold)
  counts = np.bincount(gold, minlength=5) + 1.0
  np.testing.assert_allclose(prior.log_prior, np.log(counts / counts.sum()))
  assert prior.weight > 0 and prior.fitted_on == 400
  acc = lambda w: np.mean([np.argmax(s + w * np.asarray(prior.log_prior)) == g
                           for s, g in zip(scores, gold)])
  assert acc(prior.weight) > max(acc(0.0), np.mean(np.asarray(gold) == 0))


def test_fit_keeps_a_perfect_cosine_alone():
  scores = [np.eye(4)[g] for g in (0, 1, 2, 3, 3)]
  assert fit_rank_prior(scores, [0, 1, 2, 3, 3]).weight == 0.0


def test_prior_file_round_trips_and_a_bad_one_names_itself(tmp_path):
  prior = RankPrior(0.25, (-0.1, -2.0), 17)
  prior.save(tmp_path / "prior.json")
  assert RankPrior.load(tmp_path / "prior.json") == prior
  (tmp_path / "bad.json").write_text(json.dumps({"weight": 0.5}))
  with pytest.raises(ValueError, match="bad.json"):
    RankPrior.load(tmp_path / "bad.json")
