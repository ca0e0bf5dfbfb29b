"""Shared helpers of the data tests: small generated datasets, made once per session."""

import functools
import os
import tempfile

from onegen_jax.data import generate
from onegen_jax.data.packing import BatchShape

SIZES = {"el": dict(num_names=16, num_train=96, num_dev=16),
         "multihop": dict(num_people=24, num_companies=24, num_cities=8, num_train=96, num_dev=16)}
SHAPE = BatchShape(rows=8, seq_len=256, num_queries=16, num_keys=64, num_negatives=6)


@functools.lru_cache(maxsize=None)
def generated(task: str) -> str:
  """A directory with a small generated dataset of the task (train/dev/db.jsonl, tokenizer/)."""
  out = os.path.join(tempfile.mkdtemp(prefix=f"onegen-{task}-"), task)
  generate.make_dataset(task, out, seed=0, **SIZES[task])
  return out


def data_config(task: str, **overrides) -> dict:
  d = generated(task)
  config = dict(task=task, train_path=f"{d}/train.jsonl", db_path=f"{d}/db.jsonl",
                dev_path=f"{d}/dev.jsonl", tokenizer_path=f"{d}/tokenizer", prepared_dir="")
  config.update(overrides)
  return config
