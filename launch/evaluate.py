"""Scores launch.infer's predictions against a reference-format gold split.

  python -m launch.evaluate --task=el|multihop|selfrag --predictions=OUT.jsonl --gold=GOLD.jsonl

The last line printed is one JSON object of metrics (definitions: onegen_jax/eval/scoring.py).
"""

import json

from absl import app, flags

from onegen_jax.data.records import read_jsonl
from onegen_jax.data.tasks import TASKS, get_task
from onegen_jax.eval.scoring import score_el, score_rag, score_selfrag

_TASK = flags.DEFINE_enum("task", None, sorted(TASKS), "The run's task (its configs/ name).")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "launch.infer output.")
_GOLD = flags.DEFINE_string("gold", None, "Reference-format split (e.g. dev.jsonl).")
flags.mark_flags_as_required(["task", "predictions", "gold"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  predictions, gold = read_jsonl(_PREDICTIONS.value), read_jsonl(_GOLD.value)
  if _TASK.value == "selfrag":  # launch.infer --selfrag_mode=... output (Self-RAG's procedure)
    score = score_selfrag
  else:
    score = score_rag if get_task(_TASK.value).mode == "rag" else score_el
  print(json.dumps(score(predictions, gold), sort_keys=True))


if __name__ == "__main__":
  app.run(main)
