"""Each task's files: converted from ../shared/data (or given), subsetted, chat-wrapped, written to
OUT/data/MODE/{train,dev,db}.jsonl."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os

import numpy as np

from benchmarks.quality.cli import TaskSettings, say
from onegen_jax.data import convert
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import Message, document_uid, read_jsonl, write_jsonl
from onegen_jax.data.tasks import Task


@dataclasses.dataclass(frozen=True)
class DevLine:
  """A dev line before chat wrapping (what the pipeline's query texts read)."""

  user: str  # its user messages, joined
  answer: str  # its gold answer: the last assistant message, markup included
  source: str  # the set it came from ("" when unknown)


@dataclasses.dataclass
class TaskData:
  """One task's files as trained and evaluated, and its dev lines unwrapped."""

  settings: TaskSettings
  train_path: str
  dev_path: str  # the evaluated dev subset, wrapped
  db_path: str
  dev: list[DevLine]  # the same dev lines, unwrapped
  counts: dict[str, int]

  @property
  def task(self) -> Task:
    return self.settings.task


@dataclasses.dataclass
class _Splits:
  train: list[dict]
  dev: list[dict]
  db: list[dict]
  dev_sets: list[str]  # source set of each dev line ("" when unknown)


def _dev_line(line: dict, source: str) -> DevLine:
  user = " ".join(m["content"] for m in line["messages"] if m["role"] == "user")
  answer = [m for m in line["messages"] if m["role"] == "assistant"][-1]["content"]
  return DevLine(user, answer, source)


def _anchor_docs(line: dict, field: str) -> list[str]:
  """Document uids the line's anchors list under `field` ("positive" or "negative"), in order."""
  uids = []
  for m in line["messages"]:
    for entry in m.get(field) or []:
      uids += [entry] if isinstance(entry, str) else list(entry or [])
  return list(dict.fromkeys(document_uid(u) for u in uids if u))


def _limit_db(db: list[dict], keep: list[dict], limit: int, rng: np.random.Generator) -> list[dict]:
  """At most `limit` documents (0: all): every positive of the `keep` lines, then their listed
  negatives, then random others."""
  if not limit or limit >= len(db):
    return db
  positives = dict.fromkeys(u for line in keep for u in _anchor_docs(line, "positive"))
  negatives = [u for line in keep for u in _anchor_docs(line, "negative") if u not in positives]
  by_uid = {d["uid"]: d for d in db}
  chosen = [u for u in positives if u in by_uid]
  chosen += [u for u in dict.fromkeys(negatives) if u in by_uid][:max(limit - len(chosen), 0)]
  taken = set(chosen)
  others = [d["uid"] for d in db if d["uid"] not in taken]
  chosen += [others[i] for i in sorted(rng.permutation(len(others))[:max(limit - len(chosen), 0)])]
  taken = set(chosen)
  return [d for d in db if d["uid"] in taken]


def _round_robin(sets: list[str], limit: int) -> list[int]:
  """Indices of at most `limit` lines taken in turn from each source set, in file order."""
  by_set: dict[str, list[int]] = {}
  for i, s in enumerate(sets):
    by_set.setdefault(s, []).append(i)
  queues, picked = list(by_set.values()), []
  while queues and (not limit or len(picked) < limit):
    for q in list(queues):
      if q and (not limit or len(picked) < limit):
        picked.append(q.pop(0))
      if not q:
        queues.remove(q)
  return sorted(picked)


def _wrap(lines: list[dict], hf_tokenizer) -> list[dict]:
  """Copies of reference-format lines whose user messages are in the chat template."""
  out = copy.deepcopy(lines)
  for line in out:
    for m in line["messages"]:
      if m["role"] == "user":
        m["content"] = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": m["content"]}], tokenize=False, add_generation_prompt=True)
  return out


def _converted(settings: TaskSettings, args: argparse.Namespace, eos: str) -> _Splits:
  """The task's splits converted from ../shared/data by onegen_jax.data.convert."""
  if settings.mode == "el":
    train, dev, db = convert.convert_el(args.el_src, eos)
    return _Splits(train, dev, db, ["el"] * len(dev))
  splits, db = _Splits([], [], [], []), {}
  for src in [s for s in args.qa_sets.split(",") if s]:
    train, dev, docs = convert.convert_qa(src, eos, extra_corpus=args.qa_extra_corpus or None)
    splits.train += train
    splits.dev += dev
    splits.dev_sets += [os.path.basename(os.path.normpath(src))] * len(dev)
    for doc in docs:
      db.setdefault(doc["uid"], doc)
  splits.db = list(db.values())
  return splits


def _read(settings: TaskSettings, args: argparse.Namespace, eos: str) -> _Splits:
  """The given reference-format files, or the converted ones."""
  if all(settings.given):
    train, dev, db = (read_jsonl(p) for p in settings.given)
    return _Splits(train, dev, db, [""] * len(dev))
  if any(settings.given):
    raise ValueError(f"give all of --{settings.mode}_train, --{settings.mode}_dev, "
                     f"--{settings.mode}_db or none")
  return _converted(settings, args, eos)


def _short_dev(dev: list[dict], tokenizer: TaskTokenizer, max_tokens: int) -> list[int]:
  """Indices of the dev lines whose whole example is at most `max_tokens` tokens."""
  encoded = tokenizer.tokenize_with_roles(
      [[Message(m["role"], m["content"]) for m in line["messages"]] for line in dev],
      tokenizer.task.query_token, 1 << 30)
  return [i for i, e in enumerate(encoded) if len(e.tokens) <= max_tokens]


def _subset(splits: _Splits, settings: TaskSettings, args: argparse.Namespace,
            tokenizer: TaskTokenizer) -> _Splits:
  """The training limit, the dev filter and limit, and the db limit (seeded by --seed)."""
  rng = np.random.default_rng(args.seed)
  train, dev, dev_sets = splits.train, splits.dev, splits.dev_sets
  if args.train_limit and args.train_limit < len(train):
    train = [train[i] for i in sorted(rng.permutation(len(train))[:args.train_limit])]
  if settings.dev_max_tokens:
    keep = _short_dev(dev, tokenizer, settings.dev_max_tokens)
    dev, dev_sets = [dev[i] for i in keep], [dev_sets[i] for i in keep]
  picked = _round_robin(dev_sets, settings.dev_limit)
  dev, dev_sets = [dev[i] for i in picked], [dev_sets[i] for i in picked]
  return _Splits(train, dev, _limit_db(splits.db, train + dev, settings.db_limit, rng), dev_sets)


def prepare_task(settings: TaskSettings, args: argparse.Namespace, hf_tokenizer,
                 tokenizer: TaskTokenizer) -> TaskData:
  """Converts (or reads) a task's data, takes the subsets and writes OUT/data/MODE/*.jsonl."""
  splits = _read(settings, args, hf_tokenizer.eos_token or "</s>")
  counts = {"train_all": len(splits.train), "dev_all": len(splits.dev), "db_all": len(splits.db)}
  splits = _subset(splits, settings, args, tokenizer)
  counts.update(train=len(splits.train), dev=len(splits.dev), db=len(splits.db))
  for s in sorted(set(splits.dev_sets)):
    counts[f"dev_{s}"] = splits.dev_sets.count(s)
  out = os.path.join(args.out, "data", settings.mode)
  os.makedirs(out, exist_ok=True)
  paths = {}
  for name in ("train", "dev", "db"):
    lines = getattr(splits, name)
    paths[name] = os.path.join(out, f"{name}.jsonl")
    write_jsonl(paths[name], _wrap(lines, hf_tokenizer) if args.chat_template else lines)
  say(f"{settings.mode} data in {out}: {counts}")
  dev = [_dev_line(line, s) for line, s in zip(splits.dev, splits.dev_sets)]
  return TaskData(settings, paths["train"], paths["dev"], paths["db"], dev, counts)
