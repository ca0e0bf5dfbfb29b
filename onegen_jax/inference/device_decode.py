"""The compiled half of the engine's device path: up to N decode steps in one call, retrieval
inside the loop (the host half, which builds the calls and replays them: device_loop.py).

One `lax.while_loop` over the engine's KV cache and rows (it exits early once every row has
stopped): each iteration feeds every running row's pending tokens (a prompt or an inserted
document: a chunk of static width W, while the other rows feed their one token in the same
`extend`; an iteration where every row feeds one token runs at width 1), picks the next token as
the host step does (`step.next_token`: penalties, greedy or seeded sampling, forced tokens) and
stops a row on EOS, max_new_tokens, max_retrievals and capacity. A row that fed the query RET token
of its output stream is searched in the same iteration (`policy.device_search` over the `DeviceKB`,
its hidden state as the query; EL requests' candidates as `CandidateRows`) and its insertion
(`policy.device_follow`: EL's forced token, RAG's document tokens from the KB's token table) becomes
what it feeds next. Retrievals are recorded on device in fixed-size arrays (row ids, scores, query
vectors, positions, inserted tokens: R per row and call) and come back with the generated tokens.
The loop attends to a static window of the cache (the rows' use when the call starts, bucketed as
the host step's) and ends early, before an iteration whose feed would pass it: the host's next
call has the wider window. (A window sized for the call's worst-case growth instead made RAG calls
attend to twice the entries, and on CPU a decode step's attention costs in proportion.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from onegen_jax.inference.slots import chunk_width, put_rows, take_rows
from onegen_jax.inference.step import next_token, row_keys
from onegen_jax.inference.types import GenerationConfig, TaskTokens
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval import device_kb

# A row's stop inside the loop (index: its code; 0: none); the host finds "eos" and
# "max_new_tokens" again when it replays the tokens.
STOPS = ("", "eos", "max_new_tokens", "max_retrievals", "capacity", "error")
EOS, MAX_NEW, MAX_RETRIEVALS, CAPACITY, ERROR = range(1, len(STOPS))
# What a row did in an iteration: nothing fed, fed and took an output token, fed a query and
# retrieved, fed a query and stopped (max_retrievals, or RAG without a document).
IDLE, OUTPUT, RETRIEVED, ENDED = range(4)


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
                apart, params, kb, cache, rows: Rows, steps, window, k, records):
  """Up to `steps` (N, static) iterations over `rows` (Rows) and the donated cache, attending to
  `window` entries (the call ends before a feed that would pass them, unless the feed passes the
  capacity too: that row stops, as the host step stops it); k: hits searched per query; records
  (R): retrievals recorded per row; apart: P of `apart_rows` (0: off).
  Returns (the records, the new cache): per iteration i and row b, event int32 [N, B] (IDLE,
  OUTPUT, RETRIEVED, ENDED), token int32 [N, B], log_prob float32 [N, B], watched float32
  [N, B, w]; per row, the j-th retrieval's hit rows int32 [B, R, k] (-1: none), scores float32
  [B, R, k], query vector float32 [B, R, D], position int32 [B, R] and inserted tokens int32
  [B, R, L] with their count [B, R]; stop int32 [B] (STOPS' code), first_vector float32 [B, D]
  (the hidden state of a row's first fed chunk), iterations and fed (tokens fed) int32 []."""
  batch, width = rows.pending.shape
  b = jnp.arange(batch)
  follow_width = policy.follow_width(kb)
  out = _empty_records(steps, batch, records, k, model.config.hidden_size, follow_width,
                       len(watch))
  zeros = jnp.zeros((batch,), jnp.int32)
  state = dict(pending=rows.pending, count=rows.count, is_output=rows.is_output,
               length=rows.length, steps=rows.steps, history=rows.history,
               history_len=rows.history_len, forced_so_far=zeros, stream_len=rows.stream_len,
               retrievals=rows.retrievals, made=zeros, active=rows.count > 0)
  feed = _feeder(model, params, window, width, apart)
  search = _searcher(policy, kb, rows.candidates, k, records, follow_width)

  def body(carry):
    i, s, cache, out = carry
    full = s["active"] & (s["length"] + s["count"] > capacity)
    active = s["active"] & ~full
    count = jnp.where(active, s["count"], 0)
    final, cache = feed(dict(s, count=count), cache)
    forced_at = jnp.minimum(s["forced_so_far"], rows.force.shape[1] - 1)
    forced = jnp.where(s["forced_so_far"] < rows.force_count, rows.force[b, forced_at], -1)
    sampled, vector, log_prob, watched = next_token(
        model, vocab_size, watch, params, final,
        row_keys(seed, jnp.stack([rows.seeds, s["steps"]], axis=1)), rows.sampling, forced,
        rows.penalties, s["history"], rows.output_from)
    querying = active & s["is_output"] & (count == 1) & (s["pending"][:, 0] == query)
    over = querying & (s["retrievals"] >= max_retrievals)
    hits, scores, inserted, inserted_len = search(querying & ~over, vector, s["made"])
    missing = querying & ~over & (inserted_len == 0)  # RAG without a document
    output = active & ~querying
    token = jnp.where(forced >= 0, forced, sampled)
    stream_len = s["stream_len"] + output
    eos_stop = output & (token == eos)
    it = dict(active=active, first=active & (s["steps"] == 0), count=count, output=output,
              querying=querying, retrieved=querying & ~over & ~missing, token=token,
              forced=forced, length=s["length"] + count, stream_len=stream_len,
              stopping={CAPACITY: full, MAX_RETRIEVALS: over, ERROR: missing, EOS: eos_stop,
                        MAX_NEW: output & ~eos_stop & (stream_len >= rows.max_new)})
    found = dict(hits=hits, scores=scores, vector=vector, position=it["length"] - 1,
                 inserted=inserted, inserted_len=inserted_len)
    out = _record(out, i, s["made"], it, found, log_prob, watched)
    return i + 1, _advance(s, it, found, width), cache, out

  going = _going(steps, window, capacity)
  _, _, cache, out = jax.lax.while_loop(going, body, (jnp.int32(0), state, cache, out))
  return out, cache


def _going(steps, window, capacity):
  """The loop's condition on its carry (iteration, rows' state, ...): fewer than `steps`
  iterations, some row active, and no active row's next feed passing the window (a feed that
  passes the capacity too stops its row inside the iteration instead)."""

  def going(carry):
    s = carry[1]
    reach = s["length"] + s["count"]
    outgrown = s["active"] & (reach > window) & (reach <= capacity)
    return (carry[0] < steps) & jnp.any(s["active"]) & ~jnp.any(outgrown)

  return going


def _empty_records(steps, batch, records, k, dim, follow_width, watched) -> dict:
  """decode_loop's records before its first iteration (shapes: decode_loop's docstring)."""
  zeros = lambda shape, dtype=jnp.int32, fill=0: jnp.full(shape, fill, dtype)
  return dict(event=zeros((steps, batch)), token=zeros((steps, batch), fill=-1),
              log_prob=zeros((steps, batch), jnp.float32),
              watched=zeros((steps, batch, watched), jnp.float32),
              hits=zeros((batch, records, k), fill=-1),
              scores=zeros((batch, records, k), jnp.float32, -jnp.inf),
              vector=zeros((batch, records, dim), jnp.float32), position=zeros((batch, records)),
              inserted=zeros((batch, records, follow_width)),
              inserted_len=zeros((batch, records)), stop=zeros((batch,)),
              first_vector=zeros((batch, dim), jnp.float32), iterations=zeros(()), fed=zeros(()))


def _feeder(model, params, window, width, apart):
  """feed(s, cache) -> (the hidden state after each row's last fed token [B, D], the cache): the
  rows' pending tokens through `extend`. Every row at width 1 when each feeds one token at most;
  when some row feeds a chunk, every row at width W, or, with `apart` = P > 0 and at most P rows
  feeding chunks beside rows feeding one token, every row at width 1 and then the chunk rows
  alone at width W (P rows gathered from the cache and written back, the host step's
  prefill_apart). Each pass is a loop of 0 or 1 trips rather than a lax.cond: XLA keeps a loop's
  carried cache in place, where a cond's branches copied it."""

  def extend(tokens, length, cache):
    return model.apply({"params": params}, tokens, length, cache, window, method=Decoder.extend)

  def last_of(hidden, count):
    return hidden[jnp.arange(hidden.shape[0]), jnp.maximum(count - 1, 0)]

  def every_row(chunk: int):
    def run(s, final, cache):
      del final
      hidden, cache = extend(s["pending"][:, :chunk], s["length"], cache)
      return last_of(hidden, jnp.minimum(s["count"], chunk)), cache
    return run

  def chunk_rows(s, final, cache):
    chunked = s["count"] > 1
    rows = jnp.argsort(~chunked, stable=True)[:apart]  # the chunk rows first
    kept = jnp.where(chunked[rows], rows, chunked.shape[0])  # other rows: written nowhere
    hidden, part = extend(s["pending"][rows], s["length"][rows], take_rows(cache, rows, window))
    cache = put_rows(cache, kept, part)
    return final.at[kept].set(last_of(hidden, s["count"][rows]), mode="drop"), cache

  def feed(s, cache):
    chunked = s["count"] > 1
    wide = jnp.any(chunked)
    apart_now = (wide & jnp.any(s["count"] == 1) & (chunked.sum() <= apart) if apart
                 else jnp.zeros((), bool))
    passes = [(every_row(width), wide & ~apart_now), (every_row(1), ~wide | apart_now)]
    if apart:
      passes.append((chunk_rows, apart_now))
    hidden = jax.eval_shape(every_row(1), s, None, cache)[0]
    final = jnp.zeros(hidden.shape, hidden.dtype)
    for run, take in passes:
      _, final, cache = jax.lax.while_loop(
          lambda c: c[0], lambda c, run=run: (False, *run(s, c[1], c[2])), (take, final, cache))
    return final, cache

  return feed


def _searcher(policy, kb, candidates: device_kb.CandidateRows | None, k, records, follow_width):
  """search(searching bool [B], vectors float32 [B, D], made int32 [B]) -> (hits int32 [B, k],
  scores float32 [B, k], inserted int32 [B, L], inserted_len int32 [B]): the policy's search of
  the KB and its insertion, skipped (a lax.cond) when no row searches; `made` (retrievals so far
  in the call) picks each row's candidate list (EL)."""

  def run(vectors, made):
    restrict = None
    if candidates is not None:
      b, at = jnp.arange(made.shape[0]), jnp.minimum(made, records - 1)
      restrict = device_kb.CandidateRows(candidates.rows[b, at], candidates.restricted[b, at],
                                         candidates.bonus)
    hits, scores = policy.device_search(kb, vectors, k, restrict)
    return (hits, scores, *policy.device_follow(kb, hits[:, 0]))

  def skip(vectors, made):
    del vectors
    batch = made.shape[0]
    return (jnp.full((batch, k), -1, jnp.int32), jnp.full((batch, k), -jnp.inf, jnp.float32),
            jnp.zeros((batch, follow_width), jnp.int32), jnp.zeros((batch,), jnp.int32))

  return lambda searching, vectors, made: jax.lax.cond(jnp.any(searching), run, skip, vectors,
                                                       made)


def _record(out: dict, i, made, it: dict, found: dict, log_prob, watched) -> dict:
  """The records with iteration i written: each row's event, output token, log-prob, watched
  probabilities and stop; row b's j-th retrieval of the call (`found`) to slot (b, j), rows that
  did not retrieve writing nowhere."""
  b = jnp.arange(made.shape[0])
  slot = (b, jnp.where(it["retrieved"], made, out["hits"].shape[1]))
  stop = out["stop"]
  for code, stopping in it["stopping"].items():
    stop = jnp.where(stopping, code, stop)
  event = jnp.select([it["output"], it["retrieved"], it["querying"]],
                     [OUTPUT, RETRIEVED, ENDED], IDLE)
  return dict(
      out, stop=stop, iterations=i + 1, fed=out["fed"] + it["count"].sum(),
      first_vector=jnp.where(it["first"][:, None], found["vector"], out["first_vector"]),
      event=out["event"].at[i].set(event),
      token=out["token"].at[i].set(jnp.where(it["output"], it["token"], -1)),
      log_prob=out["log_prob"].at[i].set(log_prob), watched=out["watched"].at[i].set(watched),
      **{name: out[name].at[slot].set(value, mode="drop") for name, value in found.items()})


def _advance(s: dict, it: dict, found: dict, width: int) -> dict:
  """The rows' state after an iteration: a row that retrieved feeds its insertion next, one that
  took an output token feeds that token; a stopped row goes idle."""
  output, retrieved, token = it["output"], it["retrieved"], it["token"]
  inserted = found["inserted"]
  history = s["history"]
  if history.shape[1]:
    history = history.at[jnp.arange(token.shape[0]),
                         jnp.where(output, s["history_len"], history.shape[1])].set(
                             token, mode="drop")
  next_pending = jnp.zeros_like(s["pending"]).at[:, 0].set(token)
  stopped = jnp.any(jnp.stack(list(it["stopping"].values())), axis=0)
  return dict(
      pending=jnp.where(retrieved[:, None],
                        jnp.pad(inserted, ((0, 0), (0, width - inserted.shape[1]))),
                        jnp.where(output[:, None], next_pending, s["pending"])),
      count=jnp.where(retrieved, found["inserted_len"], jnp.where(output, 1, it["count"])),
      is_output=jnp.where(retrieved, False, s["is_output"] | output),
      length=it["length"], steps=s["steps"] + it["active"], history=history,
      history_len=s["history_len"] + output,
      forced_so_far=s["forced_so_far"] + (output & (it["forced"] >= 0)),
      stream_len=it["stream_len"], retrievals=s["retrievals"] + retrieved,
      made=s["made"] + retrieved, active=it["active"] & ~stopped)


def compiled_loop(model, vocab_size, config: GenerationConfig, policy, tokens: TaskTokens):
  """decode_loop jitted as the engine runs it: config's seed, watch, capacity and max_retrievals
  and the tokens' query and EOS bound; the cache donated; steps, window, k, records static."""
  return jax.jit(functools.partial(decode_loop, model, vocab_size, config.seed,
                                   tuple(config.watch), policy, tokens.query, tokens.eos,
                                   config.capacity, config.max_retrievals, apart_rows(config)),
                 donate_argnames="cache", static_argnames=("steps", "window", "k", "records"))


def loop_width(follow_width: int) -> int:
  """W, the chunk of every call: an insertion's width (`follow_width`), at least 16 (chunk_width
  of 2), so one compiled loop serves calls with and without chunks; a wider turn is fed by the
  host step (DeviceLoop.feeds)."""
  return chunk_width(max(2, follow_width))


def apart_rows(config: GenerationConfig) -> int:
  """P: the most rows feeding chunks that an iteration feeds apart from the rows decoding beside
  them (a quarter of the rows, at least 1; 0 without prefill_apart or with one row)."""
  return max(1, config.batch_size // 4) if config.prefill_apart and config.batch_size > 1 else 0


def records_per_call(config: GenerationConfig) -> int:
  """R: the retrievals a row may make in one call of N steps (one per two steps at most)."""
  return max(1, min((config.steps_per_dispatch + 1) // 2, config.max_retrievals))
