"""Ahead-of-time compilation of the real train step for a TPU topology, on any machine.

libtpu (the `tpu` extra) describes a TPU slice without any TPU attached, so a user can check that
a model and batch fit in a slice's memory before renting it:
  python -m launch.train --config=configs/el.py:llama2-7b --compile_only --topology=v5p-64
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from jax.experimental import topologies

from onegen_jax.train.metrics import flops_per_token
from onegen_jax.train.program import build_program, compile_step
from onegen_jax.train.remat_auto import compiled_bytes

# User-facing slice name -> (topology name, chip config name); every host holds 2x2x1 chips
# (chips_per_host_bounds in topology_devices). v4/v5p names count TensorCores (2 per chip, one
# "megacore" device per chip); v5e/v6e names count chips.
_SLICES = {
    "v4-8": ("v4:2x2x1", "megacore"), "v4-16": ("v4:2x2x2", "megacore"),
    "v4-32": ("v4:2x2x4", "megacore"), "v4-64": ("v4:2x4x4", "megacore"),
    "v4-128": ("v4:4x4x4", "megacore"),
    "v5p-8": ("v5:2x2x1", "megacore"), "v5p-16": ("v5:2x2x2", "megacore"),
    "v5p-32": ("v5:2x2x4", "megacore"), "v5p-64": ("v5:2x4x4", "megacore"),
    "v5p-128": ("v5:4x4x4", "megacore"), "v5p-256": ("v5:4x4x8", "megacore"),
    "v5e-1": ("v5e:1x1", "default"), "v5e-4": ("v5e:2x2", "default"),
    "v5e-8": ("v5e:2x4", "default"),
    "v5e-16": ("v5e:4x4", "default"), "v5e-32": ("v5e:4x8", "default"),
    "v5e-64": ("v5e:8x8", "default"), "v5e-128": ("v5e:8x16", "default"),
    "v5e-256": ("v5e:16x16", "default"),
    "v6e-4": ("v6e:2x2", "default"), "v6e-8": ("v6e:2x4", "default"),
    "v6e-16": ("v6e:4x4", "default"), "v6e-32": ("v6e:4x8", "default"),
    "v6e-64": ("v6e:8x8", "default"), "v6e-128": ("v6e:8x16", "default"),
    "v6e-256": ("v6e:16x16", "default"),
}


@dataclasses.dataclass(frozen=True)
class CompiledStepReport:
  topology: str
  num_devices: int
  mesh: dict
  bytes_per_device: int  # arguments + outputs + temporaries - donated aliases
  argument_bytes: int
  temp_bytes: int
  model_flops_per_device: float  # one train step: metrics.flops_per_token x tokens / devices
  compiler_flops_per_device: float  # XLA cost analysis: counts a loop body (scan) once


def topology_devices(name: str) -> list:
  """The abstract devices of a named TPU slice (e.g. 'v5p-64') or a raw topology ('v5:2x4x4')."""
  if name in _SLICES:
    topology, chip_config = _SLICES[name]
  elif ":" in name:
    topology, chip_config = name, "megacore" if name.startswith(("v4:", "v5:")) else "default"
  else:
    raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(_SLICES)} "
                     "or a raw name such as 'v5:2x4x4'")
  # libtpu takes a machine-wide lock unless told that several processes may load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  dims = [int(d) for d in topology.split(":")[1].split("x")] + [1, 1]
  host = tuple(min(d, most) for d, most in zip(dims, (2, 2, 1)))  # a slice under one host's 2x2
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name=chip_config, chips_per_host_bounds=host,
                                      num_slices=1)
  return list(desc.devices)


def compile_train_step(config: ml_collections.ConfigDict, topology: str) -> CompiledStepReport:
  """Compiles the train step of `config` for `topology`; raises the compiler's error (e.g.
  RESOURCE_EXHAUSTED when the state and activations do not fit in device memory)."""

  devices = topology_devices(topology)
  program = build_program(config, devices=devices)
  compiled = compile_step(config, program)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total = compiled_bytes(compiled)
  tokens = config.batch.rows * config.batch.seq_len
  model_flops = flops_per_token(program.model.config, config.batch.seq_len) * tokens / len(devices)
  return CompiledStepReport(topology, len(devices), dict(program.mesh.shape), int(total),
                            int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes),
                            model_flops, float(cost.get("flops", 0.0)))
