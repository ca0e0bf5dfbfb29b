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

from onegen_jax.train.config import base_config, paper_config


def get_config(arg: str = "demo"):
  if arg != "demo":
    return paper_config("el", arg)
  c = base_config("el")
  c.model.update(preset="tiny", dtype="float32")
  c.mesh.update(data=-1, fsdp=1)
  c.loss.update(loss_type="infonce")  # learns retrieval faster than BPR at this size
  c.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=50)
  c.batch.update(rows=8, seq_len=256, num_queries=16, num_keys=64, num_negatives=4)
  c.train.update(steps=600, log_every=100, eval_every=300)
  c.checkpoint.update(every_steps=200)
  data = "runs/demo-data/el"
  c.data.update(generate="el", n_neg_per_pos=1, train_path=f"{data}/train.jsonl", db_path=f"{data}/db.jsonl",
                dev_path=f"{data}/dev.jsonl", tokenizer_path=f"{data}/tokenizer")
  return c
