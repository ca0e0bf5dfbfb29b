"""Shared helpers of the engine tests."""

import numpy as np


class ScriptedIndex:
  """An index that returns, query after query, the given ids (the examples' own positives):
  replaying a gold answer through the engine then inserts what training inserted."""

  def __init__(self, answers: list[str]):
    self.answers = list(answers)

  def _next(self, queries: np.ndarray, k: int):
    ids = [[self.answers.pop(0)] * k for _ in range(len(queries))]
    return ids, np.ones((len(queries), k), np.float32)

  search = search_documents = _next
