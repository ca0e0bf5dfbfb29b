"""OneGen for multi-hop RAG: the model emits [Question Representation] to retrieve a paragraph,
which is inserted as <paragraph>...</paragraph> into the same context.

Launch:
  python -m launch.train --config=configs/multihop.py:demo
  python -m launch.train --config=configs/multihop.py:PRESET --workdir=RUN \\
      --config.model.init_from=IMPORTED_RUN --config.data.train_path=... --config.data.db_path=... \\
      --config.data.tokenizer_path=...
  python -m launch.train --config=configs/multihop.py:PRESET --compile_only --topology=v5p-64

Variants: `demo` (the tiny decoder on the project's generated multi-hop data, written to
runs/demo-data/multihop on first use; CPU), one per model of the paper's table
(below; what all paper settings share: onegen_jax/train/config.py) and `qwen2-7b-lora` (LoRA
adapters over a bfloat16 base: train/config.py `with_lora`; any PRESET-lora works likewise).
"""

from onegen_jax.train.config import PaperSetting, demo_config, paper_config

# The paper's settings: 2 examples per GPU x accum 4 x 8 GPUs.
_MULTIHOP = dict(examples_per_step=64, accum_steps=4, lr=2e-5, epochs=3, n_pos=2)
PAPER = {
    "llama2-7b": PaperSetting(max_len=1200, n_neg=6, **_MULTIHOP),
    "llama3.1-8b": PaperSetting(max_len=1200, n_neg=2, **_MULTIHOP),
    "qwen2-1.5b": PaperSetting(max_len=1100, n_neg=6, **_MULTIHOP),
    "qwen2-7b": PaperSetting(max_len=1100, n_neg=2, **_MULTIHOP),
}


def get_config(arg: str = "demo"):
  return demo_config("multihop") if arg == "demo" else paper_config("multihop", arg, PAPER)
