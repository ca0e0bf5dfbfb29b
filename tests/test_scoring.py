"""Scoring prediction files against reference-format gold lines, on hand-computed cases."""

import pytest

from onegen_jax.eval.scoring import score_el, score_rag
from onegen_jax.data.tasks import EL


def test_linked_mentions_offsets_refer_to_the_plain_text():
  plain, mentions = EL.linked_mentions(
      "At <MENTION>Adlo</MENTION>[LK][_CONTINUE_] and <MENTION>Iska Bay</MENTION>[LK][_CONTINUE_].",
      ["city0", None])
  assert plain == "At Adlo and Iska Bay."
  assert [(plain[m["start"]:m["end"]], m["entity"]) for m in mentions] == [("Adlo", "city0"),
                                                                          ("Iska Bay", None)]


def _gold_el(content, positive):
  return {"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "content": content, "positive": positive}]}


def test_score_el_both_scorers():
  gold = [_gold_el("<MENTION>A</MENTION>[LK][_CONTINUE_] met <MENTION>B</MENTION>[LK][_CONTINUE_]"
                   " and <MENTION>C</MENTION>[LK][_CONTINUE_].", ["e1", "e2", None])]
  # Plain gold text "A met B and C.": A (0,1) e1, B (6,7) e2, C NIL. The prediction gets A right,
  # links B wrongly, and finds "met" (4,7) -> e2 with the wrong span.
  predicted = [{"mentions": [{"start": 0, "end": 1, "surface": "A", "entity": "e1"},
                             {"start": 6, "end": 7, "surface": "B", "entity": "e9"},
                             {"start": 2, "end": 5, "surface": "met", "entity": "e2"}]}]
  scores = score_el(predicted, gold)
  assert scores["strong_precision"] == pytest.approx(1 / 3)
  assert scores["strong_recall"] == pytest.approx(1 / 2)
  assert scores["reference_precision"] == pytest.approx(1 / 3)
  assert scores["reference_recall"] == pytest.approx(1 / 2)
  assert scores["gold_mention_accuracy"] == pytest.approx(1 / 2)  # A right, B wrong; C is NIL


def test_score_rag_answers_and_recall_over_steps():
  gold = [{"messages": [{"role": "user", "content": "q"}, {
      "role": "assistant", "content": "...<FINAL-ANSWER>The Iska</FINAL-ANSWER></s>",
      "positive": ["person2-1", ["city17"]]}]}]
  predicted = [{"text": "... <FINAL-ANSWER>iska</FINAL-ANSWER>",
                "retrievals": [{"ids": ["person2", "city3"]}, {"ids": ["city9", "city17"]}]}]
  scores = score_rag(predicted, gold)
  assert scores["em"] == 1.0 and scores["f1"] == 1.0  # articles and case are normalised away
  assert scores["recall@1"] == 0.5  # person2 at step 1; city17 only second at step 2
  assert scores["recall@5"] == 1.0
