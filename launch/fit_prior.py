"""Fits the EL candidate prior on training mentions, for candidate-restricted linking.

  python -m launch.fit_prior --workdir=RUN --index=DIR --input=TRAIN.jsonl --output=PRIOR.json

TRAIN.jsonl: reference-format EL lines with their gold answers (the assistant message's
`positive`, one entry per mention) and "candidates" (one list for all mentions or one per mention,
in the candidate generator's order, as launch.infer reads them): training mentions, never the ones
evaluated. Each answer is teacher-forced as training encodes it; the hidden state at each mention's
query RET token is scored against its candidates' vectors in DIR (launch.build_index). The prior
(onegen_jax/retrieval/candidates.py: RankPrior) scores a candidate cos + weight x log P(gold at its
rank); the table and the one weight come from these mentions. PRIOR.json is what
`launch.infer --candidate_prior` and `launch.serve --candidate_prior` read. The last line printed
is one JSON object: the weight, the mentions used and skipped, accuracy@1 of the cosine alone,
the prior alone and the two combined on those mentions.
"""

import dataclasses
import json

from absl import app, flags

from launch import serving_flags
from onegen_jax.data.records import read_jsonl
from onegen_jax.inference.prior import fit_prior
from onegen_jax.inference.run_dir import load_index_dir, load_run
from onegen_jax.retrieval.candidates import CandidateScorer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (an EL run).")
_INDEX = flags.DEFINE_string("index", None, "Directory written by launch.build_index.")
_INPUT = flags.DEFINE_string("input", None, "Training lines with candidates and gold answers.")
_OUTPUT = flags.DEFINE_string("output", None, "The prior (JSON).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_ROWS = flags.DEFINE_integer("rows", 8, "Rows per encoding batch.")
flags.mark_flags_as_required(["workdir", "index", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run = load_run(_WORKDIR.value, _STEP.value, **serving_flags.start())
  if run.task.mode != "el":
    raise app.UsageError(f"the candidate prior is EL's; {_WORKDIR.value} is a {run.task.name} run")
  index, _, vectors = load_index_dir(_INDEX.value)
  fit = fit_prior(run, CandidateScorer(vectors, index.ids), read_jsonl(_INPUT.value),
                  _INPUT.value, _ROWS.value)
  fit.prior.save(_OUTPUT.value)
  print(json.dumps({"output": _OUTPUT.value, "weight": fit.prior.weight,
                    **{k: v for k, v in dataclasses.asdict(fit).items() if k != "prior"}}))


if __name__ == "__main__":
  app.run(main)
