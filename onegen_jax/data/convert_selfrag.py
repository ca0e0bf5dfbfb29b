"""Self-RAG training data in the reference format, from two sources.

1. Self-RAG's public training file (jsonl: instruction, input, output with reflection tokens and
   `<paragraph>...</paragraph>`; `convert_selfrag_file`). The prompt is Self-RAG's
   (`### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n`). Every
   `[Retrieval]` followed by a paragraph gets `[Question Representation]` right after it (the
   query RET token, as OneGen's self_rag workflow places it); each distinct paragraph becomes a
   `[Document Fragment Representation]` document (uid "p" + md5 of its text) and the positive of
   the query before it; negatives: 2 random other paragraphs (OneGen's Self-RAG setting, BPR with
   1 positive x 2 negatives).

2. A rule-based stand-in for Self-RAG's critic on ../shared/data's NQ-open oracle (qa.jsonl with
   one supporting paragraph per question; `convert_nq_oracle`), for tests and small studies, NOT
   Self-RAG's GPT-4-distilled labels. Rules, per question (answer: its first gold answer):
   - it retrieves: `[Retrieval][Question Representation]` then the gold paragraph
     (`{title}\\n{text}`, positive: that paragraph, negatives: 2 random others);
   - relevance: `[Relevant]` when a gold answer string occurs in the paragraph, else
     `[Irrelevant]`; support: `[Fully supported]` when it occurs, else `[No support /
     Contradictory]`; utility: `[Utility:5]` when supported, else `[Utility:3]`;
   - a second training example inserts a random other question's paragraph (a distractor):
     `[Irrelevant]{answer}[No support / Contradictory][Utility:3]`, no retrieval target;
   - dev lines (every tenth question) carry "answers" (all gold answers) and
     "needs_retrieval": true.
Deterministic (seeded).
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from onegen_jax.data.records import conversation, db_entry, read_jsonl
from onegen_jax.data.tasks import SELFRAG

_NEGATIVES = 2
_RETRIEVAL = r"\[Retrieval\]\s*"  # the reflection token before an inserted paragraph
_PARAGRAPH = re.compile(_RETRIEVAL + SELFRAG.insertion_pattern().pattern, re.S)


def prompt(instruction: str, extra: str = "") -> str:
  """Self-RAG's prompt of an instruction (and its optional input)."""
  if extra:
    instruction = f"{instruction}\n\n### Input:\n{extra}"
  return SELFRAG.query_template.format(input=instruction)


def paragraph_uid(text: str) -> str:
  return "p" + hashlib.md5(text.encode()).hexdigest()[:12]


def _negatives(rng: np.random.Generator, uids: list[str], avoid: set[str]) -> list[str]:
  picked: list[str] = []
  while len(picked) < min(_NEGATIVES, len(uids) - len(avoid)):
    uid = uids[rng.integers(len(uids))]
    if uid not in avoid and uid not in picked:
      picked.append(uid)
  return picked


def _split(examples: list[dict]) -> tuple[list[dict], list[dict]]:
  return ([e for i, e in enumerate(examples) if i % 10 != 9],
          [e for i, e in enumerate(examples) if i % 10 == 9])


def convert_selfrag_file(path: str, eos: str = "</s>", seed: int = 0
                         ) -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) from Self-RAG's training jsonl (every tenth line is dev)."""
  lines = read_jsonl(path)
  problems = [f"{path}:{i + 1}: {field}: missing or not a string" for i, line in enumerate(lines)
              for field in ("instruction", "output") if not isinstance(line.get(field), str)]
  if problems:
    raise ValueError("\n".join(problems[:20]))
  texts = list(dict.fromkeys(t for line in lines for t in _PARAGRAPH.findall(line["output"])))
  uids = [paragraph_uid(t) for t in texts]
  db = [db_entry(SELFRAG, uid, "", text + SELFRAG.doc_token) for uid, text in zip(uids, texts)]
  rng = np.random.default_rng(seed)
  examples = []
  for line in lines:
    output = line["output"]
    positives = [paragraph_uid(t) for t in _PARAGRAPH.findall(output)]
    reply = re.sub(_RETRIEVAL + f"(?={re.escape(SELFRAG.ctx_spans[0][0])})",
                   f"[Retrieval]{SELFRAG.query_token}", output) + eos
    examples.append(conversation(prompt(line["instruction"], line.get("input") or ""), reply,
                                 positives or None,
                                 [_negatives(rng, uids, {p}) for p in positives] or None))
  return (*_split(examples), db)


def convert_nq_oracle(src: str, eos: str = "</s>", seed: int = 0
                      ) -> tuple[list[dict], list[dict], list[dict]]:
  """(train, dev, db) from a qa/<set> folder (qa.jsonl with supporting paragraphs) by the rules
  of the module docstring."""
  questions = [q for q in read_jsonl(os.path.join(src, "qa.jsonl"))
               if any(p["is_supporting"] for p in q["paragraphs"])]
  gold = [next(p for p in q["paragraphs"] if p["is_supporting"]) for q in questions]
  text = {p["pid"]: f"{p['title']}\n{p['text']}" for p in gold}
  db = [db_entry(SELFRAG, pid, "", t + SELFRAG.doc_token) for pid, t in text.items()]
  uids = list(text)
  rng = np.random.default_rng(seed)
  train, dev = [], []
  for i, (q, p) in enumerate(zip(questions, gold)):
    answer, found = q["answers"][0], any(a in text[p["pid"]] for a in q["answers"])
    verdict = ("[Relevant]", "[Fully supported]", "[Utility:5]") if found else (
        "[Irrelevant]", "[No support / Contradictory]", "[Utility:3]")
    reply = (f"[Retrieval]{SELFRAG.query_token}{SELFRAG.insertion(text[p['pid']])}"
             f"{verdict[0]}{answer}{verdict[1]}{verdict[2]}{eos}")
    line = conversation(prompt(q["question"]), reply, [p["pid"]],
                        [_negatives(rng, uids, {p["pid"]})])
    if i % 10 == 9:
      dev.append(dict(line, answers=list(q["answers"]), needs_retrieval=True))
      continue
    train.append(line)
    other = uids[rng.integers(len(uids))]
    if other != p["pid"]:
      train.append(conversation(prompt(q["question"]), (
          f"[Retrieval]{SELFRAG.query_token}{SELFRAG.insertion(text[other])}[Irrelevant]"
          f"{answer}[No support / Contradictory][Utility:3]{eos}"), [None], [[]]))
  return train, dev, db
