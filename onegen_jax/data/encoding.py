"""Tokenisation with token roles, exactly as docs/ONEGEN.md of the shared docs states.

Each message is tokenised on its own (no BOS/EOS added; the data carries its own) and the pieces are
concatenated. `is_target[i]` says whether token i is a GEN target (its prediction from position
i-1 is trained):
- user and system tokens: CTX (False);
- assistant tokens: GEN (True), except spans from a CTX open tag to its close tag inclusive, and
  the token right after each RET token (that position gets only the contrastive loss);
- the RET token itself is a GEN target: the model learns to emit it.
RET tokens count only inside assistant messages (query RET for examples, document RET for db
documents); a literal RET token in a user instruction is context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from transformers import AutoTokenizer

from onegen_jax.data.records import Message
from onegen_jax.data.tasks import Task

_BATCH = 512  # messages per call of the (Rust, multi-threaded) fast tokenizer


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """tokens int32 [n]; is_target bool [n]; rets int32 [r]: positions of the RET tokens in
  assistant messages, in order; cut: tokens removed by truncation."""

  tokens: np.ndarray
  is_target: np.ndarray
  rets: np.ndarray
  cut: int = 0


class TaskTokenizer:
  """A Hugging Face tokenizer from a local directory plus the task's special tokens (by name)."""

  def __init__(self, path: str, task: Task):
    self.task = task
    self.hf = AutoTokenizer.from_pretrained(path)
    self.hf.add_tokens(list(task.special_tokens), special_tokens=True)
    self.ids = {t: self.hf.convert_tokens_to_ids(t) for t in task.special_tokens}
    for token, token_id in self.ids.items():
      if self.hf.encode(f"a {token} b", add_special_tokens=False).count(token_id) != 1:
        raise ValueError(f"the tokenizer at {path} does not keep {token!r} as one token")
    self._spans = [(self.ids[o], self.ids[c]) for o, c in task.ctx_spans]

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def description_ids(self) -> dict[int, list[int]]:
    """Special token id -> token ids of its description (for initialising its embedding)."""
    tokens, descriptions = zip(*self.task.descriptions)
    return dict(zip((self.ids[t] for t in tokens), self.tokenize(descriptions)))

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text on its own, without BOS/EOS: the one text -> tokens function of
    training (each message) and inference (each prompt message, each inserted document)."""
    ids = []
    for start in range(0, len(texts), _BATCH):
      chunk = list(texts[start:start + _BATCH])
      ids += self.hf(chunk, add_special_tokens=False)["input_ids"] if chunk else []
    return ids

  def insertion_tokens(self, document_text: str) -> list[int]:
    """The tokens that follow a query RET token which retrieved a document of this text (RAG):
    `<paragraph>{text}</paragraph>` tokenised as one string, exactly as inside a training
    message (the tags are special tokens, so the text is a non-initial piece, as in training:
    a SentencePiece tokenizer prepends its space only to a string's first piece)."""
    return self.tokenize([self.task.insertion(document_text)])[0]

  def tokenize_with_roles(self, conversations: Sequence[Sequence[Message]], ret_token: str,
             max_len: int) -> list[Tokenized]:
    """Encodes each conversation, cut to its first max_len tokens (RET tokens past the cut are
    dropped from `rets`; `cut` counts the removed tokens)."""
    pieces = self.tokenize([m.content for conv in conversations for m in conv])
    out, i = [], 0
    for conv in conversations:
      out.append(self._roles(conv, pieces[i:i + len(conv)], self.ids[ret_token], max_len))
      i += len(conv)
    return out

  def _roles(self, conv: Sequence[Message], pieces: list[list[int]], ret_id: int,
             max_len: int) -> Tokenized:
    tokens = np.asarray([t for p in pieces for t in p], np.int32)
    is_target = np.zeros(len(tokens), bool)
    is_ret = np.zeros(len(tokens), bool)
    start = 0
    for message, piece in zip(conv, pieces):
      span = slice(start, start + len(piece))
      if message.role == "assistant":
        is_target[span] = True
        is_ret[span] = tokens[span] == ret_id
        for open_id, close_id in self._spans:
          self._mask_spans(tokens[span], is_target[span], open_id, close_id)
      start += len(piece)
    rets = np.flatnonzero(is_ret).astype(np.int32)
    after = rets + 1
    is_target[after[after < len(tokens)]] = False
    cut = max(len(tokens) - max_len, 0)
    if cut:
      tokens, is_target, rets = tokens[:max_len], is_target[:max_len], rets[rets < max_len]
    return Tokenized(tokens, is_target, rets, cut)

  @staticmethod
  def _mask_spans(tokens: np.ndarray, is_target: np.ndarray, open_id: int, close_id: int):
    """Sets is_target (a view) to False from each open tag to its close tag inclusive."""
    opens, closes = np.flatnonzero(tokens == open_id), np.flatnonzero(tokens == close_id)
    for o in opens:
      after = closes[closes > o]
      is_target[o:(after[0] + 1 if len(after) else len(tokens))] = False
