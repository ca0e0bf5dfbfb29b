"""The engine's device path: up to N decode steps per compiled call, retrieval inside the loop.

One `lax.while_loop` over the engine's KV cache and rows (it exits early once every row has
stopped): each iteration feeds every running row's pending tokens (a prompt or an inserted document:
a chunk of static width W, while the other rows feed their one token in the same `extend`; an
iteration where every row feeds one token runs at width 1, a `lax.cond`), picks the next token as
the host step does (`step.next_token`: penalties, greedy or seeded sampling, forced tokens) and
stops a row on EOS, max_new_tokens, max_retrievals and capacity. A row that fed the query RET token
of its output stream is searched in the same iteration (`policy.device_search` over the `DeviceKB`,
its hidden state as the query; EL requests' candidates as `CandidateRows`) and its insertion
(`policy.device_follow`: EL's forced token, RAG's document tokens from the KB's token table) becomes
what it feeds next. Retrievals are recorded on device in fixed-size arrays (row ids, scores, query
vectors, positions, inserted tokens: R per row and call) and come back with the generated tokens.

Between calls the host (`DeviceLoop.dispatch`) admits requests, builds the rows' inputs from the
engine's slots and replays each row's recorded events through the engine's own bookkeeping: the
same RequestOutput and Retrieval objects as the host step, and the host-only stops (stop strings,
the n-gram loop) checked after each replayed token. A row that such a stop ends inside a call ran
on up to N - 1 steps more on the device: what it did after its stop is dropped, and its slot is
reused from the next call (its cache entries past the kept length are never attended).
`GenerationConfig.steps_per_dispatch` is N.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from onegen_jax.inference.feeding import PENALTIES, penalty_inputs
from onegen_jax.inference.slots import cache_window, chunk_width, history_width, list_width
from onegen_jax.inference.step import next_token, row_keys
from onegen_jax.inference.stopping import stop_reason
from onegen_jax.inference.types import GenerationConfig, Retrieval, TaskTokens
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.candidates import RankPrior

if TYPE_CHECKING:
  from onegen_jax.inference.engine import Engine

# A row's stop inside the loop (index: its code; 0: none); the host finds "eos" and
# "max_new_tokens" again when it replays the tokens.
STOPS = ("", "eos", "max_new_tokens", "max_retrievals", "capacity", "error")
EOS, MAX_NEW, MAX_RETRIEVALS, CAPACITY, ERROR = range(1, len(STOPS))
# What a row did in an iteration: nothing fed, fed and took an output token, fed a query and
# retrieved, fed a query and stopped (max_retrievals, or RAG without a document).
IDLE, OUTPUT, RETRIEVED, ENDED = range(4)


@dataclasses.dataclass(frozen=True)
class DeviceRetrieval:
  """The KB the device loop searches: kb (device_kb.build's), key_uids (its key rows' uids: EL's
  ids and candidates), documents (its document rows' uids: RAG's ids), prior (EL candidates'
  rank prior, as the host's CandidateScorer)."""

  kb: device_kb.DeviceKB
  key_uids: Sequence[str]
  documents: Sequence[str] = ()
  prior: RankPrior | None = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("pending", "count", "is_output", "length", "steps", "seeds",
                                "sampling", "penalties", "history", "history_len", "output_from",
                                "force", "force_count", "stream_len", "max_new", "retrievals",
                                "candidates"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class Rows:
  """The rows' state entering a call (B rows, from the engine's slots): pending int32 [B, W] and
  count int32 [B] (the tokens to feed next, 0-padded; 0: idle row), is_output bool [B] (pending is
  the row's last output-stream token: a query RET token there is searched), length int32 [B]
  (cached entries), steps int32 [B] and seeds int32 [B] (the sampling key's counters), sampling
  float32 [B, 2], penalties float32 [B, 3], history int32 [B, H] (H: 0, or room for a whole cache
  row), history_len int32 [B], output_from int32 [B] (as step_fn takes them), force int32 [B, F]
  and force_count int32 [B] (forced output tokens left), stream_len and max_new int32 [B] (output
  tokens so far, and the row's max_new_tokens), retrievals int32 [B] (so far), candidates (EL):
  CandidateRows with rows [B, R, C] and restricted [B, R], the row's next R queries."""

  pending: jax.Array
  count: jax.Array
  is_output: jax.Array
  length: jax.Array
  steps: jax.Array
  seeds: jax.Array
  sampling: jax.Array
  penalties: jax.Array
  history: jax.Array
  history_len: jax.Array
  output_from: jax.Array
  force: jax.Array
  force_count: jax.Array
  stream_len: jax.Array
  max_new: jax.Array
  retrievals: jax.Array
  candidates: device_kb.CandidateRows | None


def decode_loop(model, vocab_size, seed, watch, policy, query, eos, capacity, max_retrievals,
                params, kb, cache, rows: Rows, steps, window, k, records):
  """Up to `steps` (N, static) iterations over `rows` (Rows) and the donated cache, attending to
  `window` entries; k: hits searched per query; records (R): retrievals recorded per row.
  Returns (the records, the new cache): per iteration i and row b, event int32 [N, B] (IDLE,
  OUTPUT, RETRIEVED, ENDED), token int32 [N, B], log_prob float32 [N, B], watched float32
  [N, B, w]; per row, the j-th retrieval's hit rows int32 [B, R, k] (-1: none), scores float32
  [B, R, k], query vector float32 [B, R, D], position int32 [B, R] and inserted tokens int32
  [B, R, L] with their count [B, R]; stop int32 [B] (STOPS' code), first_vector float32 [B, D]
  (the hidden state of a row's first fed chunk), iterations and fed (tokens fed) int32 []."""
  batch, width = rows.pending.shape
  b = jnp.arange(batch)
  follow_width = policy.follow_width(kb)
  dim = model.config.hidden_size
  zeros = lambda shape, dtype=jnp.int32, fill=0: jnp.full(shape, fill, dtype)
  out = dict(event=zeros((steps, batch)), token=zeros((steps, batch), fill=-1),
             log_prob=zeros((steps, batch), jnp.float32),
             watched=zeros((steps, batch, len(watch)), jnp.float32),
             hits=zeros((batch, records, k), fill=-1),
             scores=zeros((batch, records, k), jnp.float32, -jnp.inf),
             vector=zeros((batch, records, dim), jnp.float32), position=zeros((batch, records)),
             inserted=zeros((batch, records, follow_width)), inserted_len=zeros((batch, records)),
             stop=zeros((batch,)), first_vector=zeros((batch, dim), jnp.float32),
             iterations=zeros(()), fed=zeros(()))
  state = dict(pending=rows.pending, count=rows.count, is_output=rows.is_output,
               length=rows.length, steps=rows.steps, history=rows.history,
               history_len=rows.history_len, forced_so_far=zeros((batch,)),
               stream_len=rows.stream_len, retrievals=rows.retrievals, made=zeros((batch,)),
               active=rows.count > 0)

  def feed(chunk: int):
    def run(s, cache):
      hidden, cache = model.apply({"params": params}, s["pending"][:, :chunk], s["length"], cache,
                                  window, method=Decoder.extend)
      return hidden[b, jnp.maximum(s["count"] - 1, 0) if chunk > 1 else 0], cache
    return run

  def feed_at_width(wide, s, cache):
    """feed(width) when `wide`, else feed(1), as two loops of 0 or 1 trips rather than a
    lax.cond: XLA keeps a loop's carried cache in place, where a cond's branches copied it."""
    hidden = jax.eval_shape(feed(1), s, cache)[0]
    final = jnp.zeros(hidden.shape, hidden.dtype)
    for chunk, take in ((width, wide), (1, ~wide)):
      run = feed(chunk)
      _, final, cache = jax.lax.while_loop(
          lambda c: c[0], lambda c, run=run: (False, *run(s, c[2])), (take, final, cache))
    return final, cache

  def search(queries, made):
    candidates = None
    if rows.candidates is not None:
      at = jnp.minimum(made, records - 1)
      candidates = device_kb.CandidateRows(rows.candidates.rows[b, at],
                                           rows.candidates.restricted[b, at],
                                           rows.candidates.bonus)
    hits, scores = policy.device_search(kb, queries, k, candidates)
    return (hits, scores, *policy.device_follow(kb, hits[:, 0]))

  def no_search(queries, made):
    del queries, made
    return (zeros((batch, k), fill=-1), zeros((batch, k), jnp.float32, -jnp.inf),
            zeros((batch, follow_width)), zeros((batch,)))

  def body(carry):
    i, s, cache, out = carry
    full = s["active"] & (s["length"] + s["count"] > capacity)
    stop = jnp.where(full, CAPACITY, out["stop"])
    active = s["active"] & ~full
    count = jnp.where(active, s["count"], 0)
    s = dict(s, count=count)
    final, cache = feed_at_width(jnp.any(count > 1), s, cache)
    forced_at = jnp.minimum(s["forced_so_far"], rows.force.shape[1] - 1)
    forced = jnp.where(s["forced_so_far"] < rows.force_count, rows.force[b, forced_at], -1)
    sampled, vector, log_prob, watched = next_token(
        model, vocab_size, watch, params, final,
        row_keys(seed, jnp.stack([rows.seeds, s["steps"]], axis=1)), rows.sampling, forced,
        rows.penalties, s["history"], rows.output_from)
    first_vector = jnp.where((active & (s["steps"] == 0))[:, None], vector, out["first_vector"])
    length = s["length"] + count
    querying = active & s["is_output"] & (count == 1) & (s["pending"][:, 0] == query)
    over = querying & (s["retrievals"] >= max_retrievals)
    searching = querying & ~over
    hits, scores, inserted, inserted_len = jax.lax.cond(
        jnp.any(searching), search, no_search, vector, s["made"])
    missing = searching & (inserted_len == 0)  # RAG without a document
    retrieved = searching & ~missing
    output = active & ~querying
    token = jnp.where(forced >= 0, forced, sampled)
    stream_len = s["stream_len"] + output
    eos_stop = output & (token == eos)
    new_stop = output & ~eos_stop & (stream_len >= rows.max_new)
    for code, rows_stopping in ((MAX_RETRIEVALS, over), (ERROR, missing), (EOS, eos_stop),
                                (MAX_NEW, new_stop)):
      stop = jnp.where(rows_stopping, code, stop)
    # The j-th retrieval of row b goes to slot (b, j); rows that did not retrieve write nowhere.
    slot = (b, jnp.where(retrieved, s["made"], records))
    put = lambda name, value: out[name].at[slot].set(value, mode="drop")
    out = dict(
        out, stop=stop, first_vector=first_vector, iterations=i + 1, fed=out["fed"] + count.sum(),
        event=out["event"].at[i].set(jnp.select([output, retrieved, querying],
                                                [OUTPUT, RETRIEVED, ENDED], IDLE)),
        token=out["token"].at[i].set(jnp.where(output, token, -1)),
        log_prob=out["log_prob"].at[i].set(log_prob), watched=out["watched"].at[i].set(watched),
        hits=put("hits", hits), scores=put("scores", scores), vector=put("vector", vector),
        position=put("position", length - 1), inserted=put("inserted", inserted),
        inserted_len=put("inserted_len", inserted_len))
    next_pending = jnp.zeros_like(s["pending"]).at[:, 0].set(token)
    history = s["history"]
    if history.shape[1]:
      history = history.at[b, jnp.where(output, s["history_len"], history.shape[1])].set(
          token, mode="drop")
    s = dict(
        pending=jnp.where(retrieved[:, None],
                          jnp.pad(inserted, ((0, 0), (0, width - follow_width))),
                          jnp.where(output[:, None], next_pending, s["pending"])),
        count=jnp.where(retrieved, inserted_len, jnp.where(output, 1, count)),
        is_output=jnp.where(retrieved, False, s["is_output"] | output),
        length=length, steps=s["steps"] + active, history=history,
        history_len=s["history_len"] + output,
        forced_so_far=s["forced_so_far"] + (output & (forced >= 0)), stream_len=stream_len,
        retrievals=s["retrievals"] + retrieved, made=s["made"] + retrieved,
        active=active & ~(over | missing | eos_stop | new_stop))
    return i + 1, s, cache, out

  going = lambda carry: (carry[0] < steps) & jnp.any(carry[1]["active"])
  _, _, cache, out = jax.lax.while_loop(going, body, (jnp.int32(0), state, cache, out))
  return out, cache


def compiled_loop(model, vocab_size, config: GenerationConfig, policy, tokens: TaskTokens):
  """decode_loop jitted as the engine runs it: config's seed, watch, capacity and max_retrievals
  and the tokens' query and EOS bound; the cache donated; steps, window, k, records static."""
  return jax.jit(functools.partial(decode_loop, model, vocab_size, config.seed,
                                   tuple(config.watch), policy, tokens.query, tokens.eos,
                                   config.capacity, config.max_retrievals),
                 donate_argnames="cache", static_argnames=("steps", "window", "k", "records"))


def loop_width(follow_width: int) -> int:
  """W, the chunk of every call: an insertion's width (`follow_width`), at least 16 (chunk_width
  of 2), so one compiled loop serves calls with and without chunks; a wider turn is fed by the
  host step (DeviceLoop.feeds)."""
  return chunk_width(max(2, follow_width))


def records_per_call(config: GenerationConfig) -> int:
  """R: the retrievals a row may make in one call of N steps (one per two steps at most)."""
  return max(1, min((config.steps_per_dispatch + 1) // 2, config.max_retrievals))


class DeviceLoop:
  """The engine's device path: builds each call's Rows from the engine's slots, runs
  `decode_loop` and replays its records into the engine's outputs (`dispatch`)."""

  def __init__(self, engine: Engine, vocab_size: int | None, retrieval: DeviceRetrieval):
    if engine.query_vectors is not None:
      raise ValueError("query_vectors (a pipeline's own query encoder) needs the host step: "
                       "the device loop searches the hidden states")
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
    rows, window, k = self._rows(engine, steps, records)
    with engine._rules():  # pylint: disable=protected-access
      out, engine._cache = self._loop(  # pylint: disable=protected-access
          engine.params, self.retrieval.kb, engine._cache, rows, steps=steps, window=window,
          k=k, records=records)
      out = jax.device_get(out)
    engine.tokens_fed += int(out["fed"])
    ended = [self._replay(engine, r, out) for r in busy]
    return [rid for rid in ended if rid is not None]

  def _rows(self, engine: Engine, steps: int, records: int) -> tuple[Rows, int, int]:
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
    grown = max(s.length + len(s.queue) for s in slots if s) + steps + records * self.follow_width
    window = min(cfg.capacity, cache_window(grown))
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
