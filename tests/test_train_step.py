"""The train step's semantics: token roles, accumulation, chunked L_gen, dtypes, the launcher."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import el_demo_flags
from onegen_jax import losses, sharding
from onegen_jax.data.packing import (BatchShape, merge_micro_batches, pack_batches,
                                     stack_micro_batches)
from onegen_jax.data.synthetic import CONTINUE, RET_QUERY
from onegen_jax.train.step import LossConfig, grads_and_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(prog, params, batch):
  m = jax.device_get(prog.evaluate(params, batch))
  return float(m["loss_gen"]), float(m["loss_ret"])


def test_each_token_role_reaches_only_its_own_loss(program, task, batches):
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


def _micro_batches(task):
  """Four packed micro-batches of 4 rows (each a quarter of a 16-row batch)."""
  micro = list(pack_batches(task.train, task.corpus, BatchShape(4, 64, 16, 64, 3)))[:4]
  assert len(micro) == 4
  return micro


# Float32 reassociation: accumulating over micro-batches sums each gradient element's token
# contributions in another order than the merged batch does, and XLA's CPU reductions order
# them differently per CPU. Each such sum of n terms moves by up to ~n * eps * sum|terms|;
# where terms cancel, that is large against the element itself (one embed_tokens element of
# 32,768 differed by 2.5e-5 relative on one CPU). So an element may differ by SUM_ATOL times
# its leaf's largest gradient, 2^8 float32 epsilons (3.1e-5). A real accumulation fault moves
# elements by percents of that (measured on embed_tokens, deliberately broken: the last of four
# micro-batches' gradient dropped, 0.51 of the leaf's largest gradient, 17% of its elements
# failing; each micro-batch normalised by its own token and query counts, 0.073, 28% failing).
SUM_RTOL = 1e-5
SUM_ATOL = 2.0 ** 8 * float(np.finfo(np.float32).eps)


def assert_equal_up_to_summation_order(got, want, what: str):
  """Every element within SUM_RTOL of `want` plus SUM_ATOL times want's largest magnitude."""
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=SUM_RTOL, atol=SUM_ATOL * scale, err_msg=what)


def test_gradient_accumulation_equals_one_large_batch(program, task):
  """L_gen + BPR (lambda_ret=1): each query's positive and negatives are keys of its own
  micro-batch, so the accumulated loss and gradient equal those of the merged batch exactly up
  to float32 summation order (measured on one CPU: L_ret 7e-8, gradients 3.6e-7, parameters
  after the AdamW step 1.7e-6, relative; on another, one gradient element 2.5e-5)."""
  micro = _micro_batches(task)
  full = merge_micro_batches(stack_micro_batches(micro))
  assert full["tokens"].shape == (16, 64)
  one = program(mesh=(4, 1, 2), rows=16)
  accumulated = program(mesh=(4, 1, 2), rows=16, accum_steps=4)
  params = one.init_state(seed=0).params
  with sharding.activate(one.mesh):
    grads = {m: jax.jit(functools.partial(grads_and_sums, one.model, LossConfig(lambda_ret=1.0),
                                          accum_steps=m))
             for m in (1, 4)}
    g_one, s_one = grads[1](params, full)
    g_acc, s_acc = grads[4](params, stack_micro_batches(micro))
  assert float(s_acc.gen_count) == float(s_one.gen_count) == float(full["loss_weight"].sum())
  np.testing.assert_allclose(float(s_acc.gen_sum), float(s_one.gen_sum), rtol=SUM_RTOL)
  assert float(s_acc.ret_count) == float(s_one.ret_count) > 0
  np.testing.assert_allclose(float(s_acc.ret_sum), float(s_one.ret_sum), rtol=SUM_RTOL)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_acc), jax.tree.leaves(g_one)):
    assert_equal_up_to_summation_order(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))
  # The full train steps (AdamW) agree too.
  state_one, m_one = one.step(one.init_state(seed=0), full)
  state_acc, m_acc = accumulated.step(accumulated.init_state(seed=0), stack_micro_batches(micro))
  for name in ("loss_gen", "loss_ret", "grad_norm"):
    np.testing.assert_allclose(float(m_acc[name]), float(m_one[name]), rtol=SUM_RTOL, err_msg=name)
  for a, b in zip(jax.tree.leaves(jax.device_get(state_acc.params)),
                  jax.tree.leaves(jax.device_get(state_one.params))):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


def test_accumulated_infonce_sums_each_micro_batch_on_its_own(program, task):
  """L_gen + InfoNCE with accumulation: in-batch negatives span one micro-batch, so the
  accumulated batch is not one large batch. What holds exactly (grads_and_sums, losses.combine):
  every micro-batch's loss is normalised by the whole batch's totals G (GEN targets) and R (valid
  queries), so with each micro-batch m evaluated alone (its own L_gen_m, L_ret_m over its own
  counts G_m, R_m):
    L = sum_m (G_m / G) L_gen_m + sum_m (R_m / R) L_ret_m   and   grad L = sum_m grad of that term.
  Measured: losses within 8e-8, gradients bitwise equal; scaling one weight by 1.001 fails it.
  """
  micro = _micro_batches(task)
  prog = program(mesh=(4, 1, 2), rows=16)
  params = prog.init_state(seed=0).params
  counts = [tuple(map(float, losses.batch_totals(b))) for b in micro]  # (G_m, R_m)
  gen_total, ret_total = map(sum, zip(*counts))
  assert all(r > 0 for _, r in counts)  # every micro-batch has its own L_ret

  def alone(p, batch, gen_weight, ret_weight):
    """grads_and_sums of one micro-batch on its own, its L_gen and L_ret scaled by the weights."""
    cfg = LossConfig(loss_type="infonce", lambda_gen=gen_weight, lambda_ret=ret_weight)
    return grads_and_sums(prog.model, cfg, p, batch, accum_steps=1)

  with sharding.activate(prog.mesh):
    g_acc, s_acc = jax.jit(functools.partial(
        grads_and_sums, prog.model, LossConfig(loss_type="infonce"), accum_steps=4))(
            params, stack_micro_batches(micro))
    parts = [jax.jit(alone)(params, b, g / gen_total, r / ret_total)
             for b, (g, r) in zip(micro, counts)]
  sums = [s for _, s in parts]
  assert [(float(s.gen_count), float(s.ret_count)) for s in sums] == counts
  loss_gen = sum(g * float(s.gen_sum / s.gen_count) for (g, _), s in zip(counts, sums)) / gen_total
  loss_ret = sum(r * float(s.ret_sum / s.ret_count) for (_, r), s in zip(counts, sums)) / ret_total
  metrics = jax.device_get(losses.metrics(s_acc))
  np.testing.assert_allclose(float(metrics["loss_gen"]), loss_gen, rtol=SUM_RTOL)
  np.testing.assert_allclose(float(metrics["loss_ret"]), loss_ret, rtol=SUM_RTOL)
  leaves = [jax.tree.leaves(g) for g, _ in parts]
  for (path, a), *per_micro in zip(jax.tree_util.tree_leaves_with_path(g_acc), *leaves):
    assert_equal_up_to_summation_order(np.asarray(a), np.asarray(sum(per_micro)),
                                       jax.tree_util.keystr(path))


@pytest.mark.parametrize("num_micro", [2, 4])
def test_infonce_across_micro_batches_equals_one_large_batch(program, task, num_micro):
  """loss.negatives_across_micro_batches: the two-pass step scores every query against the keys
  of all micro-batches, so its InfoNCE loss and gradients equal the merged batch's up to float32
  summation order; the plain accumulated step (negatives within a micro-batch) does not."""
  micro = _micro_batches(task)[:num_micro]
  prog = program(mesh=(4, 1, 2), rows=4 * num_micro)
  params = prog.init_state(seed=0).params
  infonce = LossConfig(loss_type="infonce")
  across = LossConfig(loss_type="infonce", negatives_across_micro_batches=True)
  step = lambda cfg, m: jax.jit(functools.partial(grads_and_sums, prog.model, cfg, accum_steps=m))
  with sharding.activate(prog.mesh):
    g_one, s_one = step(infonce, 1)(params, merge_micro_batches(stack_micro_batches(micro)))
    g_two, s_two = step(across, num_micro)(params, stack_micro_batches(micro))
    _, s_within = step(infonce, num_micro)(params, stack_micro_batches(micro))
  assert float(s_two.ret_count) == float(s_one.ret_count) > 0
  for name in ("gen_sum", "ret_sum", "ret_correct"):
    np.testing.assert_allclose(float(getattr(s_two, name)), float(getattr(s_one, name)),
                               rtol=SUM_RTOL, err_msg=name)
  assert abs(float(s_within.ret_sum) - float(s_one.ret_sum)) > 1e-3 * float(s_one.ret_sum)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_two), jax.tree.leaves(g_one)):
    assert_equal_up_to_summation_order(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="needs loss_type='infonce'"):
    jax.eval_shape(functools.partial(grads_and_sums, prog.model,
                                     LossConfig(negatives_across_micro_batches=True),
                                     accum_steps=num_micro), params, stack_micro_batches(micro))


def test_bfloat16_compute_matches_float32(program, batches):
  """model.dtype="bfloat16" (activations and matmuls; float32 master weights, norms and losses):
  the same parameters and batches give L_gen and L_ret within 1e-3 of float32, and a bfloat16
  train step is finite, with the float32 step's gradient norm.

  Measured on 4 batches: |difference| at most 1.1e-4 (L_gen ~6.2) and 3.8e-5 (L_ret ~0.7);
  computing the cross-entropy in bfloat16 instead of float32 moves L_gen by ~3.5e-3.
  """
  f32, bf16 = program(), program(dtype="bfloat16")
  params = f32.init_state(seed=0).params
  batch = batches[0]
  for prog, dtype in ((f32, "float32"), (bf16, "bfloat16")):
    logits, hidden = jax.eval_shape(functools.partial(prog.model.apply, {"params": params}),
                                    batch["tokens"], batch["segment_ids"], batch["positions"])
    assert logits.dtype == hidden.dtype == dtype
  for b in batches[:4]:
    want, got = _losses(f32, params, b), _losses(bf16, params, b)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
  state, metrics = bf16.step(bf16.init_state(seed=0), batches[0])
  _, want = f32.step(f32.init_state(seed=0), batches[0])
  metrics, want = jax.device_get(metrics), jax.device_get(want)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  np.testing.assert_allclose(metrics["grad_norm"], want["grad_norm"], rtol=1e-2)  # measured 4.0e-4
  for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                              jax.tree.leaves(jax.device_get(params))):
    assert new.dtype == np.float32 and np.isfinite(new).all(), jax.tree_util.keystr(path)
    assert not np.array_equal(new, old), jax.tree_util.keystr(path)


def _launch(*flags):
  return subprocess.run([sys.executable, "-m", "launch.train", *el_demo_flags({}), *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.processes
def test_launcher_prints_final_metrics_as_json():
  run = _launch("--config.train.steps=3", "--config.train.log_every=1", "--config.mesh.fsdp=2")
  assert run.returncode == 0, run.stderr[-3000:]
  final = json.loads(run.stdout.strip().splitlines()[-1])
  assert final["step"] == 3 and np.isfinite(final["train_loss"])


def test_launcher_rejects_a_misspelled_key():
  run = _launch("--config.optim.lrr=1e-3")
  assert run.returncode != 0
  assert "lrr" in run.stderr


def test_chunked_gen_loss_equals_the_plain_one(program, batches):
  """loss.gen_chunks = 4 (L_gen over 4 sequence chunks of 16 tokens, one chunk's logits at a
  time): the loss sums and every gradient equal the plain [B, S, V] computation on the (4, 1, 2)
  mesh (vocab over 'tensor')."""
  prog = program(mesh=(4, 1, 2))
  params = prog.init_state(seed=0).params
  batch = batches[0]
  with sharding.activate(prog.mesh):
    results = [jax.jit(functools.partial(grads_and_sums, prog.model, LossConfig(gen_chunks=c),
                                         accum_steps=1))(params, batch) for c in (1, 4)]
  (g_plain, s_plain), (g_chunked, s_chunked) = jax.device_get(results)
  assert s_chunked.gen_count == s_plain.gen_count > 0
  for name in ("gen_sum", "ret_sum"):
    np.testing.assert_allclose(getattr(s_chunked, name), getattr(s_plain, name), rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_chunked), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="gen_chunks=5 does not divide"):
    jax.eval_shape(functools.partial(grads_and_sums, prog.model, LossConfig(gen_chunks=5),
                                     accum_steps=1), params, batch)
