"""One engine step's feed: every busy cache row's queued tokens through the compiled step.

Either one call at the widest queue's (bucketed) width, or, when rows prefill (a prompt, an
inserted document) beside rows that decode and it costs fewer fed token slots, "prefill apart":
the prefilling rows in a call of their own on a copy of their cache rows, and every row in a
width-1 call. One call at width W costs every row W token slots: with 32 slots and 100-200-token
prompts that was 5.9x slower than prefilling apart (benchmarks/batching.py, RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from onegen_jax.inference.slots import cache_window, history_width, put_rows, take_rows

# A row's penalties, in Feed.penalties' order (Request / GenerationConfig fields), and their
# "off" values.
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")
NO_PENALTY = (0.0, 0.0, 1.0)


@dataclasses.dataclass
class Feed:
  """One step's inputs, by cache row (B rows): tokens int32 [B, W] (each row's queue, zero-padded;
  an idle row is fed nothing that is kept), queued int32 [B] (queue lengths, 0: idle), lengths
  int32 [B] (cached entries), counters int32 [B, 2], sampling float32 [B, 2], forced int32 [B],
  penalties float32 [B, 3], history int32 [B, H], output_from int32 [B] (as step_fn takes them)."""

  tokens: np.ndarray
  queued: np.ndarray
  lengths: np.ndarray
  counters: np.ndarray
  sampling: np.ndarray
  forced: np.ndarray
  penalties: np.ndarray
  history: np.ndarray
  output_from: np.ndarray

  def rows(self, rows: np.ndarray) -> Feed:
    """The inputs of the given rows only (copies)."""
    return Feed(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def penalty_inputs(rows: Sequence[tuple[tuple[float, float, float], Sequence[int],
                                        Sequence[int]] | None]) -> dict[str, np.ndarray]:
  """Feed's penalty fields from each cache row's (penalties in PENALTIES' order, prompt, output
  stream) (None: idle): penalties float32 [B, 3]; history int32 [B, H] (-1 padded; H bucketed,
  0 when no row has a penalty): the prompt (only with a repetition penalty) then the output
  stream's tokens, which start at output_from int32 [B] (inserted documents are in neither)."""
  penalties = np.tile(np.asarray(NO_PENALTY, np.float32), (len(rows), 1))
  output_from = np.zeros(len(rows), np.int32)
  seen = {}
  for r, row in enumerate(rows):
    if row is None or tuple(row[0]) == NO_PENALTY:
      continue
    penalties[r] = row[0]
    prompt = row[1] if penalties[r, 2] != 1 else []
    seen[r], output_from[r] = [*prompt, *row[2]], len(prompt)
  history = np.full((len(rows), history_width(max(map(len, seen.values()), default=0))), -1,
                    np.int32)
  for r, tokens in seen.items():
    history[r, :len(tokens)] = tokens
  return dict(penalties=penalties, history=history, output_from=output_from)


def rows_apart(queued: np.ndarray, width: int) -> tuple[np.ndarray, int] | None:
  """(rows int32 [n], k) for prefilling apart: the k rows queueing more than one token first,
  then idle or decoding rows as padding up to a power of two (few compiled shapes); None when one
  call at `width` costs no more token slots. (On a mesh, a row count that the row split does not
  divide is replicated, as `cache_sharding` lays out any such cache.)"""
  prefilling = np.flatnonzero(queued > 1)
  rows, k = len(queued), len(prefilling)
  n = 1 << (k - 1).bit_length() if k else rows
  decoding = np.any(queued == 1)
  if n >= rows or n * width + (rows if decoding else 0) >= rows * width:
    return None
  others = sorted(np.flatnonzero(queued <= 1), key=lambda r: queued[r])  # idle rows first
  return np.asarray([*prefilling, *others[:n - k]], np.int32), k


def feed(step: Callable, params, cache: tuple, batch: Feed, capacity: int,
         apart: tuple[np.ndarray, int] | None = None) -> tuple[list[np.ndarray], tuple]:
  """([next token [B], vector [B, D], log-prob [B], watched log-probs [B, w]], new cache) after
  feeding `batch` through `step` (the engine's compiled step_fn, donating the cache); apart:
  rows_apart's choice, or None for one call."""
  if apart is None:
    return _call(step, params, cache, batch, capacity)
  rows, k = apart
  prefilling = rows[:k]
  merged = None
  if np.any(batch.queued == 1):
    # Rows decode beside them: every row at width 1, the prefilling ones fed a placeholder past
    # their length, which their own call below overwrites.
    single = dataclasses.replace(batch, tokens=batch.tokens[:, :1].copy(),
                                 queued=np.minimum(batch.queued, 1))
    single.tokens[prefilling] = 0
    merged, cache = _call(step, params, cache, single, capacity)
  part = batch.rows(rows)
  part.tokens[k:], part.queued[k:], part.lengths[k:] = 0, 0, 0  # padding: nothing kept
  own = take_rows(cache, rows, _window(part, capacity))
  pieces, own = _call(step, params, own, part, capacity)
  cache = put_rows(cache, prefilling, own)
  if merged is None:
    merged = [np.zeros((len(batch.queued), *x.shape[1:]), x.dtype) for x in pieces]
  for whole, piece in zip(merged, pieces):
    whole[prefilling] = piece[:k]
  return merged, cache


def _call(step: Callable, params, cache: tuple, batch: Feed,
          capacity: int) -> tuple[list[np.ndarray], tuple]:
  """One compiled call over the cache's rows, attending to a bucketed window."""
  *results, cache = step(params, batch.tokens, batch.lengths, cache,
                         np.maximum(batch.queued - 1, 0), batch.counters, batch.sampling,
                         batch.forced, batch.penalties, batch.history, batch.output_from,
                         window=_window(batch, capacity))
  return [np.array(x) for x in jax.device_get(results)], cache  # writable: feed merges


def _window(batch: Feed, capacity: int) -> int:
  """The cache entries a call over `batch` attends to: its rows' longest use, bucketed."""
  return min(capacity, cache_window(int(batch.lengths.max()) + batch.tokens.shape[1]))
