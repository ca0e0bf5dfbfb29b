"""KB encoding throughput: our packed Encoder against one document per padded row.

Documents (entity descriptions) of uniformly random lengths in [--min_len, --max_len] tokens
(default 40-200), each followed by its RET token, whose hidden state is the key. Same model, same
`Encoder` class, same run; only the layout differs:
- packed: `pack_for_encoding` places documents next-fit, several per row (segment ids, positions
  restarting per document), in rows of each of --packed_lens tokens (default 256, the padded
  row length, and 512, the Encoder's default);
- padded: the reference implementation's way, each document right-padded to --padded_len tokens
  so that it fills a row alone. Its RET token sees only its own document (causal attention), so
  the vectors must equal the packed ones (the largest difference is reported).
The reference pads every document to its training max_length (1100-2048 tokens); padding to 256,
just above the longest document, is the kinder baseline.

Default: the small-34m Llama on CPU, 256 documents, 3 repeats (a couple of minutes);
--preset llama-1.1b --num_docs 20000 for an accelerator.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from benchmarks import models, probes, results_md
from onegen_jax import sharding
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.encode import EncodeItem, Encoder, pack_for_encoding


def make_documents(rng: np.random.Generator, args, vocab_size: int) -> list[np.ndarray]:
  """Random token documents, each ending with the RET token (the top id)."""
  lengths = rng.integers(args.min_len, args.max_len + 1, args.num_docs)
  return [np.append(rng.integers(1, vocab_size - 1, n), vocab_size - 1).astype(np.int32)
          for n in lengths]


def packed_items(documents: list[np.ndarray]) -> list[EncodeItem]:
  """Each document as it is, read at its RET token."""
  return [EncodeItem(doc, (len(doc) - 1,)) for doc in documents]


def padded_items(documents: list[np.ndarray], row_len: int) -> list[EncodeItem]:
  """Each document right-padded (token 0) to a whole row, read at its RET token."""
  return [EncodeItem(np.pad(doc, (0, row_len - len(doc))), (len(doc) - 1,)) for doc in documents]


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small-34m")
  parser.add_argument("--dtype", default="", help="compute dtype override")
  parser.add_argument("--num_docs", type=int, default=256)
  parser.add_argument("--min_len", type=int, default=40)
  parser.add_argument("--max_len", type=int, default=200)
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--packed_lens", type=probes.parse_ints, default="256,512",
                      help="row lengths when packed (one table row each)")
  parser.add_argument("--padded_len", type=int, default=256, help="row length when padded")
  parser.add_argument("--max_reads", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  if args.max_len + 1 > min(*args.packed_lens, args.padded_len):
    parser.error("rows must hold the longest document and its RET token")
  return args


def time_layouts(args, params, encoders: dict, layouts: dict) -> tuple[dict, dict]:
  """(seconds per layout over the repeats, the vectors of each layout's last encoding)."""
  for name, (items, _) in layouts.items():
    encoders[name].encode(params, items[:args.rows])  # compiles
  seconds = {name: [] for name in layouts}
  vectors = {}
  for repeat in range(args.repeats):
    for name in sorted(layouts, reverse=repeat % 2 == 1):  # alternate the order
      elapsed, vectors[name] = probes.timed(lambda: encoders[name].encode(params, layouts[name][0]))
      seconds[name].append(elapsed)
  return seconds, vectors


def table_rows(args, layouts: dict, seconds: dict, tokens: int) -> list[list]:
  """Per layout: batch shape, entities/s, real tokens/s, slot use, seconds, speed vs padded."""
  rows = []
  for name, (items, row_len) in layouts.items():
    s = statistics.median(seconds[name])
    num_batches = sum(1 for _ in pack_for_encoding(items, args.rows, row_len, args.max_reads))
    rows.append([name, f"{args.rows} x {row_len}", len(items) / s, tokens / s,
                 f"{tokens / (num_batches * args.rows * row_len):.1%}", s])
  for row in rows:
    row.append(f"{row[2] / rows[-1][2]:.2f}x")
  return rows


def main():
  args = parse_args()
  config = models.model_config(args.preset, **({"dtype": args.dtype} if args.dtype else {}))
  model = Decoder(config)
  params = models.init_params(model, args.seed)
  documents = make_documents(np.random.default_rng(args.seed), args, config.vocab_size)
  mesh = sharding.make_mesh(data=-1)
  layouts = {f"packed {n}": (packed_items(documents), n) for n in args.packed_lens}
  layouts["padded"] = (padded_items(documents, args.padded_len), args.padded_len)
  encoders = {name: Encoder(model, mesh, rows=args.rows, seq_len=row_len, max_reads=args.max_reads)
              for name, (_, row_len) in layouts.items()}
  seconds, vectors = time_layouts(args, params, encoders, layouts)
  tokens = sum(len(d) for d in documents)
  rows = table_rows(args, layouts, seconds, tokens)
  headers = ["layout", "batch", "entities/s", "real tokens/s", "slot use", "seconds", "vs padded"]
  table = results_md.markdown_table(headers, rows)
  print(table)
  difference = max(float(np.max(np.abs(v - vectors["padded"]))) for v in vectors.values())
  print(f"max |packed - padded| = {difference:.2e}")
  if not args.no_record:
    record(args, config, params, tokens, difference, rows, table)


def record(args, config, params, tokens: int, difference: float, rows: list[list], table: str):
  notes = [
      f"Model `{args.preset}` ({models.count_params(params) / 1e6:.1f}M parameters, compute "
      f"{config.dtype}), {jax.default_backend()}.",
      f"{args.num_docs} documents, lengths uniform in [{args.min_len}, {args.max_len}] + 1 RET "
      f"token ({tokens / args.num_docs:.0f} on average); seconds: median of {args.repeats} "
      "encodings of all of them, layouts alternating.",
      "slot use: real tokens / (batches x rows x row length).",
      f"Largest |packed - padded| vector difference: {difference:.1e} (same vectors).",
  ]
  backend = jax.default_backend().upper()
  summary = [(f"KB encoding, {row[0]} vs padded {args.padded_len} ({args.preset}, {backend})",
              f"{row[-1]} ({row[2]:.1f} vs {rows[-1][2]:.1f} entities/s)") for row in rows[:-1]]
  results_md.record("encode", f"packed vs padded, {args.preset}", table, notes, summary)


if __name__ == "__main__":
  main()
