"""Tokens/s and retrievals/s of the host engine against the device decode loop (issue 24).

  .venv/bin/python -m benchmarks.decode_loop --presets=tiny,small-34m --steps=1,8,32

N = 1 is the host engine: one compiled step per dispatch from Python, every retrieval searched on
the host (ExactIndex) and its insertion queued for the next step. N > 1 is the device loop
(inference/device_loop.py, `Engine(device=DeviceRetrieval)`): up to N steps per compiled call,
the search over the DeviceKB (device_kb.py) and the insertion inside the loop.

Workloads (per preset, random-initialised weights: benchmarks/models.py): --requests requests
submitted at once over --batch_size slots, prompts of --prompt_len tokens, each output a forced
script (`Request.force`) of --output_len content tokens ending in EOS with --retrievals query
RET tokens spread over it (every step still computes logits and samples; the script replaces the
sample). --mixed staggers them: each request writes between half and all of --output_len tokens
with its RET tokens at random places, so prompts are admitted and documents inserted while other
rows decode (continuous batching's usual state). EL: each query searches the --num_docs entity
keys and the forced token follows it; RAG: each query inserts the best document's --doc_tokens
tokens (the token table on device).
Every N runs the same requests; each pass's outputs (tokens, stop reasons, retrieval ids) must
equal the N = 1 run's, else the row is an error and is not timed. One untimed pass per engine
(compiles), then --repeats timed passes, the engines' order alternating; the median is reported.
Figures: output-stream tokens/s (insertions not counted), retrievals/s, dispatches, and the
tokens/s ratio to the host engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from benchmarks import models, probes, results_md
from onegen_jax import sharding
from onegen_jax.inference.device_loop import DeviceRetrieval
from onegen_jax.inference.engine import Engine, GenerationConfig, Request, TaskTokens
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.index import ExactIndex

WORKLOADS = ("el", "rag")
GOALS = {"tiny": 2.0, "small-34m": 1.3}  # the tokens/s goals at N = 32


@dataclasses.dataclass(frozen=True)
class Workload:
  """One task's requests and knowledge base: prompts and scripts (token ids), keys float32
  [num_docs, D] (unit rows) with their uids, and each document's insertion tokens (RAG)."""

  mode: str
  prompts: list[list[int]]
  scripts: list[list[int]]
  keys: np.ndarray
  uids: list[str]
  inserts: dict[str, list[int]]

  def insertion_tokens(self, uid: str) -> list[int]:
    """The Engine's `documents` and device_kb.insertion_table's insertion: uid -> tokens."""
    return self.inserts[uid]


def task_tokens(vocab: int) -> TaskTokens:
  """The query RET token, EOS and EL's forced token: the vocabulary's last three ids."""
  return TaskTokens(query=vocab - 1, eos=vocab - 2, force_after_query=vocab - 3)


def make_workload(args, mode: str, vocab: int, dim: int) -> Workload:
  """The requests and KB of `mode` (same seed: EL and RAG share prompts and scripts)."""
  tokens = task_tokens(vocab)
  rng = np.random.default_rng(args.seed)
  content = lambda n: rng.integers(1, vocab - 3, n).tolist()
  prompts, scripts = [], []
  for _ in range(args.requests):
    prompts.append(content(args.prompt_len))
    length = int(rng.integers(args.output_len // 2, args.output_len + 1)) if args.mixed else (
        args.output_len)
    written = content(length - 1) + [tokens.eos]
    before = ({int(i) for i in rng.choice(length - 1, args.retrievals, replace=False)}
              if args.mixed else {i * length // args.retrievals for i in range(args.retrievals)})
    scripts.append([t for i, w in enumerate(written)
                    for t in ([tokens.query, w] if i in before else [w])])
  keys = rng.standard_normal((args.num_docs, dim)).astype(np.float32)
  uids = [f"doc{i}" for i in range(args.num_docs)]
  inserts = {uid: content(args.doc_tokens) for uid in uids}
  return Workload(mode, prompts, scripts, keys / np.linalg.norm(keys, axis=1, keepdims=True),
                  uids, inserts)


def make_engine(args, model: Decoder, params, mesh, work: Workload, steps: int) -> Engine:
  """The host engine (steps 1) or the device loop at N = steps, over the same model and KB."""
  longest = max(len(p) + len(s) for p, s in zip(work.prompts, work.scripts))
  capacity = -(-(longest + args.retrievals * (args.doc_tokens + 1) + 1) // 128) * 128
  config = GenerationConfig(max_new_tokens=max(map(len, work.scripts)),
                            max_retrievals=args.retrievals, batch_size=args.batch_size,
                            capacity=capacity, retrieve_k=args.k, steps_per_dispatch=steps)
  index = ExactIndex().build(work.keys, work.uids)
  device = None
  if steps > 1:
    table = (device_kb.insertion_table(work.uids, work.insertion_tokens)
             if work.mode == "rag" else None)
    device = DeviceRetrieval.place(work.keys, work.uids, mesh, table)
  search = index.search_documents if work.mode == "rag" else index.search
  return Engine(model, params, task_tokens(model.config.vocab_size), search,
                work.insertion_tokens, config, work.mode, mesh=mesh, device=device)


def run_once(engine: Engine, work: Workload) -> dict:
  """Submits every request at once and steps the engine until all ended: seconds, dispatches,
  and what the outputs must agree on (tokens, stop reason, retrieval ids per request)."""
  start, compiled = time.perf_counter(), engine.compiled_s
  ids = [engine.submit(Request(p, force=s)) for p, s in zip(work.prompts, work.scripts)]
  dispatches = 0
  while engine.busy:
    engine.step()
    dispatches += 1
  seconds = time.perf_counter() - start
  outs = [engine.output(i) for i in ids]
  return {"seconds": seconds, "dispatches": dispatches, "compiled_s": engine.compiled_s - compiled,
          "written": sum(sum(out.generated) for out in outs),
          "retrievals": sum(len(out.retrievals) for out in outs),
          "result": [(out.tokens, out.stop_reason, [r.ids for r in out.retrievals])
                     for out in outs]}


def measure(args, engines: dict[int, Engine], work: Workload) -> dict[int, dict | str]:
  """N -> the median timed pass, or the error that replaced it (outputs unlike N = 1's)."""
  reference = run_once(engines[1], work)["result"]
  errors = {}
  for n, engine in engines.items():
    if run_once(engine, work)["result"] != reference:
      errors[n] = "error: outputs differ from N = 1"
  runs = {n: [] for n in engines if n not in errors}
  for r in range(args.repeats):
    for n in sorted(runs, reverse=r % 2 == 1):
      run = run_once(engines[n], work)
      if run["result"] != reference:
        errors[n] = "error: outputs differ from N = 1"
      runs[n].append(run)
  return {n: errors.get(n) or sorted(r, key=lambda x: x["seconds"])[len(r) // 2]
          for n, r in runs.items()} | errors


def table_rows(preset: str, mode: str, runs: dict[int, dict | str], dtype: str) -> list[list]:
  """One row per N: seconds, tokens/s, retrievals/s, dispatches, tokens/s vs N = 1, and the
  share of the time in compiled calls (dispatch included), the compute dtype."""
  host = runs[1]
  rows = []
  for n in sorted(runs):
    run = runs[n]
    engine = "host" if n == 1 else "device loop"
    if isinstance(run, str):
      rows.append([preset, mode, engine, n, run, "", "", "", "", "", dtype])
      continue
    ratio = (f"{host['seconds'] / run['seconds']:.2f}x" if isinstance(host, dict) else "")
    share = f"{100 * run['compiled_s'] / run['seconds']:.0f}%"
    rows.append([preset, mode, engine, n, run["seconds"], run["written"] / run["seconds"],
                 run["retrievals"] / run["seconds"], run["dispatches"], ratio, share, dtype])
  return rows


HEADERS = ["preset", "workload", "engine", "N", "seconds", "tokens/s", "retrievals/s",
           "dispatches", "tokens/s vs host", "in compiled calls", "dtype"]


def parse_args() -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,small-34m",
                      help="benchmarks/models.py models or presets, comma-separated")
  parser.add_argument("--steps", type=probes.parse_ints, default="1,8,32",
                      help="N per engine; 1 (the host engine, the reference) must be first")
  parser.add_argument("--workloads", default="el,rag", help="of el, rag")
  parser.add_argument("--dtypes", default="float32", help="compute dtypes (activations, KV "
                      "cache; parameters float32), comma-separated: e.g. float32,bfloat16")
  parser.add_argument("--requests", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=8, help="engine slots")
  parser.add_argument("--prompt_len", type=int, default=16, help="tokens per prompt")
  parser.add_argument("--output_len", type=int, default=64, help="written tokens per request")
  parser.add_argument("--retrievals", type=int, default=2, help="query RET tokens per request")
  parser.add_argument("--mixed", action="store_true", help="staggered requests: output lengths "
                      "from half to all of --output_len, RET tokens at random places")
  parser.add_argument("--doc_tokens", type=int, default=16, help="tokens of an inserted document")
  parser.add_argument("--num_docs", type=int, default=256, help="keys (and RAG documents)")
  parser.add_argument("--k", type=int, default=3, help="hits kept per retrieval")
  parser.add_argument("--repeats", type=int, default=3, help="timed passes per engine (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  if args.steps[0] != 1:
    parser.error("--steps must start with 1 (the host engine every N is checked against)")
  if not 1 <= args.retrievals < (args.output_len // 2 if args.mixed else args.output_len + 1):
    parser.error("--retrievals must be in 1..--output_len (with --mixed: under half of it)")
  return args


def main():
  args = parse_args()
  mesh = sharding.make_mesh(data=-1)
  rows = []
  for preset in args.presets.split(","):
    params = models.init_params(Decoder(models.model_config(preset)), args.seed)
    for dtype in args.dtypes.split(","):
      model = Decoder(models.model_config(preset, dtype=dtype))
      for mode in args.workloads.split(","):
        work = make_workload(args, mode, model.config.vocab_size, model.config.hidden_size)
        engines = {n: make_engine(args, model, params, mesh, work, n) for n in args.steps}
        rows += table_rows(preset, mode, measure(args, engines, work), dtype)
  table = results_md.markdown_table(HEADERS, rows)
  print(table)
  if not args.no_record:
    record(args, rows, table)


def record(args, rows: list[list], table: str) -> None:
  """Notes and summary rows (tokens/s ratio at the largest N per preset and workload)."""
  n = max(args.steps)
  notes = [
      f"Random-initialised weights; {args.requests} requests at once over {args.batch_size} "
      f"slots; prompts of {args.prompt_len} tokens; forced scripts of "
      f"{f'{args.output_len // 2} to ' if args.mixed else ''}{args.output_len} written "
      f"tokens (EOS last) with {args.retrievals} query RET tokens each"
      f"{' at random places' if args.mixed else ''}; greedy; "
      f"{args.num_docs} unit random keys, k={args.k}; RAG inserts {args.doc_tokens}-token "
      "documents; EL feeds its forced token.",
      "N = 1: the host engine (one dispatch per step, ExactIndex search on the host); N > 1: the "
      "device loop (DeviceKB search and insertion inside the compiled loop) on a mesh of "
      f"{len(jax.devices())} device(s). Every pass's tokens, stop reasons and retrieval ids "
      "equal the N = 1 run's (a mismatch would be an error row).",
      f"seconds: the median of {args.repeats} timed passes after one untimed pass per engine "
      "(compiles), the engines alternating; tokens/s counts output-stream tokens (RET included, "
      "insertions not).",
      "in compiled calls: the share of the pass from each compiled call's dispatch until its "
      "results were on the host (Engine.compiled_s: the call's own dispatch cost included); the "
      "rest is host work between calls (inputs, host search, bookkeeping).",
      "The machine is shared with other jobs (see the load average): compare ratios.",
  ]
  summary = []
  for row in rows:
    preset, mode, engine, steps, seconds, *_, ratio, _, dtype = row
    if steps == n and engine == "device loop":
      goal = GOALS.get(preset)
      value = ratio or seconds  # the error text when the row is one
      typed = ("" if dtype == "float32" else f", {dtype}") + (", mixed" if args.mixed else "")
      summary.append((f"tokens/s, device loop N={n} vs host, {mode.upper()} ({preset}{typed}, "
                      f"{jax.default_backend().upper()})",
                      f"{value}" + (f" (goal >= {goal}x)" if goal else "")))
  results_md.record("decode_loop", f"device loop vs host engine, {args.presets}", table, notes,
                    summary)


if __name__ == "__main__":
  main()
