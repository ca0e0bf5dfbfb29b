"""Attention kernels: Pallas splash attention (interpret mode on CPU) equals the XLA path on
packed rows with padding, forward and gradients, on the 8-device mesh with the production layout
(rows over ('data', 'fsdp'), heads over 'tensor'); a whole train step with either kernel; the
sharded init equals the unsharded one (partitionable threefry)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_config, synthetic_task
from onegen_jax import sharding
from onegen_jax.data.packing import BatchShape, pack_batches
from onegen_jax.model import splash
from onegen_jax.model.attention import packed_causal_mask, resolve_impl
from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.train import program as program_lib


def _packed_segments(rows: int, seq_len: int, rng) -> np.ndarray:
  """int32 [rows, seq_len]: 2 or 3 segments per row, each of a different length, then padding."""
  segment_ids = np.zeros((rows, seq_len), np.int32)
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(20, seq_len - 20), size=2 + r % 2, replace=False))
    for i, (a, b) in enumerate(zip([0, *cuts[:-1]], cuts)):
      segment_ids[r, a:b] = i + 1  # the last cut starts the padding (segment 0)
  return segment_ids


def test_block_sizes_follow_the_sequence_length():
  assert [splash.padded_length(s) for s in (64, 128, 300, 2048)] == [128, 128, 384, 2048]
  assert [splash.block_size(s) for s in (128, 256, 384, 1024, 1408, 8192)] == [
      128, 256, 128, 512, 128, 512]


def test_auto_picks_the_kernel_of_the_platform():
  assert resolve_impl("auto", "bfloat16", "tpu") == "splash"
  assert resolve_impl("auto", "bfloat16", "gpu") == "cudnn"
  assert resolve_impl("auto", "float32", "gpu") == "xla"  # cuDNN has no float32 attention
  assert resolve_impl("auto", "float32", "cpu") == "xla"
  assert resolve_impl("splash", "float32", "cpu") == "splash"
  # Over a KV cache (decode, extend): XLA unless cuDNN was asked for.
  assert resolve_impl("auto", "bfloat16", "tpu", cached=True) == "xla"
  assert resolve_impl("splash", "bfloat16", "tpu", cached=True) == "xla"
  assert resolve_impl("cudnn", "bfloat16", "gpu", cached=True) == "cudnn"
  with pytest.raises(ValueError, match="attention_impl"):
    preset("tiny", attention_impl="flash")


# (data, fsdp, tensor): the 4 q heads and 2 kv heads of the tiny model split over tensor = 2;
# with tensor = 4 the kv heads do not split and are repeated to the q heads inside.
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_splash_equals_xla_on_packed_rows(mesh_shape):
  """float32, 4 rows of 300 tokens (padded to 384: 3 blocks of 128), GQA 4/2 heads, 2-3
  segments and padding per row: outputs and the gradients of q, k, v agree to 1e-5."""
  rows, seq_len, heads, kv_heads, head_dim = 4, 300, 4, 2, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(rows, seq_len, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(rows, seq_len, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  segment_ids = jnp.asarray(_packed_segments(rows, seq_len, rng))
  mesh = sharding.make_mesh(*mesh_shape)
  rows_and_heads, rows_only = (nn.logical_to_mesh_sharding(
      jax.sharding.PartitionSpec(*names), mesh, sharding.LOGICAL_RULES)
      for names in (("batch", "length", "act_heads", None), ("batch",)))
  q = jax.device_put(q, rows_and_heads)
  k, v = (jax.device_put(x, rows_only) for x in (k, v))

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=packed_causal_mask(segment_ids))

  def kernel(q, k, v):
    return splash.splash_attention(q, k, v, segment_ids)

  def loss(attend, q, k, v):  # a weighting that reaches every output element differently
    return jnp.sum(jnp.sin(attend(q, k, v)) * jnp.arange(head_dim))

  with sharding.activate(mesh):
    want, got = jax.jit(xla)(q, k, v), jax.jit(kernel)(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    grads = [jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2)))(q, k, v)
             for f in (xla, kernel)]
  for name, want, got in zip("qkv", *grads):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


def test_splash_without_a_mesh_equals_xla():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 130, 2, 8)), jnp.float32) for _ in range(3))
  segment_ids = jnp.asarray(_packed_segments(1, 130, rng))
  want = jax.nn.dot_product_attention(q, k, v, mask=packed_causal_mask(segment_ids))
  np.testing.assert_allclose(splash.splash_attention(q, k, v, segment_ids), want, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _programs_and_batch():
  """The tiny model's train programs with splash and with XLA on the (2, 2, 2) mesh, rows of 256
  tokens (two 128-token blocks per kernel), and one packed batch of the synthetic task."""
  shape = BatchShape(rows=8, seq_len=256, num_queries=16, num_keys=64, num_negatives=3)
  task = synthetic_task()
  batch = next(iter(pack_batches(task.train, task.corpus, shape)))
  programs = {}
  for impl in ("splash", "xla"):
    config = demo_config(mesh=dict(data=2, fsdp=2, tensor=2), batch=dict(seq_len=shape.seq_len),
                         optim=dict(schedule="constant", lr=1e-3),
                         model=dict(dtype="float32", attention_impl=impl))
    programs[impl] = program_lib.build_program(config, devices=jax.devices()[:8])
  return programs, batch


def test_train_step_with_splash_equals_the_xla_step(monkeypatch):
  monkeypatch.setattr(splash, "BLOCKS", (128,))  # 256 tokens: two blocks, not one
  programs, batch = _programs_and_batch()
  segments = batch["segment_ids"].max(axis=1)  # rows of many segments, rows of padding only
  assert segments.max() >= 2 and (segments == 0).any()
  results = {}
  for impl, prog in programs.items():
    state, metrics = prog.step(prog.init_state(seed=0), batch)
    results[impl] = jax.device_get((state.params, metrics))
  (params, metrics), (want_params, want) = results["splash"], results["xla"]
  for name in ("loss", "loss_gen", "loss_ret", "grad_norm"):
    np.testing.assert_allclose(metrics[name], want[name], rtol=1e-5, err_msg=name)
  # Adam's first update is about lr * sign(g): a gradient near 0 magnifies float32 rounding, so
  # parameters agree to 2e-5 of the lr 1e-3 step (measured max 2.1e-6).
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_sharded_init_equals_the_unsharded_init():
  """Partitionable threefry: the state created sharded on (2, 2, 2) holds the values of the same
  init run on one device."""
  assert jax.config.jax_threefry_partitionable
  prog = program_lib.build_program(demo_config(mesh=dict(data=2, fsdp=2, tensor=2)),
                                   devices=jax.devices()[:8])
  sharded = prog.init_state(seed=0).params
  probe = jnp.zeros((1, 8), jnp.int32)
  model = Decoder(prog.model.config)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, probe, probe + 1, jnp.arange(8)[None])))
  unsharded = init(jax.random.key(0))["params"]
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded))
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(sharded),
                               jax.tree.leaves(unsharded)):
    np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want),
                                  err_msg=jax.tree_util.keystr(path))
