"""The multi-process flags every launcher shares (train, build_index, infer): each host runs the
same command; `join()` connects them before any device is used."""

import jax
from absl import flags

_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-process run: call "
                                 "jax.distributed.initialize() (auto-detects TPU pods and SLURM; "
                                 "elsewhere give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def join():
  """With --distributed, joins the other processes (jax.distributed.initialize)."""
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
