"""Entity linking with OneGen: [LK] after each generated mention retrieves an entity ([SE] keys).

Launch:
  python -m launch.train --config=configs/el.py:demo
  python -m launch.train --config=configs/el.py:llama2-7b --workdir=gs://BUCKET/el-run1 \\
      --config.model.init_from=gs://BUCKET/llama2-7b-imported \\
      --config.data.train_path=... --config.data.db_path=... --config.data.tokenizer_path=...
  python -m launch.train --config=configs/el.py:llama2-7b --compile_only --topology=v5p-64

Variants: `demo` (the tiny decoder on the project's generated entity-linking data, written to
runs/demo-data/el on first use; CPU, about a minute), `llama2-7b` (the paper's setting below;
what all paper settings share: onegen_jax/train/config.py) and `llama2-7b-lora` (the same with
LoRA adapters over a bfloat16 base: train/config.py `with_lora`; add
`--config.lora.base_dtype=int8` for an int8 base).
"""

from onegen_jax.train.config import PaperSetting, demo_config, paper_config

# The paper's setting: 5 examples per GPU x accum 2 x 8 GPUs.
PAPER = {
    "llama2-7b": PaperSetting(max_len=1300, examples_per_step=80, accum_steps=2, lr=5e-6,
                              epochs=6, n_pos=1, n_neg=4),
}


def get_config(arg: str = "demo"):
  return demo_config("el") if arg == "demo" else paper_config("el", arg, PAPER)
