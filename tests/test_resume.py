"""Fault tolerance of the training launcher: SIGKILL + restart, SIGTERM, NaN, incomplete saves."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import demo_config, el_demo, el_demo_flags
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.model.decoder import Decoder
from onegen_jax.train.data import SyntheticData
from onegen_jax.train.loop import fit
from onegen_jax.train.program import batch_shape, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
# The el.py demo run of the SIGKILL and SIGTERM tests: a checkpoint every 10 steps.
RUN = {"train.steps": STEPS, "checkpoint.every_steps": 10, "train.eval_every": 0}


def _launch(workdir, *flags, wait=True):
  cmd = [sys.executable, "-m", "launch.train", *el_demo_flags(RUN), f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if wait:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])
  return proc


def _wait_for_checkpoint(workdir, proc, min_step):
  while True:
    steps = [int(p) for p in os.listdir(workdir) if p.isdigit()] if os.path.isdir(workdir) else []
    if steps and max(steps) >= min_step:
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.02)


def _params(workdir, step):
  ckpt = Checkpointer(str(workdir))
  params = jax.device_get(ckpt.restore_params(step))
  ckpt.close()
  return jax.tree.leaves(params)


def _save_base(workdir) -> int:
  """A base checkpoint at step 0 of the el.py demo model (seeded apart from the runs) in
  `workdir`; returns its parameter count."""
  config = model_config(el_demo(RUN).model)
  model = Decoder(config)
  probe = np.zeros((1, 8), np.int32)
  params = nn.unbox(model.init(jax.random.key(7), probe, probe, probe)["params"])
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save_params(0, params, {}, config)
  ckpt.close()
  return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_then_restart_reaches_the_same_parameters(tmp_path, lora):
  """Full fine-tuning, and LoRA (adapters and task-token rows over an int8 base from
  model.init_from, adapter dropout): the restarted run's parameters equal the straight run's
  bitwise. A LoRA run's checkpoints hold the trainable tree only and name their base."""
  overrides = dict(RUN)
  if lora:
    base_size = _save_base(tmp_path / "base")
    overrides.update({"lora.enabled": True, "lora.base_dtype": "int8",
                      "model.init_from": str(tmp_path / "base")})
  fit(el_demo(overrides), str(tmp_path / "straight"))  # as launch.train runs it
  killed = tmp_path / "killed"
  flags = [f"--config.{k}={v}" for k, v in overrides.items() if k not in RUN]
  proc = _launch(killed, *flags, wait=False)
  _wait_for_checkpoint(killed, proc, 10)
  proc.kill()  # SIGKILL: no handler runs
  proc.wait()
  assert max(int(p) for p in os.listdir(killed) if p.isdigit()) < STEPS
  final = _launch(killed, *flags)
  assert final["step"] == STEPS
  straight, resumed = _params(tmp_path / "straight", STEPS), _params(killed, STEPS)
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)  # bitwise, data order included
  if lora:
    saved = Checkpointer(str(killed))
    assert saved.restore_json(STEPS, "config")["lora"]["base"] == {
        "workdir": str(tmp_path / "base"), "step": 0}
    assert saved.restore_json(STEPS, "model")["lora"]["base_dtype"] == "int8"
    saved.close()
    # the adapters and the task tokens' rows: 37,760 values against the base's 158,016
    assert sum(x.size for x in straight) < base_size / 4


@pytest.mark.processes
def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path):
  proc = _launch(tmp_path, "--config.train.steps=100000", wait=False)
  _wait_for_checkpoint(tmp_path, proc, 20)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  stopped = json.loads(out.strip().splitlines()[-1])["preempted_at_step"]
  assert Checkpointer(str(tmp_path)).latest_step() == stopped >= 20
  resumed = _launch(tmp_path, f"--config.train.steps={stopped + 5}")
  assert resumed["step"] == stopped + 5


class _NaNAt(SyntheticData):
  """The synthetic data with a NaN loss weight in the batch of one step."""

  def __init__(self, config, nan_step):
    super().__init__(config, batch_shape(config))
    self.nan_step, self.served = nan_step, 0

  def __next__(self):
    batch = dict(super().__next__())
    self.served += 1
    if self.served == self.nan_step:
      batch["loss_weight"] = batch["loss_weight"] * np.nan
    return batch


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  config = demo_config(train=dict(steps=20, eval_every=0), checkpoint=dict(every_steps=2))
  with pytest.raises(FloatingPointError, match="step 7: loss is nan"):
    fit(config, str(tmp_path), data=_NaNAt(config, nan_step=7))
  assert Checkpointer(str(tmp_path)).latest_step() == 6
  assert all(np.all(np.isfinite(x)) for x in _params(tmp_path, 6))


def test_nan_skip_policy_drops_the_step(tmp_path):
  config = demo_config(train=dict(steps=8, eval_every=0, log_every=1, nan_policy="skip"),
                       checkpoint=dict(every_steps=100))
  state, _ = fit(config, str(tmp_path), data=_NaNAt(config, nan_step=3))
  assert int(state.step) == 8
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  skipped = {line["step"]: line["skipped"] for line in lines if line["split"] == "train"}
  assert skipped == {s: float(s == 3) for s in range(1, 9)}
  assert any(line["split"] == "eval" for line in lines)
  assert os.listdir(tmp_path / "tensorboard")

