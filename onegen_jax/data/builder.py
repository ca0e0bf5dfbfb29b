"""The TFDS builder: tokenised records (tokenized.py) prepared once in array_record (no TensorFlow).

Splits `train`, `dev` and `db` (an empty one is left out: TFDS writes no empty split), all with the record features of tokenized.py, in
file order (shuffling happens per epoch in the grain loader). The builder config's name is a
fingerprint of everything the records depend on (files, tokenizer, task, max_len, max_bad_lines),
so changed inputs are prepared again instead of silently reused. The validation and truncation
report is stored with the dataset (`info.metadata`).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow_datasets as tfds

from onegen_jax.data.tokenized import FORMAT_VERSION, RECORD_ARRAYS, Source, tokenize_source

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
        **{name: tfds.features.Tensor(shape=(None,), dtype=dtype)
           for name, dtype in RECORD_ARRAYS.items()},
        "uid": tfds.features.Text(), "index": tfds.features.Scalar(dtype=np.int64)})
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
