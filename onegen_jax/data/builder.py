"""The TFDS builder: tokenised examples and db, prepared once in array_record (no TensorFlow).

Splits `train`, `dev` and `db` (an empty one is left out: TFDS writes no empty split), all with the record features of prepare.py, in
file order (shuffling happens per epoch in the grain loader). The builder config's name is a
fingerprint of everything the records depend on (files, tokenizer, task, max_len, max_bad_lines),
so changed inputs are prepared again instead of silently reused. The validation and truncation
report is stored with the dataset (`info.metadata`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.prepare import document_records, example_records, key_ids
from onegen_jax.data.records import load_records
from onegen_jax.data.tasks import Task

FORMAT_VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class Source:
  """What a prepared dataset is made from."""

  task: Task
  train_path: str
  db_path: str
  tokenizer_path: str
  max_len: int
  dev_path: str | None = None
  max_bad_lines: int = 0

  def fingerprint(self) -> str:
    h = hashlib.sha256(repr((FORMAT_VERSION, self.task, self.max_len, self.max_bad_lines)).encode())
    for path in (self.train_path, self.db_path, self.dev_path):
      if path:
        stat = os.stat(path)
        h.update(repr((os.path.abspath(path), stat.st_size, stat.st_mtime_ns)).encode())
    for name in sorted(os.listdir(self.tokenizer_path)):
      with open(os.path.join(self.tokenizer_path, name), "rb") as f:
        h.update(name.encode() + hashlib.sha256(f.read()).digest())
    return "v" + h.hexdigest()[:16]


def _int_vector():
  return tfds.features.Tensor(shape=(None,), dtype=np.int32)


def tokenize_source(source: Source) -> tuple[dict, dict]:
  """Every split of `source` validated and tokenised in memory: (records by split, metadata with
  counts, warnings, skipped lines, vocab_size, special_ids, prepare_s)."""
  start = time.time()
  train, dev, docs, report = load_records(source.task, source.train_path, source.db_path,
                                          source.dev_path, source.max_bad_lines)
  tokenizer = TaskTokenizer(source.tokenizer_path, source.task)
  db = document_records(docs, tokenizer, source.max_len, report)
  keys = key_ids(db)
  splits = {"train": example_records(train, tokenizer, keys, source.max_len, report),
            "dev": example_records(dev, tokenizer, keys, source.max_len, report, prefix="dev_"),
            "db": db}
  return splits, {"counts": report.counts, "warnings": report.warnings, "skipped": report.skipped,
                  "vocab_size": tokenizer.vocab_size, "special_ids": tokenizer.ids,
                  "prepare_s": time.time() - start}


class OneGenData(tfds.core.GeneratorBasedBuilder):
  """OneGen examples and documents of one `Source`, tokenised."""

  VERSION = tfds.core.Version(FORMAT_VERSION)
  code_path = None  # nothing to download: no checksums file to look up beside the module

  def __init__(self, source: Source, data_dir: str, **kwargs):
    self.source = source
    config = tfds.core.BuilderConfig(name=source.fingerprint(), description=repr(source))
    super().__init__(config=config, data_dir=data_dir, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "tokens": _int_vector(), "is_target": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "positions": _int_vector(), "positive_keys": _int_vector(),
        "positive_counts": _int_vector(), "negative_keys": _int_vector(),
        "negative_counts": _int_vector(), "uid": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64)})
    return tfds.core.DatasetInfo(builder=self, features=features,
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    splits, metadata = tokenize_source(self.source)
    metadata["tokenize_s"] = metadata.pop("prepare_s")
    self.info.metadata.update(metadata)
    return {name: self._generate_examples(records) for name, records in splits.items() if records}

  def _generate_examples(self, records):
    for i, record in enumerate(records):
      yield i, record


def prepare(source: Source, data_dir: str) -> tuple[dict, dict]:
  """Prepares the dataset unless it already is; (data sources by split, metadata).

  metadata["prepare_s"]: wall time of this call's preparation (0 when reused).
  """
  builder = OneGenData(source, data_dir)
  start = time.time()
  prepared = builder.is_prepared()
  builder.download_and_prepare()
  metadata = dict(builder.info.metadata, prepare_s=0.0 if prepared else time.time() - start)
  return builder.as_data_source(), metadata
