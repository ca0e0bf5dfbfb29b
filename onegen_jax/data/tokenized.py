"""Validated records + tokenizer -> tokenised records (`tokenize_source`), the form the TFDS
builder stores (builder.py) and the in-memory path serves; and the in-memory `Database` of
documents and keys.

A `Record` (one flat dict for examples and documents, so one TFDS feature spec serves both; its
arrays are RECORD_ARRAYS):
  tokens        int32 [n]   token ids, cut to max_len
  is_target     bool  [n]   GEN targets (see encoding.py)
  positions     int32 [a]   examples: the RET position of each valid anchor; documents: each key
  positive_keys int32 [p]   examples: key ids of the anchors' positives, anchor after anchor
  positive_counts int32 [a] how many of positive_keys belong to each anchor
  negative_keys, negative_counts   the same for the listed negatives found in the db
  uid           str         documents: the uid; examples: ""
  index         int64       examples: the line number in their file; documents: the position
Key ids number the keys of the db: document after document (in file order), key after key.
An anchor is valid (the reference's rule) when it has a positive in the db and lists negatives;
other anchors keep their labels but are not queries (generation-only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Mapping
from typing import TypedDict

import numpy as np

from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.packing import Corpus, Key, Segment
from onegen_jax.data.reading import load_records
from onegen_jax.data.records import DataError, Document, Example, Report, key_uid
from onegen_jax.data.tasks import Task

FORMAT_VERSION = "1.0.0"  # of the records; a prepared dataset of another version is rebuilt
RECORD_ARRAYS = {"tokens": np.int32, "is_target": np.bool_, "positions": np.int32,
                 "positive_keys": np.int32, "positive_counts": np.int32,
                 "negative_keys": np.int32, "negative_counts": np.int32}


class Record(TypedDict):
  """A tokenised example or document (fields: the module docstring)."""

  tokens: np.ndarray
  is_target: np.ndarray
  positions: np.ndarray
  positive_keys: np.ndarray
  positive_counts: np.ndarray
  negative_keys: np.ndarray
  negative_counts: np.ndarray
  uid: str
  index: np.int64

LISTED = 10  # bad examples a DataError lists; the others are counted


def _ints(values) -> np.ndarray:
  return np.asarray(values, np.int32).reshape(-1)


def _record(enc, positions, positives=(), negatives=(), uid="", index=0) -> Record:
  return Record(tokens=enc.tokens, is_target=enc.is_target, positions=_ints(positions),
                positive_keys=_ints([k for p in positives for k in p]),
                positive_counts=_ints([len(p) for p in positives]),
                negative_keys=_ints([k for n in negatives for k in n]),
                negative_counts=_ints([len(n) for n in negatives]), uid=uid,
                index=np.int64(index))


def document_records(docs: list[Document], tokenizer: TaskTokenizer, max_len: int,
                     report: Report) -> list[dict]:
  """Tokenised documents; a document whose keys were all cut away by truncation is dropped."""
  encoded = tokenizer.tokenize_with_roles([d.messages for d in docs], tokenizer.task.doc_token, max_len)
  records = []
  for doc, enc in zip(docs, encoded):
    if len(enc.rets) != doc.num_keys and not enc.cut:
      raise ValueError(f"{doc.path}:{doc.line}: {doc.num_keys} RET tokens in the text but "
                       f"{len(enc.rets)} after tokenisation")
    report.count("db_tokens", len(enc.tokens))
    if enc.cut:
      report.count("documents_truncated")
      report.count("keys_lost_to_truncation", doc.num_keys - len(enc.rets))
    if len(enc.rets) == 0:
      report.warnings.append(f"{doc.path}:{doc.line}: messages: truncation to {max_len} tokens "
                             "left no key; the document is dropped")
      continue
    records.append(_record(enc, enc.rets, uid=doc.uid, index=len(records)))
  report.counts["documents"] = len(records)
  report.counts["keys"] = sum(len(r["positions"]) for r in records)
  return records


def key_ids(doc_records: list[dict]) -> dict[str, int]:
  """Key uid -> key id."""
  uids = [key_uid(r["uid"], k) for r in doc_records for k in range(len(r["positions"]))]
  return {uid: i for i, uid in enumerate(uids)}


def example_records(examples: list[Example], tokenizer: TaskTokenizer, keys: dict[str, int],
                    max_len: int, report: Report, prefix: str = "") -> list[dict]:
  """Tokenised examples with their valid anchors; counts go to report under `prefix`.

  Raises DataError when an example's last assistant message does not end with the tokenizer's
  EOS id (a model trained on it never stops), or when the tokenizer has none.
  """
  encoded = tokenizer.tokenize_with_roles([e.messages for e in examples], tokenizer.task.query_token, max_len)
  problems = eos_problems(examples, encoded, tokenizer)
  if problems:
    raise DataError(problems[:LISTED], more=len(problems) - len(problems[:LISTED]))
  records = []
  for ex, enc in zip(examples, encoded):
    if not enc.cut and len(enc.rets) != len(ex.anchors):
      raise ValueError(f"{ex.path}:{ex.line}: {len(ex.anchors)} RET tokens in the text but "
                       f"{len(enc.rets)} after tokenisation")
    report.count(prefix + "examples")
    report.count(prefix + "tokens", len(enc.tokens))
    report.count(prefix + "anchors", len(ex.anchors))
    if enc.cut:
      report.count(prefix + "examples_truncated")
      report.count(prefix + "tokens_cut", enc.cut)
      report.count(prefix + "anchors_lost_to_truncation", len(ex.anchors) - len(enc.rets))
    positions, positives, negatives = [], [], []
    for position, anchor in zip(enc.rets, ex.anchors):
      pos = [keys[u] for u in anchor.positives if u in keys]
      if pos and anchor.negatives:
        report.counts["max_positives_per_anchor"] = max(
            report.counts.get("max_positives_per_anchor", 0), len(pos))
        positions.append(position)
        positives.append(pos)
        negatives.append([keys[u] for u in anchor.negatives if u in keys])
    report.count(prefix + "valid_anchors", len(positions))
    report.count(prefix + "generation_only_examples", not positions)
    records.append(_record(enc, positions, positives, negatives, index=ex.line))
  return records


def eos_problems(examples: list[Example], encoded: list, tokenizer: TaskTokenizer) -> list[str]:
  """`FILE:LINE: field: problem` for each example (encoded: TaskTokenizer.encode of its messages)
  whose last assistant message does not end with the tokenizer's EOS id; an example cut by
  max_len (Tokenized.cut > 0) is not checked: its end was cut."""
  hf = tokenizer.hf
  if hf.eos_token_id is None:
    return [f"{hf.name_or_path}: eos_token: the tokenizer has no EOS token (a model trained on "
            "its data cannot learn to stop)"]
  last = [max(i for i, m in enumerate(e.messages) if m.role == "assistant") for e in examples]
  after = {n: e.messages[i + 1:] for n, (e, i) in enumerate(zip(examples, last))
           if i + 1 < len(e.messages)}  # messages after the last assistant one: their tokens
  after_len = dict(zip(after, (len(a.tokens) for a in tokenizer.tokenize_with_roles(
      list(after.values()), tokenizer.task.query_token, 1 << 62))))
  problems = []
  for n, (ex, enc, i) in enumerate(zip(examples, encoded, last)):
    end = len(enc.tokens) - after_len.get(n, 0)
    if enc.cut or (end and enc.tokens[end - 1] == hf.eos_token_id):
      continue
    tail = enc.tokens[max(end - 4, 0):end].tolist()
    problems.append(f"{ex.path}:{ex.line}: messages[{i}].content: ends with {hf.decode(tail)!r} "
                    f"(ids {tail}), not the tokenizer's EOS {hf.eos_token!r} "
                    f"(id {hf.eos_token_id})")
  return problems


class Database:
  """The documents in memory: a packing.Corpus plus key tables for sampling.

  key_uids[i]: uid of key id i; doc_first_key / doc_num_keys int [D]: each document's key ids.
  text_weight: the loss weight of a packed document's GEN targets (its assistant text, as its
  roles say). 1 is the reference: L_gen averages over document rows as over examples; 0 packs
  documents as context, so only their keys train (L_ret) and L_gen is the examples' alone.
  """

  def __init__(self, doc_records: list[dict], text_weight: float = 1.0):
    docs = {}
    self.key_uids: list[str] = []
    for r in doc_records:
      uid = str(r["uid"].decode() if isinstance(r["uid"], bytes) else r["uid"])
      keys = tuple(Key(int(p), key_uid(uid, k)) for k, p in enumerate(r["positions"]))
      docs[uid] = Segment(np.asarray(r["tokens"]), np.asarray(r["is_target"]), keys=keys,
                          target_weight=text_weight)
      self.key_uids += [k.uid for k in keys]
    self.corpus = Corpus(docs)
    counts = np.array([len(d.keys) for d in docs.values()], np.int64)
    self.doc_num_keys = counts
    self.doc_first_key = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

  def __len__(self) -> int:
    return len(self.key_uids)


def max_len(config: Mapping, seq_len: int) -> int:
  """The truncation length of examples and documents: config.data's max_len, else the batch's
  seq_len. Encoding a db for inference uses it too, so its keys are the keys training saw."""
  return int(config.get("max_len") or seq_len)


@dataclasses.dataclass(frozen=True)
class Source:
  """What a prepared dataset is made from."""

  task: Task
  train_path: str
  db_path: str
  tokenizer_path: str
  max_len: int
  dev_path: str | None = None
  max_bad_lines: int = 0

  def fingerprint(self) -> str:
    h = hashlib.sha256(repr((FORMAT_VERSION, self.task, self.max_len, self.max_bad_lines)).encode())
    for path in (self.train_path, self.db_path, self.dev_path):
      if path:
        stat = os.stat(path)
        h.update(repr((os.path.abspath(path), stat.st_size, stat.st_mtime_ns)).encode())
    for name in sorted(os.listdir(self.tokenizer_path)):
      with open(os.path.join(self.tokenizer_path, name), "rb") as f:
        h.update(name.encode() + hashlib.sha256(f.read()).digest())
    return "v" + h.hexdigest()[:16]


def tokenize_source(source: Source) -> tuple[dict, dict]:
  """Every split of `source` validated and tokenised in memory: (records by split, metadata with
  counts, warnings, skipped lines, vocab_size, special_ids, prepare_s)."""
  start = time.time()
  train, dev, docs, report = load_records(source.task, source.train_path, source.db_path,
                                          source.dev_path, source.max_bad_lines)
  tokenizer = TaskTokenizer(source.tokenizer_path, source.task)
  db = document_records(docs, tokenizer, source.max_len, report)
  keys = key_ids(db)
  splits = {"train": example_records(train, tokenizer, keys, source.max_len, report),
            "dev": example_records(dev, tokenizer, keys, source.max_len, report, prefix="dev_"),
            "db": db}
  return splits, {"counts": report.counts, "warnings": report.warnings, "skipped": report.skipped,
                  "vocab_size": tokenizer.vocab_size, "special_ids": tokenizer.ids,
                  "prepare_s": time.time() - start}
