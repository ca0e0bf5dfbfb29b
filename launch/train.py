"""Trains a OneGen model: python -m launch.train --config=configs/el.py:demo [--workdir=RUN]

Dotted overrides work (`--config.optim.lr=1e-3`); the last line printed is one JSON object with
the final metrics.
"""

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from onegen_jax.train.loop import fit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Task config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (any path Orbax accepts) for "
                               "checkpoints and metrics; a restart resumes from its latest step.")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _, final = fit(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(final, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
