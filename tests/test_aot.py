"""Ahead-of-time compilation of the train step for TPU slices (libtpu, no TPU attached)."""

import os
import subprocess
import sys

import pytest

from conftest import demo_config
from onegen_jax.train.aot import compile_train_step, topology_devices

pytestmark = pytest.mark.processes  # run by .ci/run, not by make test (see pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_config_compiles_for_v5p_8():
  report = compile_train_step(demo_config(mesh=dict(data=-1, fsdp=1)), "v5p-8")
  assert report.num_devices == 4 and report.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report.argument_bytes > 0 and report.bytes_per_device >= report.argument_bytes
  assert report.model_flops_per_device > 0 and report.compiler_flops_per_device > 0


def test_splash_needs_no_score_temporaries():
  """The tiny step at S = 2048 for v5p-8 (4 devices, one row each, 4 heads). XLA attention holds
  [rows, heads, S, S] float32 scores (64 MiB per device) among its temporaries; auto, which must
  pick splash for a TPU slice even on this CPU machine, holds none. Measured: temporaries 140.7
  MiB (xla) vs 26.9 MiB (auto = splash)."""
  reports = {impl: compile_train_step(demo_config(
      mesh=dict(data=-1, fsdp=1), batch=dict(rows=4, seq_len=2048),
      model=dict(attention_impl=impl)), "v5p-8") for impl in ("xla", "auto")}
  scores = 1 * 4 * 2048 * 2048 * 4
  assert reports["xla"].temp_bytes - reports["auto"].temp_bytes >= scores


def test_named_slices_have_their_chip_counts():
  assert len(topology_devices("v5p-64")) == 32  # v5p names count TensorCores, 2 per chip
  assert len(topology_devices("v5e-256")) == 256
  with pytest.raises(ValueError, match="unknown TPU topology 'v9-8'"):
    topology_devices("v9-8")


def test_a_config_that_does_not_fit_fails_with_the_compilers_message():
  # XLA attention: its [B, H, S, S] scores do not fit at S = 32768 (splash, auto's choice on
  # TPU, fits: it never builds them).
  run = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/el.py:demo", "--compile_only",
       "--topology=v5e-4", "--config.batch.rows=4", "--config.batch.seq_len=32768",
       "--config.mesh.data=4", "--config.model.attention_impl=xla"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 1
  assert "does not fit on v5e-4: RESOURCE_EXHAUSTED" in run.stderr
