"""Paired bootstrap of the RAG study's per-question figures: is a difference between two arms
larger than the dev set's noise?

  python -m benchmarks.quality.paired --out=runs/quality_cpu BASE_ARM ARM [ARM ...]

Arms are the study's keys (their folders under OUT/eval/rag, e.g. git_pipeline or
onegen_infonce@lambda_ret=0.03). Each question is scored on its own with the study's scorer
(onegen_jax.eval.scoring.score_rag: EM, F1, generated R@1), so the means equal the study's table.
Questions are resampled with replacement (the same draw for both arms of a pair); the table gives
each ARM - BASE_ARM difference with its 95% percentile interval and the share of resamples in
which it is <= 0.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from onegen_jax.data.records import read_jsonl
from onegen_jax.eval.scoring import score_rag

FIGURES = (("em", "EM"), ("f1", "F1"), ("recall@1", "R@1 generated"))


def per_question(out: str, arm: str, gold: list[dict]) -> dict[str, np.ndarray]:
  """figure -> float [questions]: the arm's predictions scored one question at a time."""
  path = os.path.join(out, "eval", "rag", arm, "predictions.jsonl")
  if not os.path.isfile(path):
    raise SystemExit(f"{path}: no such file (arm {arm!r} has no RAG predictions in {out})")
  predictions = read_jsonl(path)
  if len(predictions) != len(gold):
    raise SystemExit(f"{path}: {len(predictions)} predictions for {len(gold)} dev questions")
  scores = [score_rag([p], [g], ks=(1,)) for p, g in zip(predictions, gold)]
  return {name: np.array([s[name] for s in scores]) for name, _ in FIGURES}


def bootstrap(diff: np.ndarray, samples: int, seed: int) -> tuple[float, float, float]:
  """diff float [n] -> (2.5th and 97.5th percentile of the resampled mean, share <= 0)."""
  rng = np.random.default_rng(seed)
  means = diff[rng.integers(0, len(diff), (samples, len(diff)))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return float(low), float(high), float(np.mean(means <= 0))


def table(out: str, base: str, arms: list[str], samples: int, seed: int) -> str:
  gold = read_jsonl(os.path.join(out, "data", "rag", "dev.jsonl"))
  base_scores = per_question(out, base, gold)
  lines = [f"Paired bootstrap over {len(gold)} dev questions ({samples:,} resamples, x100): "
           f"each arm minus {base}.", "",
           "| arm | figure | arm | base | difference | 95% interval | P(difference <= 0) |",
           "|---|---|---|---|---|---|---|"]
  for arm in arms:
    scores = per_question(out, arm, gold)
    for name, label in FIGURES:
      diff = scores[name] - base_scores[name]
      low, high, p_le0 = bootstrap(diff, samples, seed)
      lines.append(f"| {arm} | {label} | {100 * scores[name].mean():.1f} | "
                   f"{100 * base_scores[name].mean():.1f} | {100 * diff.mean():+.1f} | "
                   f"[{100 * low:+.1f}, {100 * high:+.1f}] | {p_le0:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.quality.paired",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="The study's --out.")
  p.add_argument("--samples", type=int, default=10_000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("base", help="The arm every other arm is compared with.")
  p.add_argument("arms", nargs="+")
  args = p.parse_args(argv)
  print(table(args.out, args.base, args.arms, args.samples, args.seed))


if __name__ == "__main__":
  main()
