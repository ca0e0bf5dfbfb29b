"""Writes a generated dataset in the reference format: train.jsonl, dev.jsonl, db.jsonl, tokenizer/.

  python -m launch.make_data --task=el --out=/tmp/el [--seed=0]
  python -m launch.make_data --task=multihop --out=/tmp/multihop
  python -m launch.make_data --task=selfrag --out=/tmp/selfrag --num_dev=40
"""

import json

from absl import app, flags

from onegen_jax.data.generate import GENERATORS, make_dataset

_TASK = flags.DEFINE_enum("task", None, sorted(GENERATORS), "Which task's data to generate.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generator.")
_VOCAB = flags.DEFINE_integer("vocab_size", 512, "Vocabulary size of the trained BPE tokenizer.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 0, "Training examples (0: the generator's default).")
_NUM_DEV = flags.DEFINE_integer("num_dev", 0, "Dev examples (0: the generator's default).")
flags.mark_flags_as_required(["task", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sizes = {k: v for k, v in (("num_train", _NUM_TRAIN.value), ("num_dev", _NUM_DEV.value)) if v}
  make_dataset(_TASK.value, _OUT.value, seed=_SEED.value, vocab_size=_VOCAB.value, **sizes)
  print(json.dumps({"out": _OUT.value, "files": ["train.jsonl", "dev.jsonl", "db.jsonl",
                                                 "tokenizer"]}))


if __name__ == "__main__":
  app.run(main)
