"""Load on the HTTP server: N concurrent clients against the same requests sent one at a time.

Starts `launch.serve` on a free localhost port (a subprocess, --max_batch slots), sends the same
--requests requests (the prompts of --requests_file, cycled) at each client count of --clients:
each client is a thread with its own HTTP connection sending its share one after another. One
client is the baseline: the requests sent one at a time. Before timing, every level runs once
untimed (compiles of the batch shapes it meets). Figures per level: requests/s (and the ratio to
one client), p50 / p99 latency of a request, generated tokens/s. Checked: greedy answers are the
same at every level (batching must not change them). Bounded: --requests per level and
--deadline_s for the whole run (the run fails past it); localhost only.

Default: the demo model of `make demo` (runs/demo) with an index of its db built on first use:
  make demo && .venv/bin/python -m benchmarks.serve_load
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from benchmarks import probes, results_md
from onegen_jax.data.records import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo", help="Run directory (make demo's).")
  p.add_argument("--index", default="runs/demo-index", help="launch.build_index output; built "
                 "from --db when missing.")
  p.add_argument("--db", default="runs/demo-data/el/db.jsonl")
  p.add_argument("--requests_file", default="runs/demo-data/el/dev.jsonl",
                 help="Reference-format lines whose prompts are sent.")
  p.add_argument("--clients", default="1,4,16", help="Concurrent client counts (1: baseline).")
  p.add_argument("--requests", type=int, default=64, help="Requests per client count.")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--max_batch", type=int, default=16, help="The server's slots.")
  p.add_argument("--capacity", type=int, default=1024)
  p.add_argument("--deadline_s", type=float, default=900.0, help="Bound of the whole run.")
  p.add_argument("--no_record", action="store_true", help="Print only (RESULTS.md untouched).")
  return p.parse_args(argv)


def start_server(args) -> tuple[str, subprocess.Popen]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = open(os.path.join(args.index, "serve_load.log"), "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--workdir={args.workdir}", f"--index={args.index}",
       f"--port={port}", f"--max_batch={args.max_batch}", f"--capacity={args.capacity}",
       f"--max_new_tokens={args.max_new_tokens}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    if proc.poll() is not None:
      raise SystemExit(f"launch.serve exited {proc.returncode}: see {log.name}")
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return url, proc
    except httpx.TransportError:
      time.sleep(0.3)
  proc.kill()
  raise SystemExit(f"launch.serve did not answer /health: see {log.name}")


def run_level(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[dict]]:
  """(wall seconds, latency of each request, results in request order) with `clients` threads,
  client i sending requests i, i + clients, ... one after another."""
  latencies, results = [0.0] * len(bodies), [None] * len(bodies)

  def client(first: int):
    with httpx.Client(base_url=url, timeout=600) as http:
      for i in range(first, len(bodies), clients):
        start = time.perf_counter()
        response = http.post("/v1/generate", json=bodies[i])
        latencies[i] = time.perf_counter() - start
        if response.status_code != 200:
          raise RuntimeError(f"request {i}: {response.status_code} {response.text[:200]}")
        results[i] = response.json()

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for future in [pool.submit(client, c) for c in range(clients)]:
      future.result()
  return time.perf_counter() - start, latencies, results


def percentile(values: list[float], q: float) -> float:
  return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 \
      else values[0]


def ensure_index(args):
  if os.path.exists(os.path.join(args.index, "index.json")):
    return
  subprocess.run([sys.executable, "-m", "launch.build_index", f"--workdir={args.workdir}",
                  f"--db={args.db}", f"--out={args.index}"], cwd=ROOT, check=True)


def main(argv=None):
  args = parse_args(argv)
  levels = probes.parse_ints(args.clients)
  deadline = time.monotonic() + args.deadline_s
  ensure_index(args)
  lines = read_jsonl(args.requests_file)
  bodies = [{"messages": lines[i % len(lines)]["messages"]} for i in range(args.requests)]
  url, proc = start_server(args)
  rows, answers, base = [], {}, None
  try:
    for clients in levels:  # untimed: the batch shapes of every level compile
      run_level(url, bodies, clients)
    for clients in levels:
      if time.monotonic() > deadline:
        raise SystemExit(f"past --deadline_s={args.deadline_s} before {clients} clients")
      wall, latencies, results = run_level(url, bodies, clients)
      answers[clients] = [(r["text"], [x["ids"] for x in r["retrievals"]]) for r in results]
      generated = sum(r["usage"]["generated_tokens"] for r in results)
      rate = len(bodies) / wall
      base = base or rate
      rows.append([clients, len(bodies), f"{wall:.2f}", f"{rate:.2f}", f"{rate / base:.2f}x",
                   f"{1e3 * percentile(latencies, 50):.0f}",
                   f"{1e3 * percentile(latencies, 99):.0f}", f"{generated / wall:.0f}"])
  finally:
    proc.terminate()
    proc.wait(60)
  same = all(a == answers[levels[0]] for a in answers.values())
  table = results_md.markdown_table(
      ["clients", "requests", "wall s", "requests/s", "vs one at a time", "p50 ms", "p99 ms",
       "generated tokens/s"], rows)
  print(table)
  print(json.dumps({"same_answers_at_every_level": same}))
  if not same:
    raise SystemExit("answers differ between client counts")
  if args.no_record:
    return
  top = rows[-1]
  results_md.record(
      "serve_load", f"{args.requests} requests at {levels} concurrent clients", table,
      [f"Server: `launch.serve --max_batch={args.max_batch} --capacity={args.capacity} "
       f"--max_new_tokens={args.max_new_tokens}` on {args.workdir} (greedy), index {args.index};"
       f" prompts: {args.requests_file} cycled.",
       "Clients: threads on the same 2-core machine as the server, one HTTP connection each; "
       "every level ran once untimed before (compiles).",
       "Greedy answers (text, retrieved ids) are the same at every client count."],
      [(f"requests/s, {top[0]} clients vs one at a time", top[4])])


if __name__ == "__main__":
  main()
