"""Per-device memory of the device decode loop compiled for a TPU slice (libtpu, no TPU; issue 24).

  .venv/bin/python -m benchmarks.aot_decode_loop --config=configs/el.py:llama2-7b \\
      --topology=v5p-64 --kb_keys=10000000,32

Compiles the engine's decode loop (onegen_jax/inference/aot.py) for each --kb_keys and prints
one JSON line per configuration: its settings and bytes per device, the total (arguments +
outputs + temporaries - the donated cache) and its parts (params, KB, KV cache, temporaries).
A small KB (e.g. one key per device) gives the model's own memory beside a large KB's. A
configuration that does not fit prints its RESOURCE_EXHAUSTED message as "error" (exit status 1).

The model is the config's (a -lora config: its plain model, as load_run merges it) in its
param_dtype, computing in bfloat16 (load_run's dtype on a TPU), on the config's mesh
(`--config.mesh.tensor=8 --config.mesh.fsdp=4` etc. to change it). Defaults: a serving setting
for EL with llama2-7b: 64 cache rows (2 per v5p-64 device over fsdp 32) of 2048 entries
(launch.serve's --capacity; the paper's prompts are at most 1300 tokens), N = 32 steps per call,
k = 10 hits per query (launch.serve's --retrieve_k), a 10M x 4096 bfloat16 KB.
"""

from __future__ import annotations

import dataclasses
import json

import jax
from absl import app, flags
from ml_collections import config_flags

from onegen_jax.inference.aot import compile_decode_loop
from onegen_jax.train.program import model_config

_CONFIG = config_flags.DEFINE_config_file("config", "configs/el.py:llama2-7b",
                                          "Task config file[:variant]: the model and mesh.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-64", "TPU slice, e.g. v5p-64, v5e-256.")
_KB_KEYS = flags.DEFINE_list("kb_keys", ["10000000"], "KB keys, one configuration each.")
_KB_DTYPE = flags.DEFINE_enum("kb_dtype", "bfloat16", ["bfloat16", "float32"], "The keys' dtype.")
_BATCH = flags.DEFINE_integer("batch", 64, "Cache rows (requests decoded together).")
_CAPACITY = flags.DEFINE_integer("capacity", 2048, "Cache entries per row.")
_STEPS = flags.DEFINE_integer("steps_per_dispatch", 32, "N: decode steps per compiled call.")
_K = flags.DEFINE_integer("k", 10, "Hits searched per query.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  model = model_config(config.model).replace(dtype="bfloat16")
  failed = False
  for keys in map(int, _KB_KEYS.value):
    settings = dict(kb_keys=keys, kb_dtype=_KB_DTYPE.value, batch=_BATCH.value,
                    capacity=_CAPACITY.value, steps_per_dispatch=_STEPS.value, k=_K.value)
    try:
      line = dataclasses.asdict(compile_decode_loop(model, _TOPOLOGY.value,
                                                    mesh_shape=config.mesh.to_dict(), **settings))
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      failed = True
      detail = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
      line = dict(settings, topology=_TOPOLOGY.value, error=f"RESOURCE_EXHAUSTED: {detail}")
    print(json.dumps(line, sort_keys=True), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
