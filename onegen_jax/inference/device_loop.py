"""The host half of the engine's device path (the compiled half, up to N decode steps per call
with retrieval inside the loop: device_decode.py).

Between calls the host (`DeviceLoop.dispatch`) admits requests, builds the rows' inputs
(device_decode.Rows) from the engine's slots and replays each row's recorded events through the
engine's own bookkeeping: the same RequestOutput and Retrieval objects as the host step, and the
host-only stops (stop strings, the n-gram loop) checked after each replayed token. A row that such
a stop ends inside a call ran on up to N - 1 steps more on the device: what it did after its stop
is dropped, and its slot is reused from the next call (its cache entries past the kept length are
never attended). `GenerationConfig.steps_per_dispatch` is N.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from onegen_jax.inference.device_decode import (ENDED, IDLE, RETRIEVED, STOPS, Rows,
                                                compiled_loop, loop_width, records_per_call)
from onegen_jax.inference.feeding import PENALTIES, penalty_inputs
from onegen_jax.inference.slots import cache_window, history_width, list_width
from onegen_jax.inference.stopping import stop_reason
from onegen_jax.inference.types import Retrieval
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.candidates import RankPrior

if TYPE_CHECKING:
  from onegen_jax.inference.engine import Engine


@dataclasses.dataclass(frozen=True)
class DeviceRetrieval:
  """The KB the device loop searches: kb (device_kb.build's), key_uids (its key rows' uids: EL's
  ids and candidates), documents (its document rows' uids: RAG's ids), prior (EL candidates'
  rank prior, as the host's CandidateScorer)."""

  kb: device_kb.DeviceKB
  key_uids: Sequence[str]
  documents: Sequence[str] = ()
  prior: RankPrior | None = None

  @classmethod
  def place(cls, vectors: np.ndarray, uids: Sequence[str], mesh,
            table: device_kb.InsertionTable | None = None,
            prior: RankPrior | None = None) -> DeviceRetrieval:
    """The KB of `vectors` [keys, D] (key rows `uids`) placed on `mesh`, with RAG's insertion
    `table` (its documents: device_kb.insertion_table) and EL's candidate `prior`."""
    kb = device_kb.build(vectors, uids, mesh, table=table)
    return cls(kb, list(uids), [] if table is None else table.documents, prior)


class DeviceLoop:
  """The engine's device path: builds each call's Rows from the engine's slots, runs
  `device_decode.decode_loop` and replays its records into the engine's outputs (`dispatch`)."""

  def __init__(self, engine: Engine, vocab_size: int | None, retrieval: DeviceRetrieval):
    if engine.query_vectors is not None or engine.config.novel_documents:
      raise ValueError("query_vectors (a pipeline's own query encoder) and novel_documents need "
                       "the host step: the device loop searches the hidden states")
    policy = engine.policy
    self.retrieval = retrieval
    self.names = list(retrieval.documents if policy.mode == "rag" else retrieval.key_uids)
    self.follow_width = policy.follow_width(retrieval.kb)
    self.width = loop_width(self.follow_width)
    self._loop = compiled_loop(engine.model, vocab_size, engine.config, policy, engine.tokens)

  def check(self, engine: Engine, request) -> None:
    """ValueError for a request the device loop cannot run (RAG searches documents, never
    candidates)."""
    if request.candidates is not None and engine.policy.mode == "rag":
      raise ValueError("RAG searches documents: candidates restrict entity linking's search")

  def feeds(self, engine: Engine) -> bool:
    """Whether every busy slot's queue fits W. A wider turn (a prompt, a continued turn) is for
    the host step (the same tokens, search and choice as the loop's first iteration): the loop
    feeds every chunk of a call at one width, so a wide turn would widen each insertion."""
    slots = engine._slots  # pylint: disable=protected-access
    return all(len(s.queue) <= self.width for s in slots if s)

  def dispatch(self, engine: Engine) -> list[int]:
    """One call of up to N steps over the engine's busy slots; returns the requests that ended."""
    cfg, slots = engine.config, engine._slots  # pylint: disable=protected-access
    busy = [r for r, s in enumerate(slots) if s is not None]
    steps = cfg.steps_per_dispatch
    records = records_per_call(cfg)
    rows, window, k = self._rows(engine, records)
    start = time.perf_counter()
    with engine._rules():  # pylint: disable=protected-access
      out, engine._cache = self._loop(  # pylint: disable=protected-access
          engine.params, self.retrieval.kb, engine._cache, rows, steps=steps, window=window,
          k=k, records=records)
      out = jax.device_get(out)
    engine.compiled_s += time.perf_counter() - start
    engine.tokens_fed += int(out["fed"])
    ended = [self._replay(engine, r, out) for r in busy]
    return [rid for rid in ended if rid is not None]

  def _rows(self, engine: Engine, records: int) -> tuple[Rows, int, int]:
    """(Rows, window, k) of a call over the engine's slots."""
    cfg, slots = engine.config, engine._slots  # pylint: disable=protected-access
    outs = [engine.output(s.rid) if s else None for s in slots]
    setting = lambda s, name: engine._setting(s.rid, name)  # pylint: disable=protected-access
    pending = np.zeros((len(slots), self.width), np.int32)
    for r, s in enumerate(slots):
      if s:
        pending[r, :len(s.queue)] = s.queue
    force = np.zeros((len(slots), list_width(max(len(s.force) if s else 0 for s in slots))),
                     np.int32)
    for r, s in enumerate(slots):
      if s:
        force[r, :len(s.force)] = s.force
    penalties = penalty_inputs([(tuple(setting(s, n) for n in PENALTIES), outs[r].prompt,
                                 s.stream) if s else None for r, s in enumerate(slots)])
    history = penalties["history"]
    history_len = (history >= 0).sum(axis=1).astype(np.int32)
    if history.shape[1]:  # room for every token a row can hold: one shape whatever the lengths
      history = np.pad(history, ((0, 0), (0, history_width(cfg.capacity) - history.shape[1])),
                       constant_values=-1)
    array = lambda values, dtype=np.int32: np.asarray(values, dtype)
    per_row = lambda f, idle: [f(r, s) if s else idle for r, s in enumerate(slots)]
    rows = Rows(
        pending=pending, count=array(per_row(lambda r, s: len(s.queue), 0)),
        is_output=array(per_row(lambda r, s: bool(outs[r].tokens) and outs[r].generated[-1],
                                False), bool),
        length=array(per_row(lambda r, s: s.length, 0)),
        steps=array(per_row(lambda r, s: s.steps, 0)),
        seeds=array(per_row(lambda r, s: engine._stream(s.rid),  # pylint: disable=protected-access
                            0)),
        sampling=array(per_row(lambda r, s: [setting(s, "temperature"), setting(s, "top_p")],
                               [0.0, 1.0]), np.float32),
        penalties=penalties["penalties"], history=history, history_len=history_len,
        output_from=penalties["output_from"], force=force,
        force_count=array(per_row(lambda r, s: len(s.force), 0)),
        stream_len=array(per_row(lambda r, s: len(s.stream), 0)),
        max_new=array(per_row(lambda r, s: setting(s, "max_new_tokens"), 0)),
        retrievals=array(per_row(lambda r, s: len(outs[r].retrievals), 0)),
        candidates=self._candidates(engine, outs, records))
    # The rows' use now: the loop ends its call before a feed passes it (device_decode).
    window = min(cfg.capacity, cache_window(max(s.length + len(s.queue) for s in slots if s)))
    k = max(setting(s, "retrieve_k") for s in slots if s)
    return rows, window, k

  def _candidates(self, engine: Engine, outs, records: int) -> device_kb.CandidateRows | None:
    """EL: each row's candidate lists for its next `records` queries, [B, R, C] (every EL call
    carries them, restricted or not, so one compiled loop serves both)."""
    if engine.policy.mode != "el":
      return None
    lists = []
    for s, out in zip(engine._slots, outs):  # pylint: disable=protected-access
      request = engine._requests[s.rid][0] if s else None  # pylint: disable=protected-access
      lists += [request.candidates_for(len(out.retrievals) + j) if request else None
                for j in range(records)]
    width = list_width(max((len(set(c)) for c in lists if c is not None), default=0))
    flat = device_kb.candidate_rows(self.retrieval.key_uids, lists, width, self.retrieval.prior)
    batch = len(outs)
    return device_kb.CandidateRows(flat.rows.reshape(batch, records, width),
                                   flat.restricted.reshape(batch, records), flat.bonus)

  def _replay(self, engine: Engine, r: int, out: dict) -> int | None:
    """Row r's recorded events through the engine's bookkeeping, as the host step would have
    taken them (host-only stops included); returns its request id if it ended."""
    slot = engine._slots[r]  # pylint: disable=protected-access
    request, output = engine._requests[slot.rid]  # pylint: disable=protected-access
    made = 0
    for i in range(int(out["iterations"])):
      event = out["event"][i, r]
      if event == IDLE:
        continue
      if slot.steps == 0:
        output.prompt_vector = out["first_vector"][r]
      slot.length += len(slot.queue)
      slot.steps += 1
      if event == ENDED:
        reason = STOPS[out["stop"][r]]
        if reason == "error":
          output.error = "LookupError: the search found no document to insert"
        return engine._end(r, reason)  # pylint: disable=protected-access
      if event == RETRIEVED:
        self._retrieved(engine, slot, output, out, r, made)
        made += 1
        continue
      token = int(out["token"][i, r])
      if slot.force:
        slot.force.pop(0)
      output.tokens.append(token)
      output.generated.append(True)
      output.log_probs.append(float(out["log_prob"][i, r]))
      if engine.config.watch:
        output.watched.append(out["watched"][i, r])
      slot.stream.append(token)
      slot.queue = [token]
      reason = stop_reason(request, engine.config, output, slot.stream, engine.tokens.eos,
                           engine.decode)
      if reason:
        return engine._end(r, reason)  # pylint: disable=protected-access
    if STOPS[out["stop"][r]] == "capacity":
      return engine._end(r, "capacity")  # pylint: disable=protected-access
    return None

  def _retrieved(self, engine: Engine, slot, output, out: dict, r: int, j: int) -> None:
    """Records row r's j-th retrieval of the call and queues its insertion, as Engine._retrieve."""
    k = engine._setting(slot.rid, "retrieve_k")  # pylint: disable=protected-access
    hits = out["hits"][r, j, :k]
    found = hits >= 0
    output.retrievals.append(Retrieval(
        int(out["position"][r, j]), [self.names[h] for h in hits[found]],
        [float(x) for x in out["scores"][r, j, :k][found]], out["vector"][r, j]))
    slot.queue = [int(t) for t in out["inserted"][r, j, :out["inserted_len"][r, j]]]
    output.tokens += slot.queue
    output.generated += [False] * len(slot.queue)
