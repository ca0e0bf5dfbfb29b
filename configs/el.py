"""Entity linking with OneGen: [LK] after each generated mention retrieves an entity ([SE] keys).

Launch:
  python -m launch.train --config=configs/el.py:demo
  python -m launch.train --config=configs/el.py:llama2-7b --workdir=gs://BUCKET/el-run1 \\
      --config.model.init_from=gs://BUCKET/llama2-7b-imported \\
      --config.data.train_path=... --config.data.db_path=... --config.data.tokenizer_path=...
  python -m launch.train --config=configs/el.py:llama2-7b --compile_only --topology=v5p-64

Variants: `demo` (the tiny decoder on the project's generated entity-linking data, written to
runs/demo-data/el on first use; CPU, about a minute) and `llama2-7b` (the paper's setting, see
onegen_jax/train/config.py).
"""

from onegen_jax.train.config import demo_config, paper_config


def get_config(arg: str = "demo"):
  return demo_config("el") if arg == "demo" else paper_config("el", arg)
