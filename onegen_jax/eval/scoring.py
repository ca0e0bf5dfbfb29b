"""Scoring prediction files (launch.infer's output) against a reference-format gold split.

RAG: the answer is the text inside <FINAL-ANSWER>...</FINAL-ANSWER> of the last assistant turn
(the whole text when absent); the gold documents are the documents of the positive keys.
Recall@k of a question = fraction of its gold documents among the union of the top k documents
of every retrieval step, averaged over questions with gold documents.
Self-RAG: a line's gold answers are its "answers" (else the gold assistant text without
reflection tokens, paragraphs and EOS); whether it needs retrieval is its "needs_retrieval" (else
whether the gold answer retrieves). match: a gold answer occurs in the predicted answer;
accuracy: the predicted answer's first word is a gold label (PubHealth, ARC); decisions: the
fraction of lines whose retrieval decision equals the gold one; each also per need.
EL: gold mentions are the <MENTION>...</MENTION> spans of the gold assistant text (markup and
RET tokens removed gives the plain text the offsets refer to), linked to the positive of the
[LK] that follows each mention (null = NIL).
"""

from __future__ import annotations

import re

from onegen_jax.data.records import document_uid
from onegen_jax.eval import metrics
from onegen_jax.data.tasks import EL, SELFRAG

_ANSWER = re.compile(r"<FINAL-ANSWER>(.*?)</FINAL-ANSWER>", re.S)


def final_answer(text: str) -> str:
  match = _ANSWER.search(text)
  return (match.group(1) if match else text).strip()


def _gold_assistant(line: dict) -> dict:
  return [m for m in line["messages"] if m["role"] == "assistant"][-1]


def score_rag(predictions: list[dict], gold: list[dict], ks=(1, 5, 10)) -> dict[str, float]:
  if len(predictions) != len(gold):
    raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold lines")
  answers = [final_answer(_gold_assistant(g)["content"]) for g in gold]
  predicted = [final_answer(p["text"]) for p in predictions]
  scores = metrics.answer_metrics(predicted, answers)
  gold_docs = [{document_uid(u) for p in _gold_assistant(g).get("positive", []) if p
                for u in ([p] if isinstance(p, str) else p)} for g in gold]
  with_gold = [i for i, docs in enumerate(gold_docs) if docs]
  for k in ks:
    union = [list(dict.fromkeys(d for r in predictions[i]["retrievals"] for d in r["ids"][:k]))
             for i in with_gold]
    everything = max([1] + [len(u) for u in union])  # the whole union counts, not its first k
    scores[f"recall@{k}"] = metrics.recall_at_k(union, [gold_docs[i] for i in with_gold], everything)
  scores["questions"] = len(gold)
  return scores


def _gold_mentions(line: dict) -> tuple[list[tuple[str, str | None]], list[tuple[int, int, str | None]]]:
  assistant = _gold_assistant(line)
  positives = [p if isinstance(p, str) or p is None else p[0] for p in assistant.get("positive", [])]
  _, mentions = EL.linked_mentions(assistant["content"], positives)
  return ([(m["surface"], m["entity"]) for m in mentions],
          [(m["start"], m["end"], m["entity"]) for m in mentions])


def score_el(predictions: list[dict], gold: list[dict]) -> dict[str, float]:
  if len(predictions) != len(gold):
    raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold lines")
  gold_surface, gold_spans = zip(*[_gold_mentions(g) for g in gold]) if gold else ((), ())
  pred_surface = [[(m["surface"], m["entity"]) for m in p["mentions"]] for p in predictions]
  pred_spans = [[(m["start"], m["end"], m["entity"]) for m in p["mentions"]] for p in predictions]
  reference = metrics.el_reference_prf(list(gold_surface), pred_surface)
  strong = metrics.el_strong_prf(list(gold_spans), pred_spans)
  return {"reference_precision": reference.precision, "reference_recall": reference.recall,
          "reference_f1": reference.f1, "strong_precision": strong.precision,
          "strong_recall": strong.recall, "strong_f1": strong.f1,
          "gold_mention_accuracy": metrics.el_gold_mention_accuracy(list(gold_spans), pred_spans),
          "documents": len(gold)}


def _selfrag_gold(line: dict) -> tuple[list[str], bool]:
  """(gold answers, needs retrieval) of a Self-RAG line."""
  text = _gold_assistant(line)["content"]
  needs = line.get("needs_retrieval", "[Retrieval]" in text)
  if "answers" in line:
    return list(line["answers"]), bool(needs)
  text = SELFRAG.insertion_pattern().sub("", text)
  text = re.sub(r"\[[^\[\]]*\]", "", text).replace("</s>", "")
  return [text.strip()], bool(needs)


def score_selfrag(predictions: list[dict], gold: list[dict]) -> dict[str, float]:
  if len(predictions) != len(gold):
    raise ValueError(f"{len(predictions)} predictions for {len(gold)} gold lines")
  if predictions and "retrieved" not in predictions[0]:
    raise ValueError("Self-RAG predictions come from launch.infer --selfrag_mode=adaptive_retrieval|"
                     "always_retrieve|no_retrieval (these lines have no `retrieved`)")
  golds = [_selfrag_gold(g) for g in gold]
  rows = [(metrics.match(p["answer"], a), metrics.label_accuracy(p["answer"], a),
           float(bool(p["retrieved"]) == needs), needs, bool(p["retrieved"]))
          for p, (a, needs) in zip(predictions, golds)]
  mean = lambda values: sum(values) / len(values) if values else 0.0
  scores = {"match": mean([r[0] for r in rows]), "accuracy": mean([r[1] for r in rows]),
            "decision_agreement": mean([r[2] for r in rows]),
            "retrieval_rate": mean([float(r[4]) for r in rows]), "questions": float(len(rows))}
  for name, needs in (("needs_retrieval", True), ("no_retrieval_needed", False)):
    part = [r for r in rows if r[3] == needs]
    scores[f"match_{name}"] = mean([r[0] for r in part])
    scores[f"questions_{name}"] = float(len(part))
  return scores
