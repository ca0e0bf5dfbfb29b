"""The raw ../shared/data shaped for short sequences before conversion (onegen_jax.data.convert
converts the shaped copies, so its rules stay the one conversion).

EL: the documents of docs_train.jsonl are split into train and dev by document (every
`dev_every`-th document is dev; the OKE files are train only), then every document is cut into
pieces of at most `max_sentences` sentences and `max_tokens` tokens of text. Cuts fall at sentence
ends (`.`, `!` or `?`, closing quotes, whitespace), or, inside a sentence longer than the limit,
at word ends; never inside a mention. Each piece keeps the mentions inside it with their character
offsets shifted to the piece (checked: `piece[start:end]` is the mention's surface). Training
pieces without a mention are dropped (they would train copying only); dev keeps them (precision).
Each dev mention keeps its REL candidates (`rel_candidates`), the candidate set of the in-KB
accuracy.

RAG: the text of every paragraph is cut to its first `max_tokens` tokens (at a word end), by pid,
in qa.jsonl and corpus.jsonl alike, so a paragraph inserted in a training answer and the same
paragraph as a db document stay the same text.

Tokens are counted with the model's tokenizer (the Hugging Face one, over the raw text).
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
from collections.abc import Callable

from benchmarks.quality.cli import say
from onegen_jax.data.convert import entity_uid
from onegen_jax.data.records import read_jsonl, write_jsonl

_SENTENCE_END = re.compile(r"[.!?](?:''|[\"')\]\u201d\u2019])*\s+")
_WORD_END = re.compile(r"\s+")
_OKE_FILES = ("oke-2015-train.benchmark.jsonl", "oke-2016-train.benchmark.jsonl")

Spans = list[tuple[int, int]]
Counter = Callable[[int, int], int]  # tokens of text[a:b]


@dataclasses.dataclass(frozen=True)
class Chunking:
  max_tokens: int  # text tokens per piece (0: no limit)
  max_sentences: int  # sentences per piece (0: no limit)


@dataclasses.dataclass
class ElSources:
  """Shaped EL folders (each: kb.jsonl, docs_train.jsonl[, the OKE files]) for convert_el."""

  train_dir: str
  dev_dir: str
  dev_candidates: list[dict[tuple[int, int], list[str]]]  # per dev piece: span -> candidate uids
  train_candidates: list[dict[tuple[int, int], list[str]]]  # ... per docs_train training piece
  counts: dict[str, int]


def token_counter(hf_tokenizer, text: str) -> Counter:
  """tokens(a, b): the tokens of `text` (tokenised whole) that start in [a, b)."""
  starts = [s for s, _ in hf_tokenizer(text, add_special_tokens=False,
                                       return_offsets_mapping=True)["offset_mapping"]]
  return lambda a, b: sum(a <= s < b for s in starts)


def _cuts(pattern: re.Pattern, text: str, spans: Spans) -> list[int]:
  """Ends of the pattern's matches that fall inside no span and before the end, plus the end."""
  inside = lambda p: any(s < p < e for s, e in spans)
  return [m.end() for m in pattern.finditer(text) if m.end() < len(text)
          and not inside(m.end())] + [len(text)]


def _furthest(a: int, cuts: list[int], count: Counter, max_tokens: int,
              max_units: int) -> int | None:
  """The furthest cut after `a` within both limits (None: even the first is over)."""
  best = None
  for n, c in enumerate([c for c in cuts if c > a], start=1):
    if (max_units and n > max_units) or (max_tokens and count(a, c) > max_tokens):
      break
    best = c
  return best


def piece_bounds(text: str, spans: Spans, count: Counter, chunking: Chunking) -> Spans:
  """[(a, b)]: consecutive pieces covering `text`, cut at sentence ends within the limits, at word
  ends inside a longer sentence (a single word longer than the limit stays whole)."""
  sentences, words = _cuts(_SENTENCE_END, text, spans), _cuts(_WORD_END, text, spans)
  bounds, a = [], 0
  while a < len(text):
    b = _furthest(a, sentences, count, chunking.max_tokens, chunking.max_sentences)
    if b is None:
      b = (_furthest(a, words, count, chunking.max_tokens, 0)
           or next(c for c in words if c > a))
    bounds.append((a, b))
    a = b
  return bounds


def _pieces(doc: dict, spans: Spans, count: Counter, chunking: Chunking) -> list[tuple[int, str]]:
  """(offset, text) of each piece of the document, trailing whitespace removed."""
  if not (chunking.max_tokens or chunking.max_sentences):
    return [(0, doc["text"])]
  return [(a, doc["text"][a:b].rstrip())
          for a, b in piece_bounds(doc["text"], spans, count, chunking)]


def _shift_docs_train(doc: dict, a: int, text: str, i: int) -> dict:
  mentions = [{**m, "start": m["start"] - a, "end": m["end"] - a} for m in doc["mentions"]
              if a <= m["start"] and m["end"] - a <= len(text)]
  return {**doc, "doc_id": f"{doc['doc_id']}#{i}", "text": text, "mentions": mentions}


def _shift_oke(doc: dict, a: int, text: str, i: int) -> dict:
  labels = [{**l, "span": [l["span"][0] - a, l["span"][1] - a]} for l in doc["labels"]
            if a <= l["span"][0] and l["span"][1] - a <= len(text)]
  return {**{k: v for k, v in doc.items() if k != "evaluation_span"}, "id": f"{doc['id']}#{i}",
          "text": text, "labels": labels}


def chunk_document(doc: dict, hf_tokenizer, chunking: Chunking) -> list[dict]:
  """The pieces of a docs_train.jsonl or OKE document, in the same format, offsets shifted."""
  oke = "labels" in doc
  spans = ([tuple(l["span"]) for l in doc["labels"]] if oke
           else [(m["start"], m["end"]) for m in doc["mentions"]])
  count = token_counter(hf_tokenizer, doc["text"])
  shift = _shift_oke if oke else _shift_docs_train
  out = []
  for i, (a, text) in enumerate(_pieces(doc, spans, count, chunking)):
    piece = shift(doc, a, text, i)
    for m in piece["labels"] if oke else piece["mentions"]:
      s, e = m["span"] if oke else (m["start"], m["end"])
      surface = doc["text"][s + a:e + a]
      if text[s:e] != surface:
        raise AssertionError(f"piece {i} of {doc.get('doc_id', doc.get('id'))}: mention "
                             f"{surface!r} became {text[s:e]!r}")
    out.append(piece)
  spans_kept = sum(len(p["labels"] if oke else p["mentions"]) for p in out)
  if spans_kept != len(spans):
    raise AssertionError(f"chunking kept {spans_kept} of {len(spans)} mentions")
  return out


def _rel_candidates(piece: dict, kb_titles: set[str]) -> dict[tuple[int, int], list[str]]:
  """Span -> the uids of the mention's REL candidates that are in the KB, in REL's order."""
  out = {}
  for m in piece["mentions"]:
    titles = dict.fromkeys(html.unescape(t) for t in m["rel_candidates"])
    out[(m["start"], m["end"])] = [entity_uid(t) for t in titles if t in kb_titles]
  return out


def _write_el_dir(path: str, kb_path: str, files: dict[str, list[dict]]) -> str:
  os.makedirs(path, exist_ok=True)
  link = os.path.join(path, "kb.jsonl")
  if not os.path.lexists(link):
    os.symlink(os.path.abspath(kb_path), link)
  for name, lines in files.items():
    write_jsonl(os.path.join(path, name), lines)
  return path


def el_sources(src: str, out: str, hf_tokenizer, chunking: Chunking, dev_every: int) -> ElSources:
  """Splits (by document) and chunks ../shared/data/el into OUT/{train,dev}/ for convert_el."""
  docs = read_jsonl(os.path.join(src, "docs_train.jsonl"))
  dev_docs = [d for i, d in enumerate(docs) if dev_every and i % dev_every == dev_every - 1]
  train_docs = [d for i, d in enumerate(docs) if not dev_every or i % dev_every != dev_every - 1]
  chunk = lambda ds: [p for d in ds for p in chunk_document(d, hf_tokenizer, chunking)]
  train = [p for p in chunk(train_docs) if p["mentions"]]
  oke = {name: [p for p in chunk(read_jsonl(os.path.join(src, name))) if p["labels"]]
         for name in _OKE_FILES if os.path.exists(os.path.join(src, name))}
  dev = chunk(dev_docs)
  kb_path = os.path.join(src, "kb.jsonl")
  kb_titles = {html.unescape(e["title"]) for e in read_jsonl(kb_path)}
  counts = {"el_docs_train": len(train_docs), "el_docs_dev": len(dev_docs),
            "el_pieces_train": len(train) + sum(map(len, oke.values())),
            "el_pieces_dev": len(dev),
            "el_dev_mentions": sum(len(p["mentions"]) for p in dev)}
  say(f"el pieces: {counts}")
  return ElSources(_write_el_dir(os.path.join(out, "train"), kb_path,
                                 {"docs_train.jsonl": train, **oke}),
                   _write_el_dir(os.path.join(out, "dev"), kb_path, {"docs_train.jsonl": dev}),
                   [_rel_candidates(p, kb_titles) for p in dev],
                   [_rel_candidates(p, kb_titles) for p in train], counts)


def cap_texts(texts: list[str], hf_tokenizer, max_tokens: int) -> list[str]:
  """Each text cut to its first max_tokens tokens, at the last word end before the cut."""
  if not max_tokens or not texts:
    return list(texts)
  enc = hf_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
  out = []
  for text, offsets in zip(texts, enc["offset_mapping"]):
    if len(offsets) <= max_tokens:
      out.append(text)
      continue
    head = text[:offsets[max_tokens][0]]
    space = head.rstrip().rfind(" ")
    out.append((head[:space] if space > 0 else head).rstrip())
  return out


def _capped_corpus(path: str, hf_tokenizer, max_tokens: int) -> dict[str, str]:
  """pid -> capped text of a corpus.jsonl."""
  corpus = read_jsonl(path)
  return dict(zip((p["pid"] for p in corpus),
                  cap_texts([p["text"] for p in corpus], hf_tokenizer, max_tokens)))


def rag_sources(qa_sets: list[str], extra: str, out: str, hf_tokenizer,
                max_tokens: int) -> tuple[list[str], str, dict[str, int]]:
  """(capped qa set folders, capped extra corpus path or "", counts) under OUT."""
  dirs, counts = [], {"rag_paragraphs_capped": 0}
  for src in qa_sets:
    name = os.path.basename(os.path.normpath(src))
    capped = _capped_corpus(os.path.join(src, "corpus.jsonl"), hf_tokenizer, max_tokens)
    corpus = read_jsonl(os.path.join(src, "corpus.jsonl"))
    counts["rag_paragraphs_capped"] += sum(capped[p["pid"]] != p["text"] for p in corpus)
    qa = read_jsonl(os.path.join(src, "qa.jsonl"))
    for q in qa:
      q["paragraphs"] = [{**p, "text": capped.get(p["pid"], p["text"])} for p in q["paragraphs"]]
    os.makedirs(os.path.join(out, name), exist_ok=True)
    write_jsonl(os.path.join(out, name, "corpus.jsonl"),
                [{**p, "text": capped[p["pid"]]} for p in corpus])
    write_jsonl(os.path.join(out, name, "qa.jsonl"), qa)
    dirs.append(os.path.join(out, name))
  extra_out = ""
  if extra:
    capped = _capped_corpus(extra, hf_tokenizer, max_tokens)
    extra_out = os.path.join(out, "extra_corpus.jsonl")
    write_jsonl(extra_out, [{**p, "text": capped[p["pid"]]} for p in read_jsonl(extra)])
  return dirs, extra_out, counts
