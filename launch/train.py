"""Trains a OneGen model.

  python -m launch.train --config=configs/el.py:demo [--workdir=RUN]
  python -m launch.train --config=configs/el.py:llama2-7b --compile_only --topology=v5p-64

Dotted overrides work (`--config.optim.lr=1e-5`); a misspelled key fails before anything runs.
A restart with the same --workdir resumes from its latest checkpoint. The last line printed is one
JSON object: the final metrics, or with --compile_only the per-device memory and FLOPs of the
compiled train step.
"""

import dataclasses
import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import process_flags
from onegen_jax.data.records import ConfigError, DataError
from onegen_jax.train.aot import compile_train_step
from onegen_jax.train.loop import fit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Task config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (any path Orbax accepts) for "
                               "checkpoints and metrics; a restart resumes from its latest step.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Compile the train step for --topology "
                                  "ahead of time and report its memory, without training.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice for --compile_only, e.g. v5p-64, "
                                "v5e-256, v4-32, v6e-64.")
flags.mark_flag_as_required("config")


def _compile_only(config) -> int:
  if not _TOPOLOGY.value:
    raise app.UsageError("--compile_only needs --topology (e.g. v5p-64)")
  try:
    report = compile_train_step(config, _TOPOLOGY.value)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    detail = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    print(f"does not fit on {_TOPOLOGY.value}: RESOURCE_EXHAUSTED: {detail}", file=sys.stderr)
    return 1
  print(json.dumps(dataclasses.asdict(report), sort_keys=True))
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _COMPILE_ONLY.value:
    return _compile_only(_CONFIG.value)
  process_flags.join()
  try:
    _, final = fit(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError) as e:  # KEY: problem; every bad line as FILE:LINE: field: problem
    sys.exit(str(e))
  if jax.process_index() == 0:
    print(json.dumps(final, sort_keys=True))
  return 0


if __name__ == "__main__":
  app.run(main)
