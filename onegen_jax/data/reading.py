"""Reading and validating files in the reference format (records.py has the types).

Every problem is reported as `FILE:LINE: field: problem`, and all of them are collected before
anything fails: `load_records` raises one `DataError` listing every bad line of every file, unless
a file has at most `max_bad_lines` bad lines, which are then skipped (and listed in the report).
"""

from __future__ import annotations

import dataclasses
import json
import re

from onegen_jax.data.records import (ROLES, Anchor, DataError, Document, Example, Message, Report,
                                     canonical_key, key_uid, nonblank_lines)
from onegen_jax.data.tasks import Task

_DOC_UID = re.compile(r"[^\s-]+")


def _type(x) -> str:
  return "null" if x is None else type(x).__name__


class _Line:
  """Problems of one line, each prefixed with FILE:LINE."""

  def __init__(self, path: str, number: int):
    self.where = f"{path}:{number}"
    self.problems: list[str] = []

  def bad(self, field: str, problem: str):
    self.problems.append(f"{self.where}: {field}: {problem}")


def _parse(text: str, line: _Line):
  try:
    item = json.loads(text)
  except json.JSONDecodeError as e:
    line.bad("json", f"invalid JSON ({e.msg} at column {e.colno})")
    return None
  if not isinstance(item, dict):
    line.bad("json", f"expected an object, got {_type(item)}")
    return None
  return item


def _messages(item: dict, line: _Line) -> list[tuple[int, dict]]:
  """The well-formed messages (index, dict); problems of the others are recorded."""
  if "messages" not in item:
    line.bad("messages", "missing")
    return []
  messages = item["messages"]
  if not isinstance(messages, list) or not messages:
    line.bad("messages", f"expected a non-empty list, got {_type(messages)}")
    return []
  good = []
  for i, m in enumerate(messages):
    field = f"messages[{i}]"
    if not isinstance(m, dict):
      line.bad(field, f"expected an object, got {_type(m)}")
      continue
    ok = True
    if m.get("role") not in ROLES:
      line.bad(f"{field}.role", f"unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
      ok = False
    if not isinstance(m.get("content"), str):
      line.bad(f"{field}.content", f"expected a string, got {_type(m.get('content'))}")
      ok = False
    if ok:
      good.append((i, m))
  return good


def _check_spans(content: str, task: Task, field: str, line: _Line):
  """CTX spans open and close in order, unnested, and hold no query RET token."""
  tags = {t: (open_, close) for open_, close in task.ctx_spans for t in (open_, close)}
  if not tags:
    return
  pattern = "|".join(re.escape(t) for t in (*tags, task.query_token))
  open_tag = None
  for match in re.finditer(pattern, content):
    token = match[0]
    if token == task.query_token:
      if open_tag:
        line.bad(field, f"a {token} token inside a {open_tag} span")
    elif token == tags[token][0]:
      if open_tag:
        line.bad(field, f"{token} inside an open {open_tag} span")
      open_tag = token
    else:
      if open_tag != tags[token][0]:
        line.bad(field, f"{token} without {tags[token][0]}")
      open_tag = None
  if open_tag:
    line.bad(field, f"unclosed {open_tag}")


def _uids(value, field: str, line: _Line, allow_null: bool) -> tuple[str, ...] | None:
  """A uid, a list of uids (or null) -> canonical key uids; None after recording a problem."""
  if value is None and allow_null:
    return ()
  values = [value] if isinstance(value, str) and allow_null else value
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    expected = "a uid, a list of uids or null" if allow_null else "a list of uids"
    line.bad(field, f"expected {expected}, got {json.dumps(value)[:80]}")
    return None
  uids = []
  for v in values:
    parsed = canonical_key(v)
    if parsed is None:
      line.bad(field, f"bad uid {v!r} (expected DOC or DOC-K: DOC without '-' or whitespace, K >= 0)")
      return None
    uids.append(key_uid(*parsed))
  return tuple(uids)


def _anchors(i: int, m: dict, task: Task, line: _Line) -> list[Anchor]:
  """The anchors of assistant message i, with their positive and negative entries checked."""
  field = f"messages[{i}]"
  count = m["content"].count(task.query_token)
  lists = {}
  for name in ("positive", "negative"):
    value = m.get(name)
    if value is None and count == 0:
      value = []
    if value is None:
      line.bad(f"{field}.{name}", f"missing (the content has {count} {task.query_token} tokens)")
    elif not isinstance(value, list):
      line.bad(f"{field}.{name}", f"expected a list, got {_type(value)}")
    elif len(value) != count:
      line.bad(f"{field}.{name}", f"{len(value)} entries for {count} {task.query_token} tokens in "
                                  "the content")
    else:
      lists[name] = [_uids(v, f"{field}.{name}[{j}]", line, allow_null=name == "positive")
                     for j, v in enumerate(value)]
  if len(lists) < 2 or any(u is None for u in lists["positive"] + lists["negative"]):
    return []
  return [Anchor(p, n, f"{field}.positive[{j}]")
          for j, (p, n) in enumerate(zip(lists["positive"], lists["negative"]))]


def _read_example(path: str, number: int, text: str, task: Task) -> tuple[Example | None, list[str]]:
  line = _Line(path, number)
  item = _parse(text, line)
  if item is None:
    return None, line.problems
  messages = _messages(item, line)
  anchors = []
  for i, m in messages:
    if m["role"] == "assistant":
      _check_spans(m["content"], task, f"messages[{i}].content", line)
      anchors += _anchors(i, m, task, line)
  if "messages" in item and isinstance(item["messages"], list) and not any(
      isinstance(m, dict) and m.get("role") == "assistant" for m in item["messages"]):
    line.bad("messages", "no assistant message (nothing to train on)")
  if line.problems:
    return None, line.problems
  return Example(path, number, tuple(Message(m["role"], m["content"]) for _, m in messages),
                 tuple(anchors)), []


def _read_document(path: str, number: int, text: str, task: Task) -> tuple[Document | None, list[str]]:
  line = _Line(path, number)
  item = _parse(text, line)
  if item is None:
    return None, line.problems
  uid = item.get("uid")
  if "uid" not in item:
    line.bad("uid", "missing")
  elif not isinstance(uid, str):
    line.bad("uid", f"expected a string, got {_type(uid)}")
  elif not _DOC_UID.fullmatch(uid):
    line.bad("uid", f"bad uid {uid!r} (a document uid is non-empty, without '-' or whitespace)")
  messages = _messages(item, line)
  num_keys = sum(m["content"].count(task.doc_token) for _, m in messages if m["role"] == "assistant")
  if messages and not any(m["content"].strip() for _, m in messages):
    line.bad("messages", "empty document (every content is blank)")
  elif messages and num_keys == 0:
    line.bad("messages", f"no {task.doc_token} token in an assistant message (a document needs "
                         "at least one key)")
  if line.problems:
    return None, line.problems
  return Document(path, number, uid, tuple(Message(m["role"], m["content"]) for _, m in messages),
                  num_keys), []


def _read(path: str, parse, task: Task) -> tuple[list, list[list[str]]]:
  """(parsed items, the problems of each bad line)."""
  items, bad = [], []
  for number, text in nonblank_lines(path):
    item, line_problems = parse(path, number, text, task)
    if item is None:
      bad.append(line_problems)
    else:
      items.append(item)
  return items, bad


def _dedupe(documents: list[Document]) -> tuple[list[Document], list[list[str]]]:
  """(documents with first-seen uids, a problem for each later duplicate)."""
  first, kept, bad = {}, [], []
  for doc in documents:
    if doc.uid in first:
      bad.append([f"{doc.path}:{doc.line}: uid: duplicate uid {doc.uid!r} (first on line "
                  f"{first[doc.uid]})"])
    else:
      first[doc.uid] = doc.line
      kept.append(doc)
  return kept, bad


def _settle(bad: list[list[str]], max_bad_lines: int, problems: list[str], report: Report):
  """A file's bad lines fail the run if there are more than max_bad_lines; else they are skipped."""
  flat = [p for line_problems in bad for p in line_problems]
  if len(bad) > max_bad_lines:
    problems += flat
  elif bad:
    report.skipped += flat
    report.count("skipped_lines", len(bad))


def check_references(examples: list[Example], keys: set[str], report: Report) -> list[Example]:
  """Drops positives that name no key of the db, reporting them; counts such negatives (kept: an
  anchor is valid only if it lists negatives, and those are filtered when sampling).

  An anchor left without a positive is generation-only (the reference does this silently).
  """
  out = []
  for ex in examples:
    anchors = []
    for a in ex.anchors:
      missing = [u for u in a.positives if u not in keys]
      positives = tuple(u for u in a.positives if u in keys)
      if missing:
        report.count("positives_missing_from_db", len(missing))
        fate = "the anchor is generation-only" if not positives else "dropped"
        report.warnings.append(f"{ex.path}:{ex.line}: {a.field}: {', '.join(map(repr, missing))} "
                               f"not in the db; {fate}")
        report.count("anchors_without_db_positive", not positives)
      report.count("negatives_missing_from_db", sum(u not in keys for u in a.negatives))
      anchors.append(dataclasses.replace(a, positives=positives))
    out.append(dataclasses.replace(ex, anchors=tuple(anchors)))
  return out


def check_insertions(examples: list[Example], documents: list[Document], task: Task,
                     report: Report):
  """Warns about each query RET token whose CTX span (`<paragraph>...</paragraph>` right after it)
  is not the text that inference inserts for any of its positives (Document.text): the model
  would be trained on one context and served another."""
  if not task.ctx_spans:
    return
  texts = {d.uid: d.text(task) for d in documents}
  open_tag, close_tag = task.ctx_spans[0]
  span = re.compile(re.escape(task.query_token) + "(" + re.escape(open_tag) + ".*?"
                    + re.escape(close_tag) + ")?", re.DOTALL)
  for ex in examples:
    contents = "".join(m.content for m in ex.messages if m.role == "assistant")
    for anchor, match in zip(ex.anchors, span.finditer(contents)):
      docs = {canonical_key(u)[0] for u in anchor.positives}
      if match[1] and docs and match[1] not in {task.insertion(texts[d]) for d in docs}:
        report.count("insertions_differing_from_db")
        if report.counts["insertions_differing_from_db"] <= 20:
          report.warnings.append(
              f"{ex.path}:{ex.line}: {anchor.field}: the {open_tag} span after this query is not "
              f"the text inference inserts for {'/'.join(sorted(docs))} (its db assistant "
              f"content without {task.doc_token})")


def _documents(task: Task, db_path: str, max_bad_lines: int, problems: list[str],
               report: Report) -> list[Document]:
  db, bad = _read(db_path, _read_document, task)
  db, duplicates = _dedupe(db)
  _settle(bad + duplicates, max_bad_lines, problems, report)
  return db


def load_documents(task: Task, db_path: str, max_bad_lines: int = 0) -> tuple[list[Document], Report]:
  """(documents of a db.jsonl, report); raises DataError listing every problem."""
  problems: list[str] = []
  report = Report()
  db = _documents(task, db_path, max_bad_lines, problems, report)
  if problems:
    raise DataError(problems)
  return db, report


def load_records(task: Task, train_path: str, db_path: str, dev_path: str | None = None,
                 max_bad_lines: int = 0) -> tuple[list[Example], list[Example], list[Document], Report]:
  """(train examples, dev examples, documents, report); raises DataError listing every problem.

  max_bad_lines: per file, how many bad lines may be skipped instead of failing.
  """
  problems: list[str] = []
  report = Report()
  db = _documents(task, db_path, max_bad_lines, problems, report)
  train, bad = _read(train_path, _read_example, task)
  _settle(bad, max_bad_lines, problems, report)
  dev = []
  if dev_path:
    dev, bad = _read(dev_path, _read_example, task)
    _settle(bad, max_bad_lines, problems, report)
  if problems:
    raise DataError(problems)
  keys = {key_uid(d.uid, k) for d in db for k in range(d.num_keys)}
  train, dev = check_references(train, keys, report), check_references(dev, keys, report)
  check_insertions(train + dev, db, task, report)
  return train, dev, db, report
