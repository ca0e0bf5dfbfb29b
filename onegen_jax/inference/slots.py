"""The engine's slots: one request per row of the KV cache, and moving a row's cache in and out
(sessions). Widths are bucketed so few shapes are ever compiled."""

from __future__ import annotations

import dataclasses
import functools

import jax


@dataclasses.dataclass
class Slot:
  """A busy cache row: request id, tokens to feed next, cached entries, tokens still forced,
  steps taken (for the sampling key), its output-stream tokens so far (sampled or forced; no
  insertions)."""

  rid: int
  queue: list[int]
  length: int
  force: list[int]
  steps: int = 0
  stream: list[int] = dataclasses.field(default_factory=list)


def _power_of_two(n: int, smallest: int) -> int:
  """The smallest power of two >= n, at least `smallest` (a static shape's bucket)."""
  return max(smallest, 1 << (n - 1).bit_length())


def chunk_width(n: int) -> int:
  """Static widths of a fed chunk: 1, then powers of two from 16."""
  return 1 if n == 1 else _power_of_two(n, 16)


def history_width(n: int) -> int:
  """Static widths of the penalties' token history (the longest penalised row's n tokens): 0 when
  there is none, then powers of two from 16."""
  return 0 if n == 0 else _power_of_two(n, 16)


def list_width(n: int) -> int:
  """Static widths of a padded per-row list (the device loop's forced tokens, EL candidates):
  powers of two from 16, so one shape serves every short list."""
  return _power_of_two(n, 16)


def cache_window(n: int) -> int:
  """Cache entries attended (or saved) for n used ones: a power of two from 256."""
  return _power_of_two(n, 256)


@functools.partial(jax.jit, static_argnames="window")
def save_row(cache: tuple, row: int, window: int) -> tuple:
  """The first `window` entries of one cache row: (k, v), each [L, window, K, H]."""
  return tuple(jax.lax.dynamic_index_in_dim(c, row, axis=1, keepdims=False)[:, :window]
               for c in cache)


@functools.partial(jax.jit, donate_argnums=0)
def restore_row(cache: tuple, row: int, saved: tuple) -> tuple:
  """Writes a saved row prefix (save_row) back into row `row` of the (donated) cache."""
  return tuple(jax.lax.dynamic_update_slice(c, s[:, None].astype(c.dtype), (0, row, 0, 0, 0))
               for c, s in zip(cache, saved))


@functools.partial(jax.jit, static_argnames="window")
def take_rows(cache: tuple, rows: jax.Array, window: int) -> tuple:
  """The first `window` entries of the given cache rows int32 [n]: (k, v), each [L, n, window,
  K, H] (a cache of its own, for a step over those rows alone)."""
  return tuple(c[:, rows, :window] for c in cache)


@functools.partial(jax.jit, donate_argnums=0)
def put_rows(cache: tuple, rows: jax.Array, part: tuple) -> tuple:
  """Writes the first len(rows) rows of `part` (take_rows' layout) back into rows `rows` of the
  (donated) cache."""
  n, window = rows.shape[0], part[0].shape[2]
  return tuple(c.at[:, rows, :window].set(p[:, :n].astype(c.dtype)) for c, p in zip(cache, part))
