"""The training curves of every trained arm (L_gen, L_ret, in-batch retrieval accuracy per step,
from each run's metrics.jsonl) in one PNG: a row per task, a column per figure, a line per arm
(a moving average over a twentieth of the steps; the raw steps faint behind it)."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.quality.arms import label
from benchmarks.quality.cli import say
from benchmarks.quality.results import read_json_lines

FIGURES = (("loss_gen", "L_gen"), ("loss_ret", "L_ret"),
           ("retrieval_accuracy", "in-batch accuracy"))
TASK_TITLES = {"rag": "multi-hop RAG", "el": "entity linking"}


def curves(runs: dict[str, dict[str, str]]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """task -> arm -> {"step": ..., figure: ...} from {task: {arm: training run directory}}."""
  out = {}
  for mode, arms in runs.items():
    for name, workdir in arms.items():
      by_step = {m["step"]: m for m in read_json_lines(os.path.join(workdir, "metrics.jsonl"))
                 if m.get("split") == "train"}
      if by_step:
        steps = sorted(by_step)
        out.setdefault(mode, {})[name] = {
            "step": np.asarray(steps),
            **{f: np.asarray([by_step[s].get(f, np.nan) for s in steps]) for f, _ in FIGURES}}
  return out


def _smooth(values: np.ndarray) -> np.ndarray:
  window = max(1, len(values) // 20)
  return np.convolve(values, np.ones(window) / window, mode="valid") if window > 1 else values


def plot(runs: dict[str, dict[str, str]], paths: list[str]) -> bool:
  """Writes the PNG to each of `paths`; False (nothing written) when no run has a step yet or
  matplotlib (the `bench` extra) is missing."""
  data = curves(runs)
  try:
    import matplotlib  # noqa: PLC0415  (optional: the `bench` extra)
  except ImportError:
    say("no training curves: matplotlib is missing (pip install '.[bench]')")
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  if not data:
    return False
  fig, axes = plt.subplots(len(data), len(FIGURES), figsize=(4.2 * len(FIGURES), 3.2 * len(data)),
                           squeeze=False)
  for row, (mode, arms) in enumerate(data.items()):
    for col, (figure, title) in enumerate(FIGURES):
      ax = axes[row][col]
      for name, series in arms.items():
        smooth = _smooth(series[figure])
        line, = ax.plot(series["step"][len(series["step"]) - len(smooth):], smooth,
                        label=label(name))
        ax.plot(series["step"], series[figure], color=line.get_color(), alpha=0.15, lw=0.8)
      ax.set_title(f"{TASK_TITLES.get(mode, mode)}: {title}", fontsize=10)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    axes[row][0].legend(fontsize=7)
  fig.tight_layout()
  for path in paths:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
