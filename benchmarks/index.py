"""Key index: build time, memory, queries/s and recall against exact search, per backend.

Data: clustered unit vectors (gaussian clusters of ~1000 keys around random unit centres, rows
normalised) at the paper's entity-linking KB size, 1.25M keys, with 576 (SmolLM2) and 2048 (a 1B
model) dimensions; queries are fresh draws from the same clusters. Backends, each in its own
process (clean memory figures) on the same files:
- numpy: exact brute force on the CPU (the baseline; it also gives the ground truth);
- exact / approx: our ExactIndex / ApproxIndex (JAX; approx_max_k is exact outside TPUs);
- scann: our ScannIndex at --scann settings (leaves_fraction:reorder_factor).
Figures: build seconds, vector bytes, process RSS growth after the build and at its peak (build
and search), queries/s for all queries at once, latency of one query, recall@1 and recall@10
(overlap of the top 10) against numpy.

Default (3-4 minutes on 2 cores): 100k x 576 and 25k x 2048. The KB size for 576 (about 25
minutes here):
  .venv/bin/python -m benchmarks.index --sizes 576:1250000,2048:250000
1.25M x 2048 (--sizes 2048:1250000) is 9.5 GiB of float32 vectors; the ExactIndex worker holds
them, a padded copy and a search peak (~29 GiB in all), more than a 24 GiB machine has.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics

import jax
import numpy as np

from benchmarks import probes, results_md
from onegen_jax.retrieval.index import ApproxIndex, ExactIndex, ScannIndex

K = 10  # neighbours searched; recall@1 and recall@10 come from the same search


def normalize(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_vectors(path: str, n: int, centers: np.ndarray, spread: float, seed: int) -> None:
  """n draws around random centres (noise of norm ~spread), rows normalised, as float32 .npy;
  written in chunks so that generation never holds more than the file's pages."""
  rng = np.random.default_rng(seed)
  out = np.lib.format.open_memmap(path, "w+", np.float32, (n, centers.shape[1]))
  for start in range(0, n, 65536):
    m = min(65536, n - start)
    noise = rng.standard_normal((m, centers.shape[1]), np.float32)
    noise *= spread / np.sqrt(centers.shape[1])
    out[start:start + m] = normalize(centers[rng.integers(len(centers), size=m)] + noise)
  out.flush()
  del out


def make_data(args, dim: int, n: int) -> dict[str, str]:
  """Paths of the keys, queries (same clusters, another seed) and the ground-truth file."""
  os.makedirs(args.data_dir, exist_ok=True)
  clusters = max(1, n // args.cluster_size)
  stem = os.path.join(args.data_dir, f"d{dim}_n{n}_c{clusters}_r{args.spread}_s{args.seed}")
  rng = np.random.default_rng([args.seed, dim])
  centers = normalize(rng.standard_normal((clusters, dim)).astype(np.float32))
  paths = {"keys": stem + "_keys.npy", "queries": stem + f"_q{args.queries}.npy",
           "truth": stem + f"_q{args.queries}_truth.npy"}
  if not os.path.exists(paths["keys"]):
    write_vectors(paths["keys"], n, centers, args.spread, args.seed)
  write_vectors(paths["queries"], args.queries, centers, args.spread, args.seed + 1)
  return paths


# --------------------------------------------------------------------------------------------
# Workers

def numpy_top_k(keys: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
  """Exact top k rows [Q, k], best first: matmul, argpartition, sort."""
  out = []
  for start in range(0, len(queries), chunk):
    scores = queries[start:start + chunk] @ keys.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    out.append(np.take_along_axis(part, order, axis=1))
  return np.concatenate(out)


def build(job: dict, keys: np.ndarray):
  """(search function queries -> rows int [Q, K]) for the job's backend; builds the index."""
  if job["backend"] == "numpy":
    return lambda q: numpy_top_k(keys, q, K)
  if job["backend"] == "scann":
    index = ScannIndex(leaves_fraction=job["leaves_fraction"], reorder_factor=job["reorder"])
  else:
    index = {"exact": ExactIndex, "approx": ApproxIndex}[job["backend"]]()
  index.build(keys, job["ids"])
  return lambda q: np.asarray([[int(i) if i is not None else -1 for i in row]
                               for row in index.search(q, K)[0]])


def run_worker(job: dict) -> dict:
  """Loads the files, builds, searches; memory relative to the loaded keys, the ids and the
  initialised runtime (JAX's CPU client, ScaNN's library)."""
  keys, queries = np.load(job["keys"]), np.load(job["queries"])
  job = {**job, "ids": [str(i) for i in range(len(keys))]}
  jax.devices()  # the CPU client and ScaNN's library exist before the baseline
  if job["backend"] == "scann":
    importlib.import_module("scann.scann_ops.py.scann_ops_pybind")
  before = probes.rss_bytes()
  probes.reset_peak_rss()
  build_s, search = probes.timed(lambda: build(job, keys))
  after_build = probes.rss_bytes()
  search(queries[:1])  # compiles (JAX backends) or warms up
  batch_s, rows = probes.timed(lambda: search(queries))
  single_s = statistics.median(probes.timed(lambda: search(queries[i:i + 1]))[0]
                               for i in range(min(20, len(queries))))
  result = {"build_s": build_s, "qps": len(queries) / batch_s, "single_ms": 1e3 * single_s,
            "rss_gib": (after_build - before) / 2**30,
            "peak_gib": (probes.peak_rss_bytes() - before) / 2**30}
  if job["backend"] == "numpy":
    np.save(job["truth"], rows)
  truth = np.load(job["truth"])
  result["recall1"] = float(np.mean(rows[:, 0] == truth[:, 0]))
  result["recall10"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, truth)]))
  return result


# --------------------------------------------------------------------------------------------
# The parent

def jobs(args, paths: dict[str, str]) -> list[dict]:
  """numpy first (the ground truth), then our backends."""
  out = [{"backend": b, **paths} for b in ("numpy", "exact", "approx")]
  for setting in args.scann.split(","):
    leaves, reorder = setting.split(":")
    out.append({"backend": "scann", "leaves_fraction": float(leaves), "reorder": int(reorder),
                **paths})
  return out


def label(job: dict) -> str:
  if job["backend"] == "scann":
    return f"ScannIndex leaves {job['leaves_fraction']}, reorder {job['reorder']}"
  return {"numpy": "numpy exact (baseline)", "exact": "ExactIndex (JAX)",
          "approx": "ApproxIndex (JAX)"}[job["backend"]]


def measure_size(args, dim: int, n: int) -> list[list]:
  """Table rows for one (dim, N)."""
  paths = make_data(args, dim, n)
  rows = []
  for job in jobs(args, paths):
    r = probes.spawn_worker("benchmarks.index", job, [])
    gib = n * dim * 4 / 2**30
    if "error" in r:
      rows.append([dim, n, label(job), "failed: " + " / ".join(r["error"]), f"{gib:.2f}",
                   "", "", "", "", "", ""])
      continue
    rows.append([dim, f"{n:,}", label(job), f"{r['build_s']:.1f}", f"{gib:.2f}",
                 f"{r['rss_gib']:.2f}", f"{r['peak_gib']:.2f}", f"{r['qps']:,.0f}",
                 f"{r['single_ms']:.3g}", f"{r['recall1']:.3f}", f"{r['recall10']:.3f}"])
    print(rows[-1], flush=True)
  if not args.keep_data:
    for path in paths.values():
      if os.path.exists(path):  # the truth file is missing when the numpy worker failed
        os.remove(path)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="576:100000,2048:25000", help="comma list of DIM:N")
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--cluster_size", type=int, default=1000, help="keys per cluster (mean)")
  parser.add_argument("--spread", type=float, default=1.0, help="noise norm around a centre")
  parser.add_argument("--scann", default="0.03:10,0.1:10,0.1:40",
                      help="comma list of leaves_fraction:reorder_factor")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default="/tmp/onegen_index_bench")
  parser.add_argument("--keep_data", action="store_true")
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    probes.worker_result(run_worker(json.loads(args.worker)))
    return
  sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes.split(",")]
  rows = [row for dim, n in sizes for row in measure_size(args, dim, n)]
  headers = ["dim", "keys", "backend", "build s", "vectors GiB", "RSS growth GiB",
             "peak RSS growth GiB", "queries/s", "1-query ms", "recall@1", "recall@10"]
  table = results_md.markdown_table(headers, rows)
  print(table)
  if not args.no_record:
    record(args, sizes, rows, table)


def record(args, sizes, rows: list[list], table: str) -> None:
  notes = [
      f"Gaussian clusters of {args.cluster_size} keys on average (N / {args.cluster_size} random "
      f"unit centres, noise of norm {args.spread}, rows normalised: cosine ~0.5 within a "
      f"cluster); {args.queries} queries drawn from the same clusters; k = {K}. (A first "
      "parametrisation, 1000 clusters and noise 0.5, gave recall 1.000 for every backend at "
      "100k: the whole cluster fell inside ScaNN's rescored candidates.)",
      "Each backend runs in its own process on the same .npy files; RSS growth is measured from "
      "after the keys, the N id strings and the runtime (JAX CPU client, ScaNN library) are "
      "loaded, so it is what the index adds: copies of the vectors, the id map, ScaNN's codes. "
      "Peak covers the build and the searches.",
      f"queries/s: all {args.queries} queries in one call (ExactIndex/ApproxIndex in chunks of "
      "256; ScaNN search_batched_parallel); 1-query ms: median of 20 single-query calls (or "
      "one per query, if fewer).",
      "ApproxIndex uses jax.lax.approx_max_k, which is approximate on TPU only; on CPU it sorts.",
  ]
  results_md.record("index", ", ".join(f"{n:,} x {d}" for d, n in sizes), table, notes,
                summary_rows(rows))


def summary_rows(rows: list[list]) -> list[tuple[str, str]]:
  """Two summary rows per (dim, keys): exact backends' queries/s; ScaNN's queries/s and recall."""
  out = []
  for size in dict.fromkeys((row[0], row[1]) for row in rows):
    done = [r for r in rows if (r[0], r[1]) == size and "failed" not in str(r[3])]
    exact = [r for r in done if not r[2].startswith("ScannIndex")]
    scann = [r for r in done if r[2].startswith("ScannIndex")]
    tag = f"{size[1]} x {size[0]}, CPU"
    out.append((f"exact search q/s ({' / '.join(r[2].split(' (')[0] for r in exact)}), {tag}",
                " / ".join(r[7] for r in exact)))
    out.append((f"ScaNN q/s at recall@10 (leaves fraction:reorder), {tag}",
                "; ".join(f"{':'.join(re.findall(r'[0-9.]+', r[2]))} {r[7]} at {r[10]}"
                          for r in scann)))
  return out


if __name__ == "__main__":
  main()
