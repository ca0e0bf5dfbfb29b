"""Self-RAG's short-form procedure with OneGen: the model decides whether to retrieve, is its own
retriever, critiques each piece of evidence with its reflection tokens, and the best-scored
continuation is the answer (Asai et al. 2023; OneGen's scripts/self_rag with the retriever
replaced by the model).

For each prompt (`### Instruction:\\n{instruction}\\n\\n### Response:\\n`, tokenised as training
tokenises it), on one Engine whose config watches the reflection tokens:
  1. adaptive_retrieval: the prompt is prefilled (cache kept); p = P([Retrieval]) /
     (P([Retrieval]) + P([No Retrieval])) at the first output step; retrieve iff p > threshold.
  2. retrieve: `[Retrieval][Question Representation]` is fed after the kept prompt cache; the
     hidden state at [Question Representation] is the query, searched for the top k documents.
  3. each document's `<paragraph>{text}</paragraph>` (the insertion training used) is fed in its
     own row, all k rows continuing one copy of the same cache (`Engine.branch`: the prompt is
     computed once), and decoded greedily as one batch;
  4. each continuation is scored from its own token probabilities:
       relevance   = P([Relevant]) / (P([Relevant]) + P([Irrelevant])) at its first token;
       support     = P(Fully) + 0.5 P(Partially), normalised over the three support tokens, at
                     its first support token (0 without one);
       utility     = sum over [Utility:1..5] of (-1, -0.5, 0, 0.5, 1) x normalised probability at
                     its first utility token (0 without one);
       score       = exp(mean log-probability of its tokens) (with use_seq_score)
                     + w_rel relevance + w_sup support + w_use utility;
     the highest score wins (the reference's `use_seqscore`: the exponentiated mean, i.e. the
     geometric-mean token probability);
  no retrieval: `[No Retrieval]` is fed after the prompt and the model answers.
Modes: adaptive_retrieval, always_retrieve (step 1 skipped), no_retrieval (only the last line).
The answer is the winner's text without reflection tokens, paragraph tags, EOS and newlines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.inference.engine import Engine
from onegen_jax.inference.requests import output_text
from onegen_jax.inference.retrieval_policy import InsertDocument
from onegen_jax.inference.run_dir import LoadedRun, make_engine
from onegen_jax.retrieval.index import Index
from onegen_jax.inference.types import GenerationConfig, Request, RequestOutput

RETRIEVE, NO_RETRIEVE = "[Retrieval]", "[No Retrieval]"
RELEVANCE = ("[Relevant]", "[Irrelevant]")
SUPPORT = ("[Fully supported]", "[Partially supported]", "[No support / Contradictory]")
UTILITY = tuple(f"[Utility:{i}]" for i in range(1, 6))
UTILITY_VALUES = (-1.0, -0.5, 0.0, 0.5, 1.0)
# The ids an engine for Self-RAG watches, in this order (SelfRag reads them by this position).
WATCHED = (RETRIEVE, NO_RETRIEVE, *RELEVANCE, *SUPPORT, *UTILITY)
MODES = ("adaptive_retrieval", "always_retrieve", "no_retrieval")


@dataclasses.dataclass(frozen=True)
class SelfRagConfig:
  mode: str = "adaptive_retrieval"
  threshold: float = 0.2  # retrieve iff P([Retrieval]) / (P([Retrieval]) + P([No Retrieval])) > it
  k: int = 5  # documents retrieved, one continuation each
  w_rel: float = 1.0
  w_sup: float = 1.0
  w_use: float = 0.5
  use_seq_score: bool = True
  max_new_tokens: int = 64

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")


@dataclasses.dataclass
class Critique:
  """The scores of one continuation (see the module docstring)."""

  relevance: float
  support: float
  utility: float
  seq_score: float
  score: float


@dataclasses.dataclass
class Evidence:
  """One evidence continuation: the document, its retrieval score, its text and critique."""

  document: str
  retrieval_score: float
  tokens: list[int]  # the continuation after the paragraph
  text: str
  critique: Critique


@dataclasses.dataclass
class SelfRagResult:
  retrieve_prob: float | None  # step 1's p (adaptive_retrieval only)
  retrieved: bool
  text: str  # the chosen continuation as generated (the no-retrieval answer without retrieval)
  answer: str  # `text` without reflection tokens, paragraph tags, EOS and newlines
  evidence: list[Evidence]  # one continuation per retrieved document
  best: int | None  # index of the chosen continuation

  def record(self) -> dict:
    """JSON-ready (launch.infer's output line)."""
    return {"answer": self.answer, "text": self.text, "retrieved": self.retrieved,
            "retrieve_prob": self.retrieve_prob, "best": self.best,
            "evidence": [{"id": e.document, "retrieval_score": e.retrieval_score,
                          "text": e.text, **dataclasses.asdict(e.critique)}
                         for e in self.evidence]}


def selfrag_runner(run: LoadedRun, index: Index, texts: dict[str, str],
                   config: GenerationConfig) -> Callable[[SelfRagConfig], SelfRag]:
  """A selfrag run's procedure on one engine of its own, built once for launch.infer and the
  server: the engine watches the reflection tokens (watched_ids) and a query inside an evidence
  continuation ends it (max_retrievals 0); SelfRagConfig -> the SelfRag runner."""
  engine = make_engine(run, index, texts, dataclasses.replace(
      config, watch=watched_ids(run.tokenizer), max_retrievals=0))
  return lambda settings: SelfRag(engine, run.tokenizer, settings)


def watched_ids(tokenizer: TaskTokenizer) -> tuple[int, ...]:
  """The token ids of WATCHED: what the engine's GenerationConfig.watch must be."""
  return tuple(tokenizer.ids[t] for t in WATCHED)


def critique(out: RequestOutput, ids: dict[str, int], config: SelfRagConfig) -> Critique:
  """Scores one continuation from its recorded log-probabilities (out.watched in WATCHED order,
  out.log_probs of its tokens); ids: token -> id."""
  probs = [np.exp(np.asarray(w, np.float64)) for w in out.watched]
  at = {t: i for i, t in enumerate(WATCHED)}

  def normalised(step: int, tokens: Sequence[str]) -> np.ndarray:
    p = np.array([probs[step][at[t]] for t in tokens])
    return p / p.sum()

  def first(tokens: Sequence[str]) -> int | None:
    wanted = {ids[t] for t in tokens}
    return next((i for i, t in enumerate(out.tokens) if t in wanted), None)

  relevance = float(normalised(0, RELEVANCE)[0]) if probs else 0.0
  step = first(SUPPORT)
  support = 0.0 if step is None else float(normalised(step, SUPPORT) @ np.array([1.0, 0.5, 0.0]))
  step = first(UTILITY)
  utility = 0.0 if step is None else float(normalised(step, UTILITY) @ np.array(UTILITY_VALUES))
  seq = math.exp(float(np.mean(out.log_probs))) if config.use_seq_score and out.log_probs else 0.0
  score = seq + config.w_rel * relevance + config.w_sup * support + config.w_use * utility
  return Critique(relevance, support, utility, seq, score)


class SelfRag:
  """Runs the procedure for a list of prompts on `engine` (GenerationConfig.watch =
  watched_ids(tokenizer); max_retrievals=0, so a query inside a continuation ends it): the
  engine's retrieval policy (an InsertDocument: make_engine's for a selfrag run) searches the
  documents and gives each one's insertion."""

  def __init__(self, engine: Engine, tokenizer: TaskTokenizer, config: SelfRagConfig):
    if tuple(engine.config.watch) != watched_ids(tokenizer):
      raise ValueError("the engine must watch selfrag.watched_ids(tokenizer)")
    if not isinstance(engine.policy, InsertDocument):
      raise ValueError(f"Self-RAG inserts documents; the engine's policy is {engine.policy.mode}")
    self.engine, self.tokenizer, self.policy, self.config = engine, tokenizer, engine.policy, config
    self.ids = {t: tokenizer.ids[t] for t in WATCHED}
    self.query = tokenizer.ids[tokenizer.task.query_token]

  def run(self, prompts: Sequence[Sequence[int]]) -> list[SelfRagResult]:
    """The procedure for every prompt (token ids), all batched together on the engine."""
    cfg, engine, ids = self.config, self.engine, self.ids
    query_suffix = [ids[RETRIEVE], self.query]
    probs: list[float | None] = [None] * len(prompts)
    plain, queries = {}, {}  # prompt index -> request id (answering / querying)
    if cfg.mode == "no_retrieval":
      plain = {i: engine.submit(Request([*p, ids[NO_RETRIEVE]], **self._settings()))
               for i, p in enumerate(prompts)}
    elif cfg.mode == "always_retrieve":
      queries = {i: engine.submit(Request([*p, *query_suffix], max_new_tokens=1,
                                          keep_session=True)) for i, p in enumerate(prompts)}
    else:
      firsts = [engine.submit(Request(p, max_new_tokens=1, keep_session=True)) for p in prompts]
      probs = [self._retrieve_prob(out) for out in engine.run(firsts)]
      for i, (rid, prob) in enumerate(zip(firsts, probs)):
        if prob > cfg.threshold:
          queries[i] = engine.branch(rid, [query_suffix], max_new_tokens=1, keep_session=True)[0]
        else:
          plain[i] = engine.branch(rid, [[ids[NO_RETRIEVE]]], **self._settings())[0]
      self._release(firsts)
    asked = sorted(queries)
    vectors = [out.prompt_vector for out in engine.run([queries[i] for i in asked])]
    found_ids, found_scores = self.policy.search(np.stack(vectors), cfg.k) if asked else ([], [])
    branches = {i: engine.branch(queries[i], [self.policy.insertion(d) for d in found_ids[j]],
                                 **self._settings()) for j, i in enumerate(asked)}
    self._release(queries.values())
    rids = [rid for i in asked for rid in branches[i]] + list(plain.values())
    outs = dict(zip(rids, engine.run(rids)))
    self._release(rids)
    results = []
    for i in range(len(prompts)):
      if i in plain:
        text = self._text(outs[plain[i]])
        results.append(SelfRagResult(probs[i], False, text, self.answer(text), [], None))
        continue
      j = asked.index(i)
      evidence = [Evidence(doc, float(score), outs[rid].tokens, self._text(outs[rid]),
                           critique(outs[rid], ids, cfg))
                  for doc, score, rid in zip(found_ids[j], found_scores[j], branches[i])]
      best = max(range(len(evidence)), key=lambda e: evidence[e].critique.score)
      text = evidence[best].text
      results.append(SelfRagResult(probs[i], True, text, self.answer(text), evidence, best))
    return results

  def answer(self, text: str) -> str:
    """The answer in a continuation: no reflection, retrieval or paragraph tokens, EOS or
    newlines."""
    eos = self.tokenizer.hf.eos_token
    for token in (*self.tokenizer.task.special_tokens, *([eos] if eos else [])):
      text = text.replace(token, "")
    return text.replace("\n", "").strip()

  # -- helpers ---------------------------------------------------------------------------------
  def _settings(self) -> dict:
    return {"max_new_tokens": self.config.max_new_tokens}

  def _retrieve_prob(self, out: RequestOutput) -> float:
    p = np.exp(np.asarray(out.watched[0][:2], np.float64))  # WATCHED starts with the two
    return float(p[0] / p.sum())

  def _release(self, rids):
    for rid in rids:
      self.engine.close_session(rid)
      self.engine.release(rid)

  def _text(self, out: RequestOutput) -> str:
    return output_text(self.tokenizer, out.tokens)
