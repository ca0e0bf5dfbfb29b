"""Cost of one Engine step against the KV cache capacity, at a fixed number of cached tokens.

The Engine attends to a window of the cache (a power of two >= 256 covering the used length), but
the scanned layers still hand the stacked cache back as scan outputs, so a step may cost in
proportion to the capacity rather than to the tokens in the cache. This measures it: the Engine's
compiled step, with the window the Engine picks
(`Decoder.extend` + logits + sampling, cache donated), batch 1, feeding 1 token (decode) and a
--prefill-token chunk after --cached tokens, at each --capacities, with the layers scanned and
unrolled.

Default: the small-34m Llama on CPU (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks import common
from benchmarks.inference_onepass import special_tokens
from onegen_jax.inference.engine import Engine, GenerationConfig, _window
from onegen_jax.model.decoder import Decoder, init_cache


def step_ms(engine: Engine, width: int, cached: int, capacity: int, repeats: int) -> float:
  """Median milliseconds of one step feeding `width` tokens after `cached` ones."""
  fed = np.ones((1, width), np.int32)
  last, length = np.array([width - 1], np.int32), np.array([cached], np.int32)
  cache, key = init_cache(engine.model.config, 1, capacity), jax.random.key(0)
  times = []
  for _ in range(repeats + 1):  # the first call compiles
    start = time.perf_counter()
    token, _, cache = engine._step(engine.params, fed, length, cache, last, key,
                                      window=min(capacity, _window(cached + width)))
    np.asarray(token)
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small-34m")
  parser.add_argument("--capacities", type=common.parse_ints, default="1024,4096,16384")
  parser.add_argument("--cached", type=int, default=256, help="tokens already in the cache")
  parser.add_argument("--prefill", type=int, default=512, help="tokens of the prefill chunk")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  rows = []
  for scan in (True, False):
    model = Decoder(common.model_config(args.preset, scan_layers=scan))
    engine = Engine(model, common.init_params(model, 0), special_tokens(model.config.vocab_size),
                    None, None, GenerationConfig(batch_size=1), mode="rag")
    for capacity in args.capacities:
      rows.append(["scan" if scan else "unrolled", capacity,
                   step_ms(engine, 1, args.cached, capacity, args.repeats),
                   step_ms(engine, args.prefill, args.cached, capacity, args.repeats)])
      print(rows[-1], flush=True)
  headers = ["layers", "cache capacity", "decode ms (1 token)",
             f"prefill ms ({args.prefill} tokens)"]
  table = common.markdown_table(headers, rows)
  print(table)
  if not args.no_record:
    record(args, rows, table)


def record(args, rows: list[list], table: str) -> None:
  notes = [
      f"Model `{args.preset}`, batch 1, {args.cached} tokens already cached in every row; the "
      f"same tokens are fed at every capacity; median of {args.repeats} steps after a compile.",
      "With cost proportional to the used length, every row of a column would be about equal.",
  ]
  first, last = rows[0], rows[len(args.capacities) - 1]
  summary = [(f"Engine step, capacity {last[1]} vs {first[1]} at {args.cached} cached tokens "
              f"({args.preset}, scan, {jax.default_backend().upper()})",
              f"decode {last[2] / first[2]:.1f}x, prefill {last[3] / first[3]:.1f}x slower")]
  common.record("decode_capacity", f"step cost vs cache capacity, {args.preset}", table, notes,
                summary)


if __name__ == "__main__":
  main()
