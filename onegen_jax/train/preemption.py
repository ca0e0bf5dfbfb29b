"""Preemption: on SIGTERM (TPU maintenance, spot VMs) save at the next step boundary and exit 0.

With several processes every host must agree on the step at which to stop; JAX's preemption sync
point does this when `jax.distributed` is initialised (its coordination service watches for the
signal). A single process uses its own SIGTERM handler.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  def __init__(self):
    self._signalled = False
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    """True at the step boundary where the run should checkpoint and exit."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self):
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._previous)
