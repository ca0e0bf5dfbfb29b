"""Entity linking with OneGen: [LK] after each generated mention retrieves an entity ([SE] keys).

Launch:
  python -m launch.train --config=configs/el.py:demo
  python -m launch.train --config=configs/el.py:demo --config.train.steps=100 --config.mesh.fsdp=2

Variants (`get_config(arg)`):
  demo  the tiny decoder on the synthetic entity-linking task generated in code, on CPU
        (about a minute on 2 cores with an emulated or real 8-device mesh).
"""

from ml_collections import ConfigDict


def get_config(arg: str = "demo") -> ConfigDict:
  if arg != "demo":
    raise ValueError(f"unknown variant {arg!r} of configs/el.py; known: demo")
  c = ConfigDict()
  c.task = "el"
  # Decoder: a preset plus overrides of any field of onegen_jax.model.config.ModelConfig.
  # init_from: a run directory (e.g. written by launch.import_hf) whose parameters start training.
  c.model = ConfigDict(dict(preset="tiny", dtype="float32", param_dtype="float32",
                            remat_policy="full", scan_layers=True, attention_impl="xla",
                            init_from=""))
  # Mesh axis sizes; -1 fills the remaining devices.
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Loss: lambda_gen * L_gen + lambda_ret * L_ret; loss_type "bpr" (the reference's shipped
  # setting) or "infonce" (temperature applies to InfoNCE only).
  c.loss = ConfigDict(dict(loss_type="bpr", temperature=0.02, lambda_gen=1.0, lambda_ret=1.0))
  # AdamW with global-norm clipping; schedule "linear" (reference), "warmup_cosine" or "constant".
  c.optim = ConfigDict(dict(lr=3e-3, schedule="warmup_cosine", warmup_steps=50, b1=0.9, b2=0.999,
                            eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  # Static batch: `rows` rows of `seq_len` tokens per optimizer step, split into `accum_steps`
  # micro-batches; per micro-batch at most num_queries queries, num_keys keys and num_negatives
  # negatives per query. In-batch contrastive negatives span one micro-batch.
  c.batch = ConfigDict(dict(rows=8, seq_len=64, num_queries=16, num_keys=64, num_negatives=3,
                            accum_steps=1))
  # nan_policy: "stop" (exit with a message, last good checkpoint kept) or "skip" the step.
  c.train = ConfigDict(dict(steps=600, seed=0, log_every=100, eval_every=300, nan_policy="stop"))
  # Orbax checkpoints in --workdir: every `every_steps` steps, the last `keep` kept.
  c.checkpoint = ConfigDict(dict(every_steps=200, keep=3))
  # Data: the synthetic task (onegen_jax.data.synthetic), held-out examples for evaluation.
  c.data = ConfigDict(dict(kind="synthetic", seed=0, num_train=4000, num_heldout=256))
  return c
