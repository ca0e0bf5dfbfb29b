"""Sharded inference: the decoder's forward and cached decode on tensor- (and fsdp-) sharded CPU
meshes give the unsharded tokens and hidden states; the cache is sharded as `cache_sharding` says
and updated in place; launch.build_index across two processes writes one process's vectors."""

import contextlib
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from processes import run_two_processes
from onegen_jax import sharding
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.data.generate import make_dataset
from onegen_jax.inference.engine import GenerationConfig
from onegen_jax.inference.requests import prompt_tokens, read_requests
from onegen_jax.inference.run_dir import encode_db, load_run, make_engine
from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder, abstract_params, cache_sharding, init_cache
from onegen_jax.retrieval.index import ExactIndex

# Every head axis divides 8 (16 query heads over 8 kv heads: GQA with 2 per group).
CONFIG = preset("tiny", num_heads=16, num_kv_heads=8, qkv_bias=True)
ROWS, CAPACITY, DECODE_STEPS = 4, 64, 4


def _step(model, params, tokens, cache_len, cache):
  """tokens [B, T] after cache_len [B] -> (hidden [B, T, D], greedy next token per position
  [B, T], cache)."""
  hidden, cache = model.apply({"params": params}, tokens, cache_len, cache, 32,
                              method=Decoder.extend)
  logits = model.apply({"params": params}, hidden, method=Decoder.logits)
  return hidden, jnp.argmax(logits, axis=-1), cache


def _generate(params, mesh=None):
  """Forward hidden [B, S, D] of a packed batch, and a ragged prefill + DECODE_STEPS greedy
  steps over one cache: (forward hidden, [hidden of each call], tokens [B, steps], cache)."""
  model = Decoder(CONFIG)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, (ROWS, 16)).astype(np.int32)
  lengths = np.array([16, 9, 12, 5], np.int32)
  segments = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  step = jax.jit(functools.partial(_step, model), donate_argnums=(3,))
  forward = jax.jit(functools.partial(model.apply, method=Decoder.hidden_states))
  with sharding.activate(mesh) if mesh is not None else contextlib.nullcontext():
    cache = init_cache(CONFIG, ROWS, CAPACITY, mesh)
    full = forward({"params": params}, tokens, segments, np.tile(np.arange(16), (ROWS, 1)))
    hidden, next_tokens, cache = step(params, tokens, np.zeros(ROWS, np.int32), cache)
    seen, out = [hidden], [np.asarray(next_tokens)[np.arange(ROWS), lengths - 1]]
    for _ in range(DECODE_STEPS):
      hidden, next_tokens, new_cache = step(params, out[-1][:, None], lengths, cache)
      assert cache[0].is_deleted()  # donated: the step reused its buffer
      cache, lengths = new_cache, lengths + 1
      seen.append(hidden)
      out.append(np.asarray(next_tokens)[:, 0])
  return np.asarray(full), [np.asarray(h) for h in seen], np.stack(out, 1), cache


@functools.lru_cache(maxsize=1)
def _unsharded():
  model = Decoder(CONFIG)
  probe = jnp.ones((1, 4), jnp.int32)
  params = jax.jit(lambda key: nn.unbox(model.init(key, probe, probe, jnp.arange(4)[None])))(
      jax.random.key(0))["params"]
  return params, _generate(params)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (1, 1, 8)], ids=["1x2x4", "1x1x8"])
def test_sharded_forward_and_decode_equal_unsharded(mesh_shape):
  params, (full, seen, tokens, _) = _unsharded()
  mesh = sharding.make_mesh(*mesh_shape)
  abstract = abstract_params(CONFIG)
  placed = jax.device_put(params, sharding.logical_to_sharding(
      nn.get_partition_spec(abstract), mesh))
  q_kernel = placed["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, heads x head_dim]
  assert q_kernel.addressable_shards[0].data.shape[-1] == q_kernel.shape[-1] // mesh_shape[2]
  got_full, got_seen, got_tokens, cache = _generate(placed, mesh)
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_allclose(got_full, full, atol=1e-5, rtol=1e-5)
  for got, want in zip(got_seen, seen):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Rows over ('data', 'fsdp'), kv heads over 'tensor', kept through the donated steps.
  assert cache[0].sharding.is_equivalent_to(cache_sharding(CONFIG, ROWS, CAPACITY, mesh), 5)
  shard = cache[0].addressable_shards[0].data.shape
  assert shard == (CONFIG.num_layers, ROWS // mesh_shape[1], CAPACITY,
                   CONFIG.num_kv_heads // mesh_shape[2], CONFIG.dim_per_head)


def _random_run(root, model_config, seed: int, num_dev: int):
  """A run directory under root (random parameters of model_config) over generated EL data."""
  make_dataset("el", str(root / "data"), seed=0, num_train=20, num_dev=num_dev)
  model = Decoder(model_config)
  probe = jnp.ones((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(seed), probe, probe, jnp.arange(4)[None]))["params"]
  config = {"data": {"task": "el", "tokenizer_path": str(root / "data" / "tokenizer")},
            "batch": {"seq_len": 256}}
  ckpt = Checkpointer(str(root / "run"))
  ckpt.save_params(0, params, config, model_config)
  ckpt.wait()
  ckpt.close()
  return root


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
  """The tiny decoder's run directory."""
  return _random_run(tmp_path_factory.mktemp("serve"), preset("tiny"), seed=0, num_dev=4)


def _build_index_two_processes(root, out):
  """launch.build_index as 2 processes of 4 CPU devices each on a (2, 2, 2) mesh."""
  out = run_two_processes("launch.build_index", [
      f"--workdir={root / 'run'}", f"--db={root / 'data' / 'db.jsonl'}", f"--out={out}",
      "--mesh_data=2", "--mesh_fsdp=2", "--mesh_tensor=2"], str(root / "build"), timeout=300)
  return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_two_process_build_index_writes_the_vectors_of_one(random_run):
  root = random_run
  summary = _build_index_two_processes(root, root / "two")
  run = load_run(str(root / "run"))  # one process, 8 devices, a data-only mesh
  want, uids, texts, _ = encode_db(run, str(root / "data" / "db.jsonl"), str(root / "one"))
  assert summary["keys"] == len(uids) == len(want) > 0 and summary["documents_dropped"] == 0
  got = np.load(root / "two" / "vectors.npy")
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=1e-5)
  with open(root / "two" / "documents.json") as f:
    assert json.load(f) == texts


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
  """CONFIG's run directory (every head axis divides 8)."""
  return _random_run(tmp_path_factory.mktemp("wide"), CONFIG, seed=1, num_dev=6)


def _engine_outputs(root, mesh, index, texts):
  run = load_run(str(root / "run"), mesh=mesh)
  prompts = prompt_tokens(run, read_requests(str(root / "data" / "dev.jsonl")), 256)
  query = run.tokenizer.ids[run.task.query_token]
  config = GenerationConfig(max_new_tokens=12, batch_size=4, capacity=256, retrieve_k=3)
  engine = make_engine(run, index, texts, config)
  # A random model never emits [LK] by itself: each request starts with one (then decodes freely).
  return engine.generate(prompts, force=[[query]] * len(prompts)), engine


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (1, 1, 8)], ids=["1x2x4", "1x1x8"])
def test_a_tensor_sharded_engine_gives_the_unsharded_tokens_and_retrievals(wide_run, mesh_shape):
  root = wide_run
  vectors, uids, texts, _ = encode_db(load_run(str(root / "run")), str(root / "data" / "db.jsonl"),
                                      str(root / "vectors"))
  index = ExactIndex().build(np.asarray(vectors), uids)
  want, _ = _engine_outputs(root, None, index, texts)
  got, engine = _engine_outputs(root, sharding.make_mesh(*mesh_shape), index, texts)
  assert engine.mesh is not None
  for a, b in zip(got, want):
    assert a.tokens == b.tokens and [r.ids for r in a.retrievals] == [r.ids for r in b.retrievals]
    assert a.retrievals
    for x, y in zip(a.retrievals, b.retrievals):
      np.testing.assert_allclose(x.vector, y.vector, atol=1e-5)
