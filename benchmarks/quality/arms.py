"""The arms of the comparison: what each trains (its loss), how it retrieves, what it is scored
on."""

from __future__ import annotations

import dataclasses

RETRIEVERS = ("self", "minilm", "bm25", "prior")


@dataclasses.dataclass(frozen=True)
class Loss:
  """config.loss of a trained arm."""

  loss_type: str  # "bpr" or "infonce"
  lambda_gen: float
  lambda_ret: float


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  label: str  # its row in the tables
  loss: Loss | None  # None: not trained
  retriever: str = "self"  # its own RET hidden states, MiniLM-L6, BM25, or the first candidate
  model: bool = True  # False: a retrieval baseline without a language model
  writes: bool = True  # scored on free generation (RIT never learns to write)
  tasks: tuple[str, ...] = ("rag", "el")

  def __post_init__(self):
    if self.retriever not in RETRIEVERS:
      raise ValueError(f"retriever={self.retriever!r}; expected one of {RETRIEVERS}")


# In the order they run: the baselines without training first (minutes), then the models, the
# most important first (a --budget_s run drops the last ones).
ARMS = (
    Arm("minilm", "MiniLM-L6 (no training)", None, "minilm", model=False, writes=False),
    Arm("bm25", "BM25 (no training)", None, "bm25", model=False, writes=False),
    Arm("prior", "candidate prior (first REL candidate)", None, "prior", model=False,
        writes=False, tasks=("el",)),
    Arm("no_ft", "no fine-tuning (self-retrieval)", None),
    Arm("onegen_bpr", "OneGen, BPR", Loss("bpr", 1.0, 1.0)),
    Arm("git_pipeline", "GIT + MiniLM-L6 pipeline", Loss("bpr", 1.0, 0.0), "minilm"),
    Arm("rit", "RIT (retrieval only)", Loss("bpr", 0.0, 1.0), writes=False),
    Arm("onegen_infonce", "OneGen, InfoNCE", Loss("infonce", 1.0, 1.0)),
)
BY_NAME = {arm.name: arm for arm in ARMS}
