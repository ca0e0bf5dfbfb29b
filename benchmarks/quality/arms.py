"""The arms of the comparison: what each trains (its loss), how it retrieves, what it is scored
on; and the lever flags (--lambda_gen, --lambda_ret, --temperature, --document_text_weight)
applied to them."""

from __future__ import annotations

import dataclasses

# self_prior: its own RET hidden states combined with the candidate prior among candidates
# (onegen_jax.retrieval.candidates.RankPrior, fit on training mentions).
RETRIEVERS = ("self", "minilm", "bm25", "prior", "self_prior")
# The loss fields the lever flags set (the flags share their names), and the Arm fields.
LEVERS = ("lambda_gen", "lambda_ret", "temperature")
ARM_LEVERS = ("document_text_weight",)


@dataclasses.dataclass(frozen=True)
class Loss:
  """config.loss of a trained arm."""

  loss_type: str  # "bpr" or "infonce"
  lambda_gen: float
  lambda_ret: float
  temperature: float = 0.02  # InfoNCE's (BPR has none)


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  label: str  # its row in the tables
  loss: Loss | None  # None: not trained
  retriever: str = "self"  # its own RET hidden states, MiniLM-L6, BM25, or the first candidate
  model: bool = True  # False: a retrieval baseline without a language model
  writes: bool = True  # scored on free generation (RIT never learns to write)
  tasks: tuple[str, ...] = ("rag", "el")
  n_neg: int | None = None  # own negatives per anchor (None: the task's --MODE_n_neg)
  levers: str = ""  # the lever flags away from the arm's defaults, e.g. "lambda_ret=0.5"
  model_of: str = ""  # evaluates the model another arm trains (its training run is shared)
  # Optimizer steps this many times wider: rows and accumulation micro-batches x batch_scale,
  # InfoNCE negatives across the micro-batches (the GradCache-style step), steps / batch_scale.
  batch_scale: int = 1
  lora_rank: int = 0  # > 0: LoRA adapters of this rank over the frozen base (full fine-tune: 0)
  lr_scale: float = 1.0  # its learning rate: --lr x this
  # The loss weight of packed documents' text (config.data.document_text_weight; 0: context)
  document_text_weight: float = 1.0

  def __post_init__(self):
    if self.retriever not in RETRIEVERS:
      raise ValueError(f"retriever={self.retriever!r}; expected one of {RETRIEVERS}")

  @property
  def key(self) -> str:
    """The arm with its levers: its results file, training directory and table row."""
    return f"{self.name}@{self.levers}" if self.levers else self.name

  @property
  def train_key(self) -> str:
    """The key of the arm whose training run this arm's model is."""
    name = self.model_of or self.name
    return f"{name}@{self.levers}" if self.levers else name


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
    Arm("rit_infonce", "RIT, InfoNCE (retrieval only)", Loss("infonce", 0.0, 1.0), writes=False),
    Arm("onegen_infonce_in_batch", "OneGen, InfoNCE, in-batch negatives only",
        Loss("infonce", 1.0, 1.0), n_neg=0),
    Arm("onegen_infonce_docs_ctx", "OneGen, InfoNCE, documents as context (no L_gen on their "
        "text)", Loss("infonce", 1.0, 1.0), document_text_weight=0.0),
    Arm("onegen_infonce_docs_tenth", "OneGen, InfoNCE, documents' text at 0.1 loss weight",
        Loss("infonce", 1.0, 1.0), document_text_weight=0.1),
    Arm("onegen_infonce_wide", "OneGen, InfoNCE, 4x wider steps (negatives across 4 "
        "micro-batches)", Loss("infonce", 1.0, 1.0), batch_scale=4),
    Arm("onegen_infonce_lora", "OneGen, InfoNCE, LoRA rank 16 (adapters and task-token rows over "
        "a bf16 base)", Loss("infonce", 1.0, 1.0), lora_rank=16),
    Arm("onegen_infonce_lora_lr10", "OneGen, InfoNCE, LoRA rank 16, 10x the learning rate",
        Loss("infonce", 1.0, 1.0), lora_rank=16, lr_scale=10.0),
    Arm("onegen_infonce_with_minilm", "OneGen, InfoNCE's model writing with MiniLM-L6 retrieval "
        "(the pipeline's queries)", Loss("infonce", 1.0, 1.0), "minilm",
        model_of="onegen_infonce"),
    Arm("onegen_infonce_prior", "OneGen, InfoNCE + candidate prior (weight fit on training "
        "mentions)", Loss("infonce", 1.0, 1.0), "self_prior", writes=False, tasks=("el",),
        model_of="onegen_infonce"),
)
BY_NAME = {arm.name: arm for arm in ARMS}


def with_levers(arm: Arm, lambda_gen: float, lambda_ret: float, temperature: float,
                document_text_weight: float | None = None) -> Arm:
  """The arm as the lever flags train it: a joint arm (both weights > 0) takes lambda_gen,
  lambda_ret and the documents' text weight (None: the arm's own), an InfoNCE arm the
  temperature; generation-only and retrieval-only arms keep theirs. A value away from the arm's
  own shows in `levers` (its key and label)."""
  if arm.loss is None:
    return arm
  loss, text_weight = arm.loss, arm.document_text_weight
  if loss.lambda_gen and loss.lambda_ret:
    loss = dataclasses.replace(loss, lambda_gen=lambda_gen, lambda_ret=lambda_ret)
    text_weight = text_weight if document_text_weight is None else document_text_weight
  if loss.loss_type == "infonce":
    loss = dataclasses.replace(loss, temperature=temperature)
  levers = [f"{f}={getattr(loss, f):g}" for f in LEVERS if getattr(loss, f) != getattr(arm.loss, f)]
  if text_weight != arm.document_text_weight:
    levers.append(f"document_text_weight={text_weight:g}")
  return dataclasses.replace(arm, loss=loss, levers=",".join(levers),
                             document_text_weight=text_weight)


def label(key: str) -> str:
  """The table label of an arm key (`name` or `name@levers`)."""
  name, _, levers = key.partition("@")
  return BY_NAME[name].label + (f" ({levers})" if levers else "")
