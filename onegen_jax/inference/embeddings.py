"""Texts -> vectors with the model, outside generation (the server's /v1/embeddings).

A document text gets the key launch.build_index would store for it: the db document a converter
writes for the text (`records.db_entry`: the task's document instruction with a title, then the
text with its document RET token), tokenised by `tokenized.document_records` with the run's
training max_len and read at that RET token by `run_dir.document_encoder` (encode_db's). A query text
gets what the engine searches when the model emits the query RET token right after the text's
prompt (`requests.prompt_tokens` of one user message): the normalised hidden state there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onegen_jax.data.records import Document, Message, Report, db_entry
from onegen_jax.data.tokenized import document_records
from onegen_jax.inference.requests import prompt_tokens
from onegen_jax.inference.run_dir import LoadedRun, document_encoder
from onegen_jax.retrieval.encode import EncodeItem, Encoder


class Unencodable(ValueError):
  """A text the model cannot embed (too long, several keys); the message names it (input.I)."""


class Embedder:
  """The run's document and query vectors; `capacity`: the longest query sequence (prompt and
  query token), the engine's cache row. Each method returns (vectors float32 [texts, D], the
  number of tokens encoded), or raises Unencodable."""

  def __init__(self, run: LoadedRun, capacity: int):
    self.run = run
    self._documents = document_encoder(run)
    self.doc_len = self._documents.seq_len
    rows = self._documents.rows
    self._queries = Encoder(run.model, run.mesh, rows=rows, seq_len=capacity, max_reads=4 * rows)
    self.capacity = capacity

  def documents(self, texts: Sequence[str], titles: Sequence[str]) -> tuple[np.ndarray, int]:
    """The key of each text as a db document titled titles[i] (one key each: a text holding no
    document RET token gets one at its end)."""
    task = self.run.task
    docs = []
    for i, (text, title) in enumerate(zip(texts, titles)):
      keys = text.count(task.doc_token)
      if keys > 1:
        raise Unencodable(f"input.{i}: {keys} {task.doc_token} tokens; an embedding is one key")
      entry = db_entry(task, f"input{i}", title, text if keys else text + task.doc_token)
      docs.append(Document("<request>", i, entry["uid"],
                           tuple(Message(m["role"], m["content"]) for m in entry["messages"]), 1))
    records = document_records(docs, self.run.tokenizer, self.doc_len, Report())
    kept = {r["uid"] for r in records}
    for i, doc in enumerate(docs):
      if doc.uid not in kept:
        raise Unencodable(f"input.{i}: the document is longer than the run's {self.doc_len} "
                         "tokens; truncation cut its key away")
    items = [EncodeItem(r["tokens"], tuple(r["positions"])) for r in records]
    return (self._documents.encode(self.run.params, items),
            sum(len(r["tokens"]) for r in records))

  def queries(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
    """The query vector right after each text's prompt."""
    prompts = prompt_tokens(self.run, [(Message("user", t),) for t in texts], max_len=1 << 62)
    query = self.run.tokenizer.ids[self.run.task.query_token]
    for i, tokens in enumerate(prompts):
      if not tokens:
        raise Unencodable(f"input.{i}: the text has no tokens")
      if len(tokens) + 1 > self.capacity:
        raise Unencodable(f"input.{i}: the prompt has {len(tokens)} tokens; with the query token "
                         f"it must fit the cache of {self.capacity}")
    items = [EncodeItem(np.asarray(p + [query], np.int32), (len(p),)) for p in prompts]
    return self._queries.encode(self.run.params, items), sum(len(p) + 1 for p in prompts)
