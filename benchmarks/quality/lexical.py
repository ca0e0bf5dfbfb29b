"""BM25 (the PyPI package `bm25s`, an optional dependency of the `bench` extra): Lucene's BM25
(k1 1.5, b 0.75) over lowercased word tokens without English stop words, no stemming."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BM25:
  """An index over document texts; `scores` ranks every document for each query."""

  def __init__(self, texts: Sequence[str]):
    import bm25s  # noqa: PLC0415  (optional: only the bm25 baseline needs it)
    self._bm25s = bm25s
    self.num_documents = len(texts)
    self.retriever = bm25s.BM25()
    self.retriever.index(self._tokens(texts, return_ids=True), show_progress=False)

  def _tokens(self, texts: Sequence[str], return_ids: bool):
    return self._bm25s.tokenize(list(texts), stopwords="en", return_ids=return_ids,
                                show_progress=False)

  def scores(self, queries: Sequence[str]) -> np.ndarray:
    """float32 [queries, documents]; a query without a known word scores 0 everywhere."""
    out = np.zeros((len(queries), self.num_documents), np.float32)
    for i, tokens in enumerate(self._tokens(queries, return_ids=False)):
      if tokens:
        out[i] = self.retriever.get_scores(tokens)
    return out
