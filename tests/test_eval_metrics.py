"""Evaluation metrics against hand-computed cases."""

import pytest

from onegen_jax.eval import metrics


@pytest.mark.parametrize("text, want", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("  ", ""),
])
def test_normalize_answer(text, want):
  assert metrics.normalize_answer(text) == want


def test_exact_match_normalises_and_takes_any_alias():
  assert metrics.exact_match("the Beatles", "Beatles!") == 1.0
  assert metrics.exact_match("NYC", ["New York City", "nyc."]) == 1.0
  assert metrics.exact_match("New York", ["New York City", "NYC"]) == 0.0


@pytest.mark.parametrize("prediction, gold, want", [
    ("the cat sat on the mat", "a cat on a mat", 2 * 0.75 / 1.75),  # P 3/4, R 1
    ("x x y", "x y y", 2 / 3),  # bags: common = min(2,1) + min(1,2)
    ("New York", ["New York City", "Big Apple"], 0.8),  # best alias: P 1, R 2/3
    ("Yes.", "yes", 1.0),
    ("yes", "no", 0.0),
    ("yes it is", "yes", 0.0),  # SQuAD would give 0.5; HotpotQA zeroes it
    ("no", "no way", 0.0),
    ("noanswer", "no answer", 0.0),
    ("red", "blue", 0.0),
])
def test_f1_score(prediction, gold, want):
  assert metrics.f1_score(prediction, gold) == pytest.approx(want)


def test_answer_metrics_average_over_questions():
  scores = metrics.answer_metrics(["Paris", "the red car", "no"],
                                  ["paris", ["blue car", "a car"], "yes"])
  assert scores["em"] == pytest.approx(1 / 3)
  # "red car" vs "car": P 1/2, R 1 -> 2/3 (better than "blue car": 1/2)
  assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_answer_metrics_need_aligned_non_empty_inputs():
  with pytest.raises(ValueError):
    metrics.answer_metrics(["a"], ["a", "b"])
  with pytest.raises(ValueError):
    metrics.f1_score("a", [])


def test_recall_and_hit_at_k():
  retrieved = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "r"]]
  gold = [{"a", "c"}, {"q"}, ["r"]]
  assert metrics.recall_at_k(retrieved, gold, 1) == pytest.approx((1 / 2 + 0 + 0) / 3)
  assert metrics.recall_at_k(retrieved, gold, 2) == pytest.approx((1 / 2 + 0 + 0) / 3)
  assert metrics.recall_at_k(retrieved, gold, 3) == pytest.approx((1 + 0 + 1) / 3)
  assert metrics.hit_at_k(retrieved, gold, 1) == pytest.approx(1 / 3)
  assert metrics.hit_at_k(retrieved, gold, 3) == pytest.approx(2 / 3)


def test_recall_rejects_questions_without_gold():
  with pytest.raises(ValueError):
    metrics.recall_at_k([["a"]], [set()], 1)
  with pytest.raises(ValueError):
    metrics.hit_at_k([["a"]], [{"a"}], 0)


def test_el_reference_multisets_and_nil():
  gold = [[("Paris", "Q90"), ("Paris", "Q90"), ("France", "Q142"), ("Bob", None)],
          [("Berlin", "Q64")]]
  predicted = [[("Paris", "Q90"), (" Paris ", "Q90"), ("Paris", "Q90"), ("France", "Q999"),
                ("Bob", "Q1"), ("Bob", "Q1")],  # the first Bob is dropped by the NIL gold Bob
               [("Paris", "Q90")]]  # another document: no match
  prf = metrics.el_reference_prf(gold, predicted)
  assert (prf.true_positives, prf.num_predicted, prf.num_gold) == (2, 6, 4)
  assert (prf.precision, prf.recall) == pytest.approx((1 / 3, 1 / 2))
  assert prf.f1 == pytest.approx(0.4)


def test_el_reference_without_true_positives_is_zero():
  prf = metrics.el_reference_prf([[("a", "Q1")]], [[("a", "Q2")]])
  assert (prf.precision, prf.recall, prf.f1) == (0.0, 0.0, 0.0)
  assert metrics.el_reference_prf([[]], [[]]).f1 == 0.0


def test_el_strong_match_spans_and_nil():
  gold = [[(0, 5, "Q90"), (10, 16, "Q142"), (20, 23, None)]]
  predicted = [[(0, 5, "Q90"), (0, 5, "Q90"),  # duplicate: one matches, one is wrong
                (10, 15, "Q142"),  # span off by one
                (20, 23, "Q1"),  # links a NIL gold mention: a wrong InKB annotation
                (30, 35, None)]]  # NIL prediction: ignored
  prf = metrics.el_strong_prf(gold, predicted)
  assert (prf.true_positives, prf.num_predicted, prf.num_gold) == (1, 4, 2)
  assert prf.f1 == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))


def test_el_strong_match_is_per_document():
  prf = metrics.el_strong_prf([[(0, 5, "Q90")], []], [[], [(0, 5, "Q90")]])
  assert (prf.true_positives, prf.num_predicted, prf.num_gold) == (0, 1, 1)
