"""Each task's files: converted from the shaped ../shared/data (sources.py) or given, documents
shortened (--doc_rows), chat-wrapped, subsetted, written to OUT/data/MODE/:

  train.jsonl  training examples that fit the task's row and, with the documents their queries
               bring, an empty batch (the others are left out and counted: nothing is cut, so
               every example keeps its answer, its targets and its queries)
  db.jsonl     the training db
  dev.jsonl    the evaluated dev lines, each with `candidates`: one list of document uids per query
               RET token of its answer (EL: the mention's REL candidates in the KB; RAG: the
               question's own paragraphs, i.e. every document the line lists; given files without
               it: the anchor's listed positives and negatives)
  pool.jsonl   the evaluation pool: every document the evaluated dev lines list or name as a
               candidate (RAG: all dev paragraphs, then --rag_pool_distractors paragraphs of
               --qa_extra_corpus; EL: the dev mentions' gold and candidate entities)

RAG's dev set is multi-hop: a dev question (every tenth of a set) with fewer than two gold queries
(all of nq_open_oracle) trains instead.
  kb.jsonl     the whole db (EL with --el_whole_kb)
  prior_fit.jsonl, prior_fit_db.jsonl  EL: --el_prior_fit_pieces training pieces (docs_train's,
               with their mentions' REL candidates) and the entities they name as candidates,
               which the candidate prior is fit on (never dev)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re

import numpy as np

from benchmarks.quality import sources
from benchmarks.quality.cli import TaskSettings, qa_set_dirs, say
from onegen_jax.data import convert
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.packing import first_fit
from onegen_jax.data.records import Message, document_uid, read_jsonl, write_jsonl
from onegen_jax.data.tasks import EL, MULTIHOP, Task


@dataclasses.dataclass(frozen=True)
class DevLine:
  """A dev line before chat wrapping (what the baselines' query texts read)."""

  user: str  # its user messages, joined
  answer: str  # its gold answer: the last assistant message, markup included
  source: str  # the set it came from ("" when unknown)


@dataclasses.dataclass
class TaskData:
  """One task's files as trained and evaluated, and its dev lines unwrapped."""

  settings: TaskSettings
  train_path: str
  dev_path: str  # the evaluated dev subset, wrapped, with candidates
  db_path: str  # the training db
  pool_path: str  # the evaluation pool
  kb_path: str  # the whole db ("" when not evaluated against it)
  dev: list[DevLine]
  counts: dict[str, int]
  prior_fit_path: str = ""  # EL training lines with candidates ("" when none)
  prior_fit_db_path: str = ""  # ... the entities they name

  @property
  def task(self) -> Task:
    return self.settings.task


@dataclasses.dataclass
class _Splits:
  train: list[dict]
  dev: list[dict]  # unwrapped, with candidates
  db: list[dict]
  dev_sets: list[str]  # source set of each dev line ("" when unknown)
  distractors: list[str] = dataclasses.field(default_factory=list)  # extra-corpus uids, in order
  prior_fit: list[dict] = dataclasses.field(default_factory=list)  # EL training lines, candidates


def template_field(template: str, field: str, text: str) -> str | None:
  """The value of `{field}` in `text` produced by `template` (None if it does not match)."""
  if "{" + field + "}" not in template:
    return None
  unescape = lambda s: s.replace("{{", "{").replace("}}", "}")
  before, after = (unescape(s) for s in template.split("{" + field + "}", 1))
  match = re.search(re.escape(before) + "(.*?)" + re.escape(after) + ("" if after else "$"),
                    text, re.S)
  return match.group(1) if match else None


def short_document(line: dict, task: Task) -> dict:
  """A db line as its assistant text only, prefixed with the title its instruction names (EL:
  'title: description[SE]'); the inserted text of a RAG paragraph does not change."""
  users = " ".join(m["content"] for m in line["messages"] if m["role"] == "user")
  title = template_field(task.doc_instruction, "title", users)
  body = "".join(m["content"] for m in line["messages"] if m["role"] == "assistant")
  return {"uid": line["uid"],
          "messages": [{"role": "assistant", "content": f"{title}: {body}" if title else body}]}


def _dev_line(line: dict, source: str) -> DevLine:
  user = " ".join(m["content"] for m in line["messages"] if m["role"] == "user")
  answer = [m for m in line["messages"] if m["role"] == "assistant"][-1]["content"]
  return DevLine(user, answer, source)


def _entry_docs(entry) -> list[str]:
  uids = [entry] if isinstance(entry, str) else list(entry or [])
  return [document_uid(u) for u in uids if u]


def _entries(line: dict) -> list[tuple[list[str], list[str]]]:
  """Per anchor (query RET token, in order): the documents of its positive and negative entries."""
  return [(_entry_docs(pos), [d for n in (neg or []) for d in _entry_docs(n)])
          for m in line["messages"]
          for pos, neg in zip(m.get("positive") or [], m.get("negative") or [])]


def _listed(line: dict) -> list[list[str]]:
  """Per anchor: its positive and negative documents, positives first."""
  return [list(dict.fromkeys(pos + neg)) for pos, neg in _entries(line)]


def _with_candidates(line: dict, task: Task, spans: dict | None) -> dict:
  """The dev line with `candidates` (kept when it has them; the module docstring says which)."""
  if "candidates" in line:
    return line
  listed = _listed(line)
  if spans is not None:  # EL converted here: each mention's REL candidates, by its span
    _, mentions = task.linked_mentions(line["messages"][-1]["content"], [])
    candidates = [spans.get((m["start"], m["end"]), []) for m in mentions]
  elif task.mode == "rag":  # the question's own paragraphs, for each of its queries
    own = list(dict.fromkeys(u for docs in listed for u in docs))
    candidates = [own] * len(listed)
  else:
    candidates = listed
  return {**line, "candidates": candidates}


def _unsplit(nine: list, tenth: list) -> list:
  """The inverse of convert's split (every tenth example to dev): the lines in file order."""
  out, a, b = [], iter(nine), iter(tenth)
  for i in range(len(nine) + len(tenth)):
    out.append(next(b) if i % 10 == 9 else next(a))
  return out


def _converted_el(args: argparse.Namespace, hf_tokenizer, eos: str) -> _Splits:
  chunking = sources.Chunking(args.el_chunk_tokens, args.el_chunk_sentences)
  shaped = sources.el_sources(args.el_src, os.path.join(args.out, "data", "el_src"),
                              hf_tokenizer, chunking, args.el_dev_every)
  train_a, train_b, db = convert.convert_el(shaped.train_dir, eos)
  dev_a, dev_b, _ = convert.convert_el(shaped.dev_dir, eos)
  dev = [_with_candidates(line, EL, spans)
         for line, spans in zip(_unsplit(dev_a, dev_b), shaped.dev_candidates)]
  train = _unsplit(train_a, train_b)  # docs_train's pieces first, in order, then OKE's
  prior_fit = [_with_candidates(line, EL, spans)
               for line, spans in zip(train, shaped.train_candidates)]
  return _Splits(train, dev, db, ["el"] * len(dev), prior_fit=prior_fit)


def multi_hop_dev(train: list[dict], dev: list[dict]) -> tuple[list[dict], list[dict]]:
  """(train, dev) with every dev line of fewer than two gold queries moved to the end of train."""
  multi_hop = [len(_entries(line)) >= 2 for line in dev]
  return (train + [line for line, multi in zip(dev, multi_hop) if not multi],
          [line for line, multi in zip(dev, multi_hop) if multi])


def _converted_rag(args: argparse.Namespace, hf_tokenizer, eos: str) -> _Splits:
  """The sets converted; dev keeps the multi-hop questions of each set's dev tenth."""
  dirs, extra, _ = sources.rag_sources(qa_set_dirs(args.qa_sets), args.qa_extra_corpus,
                                       os.path.join(args.out, "data", "rag_src"), hf_tokenizer,
                                       args.rag_paragraph_tokens)
  splits, db = _Splits([], [], [], []), {}
  for src in dirs:
    train, dev, docs = convert.convert_qa(src, eos, extra_corpus=extra or None)
    train, dev = multi_hop_dev(train, dev)
    splits.train += train
    splits.dev += [_with_candidates(line, MULTIHOP, None) for line in dev]
    splits.dev_sets += [os.path.basename(os.path.normpath(src))] * len(dev)
    for doc in docs:
      db.setdefault(doc["uid"], doc)
  splits.db = list(db.values())
  splits.distractors = [document_uid(p["pid"]) for p in read_jsonl(extra)] if extra else []
  return splits


def _read(settings: TaskSettings, args: argparse.Namespace, hf_tokenizer) -> _Splits:
  """The given reference-format files, or the shaped and converted ../shared/data."""
  eos = hf_tokenizer.eos_token or "</s>"
  if all(settings.given):
    train, dev, db = (read_jsonl(p) for p in settings.given)
    return _Splits(train, [_with_candidates(line, settings.task, None) for line in dev], db,
                   [""] * len(dev))
  return (_converted_el if settings.mode == "el" else _converted_rag)(args, hf_tokenizer, eos)


def _wrap(lines: list[dict], hf_tokenizer) -> list[dict]:
  """Copies of reference-format lines whose user messages are in the chat template."""
  out = copy.deepcopy(lines)
  for line in out:
    for m in line["messages"]:
      if m["role"] == "user":
        m["content"] = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": m["content"]}], tokenize=False, add_generation_prompt=True)
  return out


def _lengths(lines: list[dict], tokenizer: TaskTokenizer) -> np.ndarray:
  """Tokens of each line's whole example, as training tokenises it (uncut)."""
  encoded = tokenizer.tokenize_with_roles(
      [[Message(m["role"], m["content"]) for m in line["messages"]] for line in lines],
      tokenizer.task.query_token, 1 << 30)
  return np.asarray([len(e.tokens) for e in encoded], np.int64)


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


def _line_docs(line: dict) -> list[str]:
  """Every document a line lists (positives first) or names as a candidate."""
  listed = [u for docs in _listed(line) for u in docs]
  named = [document_uid(u) for c in line.get("candidates", []) for u in c]
  return list(dict.fromkeys(listed + named))


def _limit_db(db: list[dict], keep: list[dict], limit: int, rng: np.random.Generator) -> list[dict]:
  """At most `limit` documents (0: all): every document the `keep` lines list, then random
  others."""
  if not limit or limit >= len(db):
    return db
  by_uid = {d["uid"]: d for d in db}
  chosen = [u for u in dict.fromkeys(u for line in keep for u in _line_docs(line)) if u in by_uid]
  others = [d["uid"] for d in db if d["uid"] not in set(chosen)]
  chosen += [others[i] for i in sorted(rng.permutation(len(others))[:max(limit - len(chosen), 0)])]
  taken = set(chosen)
  return [d for d in db if d["uid"] in taken]


def _pool(db: list[dict], dev: list[dict], distractors: list[str], limit: int) -> list[dict]:
  """The documents of `db` that the dev lines list or name as candidates, then the first
  `limit` (-1: all) distractor uids that are not among them, in db order."""
  wanted = {u for line in dev for u in _line_docs(line)}
  extra = [u for u in distractors if u not in wanted]
  wanted |= set(extra if limit < 0 else extra[:limit])
  return [d for d in db if d["uid"] in wanted]


def _packable(lines: list[dict], lengths: np.ndarray, doc_lengths: dict[str, int],
              settings: TaskSettings) -> np.ndarray:
  """Per line: whether it fits an empty batch with the documents its queries bring (per valid
  anchor, up to n_pos: its longest listed positive, since sampling may pick any, and n_neg listed
  negatives), as the packer places them; a batch that cannot hold one example stops training with
  an error, hours in."""
  rows = settings.rows // settings.accum_steps
  out = []
  for line, n in zip(lines, lengths):
    valid = [(pos, neg) for pos, neg in _entries(line) if pos and neg][:settings.n_pos]
    longest = lambda pos: [max(pos, key=lambda d: doc_lengths.get(d, 0))]
    docs = dict.fromkeys(d for pos, neg in valid for d in longest(pos) + neg[:settings.n_neg])
    sizes = [int(n), *(doc_lengths[d] for d in docs if d in doc_lengths)]
    out.append(n <= settings.seq_len and first_fit([0] * rows, sizes, settings.seq_len) is not None)
  return np.asarray(out, bool)


def _subset(splits: _Splits, settings: TaskSettings, args: argparse.Namespace,
            tokenizer: TaskTokenizer, wrap, counts: dict) -> tuple[_Splits, list[int]]:
  """(the training lines that fit, wrapped; the evaluated dev lines, wrapped; the training db),
  and the indices of the evaluated dev lines in `splits.dev`."""
  rng = np.random.default_rng(args.seed)
  train = splits.train
  if args.train_limit and args.train_limit < len(train):
    train = [train[i] for i in sorted(rng.permutation(len(train))[:args.train_limit])]
  train = wrap(train)
  lengths = _lengths(train, tokenizer)
  doc_lengths = dict(zip((d["uid"] for d in splits.db), _lengths(splits.db, tokenizer).tolist()))
  fits = _packable(train, lengths, doc_lengths, settings)
  counts["train_too_long"] = int(np.sum(lengths > settings.seq_len))
  counts["train_unpackable"] = int(np.sum(~fits)) - counts["train_too_long"]
  train = [line for line, ok in zip(train, fits) if ok]
  dev = wrap(splits.dev)
  keep = list(range(len(dev)))
  if settings.dev_max_tokens:
    keep = [i for i, n in enumerate(_lengths(dev, tokenizer)) if n <= settings.dev_max_tokens]
  picked = [keep[i] for i in _round_robin([splits.dev_sets[i] for i in keep], settings.dev_limit)]
  db = _limit_db(splits.db, train, settings.db_limit, rng)
  return _Splits(train, [dev[i] for i in picked], db, [splits.dev_sets[i] for i in picked]), picked


def prepare_task(settings: TaskSettings, args: argparse.Namespace, hf_tokenizer,
                 tokenizer: TaskTokenizer) -> TaskData:
  """Converts (or reads) a task's data, takes the subsets and writes OUT/data/MODE/*.jsonl."""
  splits = _read(settings, args, hf_tokenizer)
  if args.doc_rows == "short":
    splits.db = [short_document(d, settings.task) for d in splits.db]
  counts = {"train_all": len(splits.train), "dev_all": len(splits.dev), "db_all": len(splits.db)}
  wrap = (lambda lines: _wrap(lines, hf_tokenizer)) if args.chat_template else copy.deepcopy
  splits.db = wrap(splits.db)
  kept, picked = _subset(splits, settings, args, tokenizer, wrap, counts)
  distractors = args.rag_pool_distractors if settings.mode == "rag" else 0
  files = {"train": kept.train, "dev": kept.dev, "db": kept.db,
           "pool": _pool(splits.db, kept.dev, splits.distractors, distractors)}
  if settings.mode == "el" and args.el_whole_kb:
    files["kb"] = splits.db
  if splits.prior_fit and args.el_prior_fit_pieces:
    files["prior_fit"] = _prior_fit_lines(splits.prior_fit, args.el_prior_fit_pieces, args.seed,
                                          wrap)
    named = {u for line in files["prior_fit"] for c in line["candidates"] for u in c}
    files["prior_fit_db"] = [d for d in splits.db if d["uid"] in named]
  counts.update({name: len(lines) for name, lines in files.items()})
  counts["dev_queries"] = sum(len(line["candidates"]) for line in kept.dev)
  for s in sorted(set(kept.dev_sets)):
    counts[f"dev_{s}"] = kept.dev_sets.count(s)
  out = os.path.join(args.out, "data", settings.mode)
  os.makedirs(out, exist_ok=True)
  paths = {name: os.path.join(out, f"{name}.jsonl") for name in files}
  for name, lines in files.items():
    write_jsonl(paths[name], lines)
  say(f"{settings.mode} data in {out}: {counts}")
  dev = [_dev_line(splits.dev[i], s) for i, s in zip(picked, kept.dev_sets)]
  return TaskData(settings, paths["train"], paths["dev"], paths["db"], paths["pool"],
                  paths.get("kb", ""), dev, counts, paths.get("prior_fit", ""),
                  paths.get("prior_fit_db", ""))


def _prior_fit_lines(lines: list[dict], limit: int, seed: int, wrap) -> list[dict]:
  """At most `limit` (-1: all) of the training lines with a candidate list, at random (seeded),
  in file order, wrapped as training wraps them."""
  usable = [line for line in lines if any(line["candidates"])]
  if 0 <= limit < len(usable):
    picked = np.random.default_rng(seed).permutation(len(usable))[:limit]
    usable = [usable[i] for i in sorted(picked)]
  return wrap(usable)
