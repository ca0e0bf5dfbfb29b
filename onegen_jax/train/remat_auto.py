"""`model.remat_policy = "auto"`: the least rematerialisation whose compiled step fits in memory.

Candidates in order of speed: "none" (keep every activation), "dots_with_no_batch_dims" (keep the
weight matmuls' outputs), "full" (keep only each layer's input). Each candidate's train step is
compiled for the run's mesh and batch; its bytes per device (arguments + outputs + temporaries -
donated aliases, XLA's memory analysis) are compared with a budget: a fraction of the device's
memory (an accelerator's `bytes_limit`; on CPU the host's RAM shared by its local devices). A
compile that fails for lack of memory (RESOURCE_EXHAUSTED on a TPU) counts as not fitting. On the
CPU benchmark machine the SmolLM2-135M step fits without remat, the fastest there (RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax

from onegen_jax.train.step import TrainProgram

CANDIDATES = ("none", "dots_with_no_batch_dims", "full")
BUDGET_FRACTION = 0.8  # of a device's memory: room for the data pipeline, checkpoints, fragmentation


@dataclasses.dataclass(frozen=True)
class RematChoice:
  policy: str
  budget_bytes: int
  tried: tuple[tuple[str, int | None], ...]  # (policy, bytes per device; None: did not compile)
  program: TrainProgram | None = None  # the chosen policy's program

  def describe(self) -> str:
    tried = ", ".join(f"{p} {'failed' if b is None else f'{b / 2**30:.2f} GiB'}"
                      for p, b in self.tried)
    return (f"remat auto -> {self.policy} (budget {self.budget_bytes / 2**30:.2f} GiB per "
            f"device; {tried})")


def device_budget(devices: list[jax.Device], fraction: float = BUDGET_FRACTION) -> int:
  """Bytes per device the step may use: `fraction` of an accelerator's bytes_limit, or of the
  host RAM divided by the local devices sharing it (CPU, emulated meshes included)."""
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(fraction * stats["bytes_limit"])
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  local = sum(d.process_index == devices[0].process_index for d in devices)
  return int(fraction * ram / max(local, 1))


def compiled_bytes(compiled) -> int:
  """Bytes per device of a compiled step: arguments + outputs + temporaries - donated aliases
  (XLA's memory analysis)."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def choose_remat(build: Callable[[str], TrainProgram], compile_step: Callable[[TrainProgram], object],
                 budget_bytes: int) -> RematChoice:
  """The first of CANDIDATES whose step (`compile_step(build(policy))`) fits `budget_bytes`;
  the chosen program comes with it (its jitted step compiles again on first use, from the
  persistent compilation cache when one is set).

  Raises ValueError naming every candidate's bytes when none fits."""
  tried = []
  for policy in CANDIDATES:
    program = build(policy)
    try:
      size = compiled_bytes(compile_step(program))
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler's RESOURCE_EXHAUSTED
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      size = None
    tried.append((policy, size))
    if size is not None and size <= budget_bytes:
      return RematChoice(policy, budget_bytes, tuple(tried), program)
  failed = RematChoice("none fits", budget_bytes, tuple(tried)).describe()
  raise ValueError(f"{failed}: a smaller batch.rows (with batch.accum_steps), more devices "
                   "(mesh.fsdp) or LoRA")
