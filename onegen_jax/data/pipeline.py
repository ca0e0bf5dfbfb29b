"""The one entry point for training: config.data -> (train iterator, held-out batches, stats).

config.data keys:
  train_path, db_path   reference-format jsonl files (required)
  dev_path              held-out examples (optional; "" or None: none)
  tokenizer_path        Hugging Face tokenizer directory (required)
  task                  "el", "multihop" or "selfrag" (tasks.py) unless a Task is passed
  max_len               truncation length (default: the batch's seq_len)
  max_bad_lines         bad lines per file that may be skipped instead of failing (default 0)
  prepared_dir          TFDS data_dir: prepare once in array_record and read from it; "" or None
                        tokenises in memory (tests, demos)
  n_pos_per_sent, n_neg_per_pos   override the task's sampling
  document_text_weight  loss weight of packed documents' GEN targets (their assistant text):
                        1 (default) the reference, 0 documents as context (tokenized.Database)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from onegen_jax.data.builder import prepare
from onegen_jax.data.tokenized import Source, max_len, tokenize_source
from onegen_jax.data.loader import Host, TrainIterator, heldout_batches, mean_efficiency
from onegen_jax.data.packing import BatchShape
from onegen_jax.data.tokenized import Database
from onegen_jax.data.records import ConfigError
from onegen_jax.data.retrieval_sampling import Sampling
from onegen_jax.data.tasks import Task, get_task

_DEV_STREAM = 1 << 20  # sampling stream of held-out batches (train streams are host indices)


def _get(config: Mapping, name: str, default=None):
  value = config.get(name, default)
  return default if value in (None, "") else value


def check_paths(config: Mapping):
  """Raises ConfigError naming each input of config.data that is unset (dev_path may be) or
  missing: `data.dev_path: no such file: PATH`."""
  problems = []
  for key in ("train_path", "db_path", "dev_path", "tokenizer_path"):
    kind, exists = (("directory", os.path.isdir) if key == "tokenizer_path" else
                    ("file", os.path.isfile))
    path = _get(config, key)
    if path is None and key != "dev_path":
      problems.append(f"data.{key}: not set")
    elif path is not None and not exists(path):
      problems.append(f"data.{key}: no such {kind}: {path}")
  if problems:
    raise ConfigError("\n".join(problems))


def source_from_config(config: Mapping, seq_len: int, task: Task | None = None) -> Source:
  """The Source of config.data; raises ConfigError first if an input file is missing."""
  check_paths(config)
  return Source(task=task or get_task(config["task"]), train_path=config["train_path"],
                db_path=config["db_path"], tokenizer_path=config["tokenizer_path"],
                max_len=max_len(config, seq_len), dev_path=_get(config, "dev_path"),
                max_bad_lines=int(_get(config, "max_bad_lines", 0)))


def _document_text_weight(config: Mapping) -> float:
  weight = float(config.get("document_text_weight", 1.0))
  if weight < 0:
    raise ConfigError(f"data.document_text_weight: {weight} is negative (1: the reference, "
                      "0: documents as context)")
  return weight


class BuiltData(NamedTuple):
  train: TrainIterator  # endless host-local train batches
  dev: list[dict]  # this host's held-out batches
  stats: dict
  database: Database  # every document, for encoding the db
  dev_records: list[dict]  # held-out examples with their anchors (retrieval evaluation)


def build_data(config: Mapping, shape: BatchShape, seed: int = 0, process_index: int = 0,
               process_count: int = 1, task: Task | None = None) -> BuiltData:
  """(endless train iterator of host-local batches, this host's held-out batches, stats,
  database, held-out records).

  shape: the global micro-batch shape; each host packs rows/P rows, Q/P queries, K/P keys.
  Raises ConfigError for a missing input or a negative document_text_weight, then
  records.DataError (every bad line as FILE:LINE: field: problem), before anything else.
  stats: counts (examples, tokens, anchors, truncation, ...), warnings, vocab_size, special_ids,
  prepare_s, dev_packing_efficiency.
  """
  source = source_from_config(config, shape.seq_len, task)
  text_weight = _document_text_weight(config)
  prepared_dir = _get(config, "prepared_dir")
  if prepared_dir:
    splits, metadata = prepare(source, prepared_dir)
    db_records, dev_records = ([s[i] for i in range(len(s))] if (s := splits.get(name)) else []
                               for name in ("db", "dev"))
  else:
    splits, metadata = tokenize_source(source)
    db_records, dev_records = splits["db"], splits["dev"]
  t = source.task
  sampling = Sampling(int(_get(config, "n_pos_per_sent", t.n_pos_per_sent)),
                      int(_get(config, "n_neg_per_pos", t.n_neg_per_pos)), seed, process_index)
  most = metadata["counts"].get("max_positives_per_anchor", 0)
  if most > shape.max_positives:
    raise ValueError(f"an anchor of the data lists {most} positives; batch.max_positives="
                     f"{shape.max_positives} (raise it: InfoNCE must mask every listed positive)")
  if sampling.n_neg_per_pos > shape.num_negatives:
    raise ValueError(f"n_neg_per_pos={sampling.n_neg_per_pos} exceeds batch num_negatives="
                     f"{shape.num_negatives}")
  host = Host(process_index, process_count)
  db = Database(db_records, text_weight)
  train = TrainIterator(splits.get("train", []), db, shape, sampling, host, seed)
  dev_sampling = Sampling(sampling.n_pos_per_sent, sampling.n_neg_per_pos, seed, _DEV_STREAM)
  dev = heldout_batches(dev_records, db, shape, dev_sampling, host)
  stats = dict(metadata, dev_packing_efficiency=mean_efficiency(dev), dev_batches=len(dev))
  return BuiltData(train, dev, stats, db, dev_records)
