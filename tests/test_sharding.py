"""The sharded train step: same numbers on any mesh, parameters sharded as the rule table says."""

import re

import jax
import numpy as np
import pytest

from onegen_jax import sharding


def run_steps(program, batches, steps=3):
  state = program.init_state(seed=0)
  for batch in batches[:steps]:
    state, metrics = program.step(state, batch)
    jax.block_until_ready(metrics)
  return jax.device_get(state.params), metrics


# (mesh, loss type, parameter tolerance (relative, absolute), loss rtol). InfoNCE divides cosine
# scores by its temperature 0.02, and Adam's first updates turn the reduction-order noise of
# near-zero gradients into parameter differences: measured on (2, 4, 1) after 3 steps, relative
# 3.9e-5, absolute 9.0e-5 (lr 1e-3), loss 2.2e-5 (the gradients themselves agree to 3e-7).
# BPR measures 3.4e-6 / 7.2e-6 / 1.5e-7.
@pytest.mark.parametrize("mesh, loss_type, param_tol, loss_rtol", [
    ((2, 2, 2), "bpr", (1e-5, 2e-5), 1e-5),
    ((2, 4, 1), "bpr", (1e-5, 2e-5), 1e-5),
    # One row per device: each query's in-batch keys come from all 8 devices.
    ((2, 4, 1), "infonce", (1e-4, 2e-4), 1e-4),
], ids=["2x2x2-bpr", "2x4x1-bpr", "2x4x1-infonce"])
def test_three_steps_match_a_single_device(program, batches, mesh, loss_type, param_tol, loss_rtol):
  reference, ref_metrics = run_steps(program(mesh=(1, 1, 1), loss_type=loss_type), batches)
  sharded, metrics = run_steps(program(mesh=mesh, loss_type=loss_type), batches)
  assert float(ref_metrics["num_valid_queries"]) > 0  # the retrieval loss took part
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(sharded)):
    # Relative error of each tensor (Frobenius norm). Element-wise, Adam turns reduction-order
    # noise in near-zero gradients into update differences of a small fraction of lr (1e-3).
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert relative < param_tol[0], jax.tree_util.keystr(path)
    np.testing.assert_allclose(got, want, rtol=0, atol=param_tol[1],
                               err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=loss_rtol)
  np.testing.assert_allclose(float(metrics["loss_ret"]), float(ref_metrics["loss_ret"]),
                             rtol=loss_rtol)


def test_parameters_are_sharded_by_the_rule_table(program):
  prog = program(mesh=(2, 2, 2))
  state = prog.init_state(seed=0)
  rules = dict(sharding.LOGICAL_RULES)
  expected = {
      "embed_tokens/embedding": ("vocab", "embed"),
      "layers/self_attn/q_proj/kernel": ("layers", "embed", "heads"),
      "layers/self_attn/k_proj/kernel": ("layers", "embed", "kv"),
      "layers/self_attn/o_proj/kernel": ("layers", "heads", "embed"),
      "layers/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
      "layers/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
      "layers/input_layernorm/scale": ("layers", "norm"),
      "lm_head/kernel": ("embed", "vocab"),
      "norm/scale": ("norm",),
  }
  params = {"/".join(k.key for k in path): x
            for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
  for name, logical in expected.items():
    spec = tuple(params[name].sharding.spec) + (None,) * (len(logical) - len(params[name].sharding.spec))
    assert spec == tuple(rules[n] for n in logical), name
  # Adam moments are sharded like their parameters.
  mu = state.opt_state[1][0].mu
  assert mu["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == params[
      "layers/mlp/gate_proj/kernel"].sharding.spec
  emb = params["embed_tokens/embedding"]
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)


def test_compiled_step_never_holds_the_whole_largest_weight(program, batches):
  prog = program(mesh=(2, 2, 2))
  state = prog.init_state(seed=0)
  largest = max(jax.tree.leaves(state.params), key=lambda x: x.size)
  with sharding.activate(prog.mesh):
    hlo = prog.train_step.lower(state, batches[0]).compile().as_text()
  full = ",".join(map(str, largest.shape))
  # Per-device HLO after SPMD partitioning: no value (f32 or bf16) of the full weight's shape.
  assert not re.search(rf"\[{full}\]", hlo), f"a full [{full}] buffer appears in the compiled step"
  assert re.search(rf"\[{largest.shape[0] // 2},{largest.shape[1] // 2}\]", hlo)
