"""Paper Figure 3: latency per dialogue round of RAG, OneGen (one pass) vs a retriever pipeline.

The setting is the paper's: a conversation of 5 rounds; in each round the user sends a query of L
tokens, the model writes 10 tokens and every retrieval inserts a 30-token document
(`<paragraph>` + 30 tokens + `</paragraph>`) into the context. L sweeps {32, ..., 1024}; the
number of retrievals per round r is swept too.

Both methods feed the same conversation through the same compiled program, the Engine's own step
(`Decoder.extend` over one KV cache of the whole conversation, logits of the last fed token,
sampling; cache donated), and search an ExactIndex over the same documents:
- OneGen: the query vector is the hidden state of the RET token, returned by the very step that
  feeds that token into the cache;
- pipeline: a separate retriever of the same architecture and size (its own random weights; the
  documents are indexed with its embeddings) encodes the query text (this round's user query and
  the tokens written so far, then a RET token) in its own forward pass with our `Encoder`; the
  vector of the generator's step is ignored.
GritLM (one model, queries re-encoded in a second pass) costs the same forward per retrieval as
this pipeline; it is not run separately.

Forced schedule: the models are randomly initialised, so the written tokens are scripted. A round's
output is 10 content tokens (the last one the end-of-turn EOS) with r RET tokens placed before
content tokens 0, 10/r, 2*10/r, ... Every step still computes the logits and samples the next
token (the cost of free generation); the script then replaces the sample. The documents inserted
are the real top-1 results of each method's own search (all documents have the same length, so
which one comes back does not change the cost). The next round's user turn starts with the EOS
that ended the previous round.

`Engine.generate` starts a fresh cache per call, so a multi-round conversation over one cache is
driven here by `Conversation`, which runs the Engine's compiled step exactly as the Engine's loop
does. Before timing each L, round 1 is also run through `Engine.generate` itself (the same script
forced with its `force=` argument) and must give the same tokens and retrievals as
`Conversation`. Both insert a retrieved document as the Engine does: its whole insertion,
`<paragraph>` + document + `</paragraph>` (`insertions`).

Default: the `tiny` preset on CPU (1-3 minutes). Larger: --preset small-34m (a ~34M-parameter
Llama) or --preset llama-1.1b for an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from benchmarks import common
from onegen_jax import sharding
from onegen_jax.inference.engine import Engine, GenerationConfig, TaskTokens, _window
from onegen_jax.model.decoder import Decoder, init_cache
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex

# (vector the generator's step returned, query text so far) -> query vector float32 [D]
QueryFn = Callable[[np.ndarray, list[int]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Round:
  """One dialogue round: the user's tokens, then what the model writes (RET tokens included)."""

  user: list[int]
  output: list[int]  # ends with EOS


def special_tokens(vocab_size: int) -> TaskTokens:
  """RET, EOS and the paragraph tags are the top 4 ids; content tokens lie below them."""
  v = vocab_size
  return TaskTokens(query=v - 1, eos=v - 2)


def paragraph_tags(vocab_size: int) -> tuple[int, int]:
  """The ids of `<paragraph>` and `</paragraph>` (see special_tokens)."""
  return vocab_size - 3, vocab_size - 4


def insertions(documents: dict[str, list[int]], vocab_size: int) -> dict[str, list[int]]:
  """Each document's insertion, what follows a query RET token that retrieved it:
  `<paragraph>` + its tokens + `</paragraph>` (the Engine's `documents(uid)`)."""
  open_tag, close_tag = paragraph_tags(vocab_size)
  return {uid: [open_tag, *doc, close_tag] for uid, doc in documents.items()}


def make_dialogue(rng: np.random.Generator, tokens: TaskTokens, vocab_size: int, rounds: int,
                  query_len: int, output_len: int, retrievals: int) -> list[Round]:
  """Random content tokens; r RET tokens evenly spread over each round's output."""
  content = lambda n: rng.integers(1, vocab_size - 4, n).tolist()
  dialogue = []
  for k in range(rounds):
    user = content(query_len) if k == 0 else [tokens.eos] + content(query_len - 1)
    written = content(output_len - 1) + [tokens.eos]
    ret_before = {i * output_len // retrievals for i in range(retrievals)}
    output = [t for i, w in enumerate(written)
              for t in ([tokens.query, w] if i in ret_before else [w])]
    dialogue.append(Round(user, output))
  return dialogue


class Conversation:
  """One conversation over one KV cache (batch 1), fed through the Engine's compiled step."""

  def __init__(self, engine: Engine, capacity: int):
    self.engine = engine
    self.cache = init_cache(engine.model.config, 1, capacity)
    self.length = np.zeros(1, np.int32)
    self.steps = 0

  def feed(self, tokens: Sequence[int]) -> np.ndarray:
    """Feeds tokens into the cache; returns the normalised hidden state of the last one.

    The step also computes the logits and samples the next token, as in `Engine.generate`; the
    caller's script decides what is fed next.
    """
    fed, last = Engine._chunk([list(tokens)], [True])
    if int(self.length[0]) + fed.shape[1] > self.cache[0].shape[2]:
      raise ValueError("the conversation does not fit the cache capacity")
    rng = jax.random.fold_in(jax.random.key(self.engine.config.seed), self.steps)
    window = min(self.cache[0].shape[2], _window(int(self.length[0]) + fed.shape[1]))
    next_token, vectors, self.cache = self.engine._step(
        self.engine.params, fed, self.length, self.cache, last, rng, window=window)
    np.asarray(next_token)  # the Engine reads the token back every step
    self.length += len(tokens)
    self.steps += 1
    return np.asarray(vectors)[0]


def run_round(conversation: Conversation, round_: Round, query: QueryFn,
              search: Callable, inserted: dict[str, list[int]]) -> tuple[list[int], list[str]]:
  """Feeds one round; returns (everything after the user turn, retrieved document uids).

  inserted: document uid -> its whole insertion (tags included), as the Engine's `documents`.
  """
  tok = conversation.engine.tokens
  conversation.feed(round_.user)
  stream, retrieved = [], []
  for i, token in enumerate(round_.output[:-1]):  # the final EOS is fed by the next round
    vector = conversation.feed([token])
    stream.append(token)
    if token == tok.query:
      ids, _ = search(query(vector, round_.user + round_.output[:i])[None], 1)
      paragraph = list(inserted[ids[0][0]])
      conversation.feed(paragraph)
      stream += paragraph
      retrieved.append(ids[0][0])
  return stream + round_.output[-1:], retrieved


def check_against_engine(engine: Engine, round_: Round, search: Callable,
                         inserted: dict[str, list[int]], capacity: int) -> None:
  """Round 1 through `Engine.generate` (the script forced: `force=`) equals `Conversation`'s
  round 1: the same tokens (insertions included), retrievals, and an EOS stop."""
  want_stream, want_ids = run_round(Conversation(engine, capacity), round_,
                                    lambda v, _: v, search, inserted)
  forced = Engine(engine.model, engine.params, engine.tokens, search, inserted.__getitem__,
                  dataclasses.replace(engine.config, max_new_tokens=len(round_.output),
                                      max_retrievals=len(want_ids)), mode="rag")
  out = forced.generate([round_.user], force=[round_.output])[0]
  got_ids = [r.ids[0] for r in out.retrievals]
  if out.tokens != want_stream or got_ids != want_ids or out.stop_reason != "eos":
    raise AssertionError(f"Conversation and Engine.generate differ on round 1 (stop reason "
                         f"{out.stop_reason!r}, {len(got_ids)} vs {len(want_ids)} retrievals)")


def build_index(encoder: Encoder, params, documents: dict[str, list[int]], ret: int) -> ExactIndex:
  """Each document embedded at a RET token after its text, as OneGen embeds documents."""
  items = [EncodeItem(np.asarray([*doc, ret], np.int32), (len(doc),)) for doc in documents.values()]
  return ExactIndex().build(encoder.encode(params, items), list(documents))


def time_in_lockstep(engine: Engine, dialogue: list[Round], methods: dict, capacity: int,
                     inserted: dict[str, list[int]]) -> dict[str, list[float]]:
  """Seconds per round of each method's own conversation (caches allocated before timing).

  The conversations advance in lockstep, round k of one method next to round k of the other,
  which goes first alternating, so both meet the same load from other jobs on the machine.
  """
  conversations = {name: Conversation(engine, capacity) for name in methods}
  jax.block_until_ready([c.cache for c in conversations.values()])
  seconds = {name: [] for name in methods}
  for k, round_ in enumerate(dialogue):
    for name in sorted(methods, reverse=k % 2 == 1):
      query, search = methods[name]
      start = time.perf_counter()
      run_round(conversations[name], round_, query, search, inserted)
      seconds[name].append(time.perf_counter() - start)
  return seconds


class TimedEncoder:
  """The pipeline's query function: encode the text with the retriever; seconds accumulate."""

  def __init__(self, encoder: Encoder, params, ret: int):
    self.encoder, self.params, self.ret, self.seconds = encoder, params, ret, 0.0

  def __call__(self, vector: np.ndarray, text: list[int]) -> np.ndarray:
    start = time.perf_counter()
    item = EncodeItem(np.asarray([*text, self.ret], np.int32), (len(text),))
    out = self.encoder.encode(self.params, [item])[0]
    self.seconds += time.perf_counter() - start
    return out


def capacity_for(args, query_len: int, retrievals: int) -> int:
  """Cache entries for the whole conversation, rounded up to a multiple of 128."""
  per_round = query_len + args.output_tokens + retrievals * (args.doc_tokens + 3)
  return -(-args.rounds * per_round // 128) * 128


def measure_length(args, setup: dict, query_len: int) -> list[list]:
  """Table rows for one query length: every retrieval count, both methods, the median round."""
  model, tokens, inserted = setup["model"], setup["tokens"], setup["inserted"]
  capacity = capacity_for(args, query_len, max(args.retrievals))
  engine = Engine(model, setup["generator"], tokens, setup["onegen_index"].search,
                  inserted.__getitem__, GenerationConfig(batch_size=1, capacity=capacity),
                  mode="rag")
  seq_len = -(-(query_len + args.output_tokens + max(args.retrievals) + 1) // 16) * 16
  encoder = Encoder(model, setup["mesh"], rows=1, seq_len=seq_len, max_reads=1)
  pipeline = TimedEncoder(encoder, setup["retriever"], tokens.query)
  methods = {"onegen": (lambda v, _: v, setup["onegen_index"].search),
             "pipeline": (pipeline, setup["pipeline_index"].search)}
  rng = np.random.default_rng([args.seed, query_len])
  warmup = make_dialogue(rng, tokens, model.config.vocab_size, 1, query_len, args.output_tokens,
                         max(args.retrievals))[0]
  # Compiles too.
  check_against_engine(engine, warmup, setup["onegen_index"].search, inserted, capacity)
  run_round(Conversation(engine, capacity), warmup, pipeline, methods["pipeline"][1], inserted)
  rows = []
  for r in args.retrievals:
    per_round = {name: [] for name in methods}
    pipeline.seconds = 0.0
    for _ in range(args.repeats):
      dialogue = make_dialogue(rng, tokens, model.config.vocab_size, args.rounds, query_len,
                               args.output_tokens, r)
      for name, seconds in time_in_lockstep(engine, dialogue, methods, capacity, inserted).items():
        per_round[name] += seconds
    onegen, piped = (statistics.median(per_round[n]) for n in ("onegen", "pipeline"))
    encode = pipeline.seconds / len(per_round["pipeline"])
    rows.append([query_len, r, 1e3 * onegen, 1e3 * piped, 1e3 * encode, piped / onegen])
    print(rows[-1], flush=True)
  return rows


def setup_models(args) -> dict:
  """Generator and retriever parameters, the documents and each method's index."""
  overrides = {"dtype": args.dtype} if args.dtype else {}
  config = common.model_config(args.preset, **overrides)
  model = Decoder(config)
  tokens = special_tokens(config.vocab_size)
  rng = np.random.default_rng(args.seed)
  documents = {f"doc{i}": rng.integers(1, config.vocab_size - 4, args.doc_tokens).tolist()
               for i in range(args.num_docs)}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  generator = common.init_params(model, args.seed)
  retriever = common.init_params(model, args.seed + 1)
  encoder = Encoder(model, mesh, rows=8, seq_len=args.doc_tokens + 1, max_reads=8)
  return {"model": model, "tokens": tokens, "documents": documents,
          "inserted": insertions(documents, config.vocab_size), "mesh": mesh,
          "generator": generator, "retriever": retriever,
          "onegen_index": build_index(encoder, generator, documents, tokens.query),
          "pipeline_index": build_index(encoder, retriever, documents, tokens.query)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", help="a benchmarks/common.py model or a preset")
  parser.add_argument("--dtype", default="", help="compute dtype override (e.g. float32 on CPU)")
  parser.add_argument("--query_lengths", type=common.parse_ints, default="32,64,128,256,512,1024")
  parser.add_argument("--retrievals", type=common.parse_ints, default="1,2,5",
                      help="retrievals per round (at most --output_tokens)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--output_tokens", type=int, default=10)
  parser.add_argument("--doc_tokens", type=int, default=30)
  parser.add_argument("--num_docs", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5, help="conversations per setting (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  if max(args.retrievals) > args.output_tokens:
    parser.error("--retrievals must not exceed --output_tokens")

  setup = setup_models(args)
  rows = [row for n in args.query_lengths for row in measure_length(args, setup, n)]
  headers = ["query tokens", "retrievals / round", "OneGen ms / round", "pipeline ms / round",
             "of which retriever ms", "pipeline / OneGen"]
  table = common.markdown_table(headers, rows)
  print(table)
  if not args.no_record:
    record(args, setup, rows, table)


def record(args, setup: dict, rows: list[list], table: str) -> None:
  """Notes and summary rows (the ratio at the corners of the sweep) for RESULTS.md."""
  config = setup["model"].config
  size = common.count_params(setup["generator"])
  notes = [
      f"Model `{args.preset}` ({size / 1e6:.1f}M parameters, compute {config.dtype}); generator "
      "and retriever the same shape, separately random-initialised; batch 1.",
      f"{args.rounds} rounds, {args.output_tokens}-token outputs, {args.doc_tokens}-token "
      f"documents (+2 tag tokens), {args.num_docs} documents in an ExactIndex; ms / round is the "
      f"median over the rounds of {args.repeats} conversations (retriever ms: the mean); OneGen "
      "and pipeline run the same conversations in lockstep (round k of one next to round k of "
      "the other, alternating which goes first), each over its own cache.",
      "Forced schedule (see the module docstring): random-init models, scripted outputs; every "
      "step computes logits and samples as in free generation. Round 1 through Engine.generate "
      "matched the driver token for token (checked for every query length).",
      "The KV cache holds the whole conversation (capacity fixed per query length); "
      "`Decoder.extend` attends over a bucketed window of it (a power of two from 256 covering "
      "the used entries), for both methods alike.",
  ]
  wanted = {(max(args.query_lengths), max(args.retrievals)),
            (max(args.query_lengths), min(args.retrievals)),
            (min(args.query_lengths), min(args.retrievals))}
  backend = jax.default_backend().upper()
  summary = [(f"pipeline / OneGen latency per round, L={row[0]}, {row[1]} ret/round "
              f"({args.preset}, {backend})", f"{row[-1]:.2f}x")
             for row in rows if (row[0], row[1]) in wanted]
  common.record("inference_onepass", f"OneGen vs pipeline, {args.preset}", table, notes, summary)


if __name__ == "__main__":
  main()
