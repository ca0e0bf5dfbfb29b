"""benchmarks.quality.paired: a paired bootstrap of two RAG arms' per-question figures, scored
one question at a time with the study's scorer."""

import numpy as np

from benchmarks.quality import paired
from onegen_jax.data.records import write_jsonl
from onegen_jax.eval.scoring import score_rag


def test_paired_bootstrap_scores_each_question_as_the_study_scores_them_all(tmp_path):
  """Per-question scores average to score_rag's figures of the whole file; a difference that is
  the same on every question has a zero-width interval at that value."""
  gold = [{"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": f"<FINAL-ANSWER>{a}</FINAL-ANSWER>",
                         "positive": ["d1", "d2"], "negative": [["d3"], ["d4"]]}]}
          for a in ("Paris", "the red fox", "1066")]
  texts = ["<FINAL-ANSWER>Paris</FINAL-ANSWER>", "<FINAL-ANSWER>a red dog</FINAL-ANSWER>", "no"]
  retrieved = [[["d1"], ["d3"]], [["d2"], ["d1"]], [["d4"], ["d3"]]]
  predictions = [{"text": t, "retrievals": [{"ids": ids} for ids in r]}
                 for t, r in zip(texts, retrieved)]
  (tmp_path / "data" / "rag").mkdir(parents=True)
  (tmp_path / "eval" / "rag" / "a").mkdir(parents=True)
  write_jsonl(str(tmp_path / "data" / "rag" / "dev.jsonl"), gold)
  write_jsonl(str(tmp_path / "eval" / "rag" / "a" / "predictions.jsonl"), predictions)
  scores = paired.per_question(str(tmp_path), "a", gold)
  whole = score_rag(predictions, gold, ks=(1,))
  for name, _ in paired.FIGURES:
    assert np.isclose(scores[name].mean(), whole[name])
  np.testing.assert_allclose(scores["recall@1"], [0.5, 1.0, 0.0])
  assert paired.bootstrap(np.full(5, 0.25), 200, 0) == (0.25, 0.25, 0.0)
  low, high, p_le0 = paired.bootstrap(np.array([-1.0, 1.0] * 20), 2000, 0)
  assert low < 0 < high and 0.3 < p_le0 < 0.7
