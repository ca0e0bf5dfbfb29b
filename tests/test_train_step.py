"""The train step's semantics: token roles, gradient accumulation, learning, the launcher."""

import json
import math
import os
import subprocess
import sys

import functools

import jax
import numpy as np

from onegen_jax import sharding
from onegen_jax.data.packing import BatchShape, pack_batches, stack_micro_batches
from onegen_jax.data.synthetic import CONTINUE, RET_QUERY
from onegen_jax.train.step import LossConfig, grads_and_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(prog, params, batch):
  m = jax.device_get(prog.evaluate(params, batch))
  return float(m["loss_gen"]), float(m["loss_ret"])


def test_token_roles(program, task, batches):
  prog = program()
  params = prog.init_state(seed=0).params
  batch = batches[0]
  row, col = batch["query_index"][0]
  # Labels: the RET token is a GEN target (predicted from the previous position); the token
  # right after it ([_CONTINUE_]) is not; user tokens (CTX) are not.
  assert batch["tokens"][row, col] == RET_QUERY and batch["targets"][row, col] == CONTINUE
  assert batch["loss_weight"][row, col - 1] == 1 and batch["loss_weight"][row, col] == 0
  user_len = int(np.argmax(task.train[0].is_target)) - 1  # example 0 sits at row 0, offset 0
  assert user_len > 1 and not batch["loss_weight"][0, :user_len].any()
  base = _losses(prog, params, batch)

  def changed(positions):
    b = {k: v.copy() for k, v in batch.items()}
    for r, c in positions:
      b["targets"][r, c] = (b["targets"][r, c] + 17) % 200 + 8
    return _losses(prog, params, b)

  after_ret = [tuple(q) for q, ok in zip(batch["query_index"], batch["query_valid"]) if ok]
  assert changed(after_ret) == base  # position of a RET token: contrastive loss only
  assert changed([(0, c) for c in range(user_len)]) == base  # CTX
  gen = tuple(np.argwhere(batch["loss_weight"] > 0)[3])
  assert changed([gen])[0] != base[0]  # GEN
  assert changed([gen])[1] == base[1]


def _merge(micro_batches):
  """M micro-batches -> one batch of all their rows (queries and keys re-indexed)."""
  rows = micro_batches[0]["tokens"].shape[0]
  num_keys = micro_batches[0]["key_valid"].shape[0]
  merged = {}
  for name in micro_batches[0]:
    parts = []
    for m, b in enumerate(micro_batches):
      x = b[name].copy()
      if name in ("query_index", "key_index"):
        x[:, 0] += m * rows
      elif name in ("positive", "negatives"):
        x = np.where(x >= 0, x + m * num_keys, x)
      elif name == "key_group":
        x = np.where(x >= 0, x + m * num_keys, x)
      parts.append(x)
    merged[name] = np.concatenate(parts)
  return merged


def test_gradient_accumulation_equals_one_large_batch(program, task):
  micro = list(pack_batches(task.train, task.corpus, BatchShape(4, 64, 16, 64, 3)))[:4]
  full = _merge(micro)
  assert full["tokens"].shape == (16, 64)
  one = program(mesh=(4, 1, 2), rows=16, lambda_ret=0.0)
  accumulated = program(mesh=(4, 1, 2), rows=16, accum_steps=4, lambda_ret=0.0)
  params = one.init_state(seed=0).params
  with sharding.activate(one.mesh):
    grads = {m: jax.jit(functools.partial(grads_and_sums, one.model, LossConfig(lambda_ret=0.0),
                                          accum_steps=m))
             for m in (1, 4)}
    g_one, s_one = grads[1](params, full)
    g_acc, s_acc = grads[4](params, stack_micro_batches(micro))
  assert float(s_acc.gen_count) == float(s_one.gen_count) == float(full["loss_weight"].sum())
  np.testing.assert_allclose(float(s_acc.gen_sum), float(s_one.gen_sum), rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_acc), jax.tree.leaves(g_one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))
  # The full train steps (AdamW) agree too.
  state_one, m_one = one.step(one.init_state(seed=0), full)
  state_acc, m_acc = accumulated.step(accumulated.init_state(seed=0), stack_micro_batches(micro))
  np.testing.assert_allclose(float(m_acc["loss_gen"]), float(m_one["loss_gen"]), rtol=1e-6)
  np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_one["grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state_acc.params)),
                  jax.tree.leaves(jax.device_get(state_one.params))):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


def test_tiny_model_learns_the_synthetic_task(trained_demo):
  _, final, _ = trained_demo
  uniform = math.log(512)
  assert final["eval_loss_gen"] < 0.3 * uniform
  assert final["eval_retrieval_accuracy"] >= 0.9
  assert final["eval_num_valid_queries"] >= 300


def _launch(*flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/el.py:demo", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_launcher_prints_final_metrics_as_json():
  run = _launch("--config.train.steps=3", "--config.train.log_every=1", "--config.mesh.fsdp=2")
  assert run.returncode == 0, run.stderr[-3000:]
  final = json.loads(run.stdout.strip().splitlines()[-1])
  assert final["step"] == 3 and np.isfinite(final["train_loss"])


def test_launcher_rejects_a_misspelled_key():
  run = _launch("--config.optim.lrr=1e-3")
  assert run.returncode != 0
  assert "lrr" in run.stderr
