"""The reference format's records (docs/ONEGEN.md of the shared docs) and the rules every module
shares: key and document identity, prompts, JSON-lines I/O. Reading and validating files: reading.py.

`train.jsonl` / `dev.jsonl` lines: {"messages": [{"role", "content", "positive", "negative"}, ...]};
`db.jsonl` lines: {"uid", "messages"}.

Key uids: a document "doc" with k RET tokens in its assistant messages has keys "doc" (the first)
and "doc-1" .. "doc-{k-1}"; "doc-0" is read as "doc" (the reference counts from 0).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence

from onegen_jax.data.tasks import Task

ROLES = ("system", "user", "assistant")
_KEY_UID = re.compile(r"([^\s-]+)(?:-(\d+))?")


class DataError(ValueError):
  """Bad input data; `problems` holds one `FILE:LINE: field: problem` line each; `more`: further
  problems of the same kind, counted but not listed."""

  def __init__(self, problems: list[str], more: int = 0):
    self.problems = list(problems)
    listed = self.problems + ([f"... and {more} more like these"] if more else [])
    super().__init__(f"{len(self.problems) + more} problem(s) in the data:\n" + "\n".join(listed))


class ConfigError(ValueError):
  """A config value that cannot work: one line `KEY: problem` per problem (launch.train prints
  it, like a DataError, without a traceback)."""


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


@dataclasses.dataclass(frozen=True)
class Anchor:
  """One query-side RET token of an assistant message, in text order.

  positives: candidate key uids (empty: no positive, a generation-only anchor).
  negatives: hard-negative key uids as given. field: where it came from, for reports.
  """

  positives: tuple[str, ...]
  negatives: tuple[str, ...]
  field: str


@dataclasses.dataclass(frozen=True)
class Example:
  path: str
  line: int
  messages: tuple[Message, ...]
  anchors: tuple[Anchor, ...]


@dataclasses.dataclass(frozen=True)
class Document:
  path: str
  line: int
  uid: str
  messages: tuple[Message, ...]
  num_keys: int

  def text(self, task: Task) -> str:
    """The text a retrieval of this document puts into a context (tasks.Task.document_text)."""
    return task.document_text([m.content for m in self.messages if m.role == "assistant"])


def prompt_messages(messages: Sequence[Message]) -> tuple[Message, ...]:
  """The prompt of a conversation: every message before its last assistant message (all of them
  when there is none). Messages are tokenised one by one, so the prompt's tokens are exactly the
  first tokens of the whole conversation's."""
  last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
  return tuple(messages[:last])


@dataclasses.dataclass
class Report:
  """What reading skipped or changed: `skipped` bad lines (within max_bad_lines), `warnings`
  (data the reference silently drops) and counts."""

  skipped: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  def count(self, name: str, n: int = 1):
    self.counts[name] = self.counts.get(name, 0) + n


def key_uid(doc_uid: str, k: int) -> str:
  """The uid of the k-th key (0-based) of a document."""
  return doc_uid if k == 0 else f"{doc_uid}-{k}"


def canonical_key(uid: str) -> tuple[str, int] | None:
  """"doc" -> ("doc", 0), "doc-3" -> ("doc", 3); None if not a key uid."""
  match = _KEY_UID.fullmatch(uid)
  return None if match is None else (match[1], int(match[2] or 0))


def document_uid(uid: str) -> str:
  """The document a key uid belongs to ("doc-3" -> "doc"); a uid outside the key rule is its own
  document. The one place this mapping lives (index, scoring, benchmarks use it)."""
  parsed = canonical_key(uid)
  return uid if parsed is None else parsed[0]


def nonblank_lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, text) of each non-blank line of a UTF-8 text file."""
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if text.strip():
        yield number, text


def read_jsonl(path: str) -> list[dict]:
  """Every non-blank line of a JSON-lines file; a bad line raises naming FILE:LINE."""
  out = []
  for number, text in nonblank_lines(path):
    try:
      out.append(json.loads(text))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
  return out


def conversation(user: str, assistant: str, positive=None, negative=None) -> dict:
  """A reference-format line: one user message and the assistant's reply, with the reply's
  positive / negative document lists when given."""
  reply = {"role": "assistant", "content": assistant}
  if positive is not None:
    reply.update(positive=positive, negative=negative)
  return {"messages": [{"role": "user", "content": user}, reply]}


def db_entry(task: Task, uid: str, title: str, body: str) -> dict:
  """A reference-format db line: the task's document instruction (with `title`) and `body`."""
  return {"uid": uid, **conversation(task.doc_instruction.format(title=title), body)}


def write_jsonl(path: str, records: Sequence[dict]):
  """One JSON object per line, UTF-8, non-ASCII kept."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
