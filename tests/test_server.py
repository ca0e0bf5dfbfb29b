"""The HTTP server (launch.serve) as a real subprocess on a free localhost port, talked to with a
real HTTP client (httpx): answers equal launch.infer's, concurrency changes nothing, bad input
gets its 4xx and the server goes on, a client that leaves frees its slot, SIGTERM ends what is
in flight explicitly."""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import E2E_CONFIG as CONFIG, ROOT
from processes import serve
from onegen_jax.data.records import read_jsonl

# Sampling this hot makes the tiny model's outputs long (EOS is rarely drawn); a request's seed
# fixes its tokens whatever it is batched with, so `long_requests` finds seeds that run long.
LONG = {"temperature": 20.0, "max_new_tokens": 400}


def start_server(trained, chain, log_path, *flags):
  """(base url, process) of launch.serve on the trained run and the chain's index with the e2e
  settings, once its /health answers."""
  return serve(trained[3] / "run", chain.index, log_path, f"--max_batch={CONFIG.batch_size}",
               f"--capacity={CONFIG.capacity}", f"--retrieve_k={CONFIG.retrieve_k}",
               f"--max_new_tokens={CONFIG.max_new_tokens}",
               f"--max_retrievals={CONFIG.max_retrievals}", "--max_body_bytes=20000", *flags)


@pytest.fixture(scope="module")
def server(trained, chain, tmp_path_factory):
  log = tmp_path_factory.mktemp("serve") / "server.log"
  url, proc = start_server(trained, chain, log)
  assert "no API key" in log.read_text()  # an open server says so (with keys: test_openai_api)
  with httpx.Client(base_url=url, timeout=120) as client:
    yield client
  proc.terminate()
  proc.wait(60)


@pytest.fixture(scope="module")
def long_requests(trained, server) -> list[dict]:
  """Three request bodies that, left alone, generate at least 300 tokens (checked here)."""
  prompt = dev_lines(trained)[0]["messages"]
  bodies = [{"messages": prompt, "seed": seed, **LONG} for seed in range(8)]
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    results = list(pool.map(lambda body: generate(server, **body), bodies))
  long = [b for b, r in zip(bodies, results) if r["usage"]["generated_tokens"] >= 300]
  assert len(long) >= 3, [r["usage"] for r in results]
  return long[:3]


def dev_lines(trained):
  """The lines launch.infer read for chain.predictions (conftest.write_requests)."""
  return read_jsonl(f"{trained[2]}/requests.jsonl")


def request_body(line: dict) -> dict:
  """A requests.jsonl line as a /v1/generate body: its messages and answer prefix."""
  return {k: v for k, v in line.items() if k in ("messages", "answer_prefix")}


def assert_same_answers(got: list[dict], want: list[dict]):
  """Server results equal launch.infer's lines: every field the same (id, usage and session_id
  are the server's own) but the scores, equal to float32 rounding (a batch of other shapes
  rounds the same sums differently)."""
  assert len(got) == len(want)
  own = lambda r: json.loads(json.dumps({k: v for k, v in r.items()
                                          if k not in ("id", "usage", "session_id")}))
  scores = lambda r: [s for x in r["retrievals"] for s in x.pop("scores")]
  for g, w in zip(map(own, got), map(own, want)):
    assert scores(g) == pytest.approx(scores(w), abs=1e-5)
    assert g == w


def generate(client, **body):
  response = client.post("/v1/generate", json=body)
  assert response.status_code == 200, response.text
  return response.json()


def test_answers_equal_launch_infer_sequential_and_concurrent(trained, chain, server):
  """The dev lines' messages, one at a time and all at once (sharing batches), give exactly the
  lines launch.infer wrote for the same run, index and settings."""
  want = read_jsonl(chain.predictions)
  lines = dev_lines(trained)
  sequential = [generate(server, **request_body(line)) for line in lines]
  assert_same_answers(sequential, want)
  with concurrent.futures.ThreadPoolExecutor(len(lines)) as pool:
    concurrent_results = list(pool.map(lambda line: generate(server, **request_body(line)),
                                       lines))
  assert_same_answers(concurrent_results, want)
  assert sum(len(r["retrievals"]) for r in want) > 0  # the comparison covers retrievals
  if trained[1] == "el":
    assert sum(len(r["mentions"]) for r in want) > 0  # and linked mentions with offsets
  usage = sequential[0]["usage"]
  assert usage["generated_tokens"] > 0 and usage["prompt_tokens"] > 0


def read_events(response) -> list[tuple[str, dict]]:
  events, event = [], None
  for line in response.iter_lines():
    if line.startswith("event: "):
      event = line[len("event: "):]
    elif line.startswith("data: "):
      events.append((event, json.loads(line[len("data: "):])))
  return events


def test_streaming_adds_up_to_the_answer(trained, server):
  line = dev_lines(trained)[1]  # with an answer prefix: the stream holds a retrieval
  plain = generate(server, **request_body(line))
  with server.stream("POST", "/v1/generate", json={**request_body(line),
                                                   "stream": True}) as response:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = read_events(response)
  kinds = [kind for kind, _ in events]
  assert kinds[-1] == "done" and kinds.count("done") == 1 and "token" in kinds
  done = events[-1][1]
  assert_same_answers([done], [plain])
  assert "".join(e["text"] for kind, e in events if kind == "token") == done["text"]
  streamed = [{"position": e["position"], "ids": e["ids"], "scores": e["scores"]}
              for kind, e in events if kind == "retrieval"]
  assert streamed == done["retrievals"] and streamed


def test_a_session_goes_on_over_its_cache_until_closed(trained, server):
  line = dev_lines(trained)[1]
  first = generate(server, messages=line["messages"], keep_session=True)
  session = first["session_id"]
  turn = {"messages": [{"role": "user", "content": line["messages"][0]["content"]}],
          "max_new_tokens": 8}
  second = server.post(f"/v1/sessions/{session}/turns", json=turn)
  assert second.status_code == 200, second.text
  second = second.json()
  assert second["session_id"] == session
  # The turn's prompt is the whole dialogue: round 1's prompt and output, then the new turn.
  assert second["usage"]["prompt_tokens"] > (first["usage"]["prompt_tokens"]
                                             + first["usage"]["generated_tokens"])
  assert 0 < second["usage"]["generated_tokens"] <= 8
  assert server.delete(f"/v1/sessions/{session}").status_code == 200
  gone = server.post(f"/v1/sessions/{session}/turns", json=turn)
  assert gone.status_code == 404 and "unknown session" in gone.json()["error"]


def test_bad_input_gets_a_4xx_and_the_server_goes_on(trained, server):
  line = dev_lines(trained)[0]
  good = {"messages": line["messages"], "max_new_tokens": 4}
  too_long = "word " * (CONFIG.capacity + 50)
  bad = [  # (body or raw bytes, path, status, words of the reason)
      (b'{"messages": [', "/v1/generate", 400, "malformed JSON"),
      (b'[1, 2]', "/v1/generate", 400, "JSON object"),
      ({}, "/v1/generate", 422, "exactly one of"),
      ({"messages": line["messages"], "prompt": "x"}, "/v1/generate", 422, "exactly one of"),
      ({"messages": "hello"}, "/v1/generate", 422, "messages"),
      ({"messages": [{"role": "user"}]}, "/v1/generate", 422, "messages.0.content"),
      ({"messages": [{"role": "robot", "content": "x"}]}, "/v1/generate", 422, "role"),
      ({**good, "max_new_tokens": "4"}, "/v1/generate", 422, "max_new_tokens"),
      ({**good, "max_new_tokens": 0}, "/v1/generate", 422, "max_new_tokens"),
      ({**good, "max_new_tokens": CONFIG.capacity}, "/v1/generate", 422, "out of range"),
      ({**good, "top_p": 0}, "/v1/generate", 422, "top_p"),
      ({**good, "retrieve_k": 1000}, "/v1/generate", 422, "retrieve_k"),
      ({**good, "colour": "blue"}, "/v1/generate", 422, "colour"),
      ({**good, "answer_prefix": 5}, "/v1/generate", 422, "answer_prefix"),
      ({**good, "answer_prefix": "word " * 10}, "/v1/generate", 422, "over max_new_tokens"),
      ({"prompt": too_long}, "/v1/generate", 400, "cache holds"),
      ({"prompt": "x" * 30000}, "/v1/generate", 413, "limit"),
      ({"prompt": "hi"}, "/v1/sessions/nope/turns", 404, "unknown session"),
      (None, "/v1/sessions/nope", 404, "unknown session"),
  ]
  if trained[1] == "rag":
    bad.append(({**good, "candidates": ["a"]}, "/v1/generate", 422, "candidates"))
  for body, path, status, words in bad:
    if body is None:
      response = server.delete(path)
    elif isinstance(body, bytes):
      response = server.post(path, content=body, headers={"content-type": "application/json"})
    else:
      response = server.post(path, json=body)
    assert response.status_code == status, (body if not isinstance(body, dict) else
                                            str(body)[:200], response.text)
    reason = response.json()["error"]
    assert words in reason and "\n" not in reason, reason
    assert generate(server, **good)["usage"]["generated_tokens"] > 0  # still serving
  assert server.get("/no/such/route").status_code == 404


def metrics(client) -> dict[str, float]:
  text = client.get("/metrics").text
  return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
          if line and not line.startswith("#")}


@pytest.mark.parametrize("trained", ["el"], indirect=True)
def test_a_client_that_leaves_frees_its_slot(server, long_requests):
  """Streaming and plain requests whose clients go away are cancelled: every slot is free again
  long before they would have ended (300+ tokens), and the cancellations are counted. (The task
  plays no part: EL's run only.)"""
  before = metrics(server).get("onegen_requests_cancelled_total", 0.0)
  for body in long_requests[:2]:  # streaming: read the first token, then hang up
    with server.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
      next(response.iter_lines())
  with httpx.Client(base_url=str(server.base_url), timeout=0.5) as impatient:
    with pytest.raises(httpx.ReadTimeout):  # plain: give up waiting
      impatient.post("/v1/generate", json=long_requests[2])
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    now = metrics(server)
    if now.get("onegen_requests_cancelled_total", 0) - before == 3 and not now["onegen_slots_busy"]:
      break
    time.sleep(0.1)
  assert now.get("onegen_requests_cancelled_total", 0) - before == 3, now
  assert now["onegen_slots_busy"] == 0 and now["onegen_queue_length"] == 0
  assert now["onegen_slots_total"] == CONFIG.batch_size and now["onegen_tokens_per_second"] > 0
  assert generate(server, **long_requests[0])["usage"]["generated_tokens"] >= 300  # unchanged


@pytest.mark.processes
def test_sigterm_ends_in_flight_requests_explicitly(trained, chain, long_requests, tmp_path):
  """With --drain_s=0, SIGTERM ends every running request at once: plain ones get 503 with a
  reason, a streaming one an `error` event; none is dropped silently; the process exits 0."""
  url, proc = start_server(trained, chain, tmp_path / "server.log", "--drain_s=0")
  with httpx.Client(base_url=url, timeout=60) as client, \
       concurrent.futures.ThreadPoolExecutor(3) as pool:
    plain = [pool.submit(client.post, "/v1/generate", json=body) for body in long_requests[:2]]

    def streamed():
      with client.stream("POST", "/v1/generate",
                         json={**long_requests[2], "stream": True}) as response:
        return read_events(response)

    stream = pool.submit(streamed)
    deadline = time.monotonic() + 30
    while metrics(client)["onegen_slots_busy"] < 3 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert metrics(client)["onegen_slots_busy"] == 3
    proc.send_signal(signal.SIGTERM)
    for future in plain:
      response = future.result(timeout=60)
      assert response.status_code == 503 and "shut down" in response.json()["error"]
    kind, data = stream.result(timeout=60)[-1]
    assert kind == "error" and data["status"] == 503 and "shut down" in data["error"]
  assert proc.wait(60) == 0


@pytest.mark.parametrize("trained", ["multihop"], indirect=True)
def test_an_internal_error_fails_that_request_only(trained, chain, tmp_path):
  """An index whose documents.json lacks the paragraph one dev request retrieves first (a broken
  index, not bad input): that request gets 500 with an id, which the log names with the cause;
  the requests batched with it get their launch.infer answers."""
  want = read_jsonl(chain.predictions)
  firsts = [r["retrievals"][0]["ids"][0] if r["retrievals"] else None for r in want]
  broken = next(i for i, uid in enumerate(firsts) if uid and firsts.count(uid) == 1)
  index = tmp_path / "index"
  shutil.copytree(chain.index, index)
  texts = json.loads((index / "documents.json").read_text())
  del texts[firsts[broken]]
  (index / "documents.json").write_text(json.dumps(texts))
  log = tmp_path / "server.log"
  url, proc = start_server(trained, dataclasses.replace(chain, index=str(index)), log)
  try:
    with httpx.Client(base_url=url, timeout=120) as client, \
         concurrent.futures.ThreadPoolExecutor(len(want)) as pool:
      responses = list(pool.map(lambda line: client.post("/v1/generate", json=request_body(line)),
                                dev_lines(trained)))
      assert responses[broken].status_code == 500
      error = responses[broken].json()
      assert error["error"] == "internal error" and error["id"].startswith("err-")
      ok = [i for i in range(len(want)) if i != broken]
      assert all(responses[i].status_code == 200 for i in ok)
      assert_same_answers([responses[i].json() for i in ok], [want[i] for i in ok])
      assert client.get("/health").status_code == 200
  finally:
    proc.terminate()
    proc.wait(60)
  logged = [line for line in log.read_text().splitlines() if error["id"] in line]
  assert logged and "KeyError" in logged[0] and firsts[broken] in logged[0]


@pytest.mark.processes
@pytest.mark.parametrize("trained", ["el"], indirect=True)
def test_the_load_benchmark_runs(trained, chain, tmp_path):
  """benchmarks/serve_load.py at its smallest (2 client counts, 4 requests, both routes),
  RESULTS.md left alone: it starts the server, checks the answers agree across client counts and
  between /v1/generate and the OpenAI chat route, prints its table."""
  index = tmp_path / "index"
  shutil.copytree(chain.index, index)
  results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
  before = open(results).read()
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.serve_load", f"--workdir={trained[3] / 'run'}",
       f"--index={index}", f"--requests_file={trained[2]}/dev.jsonl", "--clients=1,2",
       "--requests=4", "--max_new_tokens=8", "--max_batch=2", "--capacity=512", "--no_record"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  assert "| generate | 2 | 4 |" in run.stdout and "| chat | 2 | 4 |" in run.stdout
  assert '"same_answers_at_every_level_and_route": true' in run.stdout
  assert open(results).read() == before
