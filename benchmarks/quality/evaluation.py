"""Evaluating one arm: retrieval on gold context (ranking.py: among each query's candidates, in the
pool, in the whole db), then free one-pass generation with retrieval through the Engine, scored.

The retrievers: an arm's own RET hidden states (the gold answer teacher-forced as training
encodes it; documents encoded as training encoded them), MiniLM-L6 or BM25 over the query texts of
minilm.py, or the candidate prior. The MiniLM pipeline generates with the arm's model and
replaces each query RET token's hidden state by the MiniLM embedding of its query text (the
Engine's `query_vectors` hook); insertion / linking then proceed as for OneGen.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from benchmarks.quality import ranking
from benchmarks.quality.arms import Arm
from benchmarks.quality.data import TaskData
from benchmarks.quality.lexical import BM25
from benchmarks.quality.minilm import (GeneratedQueries, MiniLM, RequestText, document_texts,
                                       gold_queries)
from benchmarks.quality.ranking import DocScores, GoldAnchor
from benchmarks.quality.results import Generation, GoldRecall
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.reading import load_documents, load_records
from onegen_jax.data.records import Document, Example, document_uid, read_jsonl, write_jsonl
from onegen_jax.eval.scoring import score_el, score_rag
from onegen_jax.inference.engine import GenerationConfig
from onegen_jax.inference.requests import output_record, prompt_tokens, read_requests
from onegen_jax.inference.prior import PriorFit, fit_prior
from onegen_jax.inference.run_dir import LoadedRun, encode_db, make_engine
from onegen_jax.retrieval.candidates import CandidateScorer
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex, Index

RAG_MAX_RETRIEVALS = 5
_ROUND = 128  # row lengths of gold-sequence encoding are rounded up to this
# ... and of documents: short rows, since encode_db reads at most 4 x rows keys a batch
_DOC_ROUND = 64


@dataclasses.dataclass
class EvalSet:
  """What every arm of one task is evaluated on: built once, it holds no parameters."""

  data: TaskData
  gold_lines: list[dict]  # the dev lines as written (chat-wrapped): what the scorers read
  request_texts: list[RequestText]  # per dev line
  items: list[EncodeItem]  # each dev sequence with gold anchors, read at them (anchor order)
  anchors: list[GoldAnchor]
  pool: list[Document]
  kb: list[Document]  # the whole db ([] when not evaluated)
  texts: dict[str, str]  # pool document uid -> its inserted text
  max_doc_tokens: int  # of the longest inserted text
  doc_len: int  # row length of document encoding: holds the longest document row, uncut
  encode_len: int  # row length that holds the longest dev sequence
  k: int
  cache: dict = dataclasses.field(default_factory=dict)  # baseline indexes, built once


def _gold_anchors(examples: list[Example], lines: list[dict], texts: list[RequestText],
                  data: TaskData, tokenizer: TaskTokenizer) -> tuple[list[EncodeItem],
                                                                     list[GoldAnchor]]:
  """The dev sequences tokenised as training tokenises them (uncut), read at each query RET
  token whose anchor has a gold document in the pool."""
  task = tokenizer.task
  encoded = tokenizer.tokenize_with_roles([e.messages for e in examples], task.query_token, 1 << 30)
  items, anchors = [], []
  for i, (ex, enc, line, text) in enumerate(zip(examples, encoded, lines, texts)):
    queries, candidates = gold_queries(task, data.dev[i], text), line["candidates"]
    if len(queries) != len(ex.anchors) or len(candidates) != len(ex.anchors):
      raise ValueError(f"{data.dev_path}:{i + 1}: {len(ex.anchors)} query RET tokens, "
                       f"{len(queries)} query texts, {len(candidates)} candidate lists")
    found = [GoldAnchor(i, position, frozenset(document_uid(u) for u in anchor.positives),
                        tuple(document_uid(u) for u in candidates[j]), queries[j])
             for j, (position, anchor) in enumerate(zip(enc.rets.tolist(), ex.anchors))
             if anchor.positives]
    if found:
      items.append(EncodeItem(enc.tokens, tuple(a.position for a in found)))
      anchors += found
  return items, anchors


def build_eval_set(data: TaskData, tokenizer: TaskTokenizer, k: int) -> EvalSet:
  """The task's eval set: dev lines, gold anchors, pool (and whole db) documents."""
  task = data.task
  examples, _, pool, _ = load_records(task, data.dev_path, data.pool_path)
  lines = read_jsonl(data.dev_path)
  texts = [RequestText.of(task, line, tokenizer.hf.eos_token or "</s>") for line in data.dev]
  items, anchors = _gold_anchors(examples, lines, texts, data, tokenizer)
  doc_texts = {d.uid: d.text(task) for d in pool}
  kb = load_documents(task, data.kb_path)[0] if data.kb_path else []
  rows = tokenizer.tokenize_with_roles([d.messages for d in pool + kb], task.doc_token, 1 << 30)
  round_up = lambda n, m: -(-n // m) * m
  return EvalSet(data, lines, texts, items, anchors, pool, kb, doc_texts,
                 max(len(t) for t in tokenizer.tokenize(list(doc_texts.values()))),
                 round_up(max(len(r.tokens) for r in rows), _DOC_ROUND),
                 round_up(max([len(i.tokens) for i in items] + [data.settings.seq_len]), _ROUND),
                 k)


def _recall(scores: DocScores | None, kb: DocScores | None, eval_set: EvalSet,
            among_candidates: DocScores | None = None) -> GoldRecall:
  """The figures of one retriever's scores on the pool (and the whole db), and R@1 per source
  set of the dev lines; among_candidates: other scores for the figures among each query's
  candidates (the candidate prior's)."""
  anchors, k = eval_set.anchors, eval_set.k
  out = GoldRecall(anchors=len(anchors), gold_in_candidates=ranking.gold_in_candidates(anchors))
  if scores is not None:
    cand = scores if among_candidates is None else among_candidates
    out.cand_r1, out.cand_rk = (ranking.hits(cand, anchors, n, True) for n in (1, k))
    out.pool_r1, out.pool_rk = (ranking.hits(scores, anchors, n, False) for n in (1, k))
    sets = [eval_set.data.dev[a.line].source for a in anchors]
    for name in sorted(set(sets) - {""}):
      rows = [i for i, s in enumerate(sets) if s == name]
      sub_anchors = [anchors[i] for i in rows]
      out.by_set[name] = {"cand_r1": ranking.hits(ranking.rows(cand, rows), sub_anchors, 1, True),
                          "pool_r1": ranking.hits(ranking.rows(scores, rows), sub_anchors, 1,
                                                  False)}
  if kb is not None:
    out.kb_r1, out.kb_rk = (ranking.hits(kb, anchors, n, False) for n in (1, k))
  return out


def _minilm_scores(eval_set: EvalSet, minilm: MiniLM) -> tuple[DocScores, DocScores | None,
                                                                Index]:
  """(pool scores, whole-db scores, the pipeline's index over the pool), built once per task."""
  if "minilm" not in eval_set.cache:
    task = eval_set.data.task
    queries = minilm.embed([a.query_text for a in eval_set.anchors])
    uids = [d.uid for d in eval_set.pool]
    vectors = minilm.embed(document_texts(task, eval_set.pool))
    kb = None
    if eval_set.kb:
      kb = DocScores([d.uid for d in eval_set.kb],
                     queries @ minilm.embed(document_texts(task, eval_set.kb)).T)
    eval_set.cache["minilm"] = (DocScores(uids, queries @ vectors.T), kb,
                                ExactIndex().build(vectors, uids))
  return eval_set.cache["minilm"]


def _bm25_scores(eval_set: EvalSet) -> tuple[DocScores, DocScores | None]:
  task, queries = eval_set.data.task, [a.query_text for a in eval_set.anchors]
  score = lambda docs: DocScores([d.uid for d in docs],
                                 BM25(document_texts(task, docs)).scores(queries))
  return score(eval_set.pool), (score(eval_set.kb) if eval_set.kb else None)


def _self_scores(eval_set: EvalSet, run: LoadedRun, args: argparse.Namespace,
                 workdir: str) -> tuple[DocScores, DocScores | None, Index]:
  """The arm's own keys of the pool (and whole db) and its gold query vectors, scored."""
  seq_len = eval_set.doc_len
  vectors, key_uids, _, _ = encode_db(run, eval_set.data.pool_path, os.path.join(workdir, "pool"),
                                      rows=args.encode_rows, seq_len=seq_len)
  encoder = Encoder(run.model, run.mesh, rows=args.encode_rows, seq_len=eval_set.encode_len,
                    max_reads=4 * args.encode_rows)
  queries = encoder.encode(run.params, eval_set.items)
  kb = None
  if eval_set.kb:
    kb_vectors, kb_uids, _, _ = encode_db(run, eval_set.data.kb_path, os.path.join(workdir, "kb"),
                                          rows=args.encode_rows, seq_len=seq_len)
    kb = ranking.from_keys(queries, kb_vectors, kb_uids)
  return (ranking.from_keys(queries, vectors, key_uids), kb,
          ExactIndex().build(np.asarray(vectors), key_uids))


def gold_recall(eval_set: EvalSet, arm: Arm, run: LoadedRun | None, minilm: MiniLM | None,
                args: argparse.Namespace, workdir: str) -> tuple[GoldRecall, Index | None]:
  """The arm's retrieval figures on gold context, and the index its generation searches."""
  start, index = time.time(), None
  if arm.retriever == "prior":
    out = GoldRecall(cand_r1=ranking.prior_hits(eval_set.anchors, 1),
                     cand_rk=ranking.prior_hits(eval_set.anchors, eval_set.k),
                     gold_in_candidates=ranking.gold_in_candidates(eval_set.anchors),
                     anchors=len(eval_set.anchors))
  elif arm.retriever == "bm25":
    out = _recall(*_bm25_scores(eval_set), eval_set)
  else:
    pool, kb, index = (_minilm_scores(eval_set, minilm) if arm.retriever == "minilm"
                       else _self_scores(eval_set, run, args, workdir))
    fit = _fitted_prior(eval_set, run, args, workdir) if arm.retriever == "self_prior" else None
    out = _recall(pool, kb, eval_set,  # with a prior, among candidates: cosine + its term
                  fit and ranking.with_prior(pool, eval_set.anchors, fit.prior))
    if fit is not None:
      out.prior = {"weight": fit.prior.weight, "mentions": fit.mentions, "skipped": fit.skipped,
                   "cosine_acc": fit.cosine_acc, "prior_acc": fit.prior_acc,
                   "combined_acc": fit.combined_acc}
  out.retrieval_eval_s = time.time() - start
  return out, index


def _fitted_prior(eval_set: EvalSet, run: LoadedRun, args: argparse.Namespace,
                  workdir: str) -> PriorFit:
  """The candidate prior fit with the arm's model on the training pieces of prior_fit.jsonl,
  their candidates encoded as the db is (rows long enough for the longest, uncut)."""
  data = eval_set.data
  if not data.prior_fit_path:
    raise ValueError("the candidate prior needs training pieces with candidates: "
                     "--el_prior_fit_pieces > 0 (EL data converted here)")
  docs = load_documents(data.task, data.prior_fit_db_path)[0]
  longest = max(len(r.tokens) for r in run.tokenizer.tokenize_with_roles(
      [d.messages for d in docs], data.task.doc_token, 1 << 30))
  vectors, key_uids, _, _ = encode_db(run, data.prior_fit_db_path,
                                      os.path.join(workdir, "prior_fit_db"),
                                      rows=args.encode_rows,
                                      seq_len=-(-longest // _DOC_ROUND) * _DOC_ROUND)
  return fit_prior(run, CandidateScorer(np.asarray(vectors), key_uids),
                   read_jsonl(data.prior_fit_path), data.prior_fit_path, args.encode_rows)


def _max_new_tokens(eval_set: EvalSet, tokenizer: TaskTokenizer) -> int:
  """The task's --MODE_max_new_tokens, or (0) the longest gold answer + 16 tokens."""
  given = eval_set.data.settings.max_new_tokens
  answers = [line["messages"][-1]["content"] for line in eval_set.gold_lines]
  return given or max(len(t) for t in tokenizer.tokenize(answers)) + 16


def _generation_config(eval_set: EvalSet, prompts: list[list[int]], max_new: int,
                       args: argparse.Namespace, query: int) -> GenerationConfig:
  """Room in the cache for the longest prompt, the new tokens and (RAG) the inserted paragraphs;
  RAG watches the query token's log-probability (a gold answer starts with it)."""
  rag = eval_set.data.task.mode == "rag"
  inserted = RAG_MAX_RETRIEVALS * (eval_set.max_doc_tokens + 8) if rag else 0
  capacity = -(-(max(len(p) for p in prompts) + max_new + inserted + 16) // 256) * 256
  return GenerationConfig(max_new_tokens=max_new,
                          max_retrievals=RAG_MAX_RETRIEVALS if rag else 1 << 30,
                          retrieve_k=eval_set.k, batch_size=args.gen_batch, capacity=capacity,
                          watch=(query,) if rag else (), loop_repeats=args.loop_repeats,
                          novel_documents=args.novel_documents and rag)


def _scores(eval_set: EvalSet, records: list[dict]) -> Generation:
  gold = eval_set.gold_lines
  if eval_set.data.task.mode == "el":
    s = score_el(records, gold)
    return Generation(reference_f1=s["reference_f1"], strong_f1=s["strong_f1"],
                      reference_precision=s["reference_precision"],
                      reference_recall=s["reference_recall"])
  s = score_rag(records, gold, ks=(1, eval_set.k))
  sources = [line.source for line in eval_set.data.dev]
  by_set = {}
  for name in sorted(set(sources) - {""}):
    idx = [i for i, x in enumerate(sources) if x == name]
    sub = score_rag([records[i] for i in idx], [gold[i] for i in idx], ks=(1,))
    by_set[name] = {"em": sub["em"], "f1": sub["f1"]}
  return Generation(em=s["em"], f1=s["f1"], r1=s["recall@1"], rk=s[f"recall@{eval_set.k}"],
                    by_set=by_set)


def generate(eval_set: EvalSet, run: LoadedRun, index: Index, arm: Arm, minilm: MiniLM | None,
             args: argparse.Namespace, workdir: str) -> Generation:
  """Free generation with retrieval over the dev prompts; predictions in WORKDIR."""
  start, task = time.time(), eval_set.data.task
  prompts = prompt_tokens(run, read_requests(eval_set.data.dev_path), 1 << 30)
  query = run.tokenizer.ids[task.query_token]
  config = _generation_config(eval_set, prompts, _max_new_tokens(eval_set, run.tokenizer), args,
                              query)
  hooks = {}
  if arm.retriever == "minilm":
    queries = GeneratedQueries(run.tokenizer, dict(zip(map(tuple, prompts),
                                                       eval_set.request_texts)))
    hooks["query_vectors"] = lambda outs, _: minilm.embed([queries(o) for o in outs])
  engine = make_engine(run, index, eval_set.texts, config, **hooks)
  # --force_first_query: each request's first output token is the query RET token.
  force = [[engine.tokens.query]] * len(prompts) if args.force_first_query else None
  outputs = engine.generate(prompts, progress=True, force=force)
  records = [output_record(run, o) for o in outputs]
  write_jsonl(os.path.join(workdir, "predictions.jsonl"), records)
  scores = _scores(eval_set, records)
  if config.watch:  # P(query token) at the first output step, mean over the requests
    scores.first_query_p = float(np.mean([np.exp(o.watched[0][0]) for o in outputs if o.watched]))
  scores.finished = sum(o.finished for o in outputs) / max(len(outputs), 1)
  scores.ran_to_limit = sum(o.stop_reason == "max_new_tokens" for o in outputs)
  if config.loop_repeats:
    scores.loop_stopped = sum(o.stop_reason == "repetition" for o in outputs)
  scores.queries_emitted = sum(t == query and g for o in outputs
                               for t, g in zip(o.tokens, o.generated))
  scores.gold_queries = sum(line["messages"][-1]["content"].count(task.query_token)
                            for line in eval_set.gold_lines)
  scores.retrievals_per_request = sum(len(o.retrievals) for o in outputs) / max(len(outputs), 1)
  scores.generation_s = time.time() - start
  return scores


def evaluate_arm(eval_set: EvalSet, arm: Arm, run: LoadedRun | None, minilm: MiniLM | None,
                 args: argparse.Namespace, workdir: str) -> tuple[GoldRecall, Generation | None]:
  """Retrieval on gold context, then (for an arm that writes) free generation, scored."""
  gold, index = gold_recall(eval_set, arm, run, minilm, args, workdir)
  if not arm.writes:
    return gold, None
  return gold, generate(eval_set, run, index, arm, minilm, args, workdir)
