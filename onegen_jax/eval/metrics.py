"""Evaluation metrics of the paper: answer EM / F1, retrieval Recall@k, entity-linking micro P/R/F1.

Pure Python. Scores are fractions in [0, 1] (the paper prints them x100).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Collection, Hashable, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_SPECIAL_ANSWERS = frozenset({"yes", "no", "noanswer"})


# Answers (SQuAD normalisation, HotpotQA rules, 2WikiMultihopQA aliases).

def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse
  whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _aliases(gold: str | Sequence[str]) -> list[str]:
  aliases = [gold] if isinstance(gold, str) else list(gold)
  if not aliases:
    raise ValueError("a question needs at least one gold answer")
  return aliases


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals a normalised gold answer (any alias), else 0.0."""
  normalized = normalize_answer(prediction)
  return float(any(normalized == normalize_answer(g) for g in _aliases(gold)))


def _token_f1(prediction: str, gold: str) -> float:
  """HotpotQA F1 of one normalised pair: 0 when either is yes/no/noanswer and they differ."""
  if (prediction in _SPECIAL_ANSWERS or gold in _SPECIAL_ANSWERS) and prediction != gold:
    return 0.0
  pred_tokens, gold_tokens = prediction.split(), gold.split()
  common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, gold: str | Sequence[str]) -> float:
  """Token F1 of the normalised answers (bags of words), the best over gold aliases."""
  normalized = normalize_answer(prediction)
  return max(_token_f1(normalized, normalize_answer(g)) for g in _aliases(gold))


def answer_metrics(predictions: Sequence[str],
                   golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """{"em", "f1"} averaged over questions; golds[i]: one answer or a list of aliases."""
  _same_length(predictions, golds)
  return {"em": _mean(exact_match(p, g) for p, g in zip(predictions, golds)),
          "f1": _mean(f1_score(p, g) for p, g in zip(predictions, golds))}


# Retrieval.

def recall_at_k(retrieved: Sequence[Sequence[Hashable]], gold: Sequence[Collection[Hashable]],
                k: int) -> float:
  """Recall@k = mean over questions q of |gold[q] & set(retrieved[q][:k])| / |gold[q]|.

  retrieved[q]: document uids ranked best first (the first k entries are taken as they are, so
  give distinct documents, e.g. from `Index.search_documents`); gold[q]: the question's gold
  documents (non-empty). With one gold document it equals hit@k.
  """
  return _mean(len(set(g) & set(r[:k])) / len(_gold_set(g))
               for r, g in _pairs(retrieved, gold, k))


def hit_at_k(retrieved: Sequence[Sequence[Hashable]], gold: Sequence[Collection[Hashable]],
             k: int) -> float:
  """hit@k = fraction of questions with at least one gold document in retrieved[q][:k]."""
  return _mean(float(bool(_gold_set(g) & set(r[:k]))) for r, g in _pairs(retrieved, gold, k))


def _gold_set(gold: Collection[Hashable]) -> set:
  if not gold:
    raise ValueError("a question without gold documents has no recall; leave it out")
  return set(gold)


def _pairs(retrieved, gold, k: int):
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  _same_length(retrieved, gold)
  return zip(retrieved, gold)


# Entity linking.

@dataclasses.dataclass(frozen=True)
class PRF:
  """Micro precision / recall / F1 with the counts behind them (sum counts to pool datasets)."""

  true_positives: int
  num_predicted: int
  num_gold: int

  @property
  def precision(self) -> float:
    return self.true_positives / self.num_predicted if self.true_positives else 0.0

  @property
  def recall(self) -> float:
    return self.true_positives / self.num_gold if self.true_positives else 0.0

  @property
  def f1(self) -> float:
    p, r = self.precision, self.recall
    return 2 * p * r / (p + r) if self.true_positives else 0.0


def _multiset_prf(gold: Iterable[Hashable], predicted: Iterable[Hashable]) -> PRF:
  """TP = size of the multiset intersection: an item predicted twice and gold once counts once."""
  gold_counts, pred_counts = collections.Counter(gold), collections.Counter(predicted)
  return PRF(sum((gold_counts & pred_counts).values()), sum(pred_counts.values()),
             sum(gold_counts.values()))


def el_reference_prf(gold: Sequence[Sequence[tuple[str, str | None]]],
                     predicted: Sequence[Sequence[tuple[str, str | None]]]) -> PRF:
  """Micro P/R/F1 as the OneGen reference scores entity linking (zjunlp/OneGen,
  scripts/entity_linking/eval_entity_linking.py).

  gold[d], predicted[d]: the (surface form, entity id) pairs of document d; entity None = NIL.
  Units are (d, surface.strip(), entity) compared as multisets (duplicates count once each). Gold
  NIL mentions are not scored, and each one removes one prediction with the same stripped surface
  (whatever entity it was linked to). Every other prediction counts.
  """
  _same_length(gold, predicted)
  gold_units, pred_units = [], []
  for d, (doc_gold, doc_pred) in enumerate(zip(gold, predicted)):
    nil_surfaces = collections.Counter(s.strip() for s, e in doc_gold if e is None)
    gold_units += [(d, s.strip(), e) for s, e in doc_gold if e is not None]
    for surface, entity in doc_pred:
      if nil_surfaces[surface.strip()]:
        nil_surfaces[surface.strip()] -= 1
      else:
        pred_units.append((d, surface.strip(), entity))
  return _multiset_prf(gold_units, pred_units)


def el_strong_prf(gold: Sequence[Sequence[tuple[int, int, str | None]]],
                  predicted: Sequence[Sequence[tuple[int, int, str | None]]]) -> PRF:
  """GERBIL strong annotation match, InKB, micro: a prediction is correct when its character span
  (start, end) is exactly a gold span and its entity is that span's entity.

  gold[d], predicted[d]: (start, end, entity) of document d; entity None = NIL. Gold NIL
  annotations are left out and NIL predictions are ignored. Compared as multisets.
  """
  _same_length(gold, predicted)
  return _multiset_prf(
      ((d, s, e, ent) for d, doc in enumerate(gold) for s, e, ent in doc if ent is not None),
      ((d, s, e, ent) for d, doc in enumerate(predicted) for s, e, ent in doc if ent is not None))


def el_gold_mention_accuracy(gold: Sequence[Sequence[tuple[int, int, str | None]]],
                             predicted: Sequence[Sequence[tuple[int, int, str | None]]]) -> float:
  """Disambiguation accuracy: the fraction of in-KB gold mentions (start, end, entity not None)
  predicted with the same span and the same entity (0 without such mentions)."""
  _same_length(gold, predicted)
  hits = total = 0
  for g, p in zip(gold, predicted):
    linked = {(s, e): entity for s, e, entity in p}
    for start, end, entity in g:
      if entity is not None:
        total += 1
        hits += linked.get((start, end)) == entity
  return hits / total if total else 0.0


def _same_length(a: Sequence, b: Sequence) -> None:
  if len(a) != len(b):
    raise ValueError(f"{len(a)} predictions for {len(b)} gold entries")


def _mean(values: Iterable[float]) -> float:
  values = list(values)
  if not values:
    raise ValueError("nothing to average")
  return sum(values) / len(values)


def match(prediction: str, gold: str | Sequence[str]) -> float:
  """Self-RAG's `match`: 1 when any gold answer string occurs in the prediction (as is)."""
  return float(any(g in prediction for g in _aliases(gold)))


def label_accuracy(prediction: str, gold: str | Sequence[str]) -> float:
  """Closed answers (PubHealth true/false, ARC A-D): the prediction's first word, lowercased and
  without punctuation, is a gold label."""
  plain = lambda text: "".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split()
  words = plain(prediction)
  return float(bool(words) and words[0] in {" ".join(plain(g)) for g in _aliases(gold)})
