"""Evaluating one arm: retrieval on gold context (the gold answer teacher-forced, as training
encodes it), then free generation with retrieval through the Engine, scored."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np

from benchmarks.quality.arms import Arm
from benchmarks.quality.data import DevLine, TaskData
from benchmarks.quality.minilm import (GeneratedQueries, MiniLM, RequestText, document_texts,
                                       gold_queries)
from benchmarks.quality.results import Generation, GoldRecall
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.reading import load_records
from onegen_jax.data.records import Document, Example, document_uid, read_jsonl, write_jsonl
from onegen_jax.eval.scoring import score_el, score_rag
from onegen_jax.inference.engine import Engine, GenerationConfig, RequestOutput
from onegen_jax.inference.requests import output_record, prompt_tokens, read_requests
from onegen_jax.inference.run import LoadedRun, encode_db, make_engine
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex, Index

MAX_K = 5  # the k of R@k (at most the number of documents)
RAG_MAX_RETRIEVALS = 5


@dataclasses.dataclass(frozen=True)
class GoldAnchor:
  line: int  # dev line
  position: int  # token position of the query RET token in the teacher-forced sequence
  gold: frozenset[str]  # gold document uids (in the db)
  minilm_query: str  # the pipeline's query text


@dataclasses.dataclass
class MiniLMSet:
  """The pipeline's retriever with its document index and gold-anchor query vectors."""

  model: MiniLM
  index: ExactIndex
  anchor_vectors: np.ndarray  # float32 [anchors, dim]


@dataclasses.dataclass
class EvalSet:
  """What every arm of one task is evaluated on: built once, it holds no parameters."""

  data: TaskData
  gold_lines: list[dict]  # the dev lines as written (chat-wrapped): what the scorers read
  request_texts: list[RequestText]  # per dev line
  items: list[EncodeItem]  # each dev sequence with anchors, read at them (in anchor order)
  anchors: list[GoldAnchor]
  documents: list[Document]
  texts: dict[str, str]  # document uid -> its inserted text
  max_doc_tokens: int
  minilm: MiniLMSet | None


def _gold_anchors(examples: list[Example], dev: list[DevLine], texts: list[RequestText],
                  tokenizer: TaskTokenizer,
                  seq_len: int) -> tuple[list[EncodeItem], list[GoldAnchor]]:
  """The dev sequences tokenised as training tokenises them, read at each query RET token whose
  anchor has a positive in the db."""
  task = tokenizer.task
  encoded = tokenizer.tokenize_with_roles([e.messages for e in examples], task.query_token, seq_len)
  items, anchors = [], []
  for i, (ex, enc, line, text) in enumerate(zip(examples, encoded, dev, texts)):
    found = [GoldAnchor(i, position, frozenset(document_uid(u) for u in anchor.positives), query)
             for position, anchor, query in zip(enc.rets.tolist(), ex.anchors,
                                                 gold_queries(task, line, text))
             if anchor.positives]
    if found:
      items.append(EncodeItem(enc.tokens, tuple(a.position for a in found)))
      anchors += found
  return items, anchors


def build_eval_set(data: TaskData, tokenizer: TaskTokenizer, seq_len: int,
                   minilm: MiniLM | None) -> EvalSet:
  """The task's eval set (with the MiniLM index and queries when `minilm` is given)."""
  task = data.task
  examples, _, documents, _ = load_records(task, data.dev_path, data.db_path)
  texts = [RequestText.of(task, line, tokenizer.hf.eos_token or "</s>") for line in data.dev]
  items, anchors = _gold_anchors(examples, data.dev, texts, tokenizer, seq_len)
  doc_texts = {d.uid: d.text(task) for d in documents}
  max_doc_tokens = max(len(t) for t in tokenizer.tokenize(list(doc_texts.values())))
  pipeline = None
  if minilm is not None:
    index = ExactIndex().build(minilm.embed(document_texts(task, documents)),
                               [d.uid for d in documents])
    pipeline = MiniLMSet(minilm, index, minilm.embed([a.minilm_query for a in anchors]))
  return EvalSet(data, read_jsonl(data.dev_path), texts, items, anchors, documents, doc_texts,
                 max_doc_tokens, pipeline)


class PipelineEngine(Engine):
  """The Engine of the GIT model with a separate retriever: at each query RET token the model
  emits, its hidden-state query is replaced by the MiniLM embedding of query_text(that row's
  RequestOutput); insertion / linking then proceed as in OneGen (Engine._retrieve, the engine's
  one retrieval step, does them)."""

  minilm: MiniLM
  query_text: Callable[[RequestOutput], str]

  @classmethod
  def of(cls, engine: Engine, minilm: MiniLM,
         query_text: Callable[[RequestOutput], str]) -> PipelineEngine:
    engine.__class__ = cls
    engine.minilm, engine.query_text = minilm, query_text
    return engine

  def _retrieve(self, rows, vectors, outs, queues, lengths):
    if rows:
      vectors = np.zeros((len(vectors), self.minilm.dim), np.float32)
      vectors[rows] = self.minilm.embed([self.query_text(outs[r]) for r in rows])
    super()._retrieve(rows, vectors, outs, queues, lengths)


def _self_index(eval_set: EvalSet, run: LoadedRun, args: argparse.Namespace,
                workdir: str) -> tuple[Index, np.ndarray]:
  """(an index of the db's keys encoded by the arm's model, the gold anchors' query vectors)."""
  vectors, key_uids, _, _ = encode_db(run, eval_set.data.db_path, os.path.join(workdir, "index"),
                                      rows=args.encode_rows, seq_len=args.seq_len)
  index = ExactIndex().build(np.asarray(vectors), key_uids)
  encoder = Encoder(run.model, run.mesh, rows=args.encode_rows, seq_len=args.seq_len,
                    max_reads=4 * args.encode_rows)
  return index, encoder.encode(run.params, eval_set.items)


def _hits(ranked: list[list[str]], anchors: list[GoldAnchor], k: int) -> float:
  if not anchors:
    return float("nan")
  return float(np.mean([bool(set(r[:k]) & a.gold) for r, a in zip(ranked, anchors)]))


def gold_recall(index: Index, queries: np.ndarray, anchors: list[GoldAnchor]) -> GoldRecall:
  """R@1 and R@k of the gold anchors' query vectors."""
  k = min(MAX_K, index.num_documents)
  ranked = index.search_documents(queries, k)[0] if anchors else []
  return GoldRecall(_hits(ranked, anchors, 1), _hits(ranked, anchors, k), len(anchors))


def _generation_config(eval_set: EvalSet, prompts: list[list[int]], k: int,
                       args: argparse.Namespace) -> GenerationConfig:
  """Room in the cache for the longest prompt, the new tokens and (RAG) the inserted paragraphs."""
  rag = eval_set.data.task.mode == "rag"
  max_new = eval_set.data.settings.max_new_tokens
  inserted = RAG_MAX_RETRIEVALS * (eval_set.max_doc_tokens + 8) if rag else 0
  capacity = -(-(max(len(p) for p in prompts) + max_new + inserted + 16) // 256) * 256
  return GenerationConfig(max_new_tokens=max_new,
                          max_retrievals=RAG_MAX_RETRIEVALS if rag else 1 << 30, retrieve_k=k,
                          batch_size=args.gen_batch, capacity=capacity)


def _scores(eval_set: EvalSet, records: list[dict], k: int) -> Generation:
  gold = eval_set.gold_lines
  if eval_set.data.task.mode == "el":
    s = score_el(records, gold)
    return Generation(reference_f1=s["reference_f1"], strong_f1=s["strong_f1"],
                      reference_precision=s["reference_precision"],
                      reference_recall=s["reference_recall"])
  s = score_rag(records, gold, ks=(1, k))
  sources = [line.source for line in eval_set.data.dev]
  by_set = {}
  for name in sorted(set(sources) - {""}):
    idx = [i for i, x in enumerate(sources) if x == name]
    sub = score_rag([records[i] for i in idx], [gold[i] for i in idx], ks=(1,))
    by_set[name] = {"em": sub["em"], "f1": sub["f1"]}
  return Generation(em=s["em"], f1=s["f1"], r1=s["recall@1"], r5=s[f"recall@{k}"], by_set=by_set)


def generate(eval_set: EvalSet, run: LoadedRun, index: Index, arm: Arm,
             args: argparse.Namespace, workdir: str) -> Generation:
  """Free generation with retrieval over the dev prompts; predictions in WORKDIR."""
  start = time.time()
  prompts = prompt_tokens(run, read_requests(eval_set.data.dev_path), args.seq_len)
  k = min(MAX_K, index.num_documents)
  engine = make_engine(run, index, eval_set.texts, _generation_config(eval_set, prompts, k, args))
  if arm.minilm:
    texts = dict(zip(map(tuple, prompts), eval_set.request_texts))
    engine = PipelineEngine.of(engine, eval_set.minilm.model,
                               GeneratedQueries(run.tokenizer, texts))
  # --force_first_query: each request's first output token is the query RET token (it then
  # retrieves as a generated one would).
  force = [[engine.tokens.query]] * len(prompts) if args.force_first_query else None
  outputs = engine.generate(prompts, force=force)
  records = [output_record(run, o) for o in outputs]
  write_jsonl(os.path.join(workdir, "predictions.jsonl"), records)
  scores = _scores(eval_set, records, k)
  scores.finished = sum(o.finished for o in outputs) / max(len(outputs), 1)
  scores.retrievals_per_request = sum(len(o.retrievals) for o in outputs) / max(len(outputs), 1)
  scores.generation_s = time.time() - start
  return scores


def evaluate_arm(eval_set: EvalSet, run: LoadedRun, arm: Arm, args: argparse.Namespace,
                 workdir: str) -> tuple[GoldRecall, Generation | None]:
  """Retrieval on gold context, then (unless the arm never writes) free generation, scored."""
  start = time.time()
  if arm.minilm:
    index, queries = eval_set.minilm.index, eval_set.minilm.anchor_vectors
  else:
    index, queries = _self_index(eval_set, run, args, workdir)
  gold = gold_recall(index, queries, eval_set.anchors)
  gold.retrieval_eval_s = time.time() - start
  return gold, (generate(eval_set, run, index, arm, args, workdir) if arm.writes else None)
