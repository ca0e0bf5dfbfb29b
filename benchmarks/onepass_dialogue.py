"""The scripted conversation of benchmarks/inference_onepass.py (paper Figure 3): its rounds and
special tokens, the two methods (OneGen's engine; the pipeline's retriever hook), the check of
every round against its script and the methods' indexes, and the lockstep timing."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from onegen_jax.inference.engine import Engine, Request, RequestOutput, TaskTokens
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex


@dataclasses.dataclass(frozen=True)
class Round:
  """One dialogue round: the user's tokens, then what the model writes (RET tokens included)."""

  user: list[int]
  output: list[int]  # ends with EOS


def special_tokens(vocab_size: int) -> TaskTokens:
  """RET, EOS and the paragraph tags are the top 4 ids; content tokens lie below them."""
  v = vocab_size
  return TaskTokens(query=v - 1, eos=v - 2)


def paragraph_tags(vocab_size: int) -> tuple[int, int]:
  """The ids of `<paragraph>` and `</paragraph>` (see special_tokens)."""
  return vocab_size - 3, vocab_size - 4


def insertions(documents: dict[str, list[int]], vocab_size: int) -> dict[str, list[int]]:
  """Each document's insertion, what follows a query RET token that retrieved it:
  `<paragraph>` + its tokens + `</paragraph>` (the Engine's `documents(uid)`)."""
  open_tag, close_tag = paragraph_tags(vocab_size)
  return {uid: [open_tag, *doc, close_tag] for uid, doc in documents.items()}


def make_dialogue(rng: np.random.Generator, tokens: TaskTokens, vocab_size: int, rounds: int,
                  query_len: int, output_len: int, retrievals: int) -> list[Round]:
  """Random content tokens; r RET tokens evenly spread over each round's output."""
  content = lambda n: rng.integers(1, vocab_size - 4, n).tolist()
  dialogue = []
  for k in range(rounds):  # a continued round's fed turn: the previous EOS + query_len - 1 tokens
    written = content(output_len - 1) + [tokens.eos]
    ret_before = {i * output_len // retrievals for i in range(retrievals)}
    output = [t for i, w in enumerate(written)
              for t in ([tokens.query, w] if i in ret_before else [w])]
    dialogue.append(Round(content(query_len - (k > 0)), output))
  return dialogue


def written(out: RequestOutput) -> list[int]:
  """The output-stream tokens of a request so far (insertions left out)."""
  return [t for t, g in zip(out.tokens, out.generated) if g]


class Pipeline:
  """The pipeline's `query_vectors` hook: the retriever encodes each querying request's text
  (the last `turn_len` prompt tokens: this round's fed turn, the previous round's EOS included;
  what it wrote before the RET token; then RET);
  seconds accumulate and the searched vectors are kept for the check."""

  def __init__(self, encoder: Encoder, params, ret: int, turn_len: int):
    self.encoder, self.params, self.ret, self.turn_len = encoder, params, ret, turn_len
    self.seconds, self.encoded, self.searched = 0.0, 0, []

  def __call__(self, outs: list[RequestOutput], vectors: np.ndarray) -> np.ndarray:
    start = time.perf_counter()
    texts = [out.prompt[-self.turn_len:] + written(out)[:-1] for out in outs]
    items = [EncodeItem(np.asarray([*text, self.ret], np.int32), (len(text),)) for text in texts]
    queries = self.encoder.encode(self.params, items)
    self.seconds += time.perf_counter() - start
    self.encoded += sum(len(text) + 1 for text in texts)
    self.searched.extend(queries)
    return queries


class Dialogue:
  """One conversation over one Engine's kept session: a round is a submit (round 1) or a
  continue_session (later rounds), run to its end."""

  def __init__(self, engine: Engine):
    self.engine, self.session = engine, None

  def round(self, round_: Round) -> RequestOutput:
    """Runs one round; returns its output (the engine keeps its session for the next one)."""
    previous = self.session
    if previous is None:
      self.session = self.engine.submit(Request(round_.user, force=round_.output,
                                                keep_session=True))
    else:
      self.session = self.engine.continue_session(previous, round_.user, force=round_.output)
    out = self.engine.run([self.session])[0]
    if previous is not None:
      self.engine.close_session(previous)
    return out

  def close(self):
    """Frees the last round's kept cache."""
    if self.session is not None:
      self.engine.close_session(self.session)


@dataclasses.dataclass
class Method:
  """One arm: its engine, its index (the check searches it again) and the pipeline hook, if any."""

  engine: Engine
  index: ExactIndex
  pipeline: Pipeline | None = None

  def searched(self, out: RequestOutput) -> list[np.ndarray]:
    """The vectors this arm searched with in the round `out` (in order)."""
    if self.pipeline is None:
      return [r.vector for r in out.retrievals]
    return self.pipeline.searched[-len(out.retrievals):] if out.retrievals else []


def check_round(method: Method, out: RequestOutput, round_: Round,
                inserted: dict[str, list[int]]) -> None:
  """Raises unless the round wrote its script, each RET token followed by the insertion of the
  document retrieved, stopped on EOS, and every retrieval is the index's top 1 for the vector
  searched."""
  query = method.engine.tokens.query
  ids = [r.ids[0] for r in out.retrievals]
  expected, hits = [], iter(ids)
  for token in round_.output:
    expected.append(token)
    if token == query:
      expected += inserted.get(next(hits, None), [])
  if (out.stop_reason != "eos" or len(ids) != round_.output.count(query)
      or out.tokens != expected or written(out) != round_.output):
    raise AssertionError(f"the round did not follow its script (stop reason {out.stop_reason!r}, "
                         f"{len(ids)} retrievals)")
  if ids:
    top = method.index.search(np.stack(method.searched(out)), 1)[0]
    if [t[0] for t in top] != ids:
      raise AssertionError(f"retrieved {ids}, but the searched vectors' top 1 is {top}")


def time_in_lockstep(methods: dict[str, Method], dialogue: list[Round],
                     inserted: dict[str, list[int]]) -> dict[str, list[float]]:
  """Seconds per round of each method's own conversation, each round checked after its timing.

  The conversations advance in lockstep, round k of one method next to round k of the other,
  which goes first alternating, so both meet the same load from other jobs on the machine.
  """
  dialogues = {name: Dialogue(m.engine) for name, m in methods.items()}
  seconds = {name: [] for name in methods}
  for k, round_ in enumerate(dialogue):
    for name in sorted(methods, reverse=k % 2 == 1):
      start = time.perf_counter()
      out = dialogues[name].round(round_)
      seconds[name].append(time.perf_counter() - start)
      check_round(methods[name], out, round_, inserted)
  for d in dialogues.values():
    d.close()
  return seconds
