"""What a caller gives the OneGen engine and gets back: task token ids, the generation config, a
request, and its output (tokens, retrievals, why it stopped)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# EL candidates: entity uids every search of a request is restricted to (one list), or one list
# per query in order; None: the whole index.
Candidates = Sequence[str] | Sequence[Sequence[str]] | None


def candidates_for(candidates: Candidates, query_index: int) -> Sequence[str] | None:
  """The candidate uids of the query_index-th query of a request (None: unrestricted)."""
  if candidates and not isinstance(candidates[0], str):  # one list per query
    return candidates[query_index] if query_index < len(candidates) else None
  return candidates


@dataclasses.dataclass(frozen=True)
class TaskTokens:
  """Token ids the engine acts on."""

  query: int  # the query-side RET token
  eos: int
  force_after_query: int | None = None  # EL: [_CONTINUE_]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  # The next four are defaults: a Request may set its own.
  max_new_tokens: int = 128  # output-stream tokens, inserted paragraphs not counted
  retrieve_k: int = 1  # results kept per retrieval (the first one is inserted / linked)
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  presence_penalty: float = 0.0  # OpenAI's: minus this from the logit of every output token seen
  frequency_penalty: float = 0.0  # OpenAI's: minus this x the token's count in the output
  repetition_penalty: float = 1.0  # HF's (CTRL): a seen (prompt or output) token's logit / this
  # if positive, x this if negative; 1: off
  loop_repeats: int = 0  # >= 2: a request whose output ends in one span (of at most
  # loop_max_span tokens) repeated this many times ends ("repetition"); 0: off
  loop_max_span: int = 32
  # ... and whose copies cover at least this many tokens: a short span must repeat more often
  # (span 1: 16 times), so the "0 0 0" of "2000" is no loop (stopping.loop_span)
  loop_min_tokens: int = 16
  max_retrievals: int = 5  # per request; a query RET token beyond it ends the request
  # RAG, host engine: a retrieval inserts the best document its request has not inserted yet
  # (when every one found was: the best; retrieval_policy.first_k); False: the best, even again
  novel_documents: bool = False
  batch_size: int = 8  # slots (cache rows)
  capacity: int = 2048  # cache entries per slot: prompt + inserted + generated tokens
  seed: int = 0
  continuous: bool = True  # a freed slot takes the next request at once (else: static batches)
  prefill_apart: bool = True  # rows prefilling beside decoding rows get a call of their own
  watch: tuple[int, ...] = ()  # token ids whose log-probabilities each output step records
  steps_per_dispatch: int = 1  # N: decode steps per compiled call of the device loop
  # (inference/device_loop.py; an Engine given a device KB); 1 without one: the host step


def host_step(config: GenerationConfig) -> GenerationConfig:
  """`config` on the host step (steps_per_dispatch 1): for an engine without a device KB
  (Self-RAG's procedure, which searches on the host)."""
  return dataclasses.replace(config, steps_per_dispatch=1)


@dataclasses.dataclass(frozen=True)
class Request:
  """prompt: token ids. force: tokens replacing the first output-stream choices. candidates: EL
  entity uids every search of this request is restricted to (one list), or one list per query in
  order. keep_session: keep the cache when it ends, for continue_session. seed: its sampling
  stream (with the config's seed; None: the request id). stop: texts that end the request once
  its output text contains one (stop_reason "stop"; the output keeps the tokens up to and
  including the one that completed it: cutting the text is the caller's). max_new_tokens,
  retrieve_k, temperature, top_p, the penalties and loop_repeats: this request's (None: the
  GenerationConfig's)."""

  prompt: Sequence[int]
  force: Sequence[int] = ()
  candidates: Candidates = None
  keep_session: bool = False
  seed: int | None = None
  max_new_tokens: int | None = None
  retrieve_k: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  stop: Sequence[str] = ()
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  repetition_penalty: float | None = None
  loop_repeats: int | None = None

  def candidates_for(self, query_index: int) -> Sequence[str] | None:
    """The candidate uids of this request's query_index-th query (None: unrestricted)."""
    return candidates_for(self.candidates, query_index)

  def setting(self, name: str, config: GenerationConfig):
    """This request's value of a per-request setting, else the config's."""
    own = getattr(self, name)
    return getattr(config, name) if own is None else own


@dataclasses.dataclass
class Retrieval:
  position: int  # index of the RET token in the request's full token sequence
  ids: list[str]
  scores: list[float]
  vector: np.ndarray  # float32 [D], the query searched (the hidden state unless query_vectors)


STOP_REASONS = ("eos", "stop", "repetition", "max_new_tokens", "max_retrievals", "capacity",
                "cancelled", "error")


@dataclasses.dataclass
class RequestOutput:
  prompt: list[int]  # for a session continuation: the whole dialogue before the new turn's output
  tokens: list[int]  # everything after the prompt: the output stream and insertions, in order
  generated: list[bool]  # per entry of `tokens`: of the output stream (sampled, or forced in its
  # place), not inserted by the engine (a retrieved paragraph, the token forced after a RET token)
  retrievals: list[Retrieval]
  stop_reason: str = ""  # one of STOP_REASONS once the request ended ("capacity": its next
  # tokens would not fit its cache row; "cancelled": Engine.cancel; "error": see `error`)
  error: str = ""  # why it failed (stop_reason "error"): an exception acting on its retrieval
  # Per output-stream token: its log-probability at its step (sampled or forced), and the
  # log-probabilities float32 [len(config.watch)] of the watched ids there (when any are).
  log_probs: list[float] = dataclasses.field(default_factory=list)
  watched: list[np.ndarray] = dataclasses.field(default_factory=list)
  # float32 [D]: the normalised hidden state of the last token of its first fed chunk (the
  # prompt; for a continuation, what it feeds after the kept cache).
  prompt_vector: np.ndarray | None = None

  @property
  def finished(self) -> bool:
    """Stopped on EOS."""
    return self.stop_reason == "eos"

  @property
  def done(self) -> bool:
    return bool(self.stop_reason)
