"""Orbax checkpoints: restore onto another mesh, incomplete saves ignored, params-only restore."""

import jax
import numpy as np
import pytest

from onegen_jax.checkpoint import Checkpointer, read_model_config


def _save(program, workdir, steps, batches, **kwargs):
  state = program.init_state(seed=0)
  ckpt = Checkpointer(str(workdir), every_steps=1, **kwargs)
  for step, batch in zip(steps, batches):
    state, _ = program.step(state, batch)
    ckpt.save(step, state, {"position": step}, {"note": "test"}, program.model.config)
  ckpt.wait()
  return ckpt, state


def test_restore_onto_another_mesh(program, batches, tmp_path):
  source = program(mesh=(2, 2, 2))
  ckpt, state = _save(source, tmp_path, [1, 2], batches)
  target = program(mesh=(8, 1, 1))
  restored, data_state = ckpt.restore(2, target.abstract_state)
  assert data_state == {"position": 2}
  assert int(restored.step) == 2
  for want, got in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(got), want)
  mlp = restored.params["layers"]["mlp"]["gate_proj"]["kernel"]
  assert mlp.sharding.mesh.shape == target.mesh.shape and mlp.sharding.spec == target.abstract_state.params[
      "layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec
  # The restored state trains on (same step function, new mesh).
  target.step(restored, batches[2])
  assert read_model_config(str(tmp_path)) == (source.model.config, 2)


def test_incomplete_save_is_ignored_and_old_steps_pruned(program, batches, tmp_path):
  prog = program()
  ckpt, _ = _save(prog, tmp_path, [1, 2, 3, 4], batches, keep=2)
  assert ckpt.all_steps() == [3, 4]
  # A save that crashed midway leaves only Orbax's temporary directory behind.
  (tmp_path / "5.orbax-checkpoint-tmp-1234").mkdir()
  (tmp_path / "5.orbax-checkpoint-tmp-1234" / "params").mkdir()
  assert Checkpointer(str(tmp_path)).latest_step() == 4


def test_parameters_restore_alone_as_saved(program, batches, tmp_path):
  prog = program()
  ckpt, state = _save(prog, tmp_path, [7], batches)
  params = ckpt.restore_params(7, prog.abstract_state.params)
  for want, got in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_a_relative_workdir_saves_under_the_current_directory(program, batches, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Orbax itself takes absolute paths only
  ckpt, _ = _save(program(), "runs/relative", [1], batches)
  assert Checkpointer("runs/relative").latest_step() == 1
  assert (tmp_path / "runs" / "relative" / "1").is_dir()


@pytest.mark.parametrize("mode,best", [("max", 2), ("min", 3)])
def test_keeps_the_latest_and_the_best(program, tmp_path, mode, best):
  prog = program()
  state = prog.init_state(seed=0)
  ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=1, best_metric="m", best_mode=mode)
  for step, value in zip([1, 2, 3, 4], [0.5, 0.9, 0.1, 0.3]):
    ckpt.save(step, state, None, {}, prog.model.config, metrics={"m": value})
  ckpt.wait()
  assert ckpt.all_steps() == sorted({best, 4})  # the best and the latest


def test_an_import_step_saves_parameters_config_and_model_only(program, tmp_path):
  """An import's step: params, config and model items only; the parameters restore as saved."""
  prog = program()
  params = prog.init_state(seed=0).params
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.save_params(0, params, {"hf": {"vocab_size": 7}}, prog.model.config)
  ckpt.wait()
  assert {p.name for p in (tmp_path / "0").iterdir() if p.is_dir()} == {"params", "config", "model"}
  assert ckpt.restore_json(0, "config") == {"hf": {"vocab_size": 7}}
  restored = ckpt.restore_params(0, prog.abstract_state.params)
  for want, got in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert read_model_config(str(tmp_path)) == (prog.model.config, 0)
