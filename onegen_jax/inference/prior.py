"""Fitting the EL candidate prior (retrieval.candidates.RankPrior) on training mentions: each gold
answer teacher-forced as training encodes it, the hidden state at each of its query RET tokens
scored against the mention's candidates (CandidateScorer.cosines, the scores linking uses), and
the prior's one weight chosen on those mentions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onegen_jax.data.records import Message
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.types import candidates_for
from onegen_jax.retrieval.candidates import CandidateScorer, RankPrior, fit_rank_prior
from onegen_jax.retrieval.encode import EncodeItem, Encoder

_ROUND = 128  # encoding rows are rounded up to a multiple of this many tokens


@dataclasses.dataclass(frozen=True)
class PriorFit:
  """A fitted prior and what it was fitted on: accuracy@1 of the mentions used under the cosine
  alone, the prior alone (the first candidate that is a key) and the two combined."""

  prior: RankPrior
  mentions: int  # mentions whose gold is a candidate with a key (the ones fitted on)
  skipped: int  # mentions without a gold candidate that is a key
  cosine_acc: float
  prior_acc: float
  combined_acc: float


def gold_query_vectors(run: LoadedRun, conversations: Sequence[Sequence[Message]],
                       rows: int = 8) -> list[np.ndarray]:
  """Per conversation float32 [r, D]: the normalised hidden state at each query RET token of the
  whole conversation (its gold answer included), tokenised as training tokenises it, uncut."""
  encoded = run.tokenizer.tokenize_with_roles(conversations, run.task.query_token, 1 << 30)
  items = [EncodeItem(e.tokens, tuple(e.rets.tolist())) for e in encoded]
  reading = [item for item in items if item.read]
  if not reading:
    return [np.zeros((0, run.model.config.hidden_size), np.float32) for _ in items]
  seq_len = -(-max(len(item.tokens) for item in reading) // _ROUND) * _ROUND
  max_reads = max(4 * rows, max(len(item.read) for item in reading))
  vectors = np.asarray(Encoder(run.model, run.mesh, rows=rows, seq_len=seq_len,
                               max_reads=max_reads).encode(run.params, reading))
  splits = np.cumsum([len(item.read) for item in items])[:-1]
  return np.split(vectors, splits)


def _gold_uids(line: dict, where: str) -> list[list[str]]:
  """Per query RET token of the line's answer (its last assistant message): its gold uids
  ([] for a mention without one)."""
  answer = [m for m in line["messages"] if m["role"] == "assistant"]
  if not answer or "positive" not in answer[-1]:
    raise ValueError(f"{where}: no assistant message with a `positive` field (the gold entities)")
  return [[p] if isinstance(p, str) else list(p or []) for p in answer[-1]["positive"]]


def fit_prior(run: LoadedRun, scorer: CandidateScorer, lines: Sequence[dict], source: str = "",
              rows: int = 8) -> PriorFit:
  """The prior fitted on the mentions of reference-format EL lines with `candidates` (one list for
  all mentions or one per mention, as launch.infer reads them) and their gold answers. `source`
  names the lines in errors (e.g. the file)."""
  if run.task.mode != "el":
    raise ValueError(f"the candidate prior is EL's; this run's task is {run.task.name}")
  conversations = [[Message(m["role"], m["content"]) for m in line["messages"]] for line in lines]
  vectors = gold_query_vectors(run, conversations, rows)
  scores, gold, skipped = [], [], 0
  for number, (line, queries) in enumerate(zip(lines, vectors), start=1):
    golds = _gold_uids(line, f"{source}:{number}")
    if len(golds) != len(queries):
      raise ValueError(f"{source}:{number}: {len(queries)} query RET tokens in the answer, "
                       f"{len(golds)} gold entries")
    for j, (query, uids) in enumerate(zip(queries, golds)):
      ranked, cosines = scorer.cosines(query, candidates_for(line.get("candidates"), j) or [])
      found = [r for r, c in enumerate(ranked) if c in uids and np.isfinite(cosines[r])]
      if not found:
        skipped += 1
        continue
      scores.append(cosines)
      gold.append(found[0])
  if not gold:
    raise ValueError(f"{source}: no mention has its gold entity among its candidates")
  prior = fit_rank_prior(scores, gold)
  accuracy = lambda pick: float(np.mean([pick(s) == g for s, g in zip(scores, gold)]))
  return PriorFit(prior, len(gold), skipped, accuracy(np.argmax),
                  accuracy(lambda s: int(np.flatnonzero(np.isfinite(s))[0])),
                  accuracy(lambda s: int(np.argmax(s + prior.bonus(len(s))))))
