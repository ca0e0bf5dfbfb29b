"""Exports the parameters of a run directory as a Hugging Face checkpoint with its tokenizer.

  python -m launch.export_hf --workdir=RUN --out=DIR [--step=N] [--dtype=bfloat16]
  python -m launch.export_hf --workdir=LORA_RUN --out=DIR --merge | --adapter

RUN is a training run or an import (launch.import_hf); the step defaults to the latest. The
architecture and the real vocabulary size come from the import record ({"hf": ...} in the config
item) of RUN or, for a training run, of the run it started from (config.model.init_from); the
padded vocabulary rows beyond it are dropped. Without a record the architecture is hf's default
(Qwen2ForCausalLM with q/k/v biases, else LlamaForCausalLM) and the vocabulary is trimmed to the
tokenizer. The tokenizer is the first of RUN/tokenizer and the run's data.tokenizer_path (then the
same for init_from), with the task's special tokens added by name.

A LoRA run (config.lora) is exported with --merge (one HF model: its base as it trained,
bfloat16-rounded or int8, plus (alpha / r) A B, the trained token rows written in) or with
--adapter (a PEFT LoRA adapter directory for `peft.PeftModel.from_pretrained` over the base's HF
export, which is `launch.export_hf --workdir=BASE_RUN`; no tokenizer or model config written).
"""

from __future__ import annotations

import math
import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from transformers import AutoTokenizer

from onegen_jax import hf, sharding
from onegen_jax.checkpoint import (Checkpointer, model_config_from_json, restore_lora,
                                   restore_merged, restore_target)
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.tasks import get_task
from onegen_jax.model.config import ModelConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: a training run or an import.")
_OUT = flags.DEFINE_string("out", None, "Output directory of the Hugging Face checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"],
                           "dtype of the written tensors.")
_MERGE = flags.DEFINE_bool("merge", False, "A LoRA run: its adapters merged into one HF model.")
_ADAPTER = flags.DEFINE_bool("adapter", False, "A LoRA run: a PEFT adapter directory.")
flags.mark_flags_as_required(["workdir", "out"])


def _say(message: str) -> None:
  print(message, flush=True)


def _open(workdir: str, step: int | None = None) -> tuple[Checkpointer, int]:
  """The checkpointer of an existing run directory and the step to read (default: latest)."""
  if not epath.Path(workdir).exists():
    raise FileNotFoundError(f"run directory {workdir} does not exist")
  ckpt = Checkpointer(workdir)
  steps = ckpt.all_steps()
  if not steps or (step is not None and step not in steps):
    ckpt.close()
    raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' of step {step}'} "
                            f"in {workdir} (steps: {steps})")
  return ckpt, max(steps) if step is None else step


def _lineage(workdir: str, config: dict) -> list[tuple[str, dict]]:
  """(run directory, its config item) for the run and each run it started from (init_from),
  at most 16 (a bound against a cycle)."""
  runs = [(workdir, config)]
  while (parent := runs[-1][1].get("model", {}).get("init_from")) and len(runs) < 16:
    ckpt, step = _open(parent)
    runs.append((parent, ckpt.restore_json(step, "config")))
    ckpt.close()
  return runs


def _hf_record(runs: list[tuple[str, dict]]) -> dict:
  """The nearest import record ({"architecture", "vocab_size", ...}), or {} when there is none."""
  return next((config["hf"] for _, config in runs if "hf" in config), {})


def _tokenizer(runs: list[tuple[str, dict]]):
  """The run's tokenizer with its task's special tokens, or None when no run names one."""
  for workdir, config in runs:
    for path in (os.path.join(workdir, "tokenizer"), config.get("data", {}).get("tokenizer_path")):
      if path and os.path.isdir(path):
        task = config.get("task")
        _say(f"tokenizer: {path}" + (f" with the {task} tokens" if task else ""))
        return TaskTokenizer(path, get_task(task)).hf if task else AutoTokenizer.from_pretrained(path)
  return None


def _mesh(model_config: ModelConfig) -> jax.sharding.Mesh:
  """An fsdp mesh over all devices (the fsdp axis divides the hidden size; data takes the rest)."""
  n = jax.device_count()
  fsdp = math.gcd(n, model_config.hidden_size)
  return sharding.make_mesh(data=n // fsdp, fsdp=fsdp)


def export_hf(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16",
              lora: str | None = None) -> dict:
  """Writes step `step` of `workdir` to `out`; returns {"step", "architecture", "vocab_size"}.
  lora: a LoRA run's export, "merge" or "adapter" (module doc); None for any other run."""
  ckpt, step = _open(workdir, step)
  model_config = model_config_from_json(ckpt.restore_json(step, "model"))
  if (model_config.lora is None) != (lora is None):
    ckpt.close()
    raise ValueError(f"{workdir} is a LoRA run: pass --merge or --adapter" if lora is None else
                     f"--{lora} exports a LoRA run; {workdir} is not one")
  runs = _lineage(workdir, ckpt.restore_json(step, "config"))
  record, tokenizer = _hf_record(runs), _tokenizer(runs)
  vocab = record.get("vocab_size") or (len(tokenizer) if tokenizer else model_config.vocab_size)
  if tokenizer is not None and len(tokenizer) > vocab:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model only {vocab}")
  mesh = _mesh(model_config)
  _say(f"restoring step {step} of {workdir}")
  if lora == "adapter":
    trainable, base = restore_lora(ckpt, step, model_config, mesh)
    ckpt.close()
    _say(f"writing the PEFT adapter {out} (base: step {base['step']} of {base['workdir']})")
    hf.save_peft_adapter(trainable, model_config, out, vocab, base["workdir"])
    return {"step": step, "architecture": record.get("architecture"), "vocab_size": vocab}
  if lora == "merge":
    params = restore_merged(ckpt, step, model_config, mesh)
    model_config = model_config.replace(lora=None)
  else:
    params = ckpt.restore_params(step, restore_target(model_config, mesh))
  ckpt.close()
  architecture = record.get("architecture")
  _say(f"writing {out}: {architecture or 'default architecture'}, {dtype}, vocab {vocab} "
       f"(of {model_config.vocab_size} rows)")
  hf.save_hf_checkpoint(params, model_config, out, dtype=dtype, tokenizer=tokenizer,
                        vocab_size=vocab, architecture=architecture)
  _say(f"done: {out}")
  return {"step": step, "architecture": architecture, "vocab_size": vocab}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
  try:
    if _MERGE.value and _ADAPTER.value:
      raise app.UsageError("--merge and --adapter exclude each other")
    lora = "merge" if _MERGE.value else "adapter" if _ADAPTER.value else None
    export_hf(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value, lora)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"export_hf: {e}")
  return 0


if __name__ == "__main__":
  app.run(main)
