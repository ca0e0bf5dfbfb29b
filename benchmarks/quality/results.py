"""The figures of one arm on one task, as quality.json holds them (results/MODE/ARM)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainStats:
  """What training an arm consumed and ended at (zeros for an untrained arm)."""

  train_s: float = 0.0  # the whole fit call, compile included
  train_loop_s: float | None = None  # fit's own wall_s
  tokens: int = 0  # non-padding tokens of every batch, documents included
  gen_targets: int = 0
  queries: int = 0  # valid queries
  steps: int = 0  # batches consumed
  final_loss: float | None = None
  final_loss_gen: float | None = None
  final_loss_ret: float | None = None


@dataclasses.dataclass
class GoldRecall:
  """Retrieval on gold context: the query RET tokens of the gold answers, teacher-forced."""

  gold_r1: float | None = None  # NaN when no anchor has a gold document in the db
  gold_r5: float | None = None  # top k = min(5, documents)
  gold_anchors: int = 0
  retrieval_eval_s: float | None = None


@dataclasses.dataclass
class Generation:
  """Free generation with retrieval, scored (RAG: em..r5, by_set; EL: the micro P/R/F1)."""

  em: float | None = None
  f1: float | None = None
  r1: float | None = None  # end-to-end Recall@1 of score_rag
  r5: float | None = None  # ... @k, k = min(5, documents)
  by_set: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # set -> em, f1
  reference_f1: float | None = None
  strong_f1: float | None = None
  reference_precision: float | None = None
  reference_recall: float | None = None
  finished: float | None = None  # fraction of requests stopped on EOS
  retrievals_per_request: float | None = None
  generation_s: float | None = None


def _read(kind, values: dict | None):
  """`kind` from the entries of `values` that name its fields (None: none do)."""
  names = {f.name for f in dataclasses.fields(kind)}
  known = {k: v for k, v in (values or {}).items() if k in names}
  return kind(**known) if known else None


@dataclasses.dataclass
class ArmResult:
  skipped: str = ""  # why the arm did not run ("budget"); "" when it ran
  train: TrainStats = dataclasses.field(default_factory=TrainStats)
  gold: GoldRecall | None = None
  generation: Generation | None = None  # None: not scored on generation (RIT)
  eval_s: float | None = None
  arm_s: float | None = None  # training and evaluation

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> ArmResult:
    """Reads to_json's form, and the flat form of quality.json files written before it."""
    flat = "train" not in values
    part = lambda name: values if flat else values.get(name)
    return cls(values.get("skipped", ""), _read(TrainStats, part("train")) or TrainStats(),
               _read(GoldRecall, part("gold")), _read(Generation, part("generation")),
               values.get("eval_s"), values.get("arm_s"))
