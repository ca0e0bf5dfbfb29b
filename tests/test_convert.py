"""Conversion of qa/ folders (onegen_jax/data/convert.py) on a hand-made folder: the hop rules."""

import json

from onegen_jax.data import convert
from onegen_jax.data.tasks import MULTIHOP


def _write(folder, questions):
  paragraphs = {p["pid"]: p for q in questions for p in q["paragraphs"]}
  (folder / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
  (folder / "corpus.jsonl").write_text("".join(
      json.dumps({k: p[k] for k in ("pid", "title", "text")}) + "\n" for p in paragraphs.values()))


def _paragraph(pid, supporting):
  return {"pid": pid, "title": pid.upper(), "text": f"text of {pid}", "is_supporting": supporting}


def test_hops_without_a_decomposition_accept_any_gold_paragraph_not_yet_inserted(tmp_path):
  """HotpotQA lists its supporting paragraphs in context order: the first query's positives are
  both, the second's the one not inserted yet; the inserted text follows the listed order."""
  _write(tmp_path, [{"id": "q", "question": "Who?", "answers": ["Ada"],
                     "paragraphs": [_paragraph("a", True), _paragraph("n", False),
                                    _paragraph("b", True)]}])
  train, dev, db = convert.convert_qa(str(tmp_path), min_negatives=1)
  reply = (train + dev)[0]["messages"][-1]
  assert reply["positive"] == [["a", "b"], "b"]
  assert reply["negative"] == [["n"], ["n"]]
  first = reply["content"].index(MULTIHOP.insertion("wiki title: A\ncontent: text of a"))
  assert first < reply["content"].index(MULTIHOP.insertion("wiki title: B\ncontent: text of b"))


def test_decomposed_hops_keep_their_own_paragraph(tmp_path):
  question = {"id": "q", "question": "Where was the founder born?", "answers": ["Lo"],
              "paragraphs": [_paragraph("a", True), _paragraph("b", True), _paragraph("n", False)],
              "question_decomposition": [
                  {"question": "Who founded X?", "answer": "Ada", "paragraph_support_idx": 1},
                  {"question": "Where was #1 born?", "answer": "Lo", "paragraph_support_idx": 0}]}
  _write(tmp_path, [question])
  train, dev, _ = convert.convert_qa(str(tmp_path), min_negatives=1)
  reply = (train + dev)[0]["messages"][-1]
  assert reply["positive"] == ["b", "a"]
  assert "Where was Ada born?" in reply["content"]
