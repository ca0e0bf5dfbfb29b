"""OneGen for selfrag RAG: the model emits [Question Representation] to retrieve a paragraph,
which is inserted as <paragraph>...</paragraph> into the same context.

Launch:
  python -m launch.train --config=configs/selfrag.py:demo
  python -m launch.train --config=configs/selfrag.py:PRESET --workdir=RUN \\
      --config.model.init_from=IMPORTED_RUN --config.data.train_path=... --config.data.db_path=... \\
      --config.data.tokenizer_path=...
  python -m launch.train --config=configs/selfrag.py:PRESET --compile_only --topology=v5p-64

Variants: `demo` (the tiny decoder on the project's generated Self-RAG data, written to
runs/demo-data/selfrag on first use; CPU, about a minute) and the paper's setting below (what all
paper settings share: onegen_jax/train/config.py). Inference: `launch.infer --task=selfrag
--selfrag_mode=adaptive_retrieval|always_retrieve|no_retrieval` (onegen_jax/inference/selfrag.py).
"""

from onegen_jax.train.config import PaperSetting, demo_config, paper_config

# The paper's setting: 3 examples per GPU x accum 4 x 8 GPUs.
PAPER = {
    "llama2-7b": PaperSetting(max_len=2048, examples_per_step=96, accum_steps=4, lr=2e-5,
                              epochs=3, n_pos=1, n_neg=2),
}


def get_config(arg: str = "demo"):
  if arg != "demo":
    return paper_config("selfrag", arg, PAPER)
  c = demo_config("selfrag")
  c.train.steps = 1000  # the critic tokens (one or three per example) need more steps than EL
  return c
