"""Paper Figure 3: latency per dialogue round of RAG, OneGen (one pass) vs a retriever pipeline.

The setting is the paper's: a conversation of 5 rounds; in each round the user sends a query of L
tokens, the model writes 10 tokens and every retrieval inserts a 30-token document
(`<paragraph>` + 30 tokens + `</paragraph>`) into the context. L sweeps {32, ..., 1024}; the
number of retrievals per round r is swept too.

Both methods run the same conversations through the Engine's public API, each on its own Engine
(same model, same compiled step, batch 1): round 1 is `submit(Request(user, force=script,
keep_session=True))`, every later round `continue_session(previous, user, force=script)`, which
goes on over the kept KV cache of the whole conversation; each round is timed from its submit to
the end of `run`. Both search an ExactIndex over the same documents:
- OneGen: the query vector is the hidden state of the RET token, returned by the very step that
  feeds that token into the cache;
- pipeline: a separate retriever of the same architecture and size (its own random weights; the
  documents are indexed with its embeddings) encodes the query text (this round's user turn and
  the tokens written so far, then a RET token) in its own forward pass with our `Encoder`,
  through the Engine's `query_vectors` hook; the generator's vector is not searched.
GritLM (one model, queries re-encoded in a second pass) costs the same forward per retrieval as
this pipeline; it is not run separately.

Forced schedule: the models are randomly initialised, so the written tokens are scripted
(`Request.force`). A round's output is 10 content tokens (the last one the end-of-turn EOS) with r
RET tokens placed before content tokens 0, 10/r, 2*10/r, ... Every step still computes the logits
and samples the next token (the cost of free generation); the script then replaces the sample.
The documents inserted are the real top-1 results of each method's own search (all documents
have the same length, so which one comes back does not change the cost). A continued round feeds
the EOS that ended the previous round, then a user turn of L - 1 tokens: L tokens in every round
(an L + 1 chunk would double the Engine's bucketed chunk width at every power-of-two L).

Checked for every round (outside the timed interval): the output is the script with each RET
token followed by the insertion of the document its search returned, it stopped on EOS, and each
retrieval is the top-1 of the method's index for the vector that method searched with.

Work bound: per round OneGen feeds q user + D document + G written tokens (G counts the RET
tokens); the pipeline also encodes each query text, about q tokens per retrieval, so its work is
at most (2q+D+G)/(q+D+G) of OneGen's with one retrieval per round (in general (q+D+G+E)/(q+D+G),
E the tokens the retriever encodes in the round). Both are printed next to the measured ratio.

Default: the `tiny` preset on CPU (about 6 minutes on 2 cores shared with two other jobs).
Larger: --preset small-34m (a ~34M-parameter Llama) or --preset llama-1.1b for an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import numpy as np

from benchmarks import models, probes, results_md
from benchmarks.onepass_dialogue import (Method, Pipeline, insertions, make_dialogue,
                                         special_tokens, time_in_lockstep)
from onegen_jax import sharding
from onegen_jax.inference.device_loop import DeviceRetrieval
from onegen_jax.inference.engine import Engine, GenerationConfig
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex


def build_index(encoder: Encoder, params, documents: dict[str, list[int]],
                ret: int) -> tuple[ExactIndex, np.ndarray]:
  """Each document embedded at a RET token after its text, as OneGen embeds documents: (the
  index, its vectors [documents, D])."""
  items = [EncodeItem(np.asarray([*doc, ret], np.int32), (len(doc),)) for doc in documents.values()]
  vectors = encoder.encode(params, items)
  return ExactIndex().build(vectors, list(documents)), vectors


def onegen_kb(setup: dict) -> DeviceRetrieval:
  """OneGen's index as the device loop's KB on the benchmark's mesh, each document's insertion
  (the Engine's `documents`) in its token table."""
  uids = list(setup["documents"])
  table = device_kb.insertion_table(uids, setup["inserted"].__getitem__)
  return DeviceRetrieval.place(setup["onegen_vectors"], uids, setup["mesh"], table)


def round_tokens(args, query_len: int, retrievals: int) -> tuple[int, int, int]:
  """(q, D, G) of one round: user tokens, inserted tokens, written tokens (RET tokens counted)."""
  return query_len, retrievals * (args.doc_tokens + 2), args.output_tokens + retrievals


def capacity_for(args, query_len: int, retrievals: int) -> int:
  """Cache entries for the whole conversation, a multiple of 128."""
  per_round = sum(round_tokens(args, query_len, retrievals))
  return -(-args.rounds * per_round // 128) * 128


def make_methods(args, setup: dict, query_len: int) -> dict[str, Method]:
  """Both arms' engines (batch 1, a cache for the whole conversation) at one query length."""
  model, tokens, inserted = setup["model"], setup["tokens"], setup["inserted"]
  r = max(args.retrievals)
  config = GenerationConfig(batch_size=1, capacity=capacity_for(args, query_len, r),
                            max_new_tokens=args.output_tokens + r, max_retrievals=r)
  seq_len = -(-(query_len + args.output_tokens + r + 1) // 16) * 16
  encoder = Encoder(model, setup["mesh"], rows=1, seq_len=seq_len, max_reads=1)
  pipeline = Pipeline(encoder, setup["retriever"], tokens.query, query_len)
  methods = {}
  steps = args.steps_per_dispatch
  for name, index, hook in (("onegen", setup["onegen_index"], None),
                            ("pipeline", setup["pipeline_index"], pipeline)):
    device = onegen_kb(setup) if name == "onegen" and steps > 1 else None
    engine = Engine(model, setup["generator"], tokens, index.search, inserted.__getitem__,
                    dataclasses.replace(config, steps_per_dispatch=steps) if device else config,
                    mode="rag", query_vectors=hook, mesh=setup["mesh"] if device else None,
                    device=device)
    methods[name] = Method(engine, index, hook)
  return methods


def measure_length(args, setup: dict, query_len: int) -> list[list]:
  """Table rows for one query length: every retrieval count, both methods, the median round."""
  methods, inserted = make_methods(args, setup, query_len), setup["inserted"]
  pipeline, vocab = methods["pipeline"].pipeline, setup["model"].config.vocab_size
  rng = np.random.default_rng([args.seed, query_len])
  dialogue = lambda r: make_dialogue(rng, setup["tokens"], vocab, args.rounds, query_len,
                                     args.output_tokens, r)
  for r in args.retrievals:  # compiles every chunk width and cache window the timing meets
    time_in_lockstep(methods, dialogue(r), inserted)
  rows = []
  for r in args.retrievals:
    per_round = {name: [] for name in methods}
    pipeline.seconds, pipeline.encoded = 0.0, 0
    for _ in range(args.repeats):
      for name, seconds in time_in_lockstep(methods, dialogue(r), inserted).items():
        per_round[name] += seconds
      pipeline.searched.clear()
    rounds = len(per_round["pipeline"])
    onegen, piped = (statistics.median(per_round[n]) for n in ("onegen", "pipeline"))
    rows.append(table_row(args, query_len, r, onegen, piped, pipeline.seconds / rounds,
                          pipeline.encoded / rounds))
    print(rows[-1], flush=True)
  return rows


def table_row(args, query_len: int, r: int, onegen: float, piped: float, encode: float,
              encoded: float) -> list:
  """One row: times in ms, the measured ratio, both work bounds and how much of the bound's
  extra the measurement shows ((ratio - 1) / (bound - 1), against the bound with E)."""
  q, d, g = round_tokens(args, query_len, r)
  bound = (2 * q + d + g) / (q + d + g)
  bound_e = (q + d + g + encoded) / (q + d + g)
  ratio = piped / onegen
  return [query_len, r, 1e3 * onegen, 1e3 * piped, 1e3 * encode, ratio, bound, bound_e,
          f"{100 * (ratio - 1) / (bound_e - 1):.0f}%"]


def setup_models(args) -> dict:
  """Generator and retriever parameters, the documents and each method's index."""
  overrides = {"dtype": args.dtype} if args.dtype else {}
  config = models.model_config(args.preset, **overrides)
  model = Decoder(config)
  tokens = special_tokens(config.vocab_size)
  rng = np.random.default_rng(args.seed)
  documents = {f"doc{i}": rng.integers(1, config.vocab_size - 4, args.doc_tokens).tolist()
               for i in range(args.num_docs)}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  generator = models.init_params(model, args.seed)
  retriever = models.init_params(model, args.seed + 1)
  encoder = Encoder(model, mesh, rows=8, seq_len=args.doc_tokens + 1, max_reads=8)
  return {"model": model, "tokens": tokens, "documents": documents,
          "inserted": insertions(documents, config.vocab_size), "mesh": mesh,
          "generator": generator, "retriever": retriever,
          **dict(zip(("onegen_index", "onegen_vectors"),
                     build_index(encoder, generator, documents, tokens.query))),
          "pipeline_index": build_index(encoder, retriever, documents, tokens.query)[0]}


HEADERS = ["query tokens q", "retrievals / round", "OneGen ms / round", "pipeline ms / round",
           "of which retriever ms", "pipeline / OneGen", "bound (2q+D+G)/(q+D+G)",
           "bound (q+D+G+E)/(q+D+G)", "share of the bound's extra"]


def parse_args() -> argparse.Namespace:
  """The command line."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", help="a benchmarks/models.py model or a preset")
  parser.add_argument("--dtype", default="", help="compute dtype override (e.g. float32 on CPU)")
  parser.add_argument("--query_lengths", type=probes.parse_ints, default="32,64,128,256,512,1024")
  parser.add_argument("--retrievals", type=probes.parse_ints, default="1,2,5",
                      help="retrievals per round (at most --output_tokens)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--output_tokens", type=int, default=10)
  parser.add_argument("--doc_tokens", type=int, default=30)
  parser.add_argument("--num_docs", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5, help="conversations per setting (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps_per_dispatch", type=int, default=1,
                      help="OneGen's engine: N > 1 runs the device decode loop (the pipeline, "
                      "whose retriever is a second model, stays on the host engine)")
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  if max(args.retrievals) > args.output_tokens:
    parser.error("--retrievals must not exceed --output_tokens")
  return args


def main():
  args = parse_args()
  setup = setup_models(args)
  rows = [row for n in args.query_lengths for row in measure_length(args, setup, n)]
  table = results_md.markdown_table(HEADERS, rows)
  print(table)
  if not args.no_record:
    record(args, setup, rows, table)


def record(args, setup: dict, rows: list[list], table: str) -> None:
  """Notes and summary rows (the ratio at the corners of the sweep) for RESULTS.md."""
  config = setup["model"].config
  size = models.count_params(setup["generator"])
  notes = [
      f"Model `{args.preset}` ({size / 1e6:.1f}M parameters, compute {config.dtype}); generator "
      "and retriever the same shape, separately random-initialised; batch 1.",
      f"{args.rounds} rounds, {args.output_tokens}-token outputs, {args.doc_tokens}-token "
      f"documents (+2 tag tokens), {args.num_docs} documents in an ExactIndex; ms / round is the "
      f"median over the rounds of {args.repeats} conversations (retriever ms: the mean); OneGen "
      "and pipeline run the same conversations in lockstep (round k of one next to round k of "
      "the other, alternating which goes first), each on its own Engine.",
      "Driven through the Engine's public API only: round 1 `submit(Request(user, force=script, "
      "keep_session=True))`, later rounds `continue_session(previous, user, force=script)` over "
      "the kept cache (a round's time includes restoring and saving the session's cache row); "
      "the pipeline's retriever runs in the `query_vectors` hook. Every round was checked: its "
      "script written, each RET followed by the insertion retrieved, an EOS stop, and each "
      "retrieval the index's top 1 for the vector searched.",
      "Bounds: q user tokens, D = r x (document + 2 tags), G = output tokens + r RET tokens per "
      "round; E = tokens the retriever encoded per round (measured: q + the stream before each "
      "RET + 1, per retrieval). Share of the bound's extra = (ratio - 1) / (bound with E - 1).",
      "The KV cache holds the whole conversation (capacity fixed per query length); each step "
      "attends over a bucketed window of it (a power of two from 256 covering the used "
      "entries), for both methods alike.",
  ]
  wanted = {(max(args.query_lengths), max(args.retrievals)),
            (max(args.query_lengths), min(args.retrievals)),
            (min(args.query_lengths), min(args.retrievals))}
  backend = jax.default_backend().upper()
  loop = (f", OneGen's device loop N={args.steps_per_dispatch}" if args.steps_per_dispatch > 1
          else "")
  if loop:
    notes.append(f"OneGen ran the device decode loop, up to {args.steps_per_dispatch} steps per "
                 "dispatch with search and insertion on the device (the host engine's results: "
                 "tests/test_device_loop.py); the pipeline the host engine, one step per "
                 "dispatch (its retriever is a second model in the query_vectors hook), so the "
                 "ratio also holds the dispatch overhead OneGen no longer pays.")
  summary = [(f"pipeline / OneGen latency per round, L={row[0]}, {row[1]} ret/round "
              f"({args.preset}, {backend}{loop})",
              f"{row[5]:.2f}x (bound {row[7]:.2f}x: {row[5] / row[7]:.2f} of it)")
             for row in rows if (row[0], row[1]) in wanted]
  results_md.record("inference_onepass", f"OneGen vs pipeline, {args.preset}{loop}", table, notes,
                    summary)


if __name__ == "__main__":
  main()
