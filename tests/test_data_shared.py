"""Conversion and TFDS preparation of the public data in ../shared/data (opt-in: -m shared_data)."""

import os

import numpy as np
import pytest

from onegen_jax.data.convert import convert_dataset
from onegen_jax.data.packing import BatchShape
from onegen_jax.data.pipeline import build_data

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "data")
SETS = [("el", "el"), ("multihop", "qa/hotpotqa_train100"), ("multihop", "qa/musique_train100"),
        ("multihop", "qa/nq_open_oracle")]


@pytest.mark.shared_data
@pytest.mark.parametrize("task,folder", SETS)
def test_convert_and_prepare(tmp_path, task, folder):
  out = tmp_path / "data"
  counts = convert_dataset(task, os.path.join(SHARED, folder), str(out))
  config = dict(task=task, train_path=f"{out}/train.jsonl", db_path=f"{out}/db.jsonl",
                dev_path=f"{out}/dev.jsonl", tokenizer_path=f"{out}/tokenizer",
                prepared_dir=str(tmp_path / "tfds"))
  shape = BatchShape(rows=8, seq_len=1024, num_queries=32, num_keys=256, num_negatives=6)
  train, dev, stats, *_ = build_data(config, shape)
  assert stats["counts"]["examples"] == counts["train"]
  assert stats["counts"]["documents"] >= counts["db"] - 2  # a key may be truncated away
  assert stats["counts"]["valid_anchors"] > 0.4 * stats["counts"]["anchors"]
  for _ in range(5):
    batch = next(train)
    q = batch["query_index"][batch["query_valid"]]
    query_id = stats["special_ids"]["[LK]" if task == "el" else "[Question Representation]"]
    assert len(q) and (batch["tokens"][q[:, 0], q[:, 1]] == query_id).all()
    assert np.mean(batch["segment_ids"] > 0) > 0.5
  assert dev
