"""Prepares a dataset once (TFDS, array_record) and prints what it holds, as one JSON line.

  python -m launch.prepare_data --task=el --data=/tmp/el --prepared_dir=/tmp/tfds \
      [--seq_len=1024 --rows=8 --num_queries=32 --num_keys=256 --num_negatives=6]

--data is a folder with train.jsonl, db.jsonl, optional dev.jsonl and tokenizer/ (what make_data
and convert_data write). Packing efficiency is measured over one epoch of train batches of the
given shape. Bad input exits non-zero with every bad line listed.
"""

import json
import os
import sys
import time

from absl import app, flags

from onegen_jax.data.loader import mean_efficiency
from onegen_jax.data.packing import BatchShape
from onegen_jax.data.pipeline import build_data
from onegen_jax.data.records import ConfigError, DataError
from onegen_jax.data.tasks import TASKS

_TASK = flags.DEFINE_enum("task", None, sorted(TASKS), "Task of the data.")
_DATA = flags.DEFINE_string("data", None, "Folder with train.jsonl, db.jsonl, dev.jsonl, tokenizer/.")
_PREPARED = flags.DEFINE_string("prepared_dir", None, "TFDS data_dir ('' tokenises in memory).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Row length S (also the truncation length).")
_ROWS = flags.DEFINE_integer("rows", 8, "Rows B per batch.")
_QUERIES = flags.DEFINE_integer("num_queries", 32, "Queries Q per batch.")
_KEYS = flags.DEFINE_integer("num_keys", 256, "Keys K per batch.")
_NEGATIVES = flags.DEFINE_integer("num_negatives", 6, "Negatives N per query.")
_MAX_BAD = flags.DEFINE_integer("max_bad_lines", 0, "Bad lines per file that may be skipped.")
flags.mark_flags_as_required(["task", "data", "prepared_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  d = _DATA.value
  dev = os.path.join(d, "dev.jsonl")
  config = dict(task=_TASK.value, train_path=os.path.join(d, "train.jsonl"),
                db_path=os.path.join(d, "db.jsonl"), dev_path=dev if os.path.exists(dev) else "",
                tokenizer_path=os.path.join(d, "tokenizer"), prepared_dir=_PREPARED.value,
                max_bad_lines=_MAX_BAD.value)
  shape = BatchShape(_ROWS.value, _SEQ_LEN.value, _QUERIES.value, _KEYS.value, _NEGATIVES.value)
  start = time.time()
  try:
    train, _, stats, *_ = build_data(config, shape)
  except (ConfigError, DataError) as e:
    sys.exit(str(e))
  built = time.time() - start
  epoch, batches = stats["counts"]["examples"], []
  while epoch > 0:
    batches.append(next(train))
    epoch -= len(train.last_example_ids)
  stats.update(build_s=built, epoch_batches=len(batches),
               train_packing_efficiency=mean_efficiency(batches),
               warnings=stats["warnings"][:20], num_warnings=len(stats["warnings"]))
  print(json.dumps(stats, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
