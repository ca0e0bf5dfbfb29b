"""Cost of one cached decode / prefill step against the KV cache capacity, at a fixed number of
cached tokens.

A step attends to a window of the cache (a power of two >= 256 covering the used length, as the
Engine picks it) and writes its new keys and values into the cache; with the cache updated in
place (a donated buffer), its cost should follow the tokens in the cache, not the capacity. This
measures it through `Decoder.extend` itself: a jitted step (extend + the last token's logits +
argmax, the cache donated), batch 1, feeding 1 token (decode) and a --prefill-token chunk after
--cached tokens, at each --capacities (taking turns step by step), with the layers scanned and
unrolled.

Default: the small-34m Llama on CPU (about a minute).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import models, probes, results_md
from onegen_jax.model.decoder import Decoder, init_cache


def window(used: int) -> int:
  """Cache entries attended for `used` ones: a power of two from 256 (the Engine's buckets)."""
  return max(256, 1 << (used - 1).bit_length())


def _step_fn(model: Decoder, params, tokens, cache_len, cache, window=None):
  """tokens [B, T] after cache_len [B] -> (greedy next token [B], updated cache)."""
  hidden, cache = model.apply({"params": params}, tokens, cache_len, cache, window,
                              method=Decoder.extend)
  logits = model.apply({"params": params}, hidden[:, -1:], method=Decoder.logits)[:, 0]
  return jnp.argmax(logits, axis=-1), cache


def make_step(model: Decoder):
  """The jitted step: the cache (argument 3) is donated, `window` static."""
  return jax.jit(functools.partial(_step_fn, model), donate_argnums=(3,),
                 static_argnames="window")


def step_ms(step, model: Decoder, params, width: int, cached: int, capacities: list[int],
            repeats: int) -> list[float]:
  """Median milliseconds of one step feeding `width` tokens after `cached` ones, per capacity.

  The capacities take turns step by step, so a change in the machine's load (it is shared) hits
  every capacity alike."""
  fed = np.ones((1, width), np.int32)
  length = np.array([cached], np.int32)
  caches = {c: init_cache(model.config, 1, c) for c in capacities}
  times = {c: [] for c in capacities}
  for _ in range(repeats + 1):  # the first call of each capacity compiles
    for c in capacities:
      start = time.perf_counter()
      token, caches[c] = step(params, fed, length, caches[c], window=min(c, window(cached + width)))
      np.asarray(token)
      times[c].append(time.perf_counter() - start)
  return [1e3 * statistics.median(times[c][1:]) for c in capacities]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small-34m")
  parser.add_argument("--capacities", type=probes.parse_ints, default="1024,4096,16384")
  parser.add_argument("--cached", type=int, default=256, help="tokens already in the cache")
  parser.add_argument("--prefill", type=int, default=512, help="tokens of the prefill chunk")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  rows = []
  for scan in (True, False):
    model = Decoder(models.model_config(args.preset, scan_layers=scan))
    params, step = models.init_params(model, 0), make_step(model)
    decode = step_ms(step, model, params, 1, args.cached, args.capacities, args.repeats)
    prefill = step_ms(step, model, params, args.prefill, args.cached, args.capacities,
                      args.repeats)
    for row in zip(args.capacities, decode, prefill):
      rows.append(["scan" if scan else "unrolled", *row])
      print(rows[-1], flush=True)
  headers = ["layers", "cache capacity", "decode ms (1 token)",
             f"prefill ms ({args.prefill} tokens)"]
  table = results_md.markdown_table(headers, rows)
  print(table)
  if not args.no_record:
    record(args, rows, table)


def record(args, rows: list[list], table: str) -> None:
  notes = [
      f"Model `{args.preset}`, batch 1, {args.cached} tokens already cached in every row; the "
      f"same tokens are fed at every capacity; median of {args.repeats} steps after a compile, the "
      "capacities taking turns step by step. "
      "Measured through a jitted `Decoder.extend` step (+ logits and argmax of the last token) "
      "that donates the cache, attending to the Engine's window.",
      "With cost proportional to the used length, every row of a column would be about equal.",
  ]
  first, last = rows[0], rows[len(args.capacities) - 1]
  summary = [(f"Decode/prefill step (Decoder.extend, cache donated), capacity {last[1]} vs "
              f"{first[1]} at {args.cached} cached tokens "
              f"({args.preset}, scan, {jax.default_backend().upper()})",
              f"decode {last[2] / first[2]:.2f}x, prefill {last[3] / first[3]:.2f}x")]
  results_md.record("decode_capacity", f"step cost vs cache capacity, {args.preset}", table, notes,
                summary)


if __name__ == "__main__":
  main()
