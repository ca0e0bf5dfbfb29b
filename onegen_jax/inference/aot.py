"""Ahead-of-time compilation of the device decode loop for a TPU slice (libtpu, no TPU attached).

What is compiled is the engine's own call (device_decode.compiled_loop: the same bound and static
arguments, the cache donated), lowered with abstract arguments (ShapeDtypeStructs carrying
NamedShardings on a mesh over the slice's devices), so a user sees whether a model, its KV cache
and an entity-linking KB of N keys fit a slice before renting it; nothing is allocated:

  python -m benchmarks.aot_decode_loop --config=configs/el.py:llama2-7b --topology=v5p-64

The arguments are laid out as the engine holds them: the params as load_run restores them
(checkpoint.restore_target: the training logical rules on the mesh, the model's param_dtype),
the KV cache as init_cache and cache_sharding make it (rows over data x fsdp, kv heads over
tensor), the DeviceKB as device_kb.build places it (rows over every mesh axis, padded to a
multiple of the devices), the Rows replicated (the engine passes them as host arrays). The call
is the largest the engine makes with these settings: chunks of the loop's width W (loop_width:
an insertion's; a longer prompt is the host step's) beside decoding rows, attending to the whole
capacity, N steps, R = records_per_call retrievals recorded per row; EL's policy (LinkEntity), no penalties
(history width 0), forced tokens and candidates at their smallest width (list_width(0)).

Mesh: the caller's ('data', 'fsdp', 'tensor') sizes. The CLI takes the model config's `mesh`
(the paper's configs: fsdp over the whole slice, as the train step's AOT compile), so the
decode loop's params are sharded as training's; `--config.mesh.*` overrides it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from onegen_jax import sharding
from onegen_jax.checkpoint import restore_target
from onegen_jax.data.tasks import get_task
from onegen_jax.inference.device_decode import Rows, compiled_loop, loop_width, records_per_call
from onegen_jax.inference.retrieval_policy import make_policy
from onegen_jax.inference.run_dir import generation_config
from onegen_jax.inference.slots import list_width
from onegen_jax.inference.types import TaskTokens
from onegen_jax.model.config import ModelConfig
from onegen_jax.model.decoder import Decoder, cache_sharding, init_cache
from onegen_jax.retrieval import device_kb
from onegen_jax.train.aot import topology_devices
from onegen_jax.train.remat_auto import compiled_bytes


@dataclasses.dataclass(frozen=True)
class DecodeLoopReport:
  """One compiled call's settings and bytes per device (XLA's memory analysis; the parts from the
  arguments' shard shapes)."""

  topology: str
  num_devices: int
  mesh: dict
  batch: int
  capacity: int
  width: int  # W: the fed chunk's width
  steps: int  # N
  records: int  # R
  k: int
  kb_keys: int
  kb_dtype: str
  bytes_per_device: int  # arguments + outputs + temporaries - donated aliases (compiled_bytes)
  params_bytes: int
  kb_bytes: int
  cache_bytes: int  # (k, v)
  argument_bytes: int  # params + KB + cache + rows
  output_bytes: int
  alias_bytes: int  # the donated cache
  temp_bytes: int


def compile_decode_loop(model_config: ModelConfig, topology: str, *, mesh_shape: dict,
                        kb_keys: int, kb_dtype: str, batch: int, capacity: int,
                        steps_per_dispatch: int, k: int) -> DecodeLoopReport:
  """Compiles the engine's decode loop for `topology` (e.g. 'v5p-64'): `model_config` on a mesh
  of `mesh_shape` ({'data', 'fsdp', 'tensor'} sizes, -1 filling one), B = `batch` cache rows of
  `capacity` entries, an EL KB of `kb_keys` keys [hidden_size] in `kb_dtype`, N =
  `steps_per_dispatch`, k hits per query. Raises the compiler's error (RESOURCE_EXHAUSTED when
  it does not fit the devices' memory)."""
  mesh = sharding.make_mesh(**mesh_shape, devices=topology_devices(topology))
  vocab = model_config.vocab_size
  tokens = TaskTokens(query=vocab - 1, eos=vocab - 2, force_after_query=vocab - 3)
  policy = make_policy("el", None, None, tokens.force_after_query)
  config = generation_config(get_task("el"), max_retrievals=1,  # EL's: no limit, whatever given
                             batch_size=batch, capacity=capacity,
                             steps_per_dispatch=steps_per_dispatch)
  records = records_per_call(config)
  kb = abstract_kb(kb_keys, model_config.hidden_size, kb_dtype, mesh)
  width = loop_width(policy.follow_width(kb))
  params = restore_target(model_config, mesh)
  cache = abstract_cache(model_config, batch, capacity, mesh)
  loop = compiled_loop(Decoder(model_config), None, config, policy, tokens)
  with sharding.activate(mesh):
    compiled = loop.lower(params, kb, cache, abstract_rows(batch, width, records, mesh),
                          steps=steps_per_dispatch, window=capacity, k=k,
                          records=records).compile()
  memory = compiled.memory_analysis()
  return DecodeLoopReport(
      topology, mesh.devices.size, dict(mesh.shape), batch, capacity, width, steps_per_dispatch,
      records, k, kb_keys, str(np.dtype(kb_dtype)), compiled_bytes(compiled),
      bytes_per_device(params), bytes_per_device(kb), bytes_per_device(cache),
      int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes),
      int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes))


def abstract_kb(num_keys: int, dim: int, dtype, mesh: Mesh) -> device_kb.DeviceKB:
  """An EL DeviceKB of `num_keys` keys [dim] in `dtype` laid out as device_kb.build places it:
  keys [Npad, dim] (Npad: a multiple of the devices), rows sharded over every axis of `mesh`."""
  axes = tuple(mesh.axis_names)
  rows = -(-num_keys // mesh.devices.size) * mesh.devices.size
  keys = jax.ShapeDtypeStruct((rows, dim), dtype, sharding=NamedSharding(mesh, P(axes, None)))
  return device_kb.DeviceKB(keys, None, None, None, num_keys, 0, 1, mesh, axes)


def abstract_cache(config: ModelConfig, batch: int, capacity: int, mesh: Mesh) -> tuple:
  """init_cache's (k, v), each [L, B, capacity, K, H], with cache_sharding's layout on `mesh`."""
  shapes = jax.eval_shape(functools.partial(init_cache, config, batch, capacity))
  placed = cache_sharding(config, batch, capacity, mesh)
  return sharding.with_shardings(shapes, (placed, placed))


def abstract_rows(batch: int, width: int, records: int, mesh: Mesh) -> Rows:
  """The Rows of a call (device_decode.Rows' fields): B rows, chunks of W, no penalties (history
  [B, 0]), forced tokens [B, F] and EL candidates [B, R, C] with F = C = list_width(0);
  replicated on `mesh`, as jit places the engine's host arrays."""
  spec = lambda shape, dtype=np.int32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, P()))
  rows, lists = (batch,), list_width(0)
  return Rows(
      pending=spec((batch, width)), count=spec(rows), is_output=spec(rows, bool),
      length=spec(rows), steps=spec(rows), seeds=spec(rows),
      sampling=spec((batch, 2), np.float32), penalties=spec((batch, 3), np.float32),
      history=spec((batch, 0)), history_len=spec(rows), output_from=spec(rows),
      force=spec((batch, lists)), force_count=spec(rows), stream_len=spec(rows),
      max_new=spec(rows), retrievals=spec(rows),
      candidates=device_kb.CandidateRows(spec((batch, records, lists)),
                                         spec((batch, records), bool),
                                         spec((lists,), np.float32)))


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
