"""Building blocks of the task configs in configs/: one base, a paper setting's config, the demo.

Each configs/TASK.py lists the paper's settings for its task (PaperSetting: the reference's
scripts, 8 GPUs, global batch = per-device x accum x 8). Common to all of them:
AdamW (0.9, 0.999, 1e-8), no weight decay, linear decay to 0 without warmup, clip 1.0, BPR with
lambda_g = lambda_r = 1, bf16 compute, full fine-tuning with rematerialisation, ZeRO-3 (= fsdp).
Our batches are packed: each micro-batch is 64 rows of 2048 tokens (131k tokens), which holds the
paper's examples per micro-batch with the documents their queries need (at about 128 tokens a
document). 64 rows split over data x fsdp of up to 64 devices; beyond that use `mesh.tensor`.
The variants set train.epochs and leave train.steps 0: the steps are derived from the data at
start (epochs x examples / examples per step, the latter measured by packing the first batches).
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict, config_dict


@dataclasses.dataclass(frozen=True)
class PaperSetting:
  """One row of the paper's training settings (the reference's scripts)."""

  max_len: int  # truncation length of an example
  examples_per_step: int  # global: per-device batch x accum x 8 GPUs
  accum_steps: int
  lr: float
  epochs: float
  n_pos: int  # RET anchors sampled per example (n_pos_per_sent)
  n_neg: int  # negatives per anchor (n_neg_per_pos)


def base_config(task: str) -> ConfigDict:
  """Every key a run reads, with neutral defaults; variants override sections."""
  c = ConfigDict()
  c.task = task
  # Decoder: a preset plus overrides of any field of onegen_jax.model.config.ModelConfig;
  # init_from: a run directory (e.g. from launch.import_hf) whose parameters start training.
  # attention_impl: auto (splash on TPU, cuDNN on GPU, XLA on CPU), splash, cudnn or xla.
  # dot_accumulation: native, float32 or auto (model/matmul.py).
  # remat_policy: none, dots, dots_with_no_batch_dims, full, or auto (train/remat_auto.py: the
  # first of none, dots_with_no_batch_dims, full whose compiled step fits the device's memory).
  c.model = ConfigDict(dict(preset="tiny", dtype="bfloat16", param_dtype="float32",
                            remat_policy="full", scan_layers=True, attention_impl="auto",
                            dot_accumulation="native", init_from=""))
  # Mesh axis sizes; -1 fills the remaining devices.
  c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # lambda_gen * L_gen + lambda_ret * L_ret; "bpr" (the reference's) or "infonce" (temperature).
  # gen_chunks: L_gen over this many sequence chunks, each chunk's [rows, S/c, V] logits made and
  # dropped in turn (large vocabularies: Qwen2 152k, Llama-3.1 128k); 1 = whole logits at once.
  # negatives_across_micro_batches (InfoNCE, batch.accum_steps > 1): each query scored against
  # the keys of every micro-batch, as in one large batch (a two-pass step, one more forward).
  # LoRA (model/lora.py): adapters of `rank` on the `targets` projections (q, k, v, o, gate, up,
  # down), scaled by alpha / rank, dropout on their input; the base frozen in base_dtype
  # ("bfloat16", "int8": weight-only per output channel, "float32"). trainable_tokens "added":
  # the task's special tokens' rows of embed_tokens (and an untied lm_head) train too, "none":
  # not; modules_to_save: ("embed_tokens", "lm_head") train whole. The base is model.init_from
  # (or, without it, the model's random init).
  c.lora = ConfigDict(dict(enabled=False, rank=16, alpha=32.0, dropout=0.05,
                           targets=("q", "k", "v", "o", "gate", "up", "down"),
                           trainable_tokens="added", modules_to_save=(), base_dtype="bfloat16"))
  c.loss = ConfigDict(dict(loss_type="bpr", temperature=0.02, lambda_gen=1.0, lambda_ret=1.0,
                           gen_chunks=1, negatives_across_micro_batches=False))
  # AdamW after global-norm clipping; schedule "linear" (reference), "warmup_cosine", "constant".
  c.optim = ConfigDict(dict(lr=2e-5, schedule="linear", warmup_steps=0, b1=0.9, b2=0.999,
                            eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  # Static batch per optimizer step: `rows` rows of `seq_len` tokens, split into `accum_steps`
  # micro-batches; per micro-batch at most num_queries queries, num_keys keys, num_negatives
  # negatives per query, max_positives listed positives per query (InfoNCE never uses the others
  # as negatives). In-batch contrastive negatives span one micro-batch.
  c.batch = ConfigDict(dict(rows=8, seq_len=64, num_queries=16, num_keys=64, num_negatives=4,
                            max_positives=4, accum_steps=1))
  # nan_policy: "stop" (exit with a message, last good checkpoint kept) or "skip" the step.
  # steps: optimizer steps; 0 derives them from epochs: ceil(epochs x training examples / examples
  # per step), examples per step measured by packing the first batches (train.run_length.derive_steps).
  c.train = ConfigDict(dict(steps=0, epochs=0.0, seed=0, log_every=100, eval_every=500,
                            nan_policy="stop"))
  # Orbax checkpoints in --workdir: every `every_steps` steps, the last `keep` kept; with
  # best_metric (an eval metric, e.g. "recall@1") the best step by best_mode ("min"/"max") too.
  c.checkpoint = ConfigDict(dict(every_steps=500, keep=3, best_metric="", best_mode="max"))
  # Data (onegen_jax.data.pipeline): reference-format jsonl files and an HF tokenizer directory;
  # prepared_dir: prepare once into TFDS array_record files there (else tokenise in memory);
  # max_len: truncation length of an example (0: batch.seq_len); n_pos_per_sent / n_neg_per_pos:
  # None keeps the task's values; num_shards: data shards (0: one per process); generate: "el" or
  # "multihop" writes the project's generated dataset to train_path's directory if missing;
  # document_text_weight: loss weight of packed documents' text (1: the reference; 0: context).
  c.data = ConfigDict(dict(kind="jsonl", task=task, train_path="", db_path="", dev_path="",
                           tokenizer_path="", prepared_dir="", max_len=0, max_bad_lines=0, seed=0,
                           n_pos_per_sent=config_dict.placeholder(int), num_shards=0, generate="",
                           n_neg_per_pos=config_dict.placeholder(int), num_train=0,
                           num_heldout=0, document_text_weight=1.0))
  return c


def paper_config(task: str, preset: str, settings: dict[str, PaperSetting]) -> ConfigDict:
  """The config of the paper's setting for `task` with the model `preset` (a key of `settings`,
  the task's rows: configs/TASK.py), or with "PRESET-lora" its LoRA variant (`with_lora`); data
  paths are set on the command line."""
  if preset.endswith(LORA_SUFFIX):
    return with_lora(paper_config(task, preset.removesuffix(LORA_SUFFIX), settings))
  if preset not in settings:
    raise ValueError(f"no paper setting for {task} with {preset!r}; known: {sorted(settings)}")
  s = settings[preset]
  max_len, examples, accum, lr, epochs, n_pos, n_neg = (
      s.max_len, s.examples_per_step, s.accum_steps, s.lr, s.epochs, s.n_pos, s.n_neg)
  c = base_config(task)
  c.model.preset = preset
  c.optim.lr = lr
  c.train.epochs = epochs
  c.data.update(n_pos_per_sent=n_pos, n_neg_per_pos=n_neg, max_len=max_len)
  per_micro = examples // accum
  # num_keys assumes one key per document (the positive's and each negative's); with
  # sentence-level keys (as in the reference multi-hop db) the key budget fills first and a batch
  # holds fewer examples: the fit loop warns and logs examples_per_step.
  c.batch.update(rows=64 * accum, seq_len=-(-max(2048, max_len) // 256) * 256, accum_steps=accum,
                 num_queries=per_micro * n_pos, num_keys=per_micro * n_pos * (1 + n_neg),
                 num_negatives=n_neg)
  return c


LORA_SUFFIX = "-lora"


def with_lora(c: ConfigDict) -> ConfigDict:
  """`c` as a LoRA run: adapters of rank 16 (alpha 32, dropout 0.05) on every projection, the
  task tokens' rows trained, the base frozen in bfloat16; lr 1e-4 (LoRA's usual rate: the
  adapters start at zero and move far less per step than full weights at the paper's 5e-6 to
  2e-5). The rest (batch, schedule, epochs) stays the paper's."""
  c.lora.update(enabled=True, rank=16, alpha=32.0, dropout=0.05, trainable_tokens="added",
                base_dtype="bfloat16")
  c.optim.lr = 1e-4
  return c


def demo_config(task: str) -> ConfigDict:
  """The tiny decoder on the project's generated data for `task` (el, multihop, selfrag), written to
  runs/demo-data/TASK on first use; trains on CPU in about a minute."""
  c = base_config(task)
  c.model.update(preset="tiny", dtype="float32")
  c.mesh.update(data=-1, fsdp=1)
  c.loss.update(loss_type="infonce")  # learns retrieval faster than BPR at this size
  c.optim.update(lr=3e-3, schedule="warmup_cosine", warmup_steps=50)
  c.batch.update(rows=8, seq_len=256, num_queries=16, num_keys=64, num_negatives=4)
  c.train.update(steps=600, log_every=100, eval_every=300)
  c.checkpoint.update(every_steps=200, best_metric="recall@1", best_mode="max")
  data = f"runs/demo-data/{task}"
  c.data.update(generate=task, n_neg_per_pos=1, train_path=f"{data}/train.jsonl",
                db_path=f"{data}/db.jsonl", dev_path=f"{data}/dev.jsonl",
                tokenizer_path=f"{data}/tokenizer")
  return c
