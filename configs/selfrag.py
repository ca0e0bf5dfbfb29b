"""OneGen for selfrag RAG: the model emits [Question Representation] to retrieve a paragraph,
which is inserted as <paragraph>...</paragraph> into the same context.

Launch:
  python -m launch.train --config=configs/selfrag.py:PRESET --workdir=RUN \\
      --config.model.init_from=IMPORTED_RUN --config.data.train_path=... --config.data.db_path=... \\
      --config.data.tokenizer_path=...
  python -m launch.train --config=configs/selfrag.py:PRESET --compile_only --topology=v5p-64

Variants: one per model of the paper's table (onegen_jax/train/config.py).
"""

from onegen_jax.train.config import paper_config


def get_config(arg: str):
  return paper_config("selfrag", arg)
