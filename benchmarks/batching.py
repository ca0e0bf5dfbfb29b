"""Throughput of continuous vs static batching on a mixed-length workload, and of prefilling apart.

A continuously batched Engine (`GenerationConfig.continuous=True`) gives a slot freed by a finished
request to the next waiting request at once (its prompt prefilled while the other rows decode);
a static one (`continuous=False`) starts the next batch only when every row of the current batch
has ended, so a short request's slot idles until the longest of its batch ends. "continuous, one
call" turns `prefill_apart` off: a prompt or inserted document prefilled beside decoding rows
widens the one step of every row to its width, instead of a call of its own for the prefilling
rows plus a width-1 call for all.

Workload: --requests requests, all submitted at once, prompts of random length in --prompt_len;
outputs of very different lengths: a --long_fraction of them write a number of tokens drawn from
--long, the others from --short. The model is random-initialised, so each output is a forced
script (`Request.force`) of content tokens ending in EOS, with --retrievals RET tokens spread over
it (RAG: each inserts a --doc_tokens document found by an ExactIndex search, as in serving). Every
step still computes logits and samples (the cost of free generation); the script replaces the
sample. The modes run the same requests on their own Engine (same model, same compiled step),
after one untimed pass each (compiles); --repeats timed passes, the modes' order
alternating. Figures: requests/s, written tokens/s (output-stream tokens, insertions not
counted), engine steps and the mean time from submission to a request's end. Checked: every mode
writes every script, stops on EOS and retrieves the same documents.

Default: the `tiny` preset on CPU, 64 requests over 8 slots (about 30 s on 2 shared cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks import models, probes, results_md
from onegen_jax.inference.engine import Engine, GenerationConfig, Request, TaskTokens
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.index import ExactIndex

MODES = {"static": dict(continuous=False), "continuous, one call": dict(prefill_apart=False),
         "continuous": {}}


def parse_range(text: str) -> tuple[int, int]:
  """"4,16" -> (4, 16), both ends included."""
  low, high = probes.parse_ints(text)
  return low, high


def make_workload(args, vocab_size: int, tokens: TaskTokens) -> tuple[list[list[int]],
                                                                      list[list[int]]]:
  """(prompts, scripts): random content tokens below the 2 special ids; every script ends with
  EOS and holds --retrievals RET tokens, evenly spread."""
  rng = np.random.default_rng(args.seed)
  content = lambda n: rng.integers(1, vocab_size - 2, n).tolist()
  prompts, scripts = [], []
  for _ in range(args.requests):
    prompts.append(content(int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))))
    span = args.long if rng.random() < args.long_fraction else args.short
    n = int(rng.integers(span[0], span[1] + 1))
    written = content(n - 1) + [tokens.eos]
    ret_before = {i * n // args.retrievals for i in range(args.retrievals)}
    scripts.append([t for i, w in enumerate(written)
                    for t in ([tokens.query, w] if i in ret_before else [w])])
  return prompts, scripts


def make_engines(args, model: Decoder, params, workload) -> dict[str, Engine]:
  """One Engine per mode over the same model, index and documents."""
  vocab = model.config.vocab_size
  tokens = TaskTokens(query=vocab - 1, eos=vocab - 2)
  rng = np.random.default_rng(args.seed + 1)
  documents = {f"doc{i}": rng.integers(1, vocab - 2, args.doc_tokens).tolist()
               for i in range(args.num_docs)}
  keys = rng.standard_normal((args.num_docs, model.config.hidden_size)).astype(np.float32)
  index = ExactIndex().build(keys / np.linalg.norm(keys, axis=-1, keepdims=True), list(documents))
  prompts, scripts = workload
  longest = max(len(p) + len(s) for p, s in zip(prompts, scripts))
  capacity = -(-(longest + args.retrievals * args.doc_tokens + 1) // 128) * 128
  return {mode: Engine(model, params, tokens, index.search, documents.__getitem__,
                       GenerationConfig(max_new_tokens=max(map(len, scripts)),
                                        max_retrievals=max(args.retrievals, 1),
                                        batch_size=args.batch_size, capacity=capacity,
                                        **settings), mode="rag")
          for mode, settings in MODES.items()}


def run_once(engine: Engine, workload) -> dict:
  """Submits every request at once and steps the engine until all ended: seconds, steps, the
  mean seconds from submission to each request's end, and the outputs (in request order)."""
  prompts, scripts = workload
  start = time.perf_counter()
  ids = [engine.submit(Request(p, force=s)) for p, s in zip(prompts, scripts)]
  ended, steps = {}, 0
  while engine.busy:
    for rid in engine.step():
      ended[rid] = time.perf_counter() - start
    steps += 1
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "steps": steps, "latency": statistics.mean(ended.values()),
          "outputs": [engine.output(i) for i in ids]}


def check(runs: dict[str, dict], scripts: list[list[int]]) -> None:
  """Every mode wrote every script, stopped on EOS and retrieved the same documents."""
  retrieved = {}
  for mode, run in runs.items():
    for out, script in zip(run["outputs"], scripts):
      got = [t for t, g in zip(out.tokens, out.generated) if g]
      if got != script or out.stop_reason != "eos":
        raise AssertionError(f"{mode}: a request did not write its script ({out.stop_reason!r})")
    retrieved[mode] = [[r.ids[0] for r in out.retrievals] for out in run["outputs"]]
  if any(got != retrieved["static"] for got in retrieved.values()):
    raise AssertionError("the modes retrieved different documents")


def measure(args, engines: dict[str, Engine], workload) -> dict[str, list[dict]]:
  """One untimed pass per mode, then --repeats timed passes, the modes' order alternating."""
  check({mode: run_once(engine, workload) for mode, engine in engines.items()}, workload[1])
  runs = {mode: [] for mode in engines}
  for k in range(args.repeats):
    for mode in sorted(engines, reverse=k % 2 == 1):
      runs[mode].append(run_once(engines[mode], workload))
    check({mode: runs[mode][-1] for mode in engines}, workload[1])
  return runs


def table_rows(runs: dict[str, list[dict]], workload) -> list[list]:
  """Per mode: the median pass's figures, and its throughput against static batching."""
  prompts, scripts = workload
  written = sum(map(len, scripts))
  median = {mode: sorted(r, key=lambda run: run["seconds"])[len(r) // 2]
            for mode, r in runs.items()}
  rows = []
  for mode in MODES:
    run = median[mode]
    rows.append([mode, run["seconds"], len(prompts) / run["seconds"], written / run["seconds"],
                 run["steps"], run["latency"],
                 f"{median['static']['seconds'] / run['seconds']:.2f}x"])
  return rows


HEADERS = ["batching", "seconds", "requests/s", "written tokens/s", "engine steps",
           "mean s to a request's end", "throughput vs static"]


def parse_args() -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", help="a benchmarks/models.py model or a preset")
  parser.add_argument("--dtype", default="", help="compute dtype override")
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=8, help="engine slots")
  parser.add_argument("--prompt_len", type=parse_range, default="16,64", help="LOW,HIGH tokens")
  parser.add_argument("--short", type=parse_range, default="4,16", help="LOW,HIGH written tokens")
  parser.add_argument("--long", type=parse_range, default="128,256", help="LOW,HIGH written tokens")
  parser.add_argument("--long_fraction", type=float, default=0.2)
  parser.add_argument("--retrievals", type=int, default=1, help="RET tokens per request")
  parser.add_argument("--doc_tokens", type=int, default=32, help="tokens of an inserted document")
  parser.add_argument("--num_docs", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  if args.retrievals > args.short[0]:
    parser.error("--retrievals must not exceed the shortest output (--short)")
  return args


def main():
  args = parse_args()
  overrides = {"dtype": args.dtype} if args.dtype else {}
  model = Decoder(models.model_config(args.preset, **overrides))
  params = models.init_params(model, args.seed)
  vocab = model.config.vocab_size
  workload = make_workload(args, vocab, TaskTokens(query=vocab - 1, eos=vocab - 2))
  engines = make_engines(args, model, params, workload)
  rows = table_rows(measure(args, engines, workload), workload)
  table = results_md.markdown_table(HEADERS, rows)
  print(table)
  if not args.no_record:
    record(args, model, params, workload, rows, table)


def record(args, model: Decoder, params, workload, rows: list[list], table: str) -> None:
  """Notes and summary rows for RESULTS.md."""
  prompts, scripts = workload
  lengths = [len(s) - args.retrievals for s in scripts]
  size = models.count_params(params)
  notes = [
      f"Model `{args.preset}` ({size / 1e6:.1f}M parameters, compute {model.config.dtype}), "
      f"random-initialised; {args.batch_size} slots; greedy.",
      f"{args.requests} requests submitted at once; prompts {args.prompt_len[0]}-"
      f"{args.prompt_len[1]} tokens; written tokens (EOS included, RET not): "
      f"{args.long_fraction:.0%} drawn from {args.long[0]}-{args.long[1]}, the rest from "
      f"{args.short[0]}-{args.short[1]} (this run: {min(lengths)} to {max(lengths)}, "
      f"{sum(lengths)} in all); {args.retrievals} retrieval(s) per request, each inserting a "
      f"{args.doc_tokens}-token document (ExactIndex over {args.num_docs} random keys).",
      "Forced scripts (see the module docstring): every step computes logits and samples as in "
      "free generation; every mode wrote every script, stopped on EOS and retrieved the same "
      "documents (checked on every pass).",
      f"seconds: the median of {args.repeats} timed passes per mode after one untimed pass "
      "(compiles), the modes alternating; written tokens/s counts output-stream tokens (RET "
      "included), not prompts or insertions; mean s to a request's end: from the common "
      "submission to the step that ended it.",
  ]
  tag = (f"({args.preset}, {args.batch_size} slots, prompts {args.prompt_len[0]}-"
         f"{args.prompt_len[1]}, {args.retrievals} ret/request, {jax.default_backend().upper()})")
  by_mode = {row[0]: row for row in rows}
  summary = [(f"requests/s, continuous vs static batching, mixed lengths {tag}",
              f"{by_mode['continuous'][2]:.1f} vs {by_mode['static'][2]:.1f} "
              f"({by_mode['continuous'][6]})"),
             (f"written tokens/s, continuous vs static batching, mixed lengths {tag}",
              f"{by_mode['continuous'][3]:,.0f} vs {by_mode['static'][3]:,.0f}"),
             (f"requests/s, prefilling apart vs in one call, continuous batching {tag}",
              f"{by_mode['continuous'][2]:.1f} vs {by_mode['continuous, one call'][2]:.1f} "
              f"({by_mode['continuous, one call'][1] / by_mode['continuous'][1]:.2f}x)")]
  results_md.record("batching", f"continuous vs static, {args.preset}, {args.requests} requests",
                table, notes, summary)


if __name__ == "__main__":
  main()
