"""LoRA over a frozen base (model/lora.py, config.lora): the model at init, what a train step
changes, the optimizer state, the int8 base, the step under scan + remat with accumulation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import el
from conftest import BATCH_SHAPE, demo_config, synthetic_task
from onegen_jax.data.packing import pack_batches, stack_micro_batches
from onegen_jax.model import lora
from onegen_jax.model.config import LoraConfig, preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.model.ret_vectors import gather_vectors, l2_normalize
from onegen_jax.train import program as program_lib

TOKENS = tuple(range(2, 8))  # the synthetic task's special tokens (program.task_token_ids)


def _lora_program(accum_steps, loss):
  """The tiny model's LoRA train program on 8 devices (4 data x 2 tensor): scan + remat "full",
  rank 4, a float32 base."""
  config = demo_config(mesh=dict(data=4, fsdp=1, tensor=2), loss=loss,
                       batch=dict(accum_steps=accum_steps, rows=8 * accum_steps),
                       optim=dict(schedule="constant", lr=1e-2),
                       lora=dict(enabled=True, rank=4, base_dtype="float32"))
  assert config.model.scan_layers and config.model.remat_policy == "full"
  return program_lib.build_program(config, devices=jax.devices()[:8])


@functools.lru_cache(maxsize=None)
def _base_and_batch():
  """The tiny model's random base parameters and one packed batch of the synthetic task."""
  task = synthetic_task()
  batch = next(iter(pack_batches(task.train, task.corpus, BATCH_SHAPE)))
  model = Decoder(preset("tiny"))
  probe = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), probe, probe, probe)["params"])
  return params, batch


def _forward(config, params, batch):
  """(logits [B, S, V], RET vectors [Q, D]) of the batch."""
  logits, hidden = jax.jit(Decoder(config).apply)({"params": params}, batch["tokens"],
                                                  batch["segment_ids"], batch["positions"])
  return np.asarray(logits), np.asarray(l2_normalize(gather_vectors(hidden, batch["query_index"])))


def _lora_params(config, base):
  """A LoRA Decoder's tree for `config` with the weights of `base` (adapters at their init)."""
  probe = jnp.zeros((1, 8), jnp.int32)
  fresh = nn.unbox(Decoder(config).init(jax.random.key(1), probe, probe, probe)["params"])
  return lora.with_base(fresh, base)


@pytest.mark.parametrize("scan_layers,base_dtype", [(True, "float32"), (True, "bfloat16"),
                                                    (False, "float32")])
def test_at_init_the_lora_model_is_its_base_exactly(scan_layers, base_dtype):
  """B = 0: logits and RET vectors bitwise equal to the plain decoder's on the same base
  weights (the bfloat16 base against the plain decoder given the bfloat16-rounded weights).
  Unscanned layers under jit: XLA:CPU fuses the adapter's (zero) addend into the base dot there
  and the dot's rounding moves (measured: 2.1e-7 at most, 39% of the logits 1 ulp off; eagerly
  bitwise equal), so that case is held to 1e-6."""
  params, batch = _base_and_batch()
  plain = preset("tiny", scan_layers=scan_layers)
  if not scan_layers:  # the same weights, one tree per layer
    params = {**{k: v for k, v in params.items() if k != "layers"},
              **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(2)}}
  config = plain.replace(lora=LoraConfig(rank=4, base_dtype=base_dtype, token_ids=TOKENS))
  trainable, frozen = lora.split(_lora_params(config, params), config.lora)
  assert float(jnp.abs(trainable["layers" if scan_layers else "layers_0"]["self_attn"]["q_proj"]
                       ["lora_a"]).max()) > 0
  rounded = jax.tree.map(lambda x: x.astype(base_dtype).astype(np.float32), params)
  want = _forward(plain, rounded, batch)
  got = _forward(config, lora.merge(trainable, frozen, config.lora), batch)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=0, atol=0 if scan_layers else 1e-6)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree))


@pytest.mark.parametrize("loss", [dict(loss_type="bpr"),
                                  dict(loss_type="infonce", negatives_across_micro_batches=True)])
def test_a_step_changes_only_the_adapters_and_the_token_rows(loss):
  """Scan + remat "full", 2 micro-batches, adapter dropout 0.05, BPR and InfoNCE across
  micro-batches (two passes): every frozen leaf bitwise unchanged (in the frozen tree and in the
  merged model tree), every adapter changed; embed_tokens and lm_head change in the task tokens'
  rows only. The optimizer state (jax.eval_shape of the init) holds Adam moments of the
  trainable leaves only: 2 x their size, not a byte for the base. Two steps (the first moves
  only B: dL/dA is 0 while B is 0)."""
  prog = _lora_program(accum_steps=2, loss=loss)
  state = prog.init_state(seed=0)
  before, frozen_before = _flat(prog.model_params(state)), _flat(state.frozen)
  trainable_size = sum(x.size for x in jax.tree.leaves(state.params))
  moments = [x for x in jax.tree.leaves(prog.abstract_state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * trainable_size
  assert trainable_size < sum(x.size for x in jax.tree.leaves(state.frozen)) / 10
  task = synthetic_task()
  batch = stack_micro_batches(list(pack_batches(task.train, task.corpus, BATCH_SHAPE))[:2])
  for _ in range(2):
    state, metrics = prog.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  after, frozen_after = _flat(prog.model_params(state)), _flat(state.frozen)
  assert frozen_after.keys() == frozen_before.keys()
  for path, old in frozen_before.items():
    np.testing.assert_array_equal(frozen_after[path], old, err_msg=str(path))
  rows = np.isin(np.arange(before[("embed_tokens", "embedding")].shape[0]), TOKENS)
  for path, old in before.items():
    new = after[path]
    if path[-1] in lora.ADAPTERS:
      assert not np.array_equal(new, old), path
    elif path == ("embed_tokens", "embedding"):
      np.testing.assert_array_equal(new[~rows], old[~rows])
      assert (new[rows] != old[rows]).any(axis=1).all()
    elif path == ("lm_head", "kernel"):
      np.testing.assert_array_equal(new[:, ~rows], old[:, ~rows])
      assert (new[:, rows] != old[:, rows]).any(axis=0).all()
    else:
      np.testing.assert_array_equal(new, old, err_msg=str(path))


# Measured on the tiny random model (logits within +-0.75): logits 6.8e-3 apart at most, RET
# vectors' cosine 0.99996 at least; the bounds leave 3x and 10x room.
INT8_LOGITS_ATOL = 0.02
INT8_MIN_COSINE = 0.9995


def test_int8_base_forward_is_close_to_the_bfloat16_base():
  """The int8 weight-only base (per output channel) against the bfloat16 base of the same
  weights, both computing in float32: logits within INT8_LOGITS_ATOL, RET vectors' cosine
  above INT8_MIN_COSINE."""
  params, batch = _base_and_batch()
  outputs = {}
  for base_dtype in ("bfloat16", "int8"):
    config = preset("tiny").replace(lora=LoraConfig(rank=4, base_dtype=base_dtype))
    trainable, frozen = lora.split(_lora_params(config, params), config.lora)
    outputs[base_dtype] = _forward(config, lora.merge(trainable, frozen, config.lora), batch)
  (logits_bf16, ret_bf16), (logits_int8, ret_int8) = outputs["bfloat16"], outputs["int8"]
  np.testing.assert_allclose(logits_int8, logits_bf16, rtol=0, atol=INT8_LOGITS_ATOL)
  assert np.sum(ret_int8 * ret_bf16, axis=-1).min() > INT8_MIN_COSINE


def test_llama2_7b_lora_variant_state_shapes():
  """configs/el.py:llama2-7b-lora, abstractly (jax.eval_shape, nothing allocated): rank 16 on
  every projection is PEFT's 39,976,960 adapter parameters (+ 2 x 4096 per task token), Adam
  holds 2 floats per trainable parameter only, and the frozen base is 6.7e9 bfloat16 numbers."""
  config = el.get_config("llama2-7b-lora")
  config.data.kind = "synthetic"  # its 6 task tokens (the real run reads the tokenizer's)
  state = program_lib.build_program(config).abstract_state
  sizes = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  adapters = {p: x for p, x in traverse_util.flatten_dict(state.params).items() if p[0] == "layers"}
  assert sum(x.size for x in adapters.values()) == 39_976_960
  assert sizes(state.params) == 39_976_960 + 2 * len(TOKENS) * 4096
  assert sizes([x for x in jax.tree.leaves(state.opt_state) if x.ndim]) == 2 * sizes(state.params)
  assert {str(x.dtype) for x in jax.tree.leaves(state.frozen)} == {"bfloat16"}
  assert 6.7e9 < sizes(state.frozen) < 6.8e9
