"""Two real processes (jax.distributed on localhost, gloo CPU collectives, 4 devices each) train,
checkpoint and resume, and match one process with 8 devices (the test's own) reading the same two
data shards."""

import json

import jax
import numpy as np
import pytest

from conftest import el_demo, el_demo_flags
from processes import run_two_processes
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.data.generate import make_dataset
from onegen_jax.train.loop import fit


@pytest.fixture(scope="module")
def el_data(tmp_path_factory):
  out = tmp_path_factory.mktemp("el")
  make_dataset("el", str(out), seed=0, num_train=200, num_dev=16)
  return out


def _overrides(data, steps) -> dict:
  """The el.py demo config's overrides of both runs: two data shards, a checkpoint every 2 steps."""
  return {"train.steps": steps, "train.eval_every": 0, "checkpoint.every_steps": 2,
          "data.num_shards": 2, "data.generate": "", "data.train_path": f"{data}/train.jsonl",
          "data.db_path": f"{data}/db.jsonl", "data.dev_path": f"{data}/dev.jsonl",
          "data.tokenizer_path": f"{data}/tokenizer"}


def _run_two_processes(data, workdir, steps):
  out = run_two_processes("launch.train", [*el_demo_flags(_overrides(data, steps)),
                                           f"--workdir={workdir}"],
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
  fit(el_demo(_overrides(el_data, steps=6)), str(tmp_path / "one"))  # this process: 8 devices
  abstract = program(mesh=(8, 1, 1)).abstract_state.params
  for a, b in zip(_params(two, 6, abstract), _params(tmp_path / "one", 6, abstract)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
