"""The figures of one arm on one task, as quality.json and OUT/results/MODE/ARM.json hold them."""

from __future__ import annotations

import dataclasses
import json
import os


@dataclasses.dataclass
class TrainStats:
  """What training an arm consumed and ended at (zeros for an untrained arm), read from the
  run's metrics.jsonl (one line per step; a resumed run's repeated steps count once)."""

  train_s: float = 0.0  # wall time of the fit calls that completed (compile included), summed
  tokens: int = 0  # non-padding tokens of every step, documents included
  gen_targets: int = 0
  queries: int = 0  # valid queries trained: the sum of num_valid_queries over the steps
  steps: int = 0
  steps_without_query: int = 0
  steps_without_target: int = 0
  packing: float | None = None  # mean fraction of non-padding token slots
  tokens_per_s: float | None = None  # the last step's (fit's meter: since its start)
  final_loss_gen: float | None = None  # means over the last tenth of the steps
  final_loss_ret: float | None = None
  final_accuracy: float | None = None  # in-batch retrieval accuracy


@dataclasses.dataclass
class GoldRecall:
  """Retrieval on gold context: each gold query RET token of the dev answers (teacher-forced) or,
  for the baselines, its query text, ranked against documents. A query hits at k when a gold
  document is among its top k; `candidates`: among its own candidates only (a gold document
  outside them is a miss); `pool`: among every pool document; `kb`: the whole db (EL)."""

  cand_r1: float | None = None
  cand_rk: float | None = None
  pool_r1: float | None = None
  pool_rk: float | None = None
  kb_r1: float | None = None
  kb_rk: float | None = None
  gold_in_candidates: float | None = None  # fraction of the queries whose gold is a candidate
  anchors: int = 0  # gold queries ranked
  retrieval_eval_s: float | None = None
  by_set: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # cand_r1, pool_r1
  prior: dict[str, float] = dataclasses.field(default_factory=dict)  # the fitted prior (self_prior)


@dataclasses.dataclass
class Generation:
  """Free generation with retrieval, scored (RAG: em..rk, by_set; EL: the micro P/R/F1)."""

  em: float | None = None
  f1: float | None = None
  r1: float | None = None  # end-to-end Recall@1 of score_rag (in the pool)
  rk: float | None = None  # ... @k
  by_set: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # set -> em, f1
  reference_f1: float | None = None
  strong_f1: float | None = None
  reference_precision: float | None = None
  reference_recall: float | None = None
  finished: float | None = None  # fraction of requests stopped on EOS
  ran_to_limit: int | None = None  # requests that stopped at max_new_tokens (greedy loops)
  loop_stopped: int | None = None  # requests the loop stop ended (--loop_repeats; None: off)
  queries_emitted: int = 0  # query RET tokens the model generated (each one retrieved)
  gold_queries: int = 0  # query RET tokens in the gold answers of the same requests
  first_query_p: float | None = None  # RAG: mean P(query token) as the first output token
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
  generation: Generation | None = None  # None: not scored on generation (RIT, baselines)
  eval_s: float | None = None
  arm_s: float | None = None  # training and evaluation in the invocation that finished it
  steps_planned: int = 0  # train.steps of the arm (0: untrained)
  command: str = ""  # the invocation that finished it

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> ArmResult:
    """Reads to_json's form (figures this version does not know are left out)."""
    return cls(values.get("skipped", ""), _read(TrainStats, values.get("train")) or TrainStats(),
               _read(GoldRecall, values.get("gold")), _read(Generation, values.get("generation")),
               values.get("eval_s"), values.get("arm_s"), values.get("steps_planned", 0),
               values.get("command", ""))


def read_json_lines(path: str) -> list[dict]:
  """The objects of a JSON-lines file ([] when it does not exist yet)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save_arm(path: str, result: ArmResult, fingerprint: str) -> None:
  """Writes a finished arm's figures (atomically: a killed write leaves no half file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"fingerprint": fingerprint, **result.to_json()}, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


def load_arm(path: str, fingerprint: str) -> ArmResult | None:
  """The arm's saved figures if it finished under the same fingerprint, else None."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    values = json.load(f)
  return ArmResult.from_json(values) if values.get("fingerprint") == fingerprint else None
