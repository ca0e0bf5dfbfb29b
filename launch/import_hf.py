"""Imports a Hugging Face checkpoint into a run directory: step 0 with params, model and config.

  python -m launch.import_hf --hf_dir=DIR --workdir=RUN [--config=configs/el.py[:VARIANT]]
      [--tokenizer_dir=DIR] [--pad_vocab_to=128]
  python -m launch.import_hf --adapter=PEFT_DIR --base=BASE_RUN --workdir=RUN
      [--base_dtype=bfloat16]

The run directory is what `launch.train --config.model.init_from=RUN`, `launch.export_hf` and
inference read. Parameters are read shard by shard onto an fsdp mesh over all devices and stored
in float32.

With --config, the task's special tokens (config.task) are added to the tokenizer by name; each
token new to the tokenizer gets an embedding (and untied LM-head) row equal to the mean of its
description's token rows, and the vocabulary is padded to a multiple of --pad_vocab_to. Without
it, the parameters are stored as they are. The tokenizer (with the task's tokens) is saved in
RUN/tokenizer. The config item of step 0 holds the task config (if any) plus
{"hf": {"architecture", "vocab_size", "source"}}: vocab_size is the real (unpadded) vocabulary,
max(the checkpoint's vocab_size, tokenizer size), which export keeps and the padding beyond it
is dropped.

With --adapter, a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors,
trained elsewhere or by launch.export_hf --adapter) becomes a LoRA run over BASE_RUN (the import
of its base model, step: its latest): step 0 holds the adapters (and token rows, modules_to_save)
with BASE_RUN as its base, its config item BASE_RUN's with {"lora": {"base": ...}}; BASE_RUN's
tokenizer is copied. Inference and export_hf --merge then read it like a trained LoRA run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from transformers import AutoTokenizer

from onegen_jax import hf, sharding
from onegen_jax.checkpoint import (Checkpointer, dumps_config, model_config_from_json,
                                   restore_target)
from onegen_jax.model import lora
from onegen_jax.model.config import LORA_BASE_DTYPES, NUMERIC_FIELDS, ModelConfig

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json and "
                              "*.safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to create (any path Orbax "
                               "accepts); it must not hold a checkpoint yet.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Task config file[:variant]: add its "
                                          "task's special tokens and take its model numerics.",
                                          lock_config=True)
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Tokenizer directory (default: "
                                     "--hf_dir).")
_PAD_VOCAB_TO = flags.DEFINE_integer("pad_vocab_to", 128, "With --config: pad the vocabulary to "
                                     "a multiple of this (shards evenly).")
_ADAPTER = flags.DEFINE_string("adapter", None, "A PEFT LoRA adapter directory to import as a "
                               "LoRA run over --base (instead of --hf_dir).")
_BASE = flags.DEFINE_string("base", None, "With --adapter: the run directory of the base model "
                            "(launch.import_hf of it).")
_BASE_DTYPE = flags.DEFINE_enum("base_dtype", "bfloat16", list(LORA_BASE_DTYPES), "With "
                                "--adapter: the dtype the base is served in before the merge.")
flags.mark_flags_as_required(["workdir"])

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _say(message: str) -> None:
  print(message, flush=True)


def _read_hf_config(hf_dir: str) -> dict:
  """config.json of `hf_dir`; FileNotFoundError naming what is missing."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --hf_dir must be a Hugging Face model directory")
  with open(path) as f:
    return json.load(f)


def _mesh(model_config: ModelConfig) -> jax.sharding.Mesh:
  """An fsdp mesh over all devices (the fsdp axis divides the hidden size; data takes the rest)."""
  n = jax.device_count()
  fsdp = math.gcd(n, model_config.hidden_size)
  return sharding.make_mesh(data=n // fsdp, fsdp=fsdp)


def _has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, name)) for name in _TOKENIZER_FILES)


def _save_tokenizer(tokenizer, workdir: str) -> str:
  """Saves `tokenizer` into workdir/tokenizer (through a local directory: any epath works)."""
  target = epath.Path(workdir) / "tokenizer"
  target.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as local:
    tokenizer.save_pretrained(local)
    for path in epath.Path(local).iterdir():
      (target / path.name).write_bytes(path.read_bytes())
  return os.fspath(target)


def _model_overrides(config) -> dict:
  """ModelConfig fields an import sets on top of the checkpoint's shapes: float32 master weights,
  and with a task config its numerics (NUMERIC_FIELDS but param_dtype) and layer layout
  (scan_layers: the import writes the layout the config trains with)."""
  fields = (*NUMERIC_FIELDS, "scan_layers")
  return {**({k: config.model[k] for k in fields} if config else {}), "param_dtype": "float32"}


def _add_task_tokens(params, model_config: ModelConfig, tokenizer_dir: str, task_name: str,
                     pad_to: int):
  """hf.add_task_tokens, reported; returns (params, model config, real vocab, HF tokenizer)."""
  added = hf.add_task_tokens(params, model_config, tokenizer_dir, task_name, pad_to)
  _say(f"task {task_name}: tokens {added.tokenizer.ids}; initialised from descriptions: "
       f"{added.initialised}; vocab {added.vocab_size} padded to {added.model_config.vocab_size}")
  return added.params, added.model_config, added.vocab_size, added.tokenizer.hf


def import_hf(hf_dir: str, workdir: str, config=None, tokenizer_dir: str | None = None,
              pad_vocab_to: int = 128) -> None:
  """Writes step 0 of `workdir` (and workdir/tokenizer) from the Hugging Face model in `hf_dir`."""
  hf_config = _read_hf_config(hf_dir)
  model_config = hf.config_from_hf(hf_config, **_model_overrides(config))
  architecture = hf.architecture(hf_config)
  tokenizer_dir = tokenizer_dir or hf_dir
  if config and not _has_tokenizer(tokenizer_dir):
    raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}; pass --tokenizer_dir")
  ckpt = Checkpointer(workdir, async_save=False)
  if ckpt.latest_step() is not None:
    raise FileExistsError(f"{workdir} already holds a checkpoint (step {ckpt.latest_step()})")
  mesh = _mesh(model_config)
  _say(f"reading {hf_dir} ({architecture}, {model_config.num_layers} layers, vocab "
       f"{model_config.vocab_size}) onto mesh {dict(mesh.shape)}")
  params = hf.load_hf_params(hf_dir, model_config, mesh)
  vocab, tokenizer = model_config.vocab_size, None
  if config:
    params, model_config, vocab, tokenizer = _add_task_tokens(
        params, model_config, tokenizer_dir, config.task, pad_vocab_to)
  elif _has_tokenizer(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
  record = {"architecture": architecture, "vocab_size": vocab, "source": os.path.abspath(hf_dir)}
  saved_config = {**(dumps_config(config) if config else {}), "hf": record}
  ckpt.save_params(0, params, saved_config, model_config)
  ckpt.wait()
  ckpt.close()
  _say(f"saved step 0 to {workdir}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters")
  if tokenizer is None:
    _say(f"no tokenizer in {tokenizer_dir}: none saved")
  else:
    _say(f"saved the tokenizer ({len(tokenizer)} tokens) to {_save_tokenizer(tokenizer, workdir)}")


def import_adapter(adapter_dir: str, base: str, workdir: str, base_dtype: str = "bfloat16") -> None:
  """Writes step 0 of `workdir`: the PEFT adapter in `adapter_dir` as a LoRA run over the run
  `base` (module doc)."""
  if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
    raise FileNotFoundError(f"{adapter_dir}/adapter_config.json not found: --adapter must be a "
                            "PEFT adapter directory")
  source = Checkpointer(base)
  step = source.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {base}")
  base_config = source.restore_json(step, "config")
  model_config = model_config_from_json(source.restore_json(step, "model"))
  source.close()
  ckpt = Checkpointer(workdir, async_save=False)
  if ckpt.latest_step() is not None:
    raise FileExistsError(f"{workdir} already holds a checkpoint (step {ckpt.latest_step()})")
  lora_config = dataclasses.replace(hf.read_lora_config(adapter_dir), base_dtype=base_dtype)
  model_config = model_config.replace(lora=lora_config)
  template = restore_target(model_config, _mesh(model_config),
                            lambda p: lora.split(p, lora_config)[0])
  trainable = hf.load_peft_adapter(adapter_dir, template, model_config)
  saved_config = {**base_config, "model": {**base_config.get("model", {}), "init_from": base},
                  "lora": {"base": {"workdir": base, "step": step},
                           "source": os.path.abspath(adapter_dir)}}
  ckpt.save_params(0, trainable, saved_config, model_config)
  ckpt.wait()
  ckpt.close()
  _say(f"saved step 0 to {workdir}: rank {lora_config.rank} on {lora_config.targets}, "
       f"{sum(x.size for x in jax.tree.leaves(trainable)):,} parameters over {base} step {step}")
  if _has_tokenizer(tokenizer := os.path.join(base, "tokenizer")):
    _say(f"saved {tokenizer} to {_save_tokenizer(AutoTokenizer.from_pretrained(tokenizer), workdir)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  try:
    if _ADAPTER.value:
      if not _BASE.value or _HF_DIR.value:
        raise app.UsageError("--adapter needs --base (and no --hf_dir)")
      import_adapter(_ADAPTER.value, _BASE.value, _WORKDIR.value, _BASE_DTYPE.value)
    elif not _HF_DIR.value:
      raise app.UsageError("--hf_dir (or --adapter with --base) is required")
    else:
      import_hf(_HF_DIR.value, _WORKDIR.value, _CONFIG.value, _TOKENIZER_DIR.value,
                _PAD_VOCAB_TO.value)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"import_hf: {e}")
  return 0


if __name__ == "__main__":
  app.run(main)
