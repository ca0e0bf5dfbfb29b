"""Retrieval quality during training: dev queries against the whole db, encoded with the current
parameters (exact search over every key)."""

from __future__ import annotations

import numpy as np

from onegen_jax.data.tokenized import Database
from onegen_jax.eval.metrics import recall_at_k
from onegen_jax.retrieval.encode import EncodeItem, Encoder


def _split(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
  return np.split(np.asarray(values), np.cumsum(counts)[:-1]) if len(counts) else []


def dev_recall(encoder: Encoder, params, database: Database, dev_records: list[dict],
               ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
  """Recall@k over dev anchors: the fraction of an anchor's positive keys among the top k of all
  db keys by cosine, averaged over anchors. Empty when there are no dev anchors."""
  records = [r for r in dev_records if len(r["positions"])]
  if not records:
    return {}
  docs = database.corpus.documents.values()
  keys = encoder.encode(params, [EncodeItem(d.tokens, tuple(k.position for k in d.keys)) for d in docs])
  queries = encoder.encode(params, [EncodeItem(np.asarray(r["tokens"]), tuple(int(p) for p in r["positions"]))
                                    for r in records])
  gold = [set(g.tolist()) for r in records for g in _split(r["positive_keys"], r["positive_counts"])]
  top = min(max(ks), len(keys))
  ranked = np.argsort(-(queries @ keys.T), axis=1, kind="stable")[:, :top]
  return {f"recall@{k}": recall_at_k(ranked.tolist(), gold, k) for k in ks}
