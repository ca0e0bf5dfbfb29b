"""Load on the HTTP server: N concurrent clients against the same requests sent one at a time, on
/v1/generate and on the OpenAI chat route (/v1/chat/completions).

Starts `launch.serve` on a free localhost port (a subprocess, --max_batch slots), sends the same
--requests requests (the prompts of --requests_file, cycled; greedy, --max_new_tokens each) at
each client count of --clients through each route of --routes: each client is a thread with its
own HTTP connection sending its share one after another. One client is the baseline: the requests
sent one at a time. The routes take turns at each client count (generate, then chat), so a drift
of the machine's load hits both alike. Before timing, every level runs once untimed on every route
(compiles of the batch shapes it meets). Figures per route and level: requests/s (the ratio to one
client, and chat's to /v1/generate's at the same client count), p50 / p99 latency of a request,
generated tokens/s. Checked: greedy answers are the same at every level (batching must not change
them) and on every route. Bounded: --requests per level and route and --deadline_s for the whole
run (the run fails past it); localhost only.

Default: the demo model of `make demo` (runs/demo) with an index of its db built on first use:
  make demo && .venv/bin/python -m benchmarks.serve_load
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from benchmarks import probes, results_md
from onegen_jax.data.records import Message, prompt_messages, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = {"generate": "/v1/generate", "chat": "/v1/chat/completions"}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo", help="Run directory (make demo's).")
  p.add_argument("--index", default="runs/demo-index", help="launch.build_index output; built "
                 "from --db when missing.")
  p.add_argument("--db", default="runs/demo-data/el/db.jsonl")
  p.add_argument("--requests_file", default="runs/demo-data/el/dev.jsonl",
                 help="Reference-format lines whose prompts are sent.")
  p.add_argument("--clients", default="1,4,16", help="Concurrent client counts (1: baseline).")
  p.add_argument("--routes", default="generate,chat", help="Routes taking turns at each client "
                 f"count: {', '.join(f'{k} ({v})' for k, v in PATHS.items())}.")
  p.add_argument("--requests", type=int, default=64, help="Requests per client count and route.")
  p.add_argument("--repeats", type=int, default=1, help="Turns of the routes at each client count "
                 "(each sends every request once); a rate is all turns' requests over their "
                 "summed wall time, latencies are over all turns.")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--max_batch", type=int, default=16, help="The server's slots.")
  p.add_argument("--capacity", type=int, default=1024)
  p.add_argument("--deadline_s", type=float, default=900.0, help="Bound of the whole run.")
  p.add_argument("--no_record", action="store_true", help="Print only (RESULTS.md untouched).")
  args = p.parse_args(argv)
  routes = list(dict.fromkeys(r for r in args.routes.split(",") if r))
  if not routes or set(routes) - set(PATHS):
    p.error(f"--routes: `{args.routes}` is not a comma list of {', '.join(PATHS)}")
  args.routes = routes
  return args


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


def run_level(url: str, path: str, bodies: list[dict],
              clients: int) -> tuple[float, list[float], list[dict]]:
  """(wall seconds, latency of each request, results in request order) of `bodies` posted to
  `path` by `clients` threads, client i sending requests i, i + clients, ... one after another."""
  latencies, results = [0.0] * len(bodies), [None] * len(bodies)

  def client(first: int):
    with httpx.Client(base_url=url, timeout=600) as http:
      for i in range(first, len(bodies), clients):
        start = time.perf_counter()
        response = http.post(path, json=bodies[i])
        latencies[i] = time.perf_counter() - start
        if response.status_code != 200:
          raise RuntimeError(f"{path} request {i}: {response.status_code} "
                             f"{response.text[:200]}")
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


def generate_bodies(args) -> list[dict]:
  """--requests /v1/generate bodies: the prompts of --requests_file cycled, greedy,
  --max_new_tokens each. A prompt is its line's messages before the assistant's, role and content
  only: what /v1/generate would cut it to, and what the chat route takes (all its messages are the
  prompt, and it refuses a message's other fields)."""
  lines = read_jsonl(args.requests_file)
  prompts = [[dataclasses.asdict(m) for m in prompt_messages(
      [Message(x["role"], x["content"]) for x in line["messages"]])] for line in lines]
  return [{"messages": prompts[i % len(prompts)], "max_new_tokens": args.max_new_tokens,
           "temperature": 0.0} for i in range(args.requests)]


def chat_body(body: dict, model: str) -> dict:
  """A /v1/generate body as the same request to /v1/chat/completions (for the served `model`)."""
  return {"model": model, "messages": body["messages"], "max_tokens": body["max_new_tokens"],
          "temperature": body["temperature"]}


def answer(route: str, result: dict) -> tuple[str, list, int]:
  """(text, retrieved ids of each retrieval, generated tokens) of a route's result: what neither
  the client count nor the route may change. Both texts are output_record's text of the engine's
  output (chat's content is it cut before a stop string, and none is sent here); chat's
  completion_tokens counts what /v1/generate's generated_tokens counts (tokens the model chose,
  not inserted ones)."""
  if route == "chat":
    message = result["choices"][0]["message"]
    return (message["content"], [r["ids"] for r in message["onegen"]["retrievals"]],
            result["usage"]["completion_tokens"])
  return (result["text"], [r["ids"] for r in result["retrievals"]],
          result["usage"]["generated_tokens"])


def differences(answers: dict, reference: tuple[str, int]) -> list[str]:
  """One line per (route, client count) of `answers` whose answers are not the `reference`'s:
  the first request that differs and both its answers."""
  want, lines = answers[reference], []
  for (route, clients), got in answers.items():
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is not None:
      lines.append(f"request {i}, {route} at {clients} clients: {got[i]!r}; {reference[0]} at "
                   f"{reference[1]} clients: {want[i]!r}")
  return lines


def main(argv=None):
  args = parse_args(argv)
  levels, routes = probes.parse_ints(args.clients), args.routes
  deadline = time.monotonic() + args.deadline_s
  ensure_index(args)
  url, proc = start_server(args)
  rows, answers, rates = [], {}, {}
  try:
    model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    generate = generate_bodies(args)
    bodies = {"generate": generate, "chat": [chat_body(b, model) for b in generate]}
    for clients in levels:  # untimed: the batch shapes of every level compile
      for route in routes:
        run_level(url, PATHS[route], bodies[route], clients)
    for clients in levels:
      timed = measure_level(args, url, bodies, clients, deadline, answers)
      for route in routes:
        wall, latencies = timed[route]
        count = len(latencies)
        rates[route, clients] = rate = count / wall
        tokens = args.repeats * sum(a[2] for a in answers[route, clients])
        rows.append([route, clients, count, f"{wall:.2f}", f"{rate:.2f}",
                     f"{rate / rates[route, levels[0]]:.2f}x", vs_generate(rates, route, clients),
                     f"{1e3 * percentile(latencies, 50):.0f}",
                     f"{1e3 * percentile(latencies, 99):.0f}", f"{tokens / wall:.0f}"])
  finally:
    proc.terminate()
    proc.wait(60)
  table = results_md.markdown_table(
      ["route", "clients", "requests", "wall s", "requests/s", "vs one at a time",
       "vs /v1/generate", "p50 ms", "p99 ms", "generated tokens/s"], rows)
  print(table)
  differ = differences(answers, (routes[0], levels[0]))
  print(json.dumps({"same_answers_at_every_level_and_route": not differ}))
  if differ:
    raise SystemExit("answers differ:\n" + "\n".join(differ))
  if not args.no_record:
    record(args, levels, routes, rates, table)


def measure_level(args, url: str, bodies: dict, clients: int, deadline: float,
                  answers: dict) -> dict[str, tuple[float, list[float]]]:
  """route -> (summed wall seconds, latencies) of --repeats turns of every route at `clients`
  (in turns: a drift of the machine's load hits all alike); answers[route, clients] gets each
  turn's answers, SystemExit when a turn's differ from the first's."""
  timed = {route: (0.0, []) for route in args.routes}
  for turn in range(args.repeats):
    for route in args.routes:
      if time.monotonic() > deadline:
        raise SystemExit(f"past --deadline_s={args.deadline_s} before {route} at {clients} "
                         "clients")
      wall, latencies, results = run_level(url, PATHS[route], bodies[route], clients)
      got = [answer(route, r) for r in results]
      if answers.setdefault((route, clients), got) != got:
        raise SystemExit(f"{route} at {clients} clients: turn {turn + 1}'s answers differ from "
                         "the first turn's")
      timed[route] = (timed[route][0] + wall, timed[route][1] + latencies)
  return timed


def vs_generate(rates: dict, route: str, clients: int) -> str:
  """A chat row's requests/s as a ratio to /v1/generate's at the same client count ("-" else)."""
  if route != "chat" or ("generate", clients) not in rates:
    return "-"
  return f"{rates[route, clients] / rates['generate', clients]:.2f}x"


def record(args, levels: list[int], routes: list[str], rates: dict, table: str):
  """RESULTS.md: the section, and the summary's rows: each route's requests/s at the most clients
  vs one at a time, and with both routes, chat's vs /v1/generate's at every client count."""
  top, label = levels[-1], {"generate": "", "chat": ", OpenAI chat route"}
  summary = [(f"requests/s, {top} clients vs one at a time{label[r]}",
              f"{rates[r, top] / rates[r, levels[0]]:.2f}x") for r in routes]
  if {"generate", "chat"} <= set(routes):
    summary += [(f"requests/s, OpenAI chat route vs /v1/generate ({c} client{'s' * (c != 1)})",
                 f"{rates['chat', c]:.2f} vs {rates['generate', c]:.2f} "
                 f"({rates['chat', c] / rates['generate', c]:.2f}x)") for c in levels]
  results_md.record(
      "serve_load", f"{args.requests} requests at {levels} concurrent clients, routes "
      f"{', '.join(routes)}", table,
      [f"Server: `launch.serve --max_batch={args.max_batch} --capacity={args.capacity} "
       f"--max_new_tokens={args.max_new_tokens}` on {args.workdir}, index {args.index}; prompts: "
       f"{args.requests_file} cycled (messages before the assistant's), greedy, "
       f"max_new_tokens={args.max_new_tokens}.",
       "Routes: " + ", ".join(f"{r} = `POST {PATHS[r]}`" for r in routes) + "; the same requests "
       "on each (chat: messages, max_tokens, temperature 0), the routes in turns at each client "
       f"count, {args.repeats} turn(s) each (requests: all turns'); generated tokens: /v1/generate's usage.generated_tokens, chat's "
       "usage.completion_tokens.",
       "Clients: threads on the same 2-core machine as the server, one HTTP connection each; "
       "every level ran once untimed on every route before (compiles).",
       "Greedy answers (text, retrieved ids, generated tokens) are the same at every client count "
       "and on every route (chat's message content equals /v1/generate's text)."],
      summary)


if __name__ == "__main__":
  main()
