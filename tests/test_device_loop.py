"""The device loop (inference/device_loop.py: N decode steps per call, search and insertion on
device) against the host engine it must equal: tokens, stop reasons and retrieval ids exactly,
scores to 1e-5, at N = 1, 7 and 32, for EL (with and without candidates, a list shorter than k)
and RAG, greedy and seeded sampling, more requests than rows (continuous batching), on the
8-device mesh with a KB of 37 keys (not a multiple of the 8 shards). The tiny model is randomly
initialised: forced tokens put query RET tokens (and an EOS) into the outputs, so every request
retrieves whatever the model would write."""

import dataclasses
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from onegen_jax import sharding
from onegen_jax.checkpoint import restore_target
from onegen_jax.inference import aot
from onegen_jax.inference.device_decode import _feeder, compiled_loop, records_per_call
from onegen_jax.inference.device_loop import DeviceRetrieval
from onegen_jax.inference.engine import Engine, GenerationConfig, Request, TaskTokens
from onegen_jax.inference.retrieval_policy import (choose_retrieval, device_kb_budget,
                                                   make_policy, task_footprint, task_table)
from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder, init_cache
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.candidates import CandidateScorer
from onegen_jax.retrieval.index import ExactIndex
from tests.test_device_kb import _key_uids

QUERY, EOS, CONTINUE = 5, 2, 6
TOKENS = TaskTokens(query=QUERY, eos=EOS, force_after_query=CONTINUE)
CONFIG = GenerationConfig(max_new_tokens=20, batch_size=4, capacity=128, retrieve_k=3,
                          max_retrievals=3, watch=(EOS, QUERY), prefill_apart=False,
                          loop_min_tokens=0)  # a 2 x 2-token loop (request 4) stops
# (prefill_apart off: fewer programs for the host reference to compile; tests/test_engine.py
# checks that it changes nothing)
N_KEYS = 37  # not a multiple of the 8 shards


UIDS = _key_uids(N_KEYS)


class _Tokens:
  """A stand-in tokenizer: a document's insertion is one token per character of its text."""

  def insertion_tokens(self, text):
    return [10 + ord(c) % 400 for c in text]


@pytest.fixture(scope="module")
def setup():
  """(model, params on the mesh, mesh, host index, key vectors, texts)."""
  model = Decoder(preset("tiny"))
  x = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), x, x, jnp.arange(8)[None]))["params"]
  mesh = sharding.make_mesh(data=-1)
  params = jax.device_put(jax.device_get(params), NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(N_KEYS, 64)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  texts = {u: f"<p>{u}" + "x" * (i % 9) for i, u in enumerate(UIDS) if "-" not in u}
  return model, params, mesh, ExactIndex().build(vectors, UIDS), vectors, texts


def _engines(setup, mode, steps, **config):
  """(host engine, device-loop engine at N = steps) of one mode over the same model and KB."""
  model, params, mesh, index, vectors, texts = setup
  config = dataclasses.replace(CONFIG, **config)
  tokens = _Tokens()
  common = dict(
      model=model, params=params, tokens=TOKENS, mode=mode, mesh=mesh,
      search=index.search_documents if mode == "rag" else index.search,
      documents=lambda uid: tokens.insertion_tokens(texts[uid]),
      search_candidates=CandidateScorer(vectors, UIDS).search, decode=_decode)
  table = device_kb.insertion_table(UIDS, common["documents"]) if mode == "rag" else None
  # The loop feeds chunk rows apart (the default): its reference is the host step without.
  device = Engine(config=dataclasses.replace(config, steps_per_dispatch=steps, prefill_apart=True),
                  device=DeviceRetrieval.place(vectors, UIDS, mesh, table), **common)
  return Engine(config=config, **common), device


def _decode(tokens) -> str:
  """Token ids -> text, for stop strings: the ids in decimal."""
  return " ".join(map(str, tokens))


def _requests(mode: str, sampled: bool) -> list[Request]:
  """Ten requests (prompts of 3 to 14 tokens) whose forced starts hold query tokens: 1 to 4
  retrievals (max_retrievals is 3), an EOS, per-request max_new_tokens, one running into the
  cache's capacity, the host-only stops (a stop string, the loop stop), one prompt (40 tokens)
  wider than the loop's chunk (fed by a host step first) and, for EL, candidates (one list for
  every query, or one per query, one shorter than k=3)."""
  rng = np.random.default_rng(1)
  requests = []
  for i in range(10):
    prompt = [int(t) for t in rng.integers(20, 500, 40 if i == 8 else 3 + i)]
    force = [int(t) for t in rng.integers(20, 500, 1 + i % 3)]
    force += [QUERY, *rng.integers(20, 500, i % 3).tolist()] * (1 + i % 4)  # <= 16 in all
    if i == 6:
      force += [EOS]
    if i == 4:
      force += [77, 78, 77, 78]  # the loop stop's (loop_repeats=2)
    candidates = None
    if mode == "el" and i % 3 == 1:
      candidates = list(rng.choice(UIDS, size=6, replace=False))
    elif mode == "el" and i % 3 == 2:
      candidates = [list(rng.choice(UIDS, size=n, replace=False)) for n in (2, 5)]
    settings = {0: dict(stop=[" 4"]), 4: dict(loop_repeats=2), 9: dict(max_new_tokens=200)}
    requests.append(Request(prompt, force, candidates=candidates, seed=i if sampled else None,
                            temperature=0.9 if sampled and i % 2 else None,
                            top_p=0.8 if sampled and i % 4 == 1 else None,
                            **{"max_new_tokens": 12 + 3 * (i % 5), **settings.get(i, {})}))
  return requests


def _same(host, device):
  assert device.tokens == host.tokens
  assert device.generated == host.generated
  assert device.stop_reason == host.stop_reason
  assert len(device.retrievals) == len(host.retrievals)
  for a, b in zip(host.retrievals, device.retrievals):
    assert (b.position, b.ids) == (a.position, a.ids)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
    np.testing.assert_allclose(b.vector, a.vector, atol=1e-5)
  np.testing.assert_allclose(device.log_probs, host.log_probs, atol=1e-5)
  np.testing.assert_allclose(device.watched, host.watched, atol=1e-5)
  np.testing.assert_allclose(device.prompt_vector, host.prompt_vector, atol=1e-5)


def _drain(engine, requests):
  """(the outputs of `requests` run to their ends, the engine steps (calls) that took); the
  engine's seconds in compiled calls are a part of the steps' time."""
  start, before = time.perf_counter(), engine.compiled_s
  ids = [engine.submit(r) for r in requests]
  calls = 0
  while engine.busy:
    engine.step()
    calls += 1
  assert 0 < engine.compiled_s - before < time.perf_counter() - start
  return [engine.output(i) for i in ids], calls


@pytest.mark.parametrize("mode,sampled", [("el", False), ("el", True), ("rag", False),
                                          ("rag", True)])
def test_device_loop_equals_the_host_engine(setup, mode, sampled):
  requests = _requests(mode, sampled)
  reference = None
  for steps in (1, 7, 32):
    host, device = _engines(setup, mode, steps)
    if reference is None:
      reference, host_calls = _drain(host, requests)
      reasons = {out.stop_reason for out in reference}
      assert reasons >= {"eos", "stop", "repetition", "max_new_tokens", "max_retrievals",
                         "capacity"}, reasons
      assert sum(len(out.retrievals) for out in reference) >= 10
    outs, calls = _drain(device, requests)
    for want, got in zip(reference, outs):
      _same(want, got)
    if steps == 1:
      assert calls == host_calls
    if steps == 32:
      assert calls * 4 < host_calls, (calls, host_calls)


def test_chunk_rows_fed_apart_equal_one_wide_pass(setup):
  """The loop's feed with P = 1 (one row feeding a chunk beside rows feeding one token: every
  row at width 1, then that row alone at width W) against P = 0 (every row at width W): the same
  hidden states and the same cache entries up to each row's new length, and past them only the
  narrower pass's writes."""
  model, params = setup[:2]
  cache = model.apply({"params": params}, jnp.arange(4 * 20).reshape(4, 20) % 300 + 10,
                      jnp.zeros(4, jnp.int32), init_cache(model.config, 4, 64),
                      method=Decoder.extend)[1]
  count = jnp.array([1, 5, 1, 0], jnp.int32)
  s = dict(pending=jnp.arange(4 * 16).reshape(4, 16) % 200 + 30, count=count,
           length=jnp.array([20, 17, 9, 3], jnp.int32))
  (want, want_cache), (got, got_cache) = (
      jax.jit(_feeder(model, params, 64, 16, apart))(s, cache) for apart in (0, 1))
  np.testing.assert_allclose(got[:3], want[:3], atol=1e-5)
  # The apart pass ran: at width W row 0 wrote W entries past its length, apart only one.
  past = slice(21, 36)
  np.testing.assert_array_equal(got_cache[0][:, 0, past], cache[0][:, 0, past])
  assert not np.array_equal(want_cache[0][:, 0, past], cache[0][:, 0, past])
  for row, end in enumerate(np.asarray(s["length"] + count)):
    for a, b in zip(got_cache, want_cache):
      np.testing.assert_allclose(a[:, row, :end], b[:, row, :end], atol=1e-5)


def test_a_call_ends_where_its_window_does(setup):
  """Capacity 512, so calls attend to 256 entries until a row needs more: a 245-token prompt
  (fed by a host step) whose retrievals' insertions carry it past 256 inside a call of N = 32,
  beside a short request. The call ends before that feed and the next one attends to 512; the
  outputs equal the host engine's (attending to too few entries would change them)."""
  rng = np.random.default_rng(2)
  requests = [Request([int(t) for t in rng.integers(20, 500, n)], [QUERY, 30, QUERY, 31, QUERY, 32],
                      max_new_tokens=12) for n in (245, 5)]
  host, device = _engines(setup, "rag", 32, capacity=512)
  windows = []
  rows = device._device._rows  # pylint: disable=protected-access

  def recorded(engine, records):
    out = rows(engine, records)
    windows.append(out[1])
    return out

  device._device._rows = recorded  # pylint: disable=protected-access
  for want, got in zip(_drain(host, requests)[0], _drain(device, requests)[0]):
    _same(want, got)
    assert len(got.retrievals) == 3
  assert windows[0] == 256 and 512 in windows, windows


def test_penalties_and_sessions(setup):
  """At N = 7: sampled and greedy requests with penalties (the token history grows on device)
  beside ones without; a kept session continued over its cache."""
  requests = _requests("el", sampled=True)[:6]
  for i in (0, 1, 2):  # prompt and output fit one history width (16)
    requests[i] = dataclasses.replace(requests[i], presence_penalty=0.5, frequency_penalty=0.3,
                                      repetition_penalty=1.3, max_new_tokens=8)
  requests[3] = dataclasses.replace(requests[3], keep_session=True)
  host, device = _engines(setup, "el", 7)
  results = [_drain(engine, requests)[0] for engine in (host, device)]
  for want, got in zip(*results):
    _same(want, got)
  turn = [31, 32, 33]
  continued = [engine.run([engine.continue_session(3, turn, max_new_tokens=8)])[0]
               for engine in (host, device)]
  _same(*continued)
  assert continued[1].prompt[-3:] == turn and continued[1].tokens


def test_choose_retrieval_places_the_kb_and_refuses(setup):
  """choose_retrieval (launch.infer's and launch.serve's --steps_per_dispatch) at N > 1 places the
  index's keys and, for RAG, its documents; at N = 1 it touches neither (a documents.json missing
  a document is then the request's error, not start-up's). N > 1 without a device KB, RAG
  candidates, and a RAG KB missing a document's text are refused."""
  _, _, mesh, index, vectors, texts = setup
  for mode in ("el", "rag"):
    run = types.SimpleNamespace(task=types.SimpleNamespace(mode=mode), tokenizer=_Tokens(),
                                mesh=mesh)
    line, device = choose_retrieval(run, index, texts, vectors, None, 8, 1 << 20)
    assert line.startswith("retrieval: on the devices") and "(fits)" in line
    assert list(device.key_uids) == UIDS and device.kb.num_keys == N_KEYS
    assert list(device.documents) == ([] if mode == "el" else list(texts))
  broken = dict(list(texts.items())[1:])
  assert choose_retrieval(run, index, broken, vectors, None, 1, 0) == (
      f"retrieval: on the host, {type(index).__name__} (--steps_per_dispatch=1)", None)
  with pytest.raises(KeyError, match=repr(list(texts)[0])):
    choose_retrieval(run, index, broken, vectors, None, 8, 1 << 20)
  host, rag = _engines(setup, "rag", 4)
  with pytest.raises(ValueError, match="needs the device loop"):
    Engine(host.model, host.params, TOKENS, host.policy.search, None,
           dataclasses.replace(CONFIG, steps_per_dispatch=4), "el", mesh=mesh)
  with pytest.raises(ValueError, match="candidates restrict entity linking"):
    rag.submit(Request([30, 31], candidates=["d0"]))


def test_device_loop_on_a_1x2x4_mesh(setup):
  """RAG at N = 7 on a (1,2,4) mesh ('data' 1, 'fsdp' 2, 'tensor' 4; the cache's rows over
  fsdp): the KB's keys, key -> document map and token table sharded over all 8 devices (37 keys:
  5 rows per shard, the last 3 padding), equal to the host engine on the same mesh."""
  model, params, _, index, vectors, texts = setup
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  params = jax.device_put(jax.device_get(params), NamedSharding(mesh, P()))
  host, device = _engines((model, params, mesh, index, vectors, texts), "rag", 7)
  kb = device._device.retrieval.kb  # pylint: disable=protected-access  (the KB the loop searches)
  assert kb.axes == ("data", "fsdp", "tensor") and kb.shards == 8
  assert {s.data.shape for s in kb.keys.addressable_shards} == {(5, 64)}
  requests = _requests("rag", sampled=False)[:4]
  results = [_drain(engine, requests)[0] for engine in (host, device)]
  assert sum(len(out.retrievals) for out in results[0]) >= 4
  for want, got in zip(*results):
    _same(want, got)


def test_the_kb_is_weighed_against_the_budget(setup):
  """task_footprint of task_table (from the sizes: 37 keys of 64 float32 over 8 shards, RAG's
  table as wide as the longest insertion) equals the placed KB's; the budget
  (--device_kb_budget_mib, else a fraction of the device's memory); N > 1 with a KB over the
  budget is an error naming both sizes."""
  _, _, mesh, index, vectors, texts = setup
  run = types.SimpleNamespace(task=types.SimpleNamespace(mode="rag"), tokenizer=_Tokens(),
                              mesh=mesh)
  table = task_table(run, UIDS, texts)
  footprint = task_footprint(run, len(UIDS), 64, table)
  assert footprint == device_kb.build(vectors, UIDS, mesh, table=table).footprint()
  assert footprint.keys == 5 * 64 * 4
  assert device_kb_budget(mesh, 3) == 3 << 20 and device_kb_budget(mesh) > 1 << 20
  with pytest.raises(ValueError, match=r"takes 0\.0 MiB per device, over the budget of 0\.0 MiB "
                                       r"per device \(--device_kb_budget_mib\)"):
    choose_retrieval(run, index, texts, vectors, None, 8, 100)
  large = device_kb.footprint(10_000_000, 4096, np.float16, 64)  # the KB on v5p-64
  assert f"{large.total / device_kb.MIB:.1f}" == "1220.7" and not large.fits(1024 << 20)


def test_the_compiled_loop_keeps_the_cache_in_place():
  """The compiled loop (tiny model, EL, on the 8-device mesh, as inference/aot.py lowers it) holds
  no copy of the KV cache: the feed's passes (every row at width W or 1, the chunk rows apart)
  run as loops of 0 or 1 trips. As a lax.cond they copied the whole cache 6 times per iteration
  (RESULTS.md finding 15)."""
  config, mesh = preset("tiny"), sharding.make_mesh(data=-1)
  generation = dataclasses.replace(CONFIG, batch_size=8, steps_per_dispatch=8, prefill_apart=True)
  cache = aot.abstract_cache(config, 8, generation.capacity, mesh)
  records = records_per_call(generation)
  loop = compiled_loop(Decoder(config), None, generation,
                       make_policy("el", None, None, CONTINUE), TOKENS)
  kb = aot.abstract_kb(N_KEYS, config.hidden_size, np.float32, mesh)
  params = restore_target(config, mesh)
  with sharding.activate(mesh):
    text = loop.lower(params, kb, cache,
                      aot.abstract_rows(8, 16, records, mesh), steps=8, window=generation.capacity,
                      k=3, records=records).compile().as_text()
  shard = cache[0].sharding.shard_shape(cache[0].shape)
  dtype = {"float32": "f32", "bfloat16": "bf16"}[str(cache[0].dtype)]
  cache_hlo = f"= {dtype}[{','.join(map(str, shard))}]"
  assert cache_hlo in text  # the shape as the HLO names it
  assert not [line for line in text.splitlines() if " copy(" in line and cache_hlo in line]
