"""Mesh construction and the one table that maps logical axis names to mesh axes.

Mesh axes: 'data' (pure data parallelism), 'fsdp' (data parallelism whose parameters and
optimizer state are sharded, ZeRO-3 style), 'tensor' (Megatron-style tensor parallelism).
The batch is split over ('data', 'fsdp'); weights over 'fsdp' on their embed dimension and over
'tensor' on heads / mlp / vocab.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Ordered (logical name -> mesh axis) rules; a name that is absent is replicated.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA's A [in, r] and B [r, out]: split on in / out only
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 in `sizes` by what fills `num_devices`; checks the product."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all); -1 fills one axis."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape((data, fsdp, tensor), len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_sharding(logical_tree, mesh: Mesh):
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, LOGICAL_RULES)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Makes `mesh` and LOGICAL_RULES current: both must be active while a step is traced."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target shardings (restores place each array directly)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def wait_on_cpu(outputs):
  """Blocks until `outputs` are computed when running on (emulated) CPU devices.

  Two sharded programs in flight at once on the emulated CPU mesh can deadlock in XLA's CPU
  collectives (each waits at a rendezvous the other's threads never reach; seen with jax 0.10.2
  on 2 cores). Accelerators keep asynchronous dispatch.
  """
  if jax.default_backend() == "cpu":
    jax.block_until_ready(outputs)
  return outputs


def batch_sharding(mesh: Mesh, ndim: int, leading_micro_axis: bool = False) -> NamedSharding:
  """Rows split over ('data', 'fsdp'); with a leading micro-batch axis the rows are axis 1."""
  if ndim == 0:
    return NamedSharding(mesh, P())
  spec = (None, BATCH_AXES) if leading_micro_axis else (BATCH_AXES,)
  return NamedSharding(mesh, P(*spec, *([None] * (ndim - len(spec)))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
