"""The OneGen engine: generation and retrieval in one pass over one KV cache, continuously batched.

Why one pass: the hidden state at a query RET token the model writes IS the query vector, so it is
searched at once and the hit (RAG: the document's insertion, tokenised as training tokenised it;
EL: the forced token after the RET token) goes into the same cache; nothing is re-encoded and no
query is encoded twice. Why continuous batching: a freed slot (cache row) takes the next request
at once, and greedy outputs do not depend on what else is batched (tested), so batching changes
only speed. The stepping interface, hooks (force, candidates, query_vectors), sessions and stop
reasons: docs/architecture.md, "Inference".
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from onegen_jax import sharding
from onegen_jax.inference.device_loop import DeviceLoop, DeviceRetrieval
from onegen_jax.inference.feeding import PENALTIES, Feed, feed, penalty_inputs, rows_apart
from onegen_jax.inference.retrieval_policy import (CandidateSearchFn, SearchFn, first_k,
                                                   make_policy)
from onegen_jax.inference.slots import Slot, cache_window, chunk_width, restore_row, save_row
from onegen_jax.inference.step import step_fn
from onegen_jax.inference.stopping import check_request, stop_reason
from onegen_jax.inference.types import (GenerationConfig, Request, RequestOutput, Retrieval,
                                        TaskTokens)
from onegen_jax.model.decoder import Decoder, init_cache


class Engine:
  """Continuously batched OneGen inference for one model, one index and one task's tokens."""

  def __init__(self, model: Decoder, params, tokens: TaskTokens, search: SearchFn,
               documents: Callable[[str], Sequence[int]] | None, config: GenerationConfig,
               mode: str, vocab_size: int | None = None,
               search_candidates: CandidateSearchFn | None = None,
               query_vectors: Callable[[list[RequestOutput], np.ndarray], np.ndarray] | None = None,
               mesh: Mesh | None = None, decode: Callable[[Sequence[int]], str] | None = None,
               device: DeviceRetrieval | None = None):
    """documents: document uid -> the token ids inserted after a query that retrieved it (RAG);
    mode: "rag" or "el"; vocab_size: the tokenizer's size when the model's vocabulary is padded
    beyond it (padded rows are never sampled); search_candidates: exact search among given uids
    (Request.candidates); query_vectors: (outputs of the querying requests, their hidden-state
    vectors [n, D]) -> the vectors to search with (default: the hidden states); mesh: the mesh
    the parameters live on (load_run's): the cache is laid out by `cache_sharding` (rows over
    data x fsdp, kv heads over 'tensor') and each step runs under the logical rules; decode:
    token ids -> their text (make_engine's is requests.output_text), which requests with `stop`
    strings need. What follows a retrieval is `policy` (retrieval_policy.make_policy of mode,
    search, documents, the forced token and search_candidates). device: the KB on `mesh`: each
    step is then one call of the device loop (inference/device_loop.py) of up to
    config.steps_per_dispatch decode steps, searching and inserting on the devices (search and
    documents unused); without it, config.steps_per_dispatch must be 1."""
    self.policy = make_policy(mode, search, documents, tokens.force_after_query, search_candidates,
                              config.novel_documents)
    self.model, self.params, self.tokens, self.config = model, params, tokens, config
    self.query_vectors = query_vectors
    self.mesh, self.decode = mesh, decode
    self._step = jax.jit(functools.partial(step_fn, model, vocab_size, config.seed,
                                           tuple(config.watch)),
                         donate_argnums=(3,), static_argnames="window")
    with self._rules():
      self._cache = init_cache(model.config, config.batch_size, config.capacity, mesh)
    self._slots: list[Slot | None] = [None] * config.batch_size
    self._waiting: collections.deque[int] = collections.deque()
    self._requests: dict[int, tuple[Request, RequestOutput]] = {}
    self._next_id = 0
    self.tokens_fed = 0  # tokens fed through the model so far (prompts, insertions, outputs)
    # Seconds from each compiled call's dispatch until its results are on the host (the rest is
    self.compiled_s = 0.0  # host work: building inputs, search on the host, bookkeeping)
    self._sessions: dict[int, tuple[tuple, int]] = {}  # request id -> (cache row, length)
    self._continues: dict[int, tuple[tuple, int]] = {}  # request id -> its session's (row, length)
    if device is None and config.steps_per_dispatch != 1:
      raise ValueError(f"steps_per_dispatch={config.steps_per_dispatch} needs the device loop: "
                       "Engine(device=DeviceRetrieval(...))")
    self._device = None if device is None else DeviceLoop(self, vocab_size, device)

  # -- the stepping interface ------------------------------------------------------------------
  def submit(self, request: Request) -> int:
    """Queues a request; returns its id (outputs: `output(id)`)."""
    if len(request.prompt) + 1 > self.config.capacity:
      raise ValueError(f"a prompt of {len(request.prompt)} tokens does not fit capacity="
                       f"{self.config.capacity}")
    check_request(request, self.config, decodes=self.decode is not None)
    if self._device is not None:
      self._device.check(self, request)
    rid, self._next_id = self._next_id, self._next_id + 1
    self._requests[rid] = (request, RequestOutput(list(request.prompt), [], [], []))
    self._waiting.append(rid)
    return rid

  def continue_session(self, session: int, turn: Sequence[int], keep_session: bool = True,
                       **settings) -> int:
    """Appends a user turn (token ids) to the finished request `session` (submitted with
    keep_session) and queues its continuation over the kept cache; returns the new request id,
    whose prompt is the whole dialogue so far plus `turn`. settings: the new request's other
    Request fields (force, max_new_tokens, ...)."""
    if not turn:
      raise ValueError("a continuation needs at least one token of user turn")
    row, length = self._kept(session)
    before = self._requests[session][1]
    unfed = [*before.prompt, *before.tokens][length:]  # its last output token
    return self.branch(session, [[*unfed, *turn]], keep_session=keep_session, **settings)[0]

  def branch(self, session: int, suffixes: Sequence[Sequence[int]], keep_session: bool = False,
             **settings) -> list[int]:
    """Continues the kept cache of the finished request `session` in one new request per suffix,
    each in its own slot: request i's prompt is the tokens the cache holds (the dialogue without
    its last, never fed, output token) plus suffixes[i]. The cache row is copied on device and
    only the suffix is fed: the shared prefix is computed once. The session is used up."""
    row, length = self._kept(session)
    before = self._requests[session][1]
    cached = [*before.prompt, *before.tokens][:length]
    if not suffixes or not all(suffixes):
      raise ValueError("every branch needs at least one token to feed")
    longest = length + max(map(len, suffixes))
    if longest + 1 > self.config.capacity:
      raise ValueError(f"a prompt of {longest} tokens does not fit capacity={self.config.capacity}")
    del self._sessions[session]  # a session goes on once
    ids = []
    for suffix in suffixes:
      rid = self.submit(Request([*cached, *suffix], keep_session=keep_session, **settings))
      self._continues[rid] = (row, length)
      ids.append(rid)
    return ids

  def _kept(self, session: int) -> tuple[tuple, int]:
    if session not in self._sessions:
      raise KeyError(f"request {session} has no kept session (unknown, not finished, or "
                     "submitted without keep_session)")
    return self._sessions[session]

  def has_session(self, rid: int) -> bool:
    """Whether an ended request's cache is kept (continue_session may go on from it)."""
    return rid in self._sessions

  def close_session(self, session: int):
    """Frees a kept session's cache (not continued)."""
    self._sessions.pop(session, None)

  def cancel(self, rid: int) -> bool:
    """Ends a waiting or running request now (stop_reason "cancelled"): its slot takes the next
    request at the next step and its cache is not kept (a cancelled continuation ends its
    session). Returns whether it was still going."""
    out = self.output(rid)
    if out.done:
      return False
    if rid in self._waiting:
      self._waiting.remove(rid)
      self._continues.pop(rid, None)
      out.stop_reason = "cancelled"
    else:
      self._end(next(r for r, s in enumerate(self._slots) if s is not None and s.rid == rid),
                "cancelled")
    return True

  @property
  def waiting(self) -> int:
    """Requests queued for a slot."""
    return len(self._waiting)

  @property
  def running(self) -> int:
    """Busy slots."""
    return sum(s is not None for s in self._slots)

  def output(self, rid: int) -> RequestOutput:
    return self._requests[rid][1]

  def release(self, rid: int) -> RequestOutput:
    """Forgets an ended request (a long-running server calls it once a result is delivered);
    returns its output. Its kept session, if any, stays until continued or closed."""
    if not self.output(rid).done:
      raise ValueError(f"request {rid} has not ended")
    return self._requests.pop(rid)[1]

  @property
  def busy(self) -> bool:
    """Whether any request waits or runs."""
    return bool(self._waiting) or self.running > 0

  def step(self) -> list[int]:
    """Admits waiting requests into free slots, feeds every busy slot once (with a device KB: up
    to steps_per_dispatch times, DeviceLoop.dispatch, unless a slot feeds a turn wider than an
    insertion), acts on queries and stops; returns the ids of the requests that ended in this
    step."""
    self._admit()
    if self._device is not None and self._device.feeds(self):
      return self._device.dispatch(self) if self.running else []
    ended = [self._end(r, "capacity") for r, s in enumerate(self._slots)
             if s is not None and s.length + len(s.queue) > self.config.capacity]
    busy = [r for r, s in enumerate(self._slots) if s is not None]
    if not busy:
      return ended
    queued = np.array([len(s.queue) if s else 0 for s in self._slots], np.int32)
    width = chunk_width(int(queued.max()))
    tokens = np.zeros((len(self._slots), width), np.int32)
    for r in busy:
      tokens[r, :queued[r]] = self._slots[r].queue
    batch = Feed(
        tokens, queued, lengths=np.array([s.length if s else 0 for s in self._slots], np.int32),
        counters=np.array([[self._stream(s.rid), s.steps] if s else [0, 0] for s in self._slots],
                          np.int32),
        sampling=np.array([[self._setting(s.rid, "temperature"), self._setting(s.rid, "top_p")]
                           if s else [0.0, 1.0] for s in self._slots], np.float32),
        forced=np.array([s.force[0] if s and s.force else -1 for s in self._slots], np.int32),
        **penalty_inputs([(tuple(self._setting(s.rid, name) for name in PENALTIES),
                           self.output(s.rid).prompt, s.stream) if s else None
                          for s in self._slots]))
    apart = rows_apart(queued, width) if self.config.prefill_apart else None
    start = time.perf_counter()
    with self._rules():
      (next_tok, vectors, log_probs, watched), self._cache = feed(
          self._step, self.params, self._cache, batch, self.config.capacity, apart)
    self.compiled_s += time.perf_counter() - start
    self.tokens_fed += int(queued.sum())
    for r in busy:
      slot = self._slots[r]
      if slot.steps == 0:
        self.output(slot.rid).prompt_vector = vectors[r]
      slot.length += len(slot.queue)
      slot.steps += 1
    return ended + self._advance(busy, next_tok, vectors, log_probs, watched)

  # -- batch helpers -----------------------------------------------------------------------------
  def generate(self, prompts: Sequence[Sequence[int]], progress: bool = False,
               force: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
    """Runs every prompt (token ids) to its end, continuously batched; force[i]: tokens that
    replace request i's first output-stream choices."""
    if force is not None and len(force) != len(prompts):
      raise ValueError(f"{len(force)} forced continuations for {len(prompts)} prompts")
    ids = [self.submit(Request(p, f)) for p, f in zip(prompts, force or [()] * len(prompts))]
    return self.run(ids, progress)

  def run(self, ids: Sequence[int], progress: bool = False) -> list[RequestOutput]:
    """Steps until the given requests ended; their outputs in order."""
    with tqdm.tqdm(total=len(ids), disable=not progress, unit="request") as bar:
      while not all(self.output(i).done for i in ids):
        bar.update(sum(i in ids for i in self.step()))
    return [self.output(i) for i in ids]

  # -- internals -----------------------------------------------------------------------------------
  def _admit(self):
    if not self.config.continuous and any(s is not None for s in self._slots):
      return  # static batching: the next batch starts when the whole batch has ended
    for r, slot in enumerate(self._slots):
      if slot is None and self._waiting:
        rid = self._waiting.popleft()
        request, out = self._requests[rid]
        if rid in self._continues:  # feed what the kept cache lacks: its last token, the turn
          row, length = self._continues.pop(rid)
          with self._rules():
            self._cache = restore_row(self._cache, r, row)
          self._slots[r] = Slot(rid, list(out.prompt[length:]), length, list(request.force))
        else:
          self._slots[r] = Slot(rid, list(request.prompt), 0, list(request.force))

  def _advance(self, busy: list[int], next_tok: np.ndarray, vectors: np.ndarray,
               log_probs: np.ndarray, watched: np.ndarray) -> list[int]:
    """Retrievals for the rows that fed a query RET token, the next token for the others (with
    its log-probability and the watched tokens') and the stop it may bring."""
    cfg, ended = self.config, []
    querying = [r for r in busy if self._is_query(r)]
    for r in [r for r in querying if len(self.output(self._slots[r].rid).retrievals)
              >= cfg.max_retrievals]:
      querying.remove(r)
      ended.append(self._end(r, "max_retrievals"))
    ended += self._retrieve(querying, vectors)
    for r in busy:
      slot = self._slots[r]
      if slot is None or r in querying:
        continue
      out = self.output(slot.rid)
      token = slot.force.pop(0) if slot.force else int(next_tok[r])
      out.tokens.append(token)
      out.generated.append(True)
      out.log_probs.append(float(log_probs[r]))
      if self.config.watch:
        out.watched.append(watched[r])
      slot.stream.append(token)
      slot.queue = [token]
      request, out = self._requests[slot.rid]
      reason = stop_reason(request, self.config, out, slot.stream, self.tokens.eos, self.decode)
      if reason:
        ended.append(self._end(r, reason))
    return ended

  def _rules(self):
    """The mesh and logical rules while tracing and running on a mesh (nothing without one)."""
    return sharding.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _setting(self, rid: int, name: str):
    return self._requests[rid][0].setting(name, self.config)

  def _stream(self, rid: int) -> int:
    seed = self._requests[rid][0].seed
    return rid if seed is None else seed

  def _is_query(self, r: int) -> bool:
    """The row just fed a query RET token of its output stream (its hidden state is the query)."""
    slot, out = self._slots[r], self.output(self._slots[r].rid)
    return bool(out.tokens) and slot.queue == [self.tokens.query] and out.generated[-1]

  def _end(self, r: int, reason: str) -> int:
    slot = self._slots[r]
    request, out = self._requests[slot.rid]
    out.stop_reason = reason
    if request.keep_session and reason not in ("cancelled", "error"):
      with self._rules():
        row = save_row(self._cache, r, cache_window(slot.length))
      self._sessions[slot.rid] = (row, slot.length)
    self._slots[r] = None
    return slot.rid

  def _retrieve(self, rows: list[int], vectors: np.ndarray) -> list[int]:
    """Searches the query vectors of `rows` at once and queues what follows each retrieval;
    returns the requests whose own retrieval raised (stop_reason "error"; the others go on)."""
    if not rows:
      return []
    outs = [self.output(self._slots[r].rid) for r in rows]
    queries = vectors[rows] if self.query_vectors is None else self.query_vectors(outs, vectors[rows])
    ks = [self._setting(self._slots[r].rid, "retrieve_k") for r in rows]
    extra = max(len(o.retrievals) for o in outs) if self.config.novel_documents else 0
    found = list(zip(*self.policy.search(queries, max(ks) + extra)))  # (ids, scores) per row
    failed = []
    for i, r in enumerate(rows):
      slot, out = self._slots[r], outs[i]
      try:
        candidates = self._requests[slot.rid][0].candidates_for(len(out.retrievals))
        if candidates is not None:
          found[i] = self.policy.search_among(queries[i], candidates, ks[i] + extra)
        ids, scores = first_k(*found[i], ks[i], {x.ids[0] for x in out.retrievals}
                              if self.config.novel_documents else ())
        queued = self.policy.follow(ids)
      except Exception as e:  # pylint: disable=broad-except  (that request fails, not the batch)
        out.error = f"{type(e).__name__}: {e}"
        failed.append(self._end(r, "error"))
        continue
      out.retrievals.append(Retrieval(slot.length - 1, ids, scores, np.asarray(queries[i])))
      slot.queue = queued
      out.tokens += queued
      out.generated += [False] * len(queued)
    return failed
