"""Two real processes (jax.distributed on localhost, gloo CPU collectives, 4 devices each) train,
checkpoint and resume, and match one process with 8 devices reading the same two data shards."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from processes import run_two_processes
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.data.generate import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def el_data(tmp_path_factory):
  out = tmp_path_factory.mktemp("el")
  make_dataset("el", str(out), seed=0, num_train=200, num_dev=16)
  return out


def _flags(data, workdir, steps):
  return ["--config=configs/el.py:demo", f"--workdir={workdir}", f"--config.train.steps={steps}",
          "--config.train.eval_every=0", "--config.checkpoint.every_steps=2",
          "--config.data.num_shards=2", "--config.data.generate=",
          f"--config.data.train_path={data}/train.jsonl", f"--config.data.db_path={data}/db.jsonl",
          f"--config.data.dev_path={data}/dev.jsonl", f"--config.data.tokenizer_path={data}/tokenizer"]


def _run_two_processes(data, workdir, steps):
  out = run_two_processes("launch.train", _flags(data, workdir, steps),
                          str(workdir.parent / workdir.name))
  return json.loads(out.strip().splitlines()[-1])


def _params(workdir, step, abstract):
  ckpt = Checkpointer(str(workdir))
  params = jax.device_get(ckpt.restore_params(step, abstract))
  ckpt.close()
  return jax.tree.leaves(params)


def test_two_processes_match_one(el_data, tmp_path, program):
  two = tmp_path / "two"
  first = _run_two_processes(el_data, two, steps=4)
  assert first["step"] == 4
  resumed = _run_two_processes(el_data, two, steps=6)  # resumes from step 4
  assert resumed["step"] == 6
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  one = subprocess.run([sys.executable, "-m", "launch.train", *_flags(el_data, tmp_path / "one", 6)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-4000:]
  abstract = program(mesh=(8, 1, 1)).abstract_state.params
  for a, b in zip(_params(two, 6, abstract), _params(tmp_path / "one", 6, abstract)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
