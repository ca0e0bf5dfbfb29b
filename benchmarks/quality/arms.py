"""The arms of the comparison: what each trains (its loss) and how it is evaluated."""

from __future__ import annotations

import dataclasses


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
  loss: Loss | None  # None: not trained (the imported model as is)
  minilm: bool = False  # retrieves with the MiniLM pipeline instead of its own RET states
  writes: bool = True  # scored on free generation (RIT never learns to write)


# In the order they run (most important first: a --budget_s run drops the last ones).
ARMS = (
    Arm("onegen_bpr", "OneGen, BPR", Loss("bpr", 1.0, 1.0)),
    Arm("git_pipeline", "GIT + MiniLM-L6 pipeline", Loss("bpr", 1.0, 0.0), minilm=True),
    Arm("onegen_infonce", "OneGen, InfoNCE", Loss("infonce", 1.0, 1.0)),
    Arm("rit", "RIT (retrieval only)", Loss("bpr", 0.0, 1.0), writes=False),
    Arm("no_ft", "no fine-tuning (self-retrieval)", None),
)
BY_NAME = {arm.name: arm for arm in ARMS}
