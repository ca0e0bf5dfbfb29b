"""Conversion of the public data in ../shared/data (see its README) into the reference format.

Entity linking (`el/`): each KB entity becomes an `[SE]` document (uid "e" + md5 of its title);
each training text (docs_train.jsonl, and the OKE training files when present) becomes an example
whose answer rewrites every mention as `<MENTION>m</MENTION>[LK][_CONTINUE_]`. Positive: the gold
entity when it is in the KB (else null); negatives: the other candidates of the mention that are
in the KB (REL and BLINK candidates; for OKE, KB titles sharing words with the mention). HTML
escapes in titles are undone on both sides before matching.

Multi-hop QA (`qa/<set>/`): each corpus paragraph becomes a `[Document Fragment Representation]`
document (uid: its pid). Each question becomes an example with one `[Question Representation]`
per supporting paragraph, followed by that paragraph in `<paragraph>...</paragraph>`: with
MuSiQue's decomposition each hop is its sub-question, the paragraph and the sub-answer, and the
positive is that hop's paragraph; without one (HotpotQA: its supporting paragraphs come in
context order, not reasoning order), hop i inserts the i-th supporting paragraph and its positives
are every supporting paragraph not inserted before it (the first query may retrieve either gold
paragraph; a listed positive is never a negative). Negatives: the question's other paragraphs, topped up to `min_negatives` with
random corpus paragraphs (NQ-open gives none). The answer ends with
`<FINAL-ANSWER>a</FINAL-ANSWER>` and the EOS string.

Self-RAG (`--task=selfrag`): data/convert_selfrag.py (Self-RAG's training file, or the NQ-open
oracle with rule-based reflection tokens).

Every tenth example goes to dev.jsonl. Deterministic.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from collections import Counter, defaultdict

import numpy as np

from onegen_jax.data.dataset_dir import write_dataset
from onegen_jax.data.records import conversation, db_entry, read_jsonl
from onegen_jax.data.convert_selfrag import convert_nq_oracle, convert_selfrag_file
from onegen_jax.data.tasks import EL, MULTIHOP, SELFRAG

_MAX_NEGATIVES = 10


def _split(examples: list[dict]) -> tuple[list[dict], list[dict]]:
  return ([e for i, e in enumerate(examples) if i % 10 != 9],
          [e for i, e in enumerate(examples) if i % 10 == 9])


def entity_uid(title: str) -> str:
  return "e" + hashlib.md5(title.encode()).hexdigest()[:12]


def _annotate(text: str, mentions: list[tuple[int, int, str | None, list[str]]], eos: str) -> dict:
  """An EL example from a text and its (start, end, positive uid, negative uids) mentions."""
  pieces, positive, negative, end = [], [], [], 0
  for start, stop, uid, negatives in sorted(mentions):
    if start < end:
      continue  # overlapping mention
    pieces += [text[end:start], EL.mention_markup(text[start:stop])]
    positive.append(uid)
    negative.append(negatives)
    end = stop
  pieces.append(text[end:])
  return conversation(EL.query_template.format(input=text), "".join(pieces) + f" {eos}",
                       positive, negative)


def convert_el(src: str, eos: str = "</s>") -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) from ../shared/data/el."""
  kb = {}
  for e in read_jsonl(os.path.join(src, "kb.jsonl")):
    kb.setdefault(html.unescape(e["title"]), html.unescape(e["description"]))
  uid = {title: entity_uid(title) for title in kb}
  db = [db_entry(EL, uid[t], t, f"{d}{EL.doc_token}") for t, d in kb.items()]
  by_word = defaultdict(set)
  for title in kb:
    for w in re.findall(r"\w+", title.lower()):
      by_word[w].add(title)

  def candidates(gold: str | None, names: list[str]) -> list[str]:
    names = [t for t in dict.fromkeys(html.unescape(n) for n in names) if t in uid and t != gold]
    return [uid[t] for t in names[:_MAX_NEGATIVES]]

  def word_candidates(surface: str, gold: str | None) -> list[str]:
    overlap = Counter(t for w in re.findall(r"\w+", surface.lower()) for t in by_word.get(w, ()))
    return candidates(gold, [t for t, _ in sorted(overlap.items(), key=lambda x: (-x[1], x[0]))])

  examples = []
  for doc in read_jsonl(os.path.join(src, "docs_train.jsonl")):
    mentions = []
    for m in doc["mentions"]:
      gold = html.unescape(m["gold_title"] or "")
      gold = gold if m["gold_in_kb"] and gold in uid else None
      mentions.append((m["start"], m["end"], uid.get(gold),
                       candidates(gold, m["rel_candidates"] + m["blink_candidates"])))
    examples.append(_annotate(doc["text"], mentions, eos))
  for name in ("oke-2015-train.benchmark.jsonl", "oke-2016-train.benchmark.jsonl"):
    if os.path.exists(os.path.join(src, name)):
      for doc in read_jsonl(os.path.join(src, name)):
        mentions = []
        for label in doc["labels"]:
          start, stop = label["span"]
          gold = html.unescape(label["name"]) if html.unescape(label["name"]) in uid else None
          mentions.append((start, stop, uid.get(gold), word_candidates(doc["text"][start:stop], gold)))
        examples.append(_annotate(doc["text"], mentions, eos))
  return (*_split(examples), db)


def _paragraph(p: dict) -> str:
  return f"wiki title: {p['title']}\ncontent: {p['text']}"


def convert_qa(src: str, eos: str = "</s>", min_negatives: int = 2, seed: int = 0,
               extra_corpus: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) from a ../shared/data/qa/<set> folder (qa.jsonl, corpus.jsonl); paragraphs of
  `extra_corpus` (a corpus.jsonl) join the db as further documents."""
  corpus = {p["pid"]: p for p in read_jsonl(os.path.join(src, "corpus.jsonl"))}
  for p in read_jsonl(extra_corpus) if extra_corpus else []:
    corpus.setdefault(p["pid"], p)
  db = [db_entry(MULTIHOP, pid, p["title"], _paragraph(p) + MULTIHOP.doc_token)
        for pid, p in corpus.items()]
  pids = list(corpus)
  rng = np.random.default_rng(seed)
  examples = []
  for q in read_jsonl(os.path.join(src, "qa.jsonl")):
    paragraphs = q["paragraphs"]
    negatives = [p["pid"] for p in paragraphs if not p["is_supporting"]]
    while len(negatives) < min_negatives:
      pid = pids[rng.integers(len(pids))]
      if pid not in negatives and pid not in {p["pid"] for p in paragraphs}:
        negatives.append(pid)
    hops = []  # (prefix, paragraph, suffix, positive uid or uids)
    if q.get("question_decomposition"):
      answers = []
      for step in q["question_decomposition"]:
        sub = re.sub(r"#(\d+)", lambda m: answers[int(m[1]) - 1], step["question"])
        p = paragraphs[step["paragraph_support_idx"]]
        hops.append((sub, p, f"{step['answer']}\n", p["pid"]))
        answers.append(step["answer"])
    else:
      supporting = [p for p in paragraphs if p["is_supporting"]]
      later = [[s["pid"] for s in supporting[i:]] for i in range(len(supporting))]
      hops = [("", p, "", uids if len(uids) > 1 else uids[0])
              for p, uids in zip(supporting, later)]
    reply = "".join(f"{pre}{MULTIHOP.query_token}{MULTIHOP.insertion(_paragraph(p))}{post}"
                    for pre, p, post, _ in hops)
    reply += f"<FINAL-ANSWER>{q['answers'][0]}</FINAL-ANSWER>{eos}"
    examples.append(conversation(MULTIHOP.query_template.format(input=q["question"]), reply,
                                  [h[3] for h in hops], [negatives] * len(hops)))
  return (*_split(examples), db)


def convert_dataset(task_name: str, src: str, out_dir: str, vocab_size: int = 4096,
                    eos: str = "</s>", extra_corpus: str | None = None):
  """Converts `src` and writes out_dir/{train,dev,db}.jsonl and a BPE tokenizer trained on them."""
  if task_name == "el":
    task, splits = EL, convert_el(src, eos)
  elif task_name == "multihop":
    task, splits = MULTIHOP, convert_qa(src, eos, extra_corpus=extra_corpus)
  elif task_name == "selfrag":  # Self-RAG's training jsonl, or an NQ-style qa/<set>/ folder
    task = SELFRAG
    splits = (convert_selfrag_file(src, eos) if os.path.isfile(src)
              else convert_nq_oracle(src, eos))
  else:
    raise ValueError(f"unknown task {task_name!r}; known: el, multihop, selfrag")
  write_dataset(out_dir, task, *splits, vocab_size=vocab_size)
  return {name: len(records) for name, records in zip(("train", "dev", "db"), splits)}
