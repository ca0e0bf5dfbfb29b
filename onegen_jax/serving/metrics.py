"""The server's figures: step records of the last window and totals (`Stats`, kept by the engine
worker under its lock) and their Prometheus text (`prometheus_text`, GET /metrics)."""

from __future__ import annotations

import collections
import time

_RATE_WINDOW_S = 10.0  # the window of the tokens/s, retrievals/s and occupancy figures


class Stats:
  """Step records of the last window and totals (guarded by the worker's lock)."""

  def __init__(self, slots: int):
    self.slots = slots
    self.steps: collections.deque = collections.deque()  # (time, busy slots, generated, retrieved)
    self.totals = collections.Counter()

  def add(self, now: float, busy: int, generated: int, retrieved: int):
    self.steps.append((now, busy, generated, retrieved))
    self.totals.update(steps=1, generated_tokens=generated, retrievals=retrieved)
    while self.steps and self.steps[0][0] < now - _RATE_WINDOW_S:
      self.steps.popleft()

  def ended(self, stop_reason: str):
    self.totals[f"requests_{stop_reason}"] += 1

  def figures(self) -> dict[str, float]:
    now = time.monotonic()
    recent = [s for s in self.steps if s[0] >= now - _RATE_WINDOW_S]
    span = max(now - recent[0][0], 1e-3) if recent else 1.0
    return {
        "slots_total": self.slots,
        "batch_occupancy": (sum(s[1] for s in recent) / (len(recent) * self.slots)
                            if recent else 0.0),
        "tokens_per_second": sum(s[2] for s in recent) / span,
        "retrievals_per_second": sum(s[3] for s in recent) / span,
        **{f"{k}_total": v for k, v in self.totals.items()},
    }


_METRICS = {  # worker.metrics() name -> (Prometheus type, help)
    "queue_length": ("gauge", "Requests waiting for a slot."),
    "slots_busy": ("gauge", "Cache rows running a request."),
    "slots_total": ("gauge", "Cache rows (--max_batch)."),
    "batch_occupancy": ("gauge", "Busy slots / slots, mean over the steps of the last 10 s."),
    "tokens_per_second": ("gauge", "Generated tokens per second over the last 10 s."),
    "retrievals_per_second": ("gauge", "Retrievals per second over the last 10 s."),
    "sessions_open": ("gauge", "Sessions whose cache is kept."),
    "draining": ("gauge", "1 while shutting down."),
}


def prometheus_text(figures: dict[str, float]) -> str:
  """worker.metrics() in the Prometheus text format (counters: the `*_total` figures)."""
  lines = []
  for name, value in sorted(figures.items()):
    kind, help_text = _METRICS.get(name, ("counter", name.replace("_", " ") + "."))
    lines += [f"# HELP onegen_{name} {help_text}", f"# TYPE onegen_{name} {kind}",
              f"onegen_{name} {float(value):g}"]
  return "\n".join(lines) + "\n"
