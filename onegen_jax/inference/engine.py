"""The OneGen engine: generation and retrieval in one pass over one KV cache.

Each request (a row of the batch) has a queue of tokens to feed. One jitted `extend` step feeds
every row's queue at once (rows may feed 1 token or a whole inserted paragraph) and returns, for
each row, the next token (greedy or sampled) and the normalised hidden state of the last token
fed. When a row feeds a query RET token of its output stream, that hidden state IS the query: it
is searched (all such rows in one batched search) and then
  - RAG: the retrieved document's insertion (`documents(uid)`: `<paragraph>{text}</paragraph>`
    tokenised as training tokenised it) is queued, prefilled into the same cache, and generation
    continues after it; a query RET token beyond `max_retrievals` ends the request (as in the
    reference: decoding past it would continue from a position never trained);
  - EL: the entity is recorded and the token forced after the RET token (`[_CONTINUE_]`) queued.
The context is never re-encoded, and the query never encoded twice.

A request's `force` tokens replace the model's first choices one by one (the output stream is
then those tokens, and retrievals and insertions happen as if the model had chosen them): this
is how tests and benchmarks replay a known answer through the real engine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from onegen_jax.losses import l2_normalize
from onegen_jax.model.decoder import Decoder, init_cache

# (query vectors float32 [n, D], k) -> (ids [n][k], scores float32 [n, k])
SearchFn = Callable[[np.ndarray, int], tuple[list[list[str]], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TaskTokens:
  """Token ids the engine acts on."""

  query: int  # the query-side RET token
  eos: int
  force_after_query: int | None = None  # EL: [_CONTINUE_]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 128  # generated tokens, inserted paragraphs not counted
  max_retrievals: int = 5  # per request; a query RET token beyond it ends the request
  retrieve_k: int = 1  # results kept per retrieval (the first one is inserted / linked)
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  batch_size: int = 8
  capacity: int = 2048  # cache entries per row: prompt + inserted + generated tokens
  seed: int = 0


@dataclasses.dataclass
class Retrieval:
  position: int  # index of the RET token in the request's full token sequence
  ids: list[str]
  scores: list[float]
  vector: np.ndarray  # float32 [D], the query


STOP_REASONS = ("eos", "max_new_tokens", "max_retrievals")


@dataclasses.dataclass
class RequestOutput:
  prompt: list[int]
  tokens: list[int]  # everything after the prompt: the output stream and insertions, in order
  generated: list[bool]  # per entry of `tokens`: of the output stream (sampled, or forced in its
  # place), not inserted by the engine (a retrieved paragraph, the token forced after a RET token)
  retrievals: list[Retrieval]
  stop_reason: str = ""  # one of STOP_REASONS once the request ended

  @property
  def finished(self) -> bool:
    """Stopped on EOS."""
    return self.stop_reason == "eos"


def _bucket(n: int) -> int:
  """Static chunk widths: 1, then powers of two from 16 (few compiled shapes)."""
  return 1 if n == 1 else max(16, 1 << (n - 1).bit_length())


def _window(n: int) -> int:
  """Cache entries attended for n used ones: a power of two from 256 (few compiled shapes)."""
  return max(256, 1 << (n - 1).bit_length())


def _sample(logits: jnp.ndarray, rng: jax.Array, temperature: float, top_p: float) -> jnp.ndarray:
  """logits float32 [B, V] -> token ids int32 [B] (greedy when temperature == 0)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose probability reaches top_p (always the top token).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


class Engine:
  """Batched OneGen inference for one model, one index and one task's tokens."""

  def __init__(self, model: Decoder, params, tokens: TaskTokens, search: SearchFn,
               documents: Callable[[str], Sequence[int]], config: GenerationConfig,
               mode: str, vocab_size: int | None = None):
    """documents: document uid -> the token ids inserted after a query that retrieved it (RAG);
    mode: "rag" or "el";
    vocab_size: the tokenizer's size when the model's vocabulary is padded beyond it (padded
    rows are never sampled)."""
    if mode not in ("rag", "el"):
      raise ValueError(f"mode={mode!r}; expected 'rag' or 'el'")
    if mode == "el" and tokens.force_after_query is None:
      raise ValueError("entity linking needs the token forced after the query token")
    self.model, self.params, self.tokens, self.search = model, params, tokens, search
    self.documents, self.config, self.mode = documents, config, mode
    self._step = jax.jit(functools.partial(
        self._step_fn, model, config.temperature, config.top_p, vocab_size), donate_argnums=(3,),
        static_argnames="window")

  @staticmethod
  def _step_fn(model, temperature, top_p, vocab_size, params, tokens, cache_len, cache, last, rng,
               window=None):
    """Feeds tokens [B, T], attending to the first `window` cache entries; returns (next token
    [B] and normalised hidden [B, D] at each row's `last` fed index, new cache)."""
    hidden, cache = model.apply({"params": params}, tokens, cache_len, cache, window,
                                method=Decoder.extend)
    final = hidden[jnp.arange(tokens.shape[0]), last]  # [B, D]
    logits = model.apply({"params": params}, final[:, None], method=Decoder.logits)[:, 0]
    logits = logits.astype(jnp.float32)
    if vocab_size is not None:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    return _sample(logits, rng, temperature, top_p), l2_normalize(final), cache

  def generate(self, prompts: Sequence[Sequence[int]], progress: bool = False,
               force: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
    """Runs every prompt (token ids) to EOS, max_new_tokens or max_retrievals, `batch_size` at a
    time. force[i]: tokens that replace request i's first output-stream choices."""
    if force is not None and len(force) != len(prompts):
      raise ValueError(f"{len(force)} forced continuations for {len(prompts)} prompts")
    b = self.config.batch_size
    outs = []
    for start in tqdm.tqdm(range(0, len(prompts), b), disable=not progress, unit="batch"):
      outs += self._generate_batch(prompts[start:start + b], start,
                                   force[start:start + b] if force is not None else None)
    return outs

  def _generate_batch(self, prompts: Sequence[Sequence[int]], first_id: int,
                      force: Sequence[Sequence[int]] | None) -> list[RequestOutput]:
    cfg, tok = self.config, self.tokens
    rows = cfg.batch_size
    outs = [RequestOutput(list(p), [], [], []) for p in prompts]
    forced = [list(f) for f in force] if force is not None else [[] for _ in prompts]
    queues = [list(p) for p in prompts] + [[] for _ in range(rows - len(prompts))]
    active = [True] * len(prompts) + [False] * (rows - len(prompts))
    new_tokens = [0] * rows
    cache = init_cache(self.model.config, rows, cfg.capacity)
    lengths = np.zeros(rows, np.int32)
    step = 0
    while any(active):
      fed, last = self._chunk(queues, active)
      if int(lengths.max()) + fed.shape[1] > cfg.capacity:
        raise ValueError(f"a request needs more than capacity={cfg.capacity} cache entries")
      rng = jax.random.fold_in(jax.random.key(cfg.seed), first_id * 1_000_003 + step)
      window = min(cfg.capacity, _window(int(lengths.max()) + fed.shape[1]))
      next_tok, vectors, cache = self._step(self.params, fed, lengths, cache, last, rng,
                                               window=window)
      next_tok, vectors = np.asarray(next_tok), np.asarray(vectors)
      lengths += np.array([len(q) if a else 0 for q, a in zip(queues, active)], np.int32)
      # A query is a RET token of the output stream, fed alone; its hidden state was just computed.
      queries = [r for r in range(len(prompts)) if active[r] and outs[r].tokens
                 and queues[r] == [tok.query] and outs[r].generated[-1]]
      for r in [r for r in queries if len(outs[r].retrievals) >= cfg.max_retrievals]:
        outs[r].stop_reason, active[r] = "max_retrievals", False
        queries.remove(r)
      self._retrieve(queries, vectors, outs, queues, lengths)
      for r in range(len(prompts)):
        if not active[r] or r in queries:
          continue
        token = forced[r].pop(0) if forced[r] else int(next_tok[r])
        outs[r].tokens.append(token)
        outs[r].generated.append(True)
        new_tokens[r] += 1
        queues[r] = [token]
        if token == tok.eos:
          outs[r].stop_reason, active[r] = "eos", False
        elif new_tokens[r] >= cfg.max_new_tokens:
          outs[r].stop_reason, active[r] = "max_new_tokens", False
      step += 1
    return outs

  @staticmethod
  def _chunk(queues: list[list[int]], active: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, T] with T a bucketed width, index of each row's last queued token)."""
    width = _bucket(max(len(q) for q, a in zip(queues, active) if a))
    fed = np.zeros((len(queues), width), np.int32)
    last = np.zeros(len(queues), np.int32)
    for r, (queue, is_active) in enumerate(zip(queues, active)):
      if is_active:
        fed[r, :len(queue)] = queue
        last[r] = len(queue) - 1
    return fed, last

  def _retrieve(self, rows: list[int], vectors: np.ndarray, outs, queues, lengths):
    """Searches the query vectors of `rows` at once and queues what follows each retrieval."""
    if not rows:
      return
    ids, scores = self.search(vectors[rows], self.config.retrieve_k)
    for i, r in enumerate(rows):
      outs[r].retrievals.append(Retrieval(int(lengths[r]) - 1, list(ids[i]),
                                          [float(s) for s in scores[i]], vectors[r]))
      if self.mode == "rag":
        queued = list(self.documents(ids[i][0]))
      else:
        queued = [self.tokens.force_after_query]
      queues[r] = queued
      outs[r].tokens += queued
      outs[r].generated += [False] * len(queued)
