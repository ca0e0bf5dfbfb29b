"""Flags that launch.infer and launch.build_index share: processes (process_flags.py), the device
mesh, the compute dtype. Each command runs the same way on every host of a multi-host run (as launch.train does):

  python -m launch.build_index ... --distributed --mesh_fsdp=4 --mesh_tensor=8   # TPU pod
  python -m launch.build_index ... --distributed --coordinator_address=HOST:PORT \\
      --num_processes=N --process_id=I                                            # elsewhere

Mesh: ('data', 'fsdp', 'tensor') sizes over all devices of all processes, -1 filling one axis
(default: data-parallel only, parameters replicated). Parameters are laid out by the training
rules: vocab, heads, kv heads and mlp over 'tensor', the embedding dimension over 'fsdp'; the
encoder's rows and the engine's batch over data x fsdp; the KV cache's kv heads over 'tensor'.
"""

from absl import flags

from launch import process_flags
from onegen_jax import sharding

_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Mesh 'data' size (-1: what fills the "
                                  "devices).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Mesh 'fsdp' size: parameters sharded on "
                                  "their embedding dimension, batch rows split.")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Mesh 'tensor' size: heads, kv heads, mlp "
                                    "and vocab sharded (must divide them).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Compute dtype (activations, "
                           "KV cache). Default: bfloat16 on TPU/GPU, float32 on CPU.")


def start() -> dict:
  """Joins the other processes when --distributed; returns load_run's mesh and dtype arguments."""
  process_flags.join()
  mesh = sharding.make_mesh(_MESH_DATA.value, _MESH_FSDP.value, _MESH_TENSOR.value)
  return {"mesh": mesh, "dtype": _DTYPE.value}
