"""Ahead-of-time compilation of the train step and of the device decode loop for TPU slices (libtpu,
no TPU attached)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import demo_config
from onegen_jax import sharding
from onegen_jax.inference.aot import abstract_rows, compile_decode_loop
from onegen_jax.inference.device_decode import loop_width, records_per_call
from onegen_jax.inference.device_loop import DeviceRetrieval
from onegen_jax.inference.engine import Engine, GenerationConfig, Request, TaskTokens
from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval import device_kb
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
  assert len(topology_devices("v5e-1")) == 1  # under one host's 2x2 chips
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


def test_decode_loop_compiles_for_v5p_8_with_its_kb():
  """The tiny model's device loop (EL) for v5p-8 (4 devices, fsdp 4) with a KB of 1001 keys (not
  a multiple of the devices): the KB's bytes per device are device_kb.footprint's."""
  report = compile_decode_loop(preset("tiny"), "v5p-8", mesh_shape=dict(data=1, fsdp=-1),
                               kb_keys=1001, kb_dtype="bfloat16", batch=8, capacity=256,
                               steps_per_dispatch=8, k=4)
  assert report.num_devices == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert (report.width, report.records) == (16, 4)  # W: EL's insertion width (one token) -> 16
  assert report.kb_bytes == device_kb.footprint(1001, 64, "bfloat16", 4).total == 251 * 64 * 2
  parts = report.params_bytes + report.kb_bytes + report.cache_bytes
  assert report.argument_bytes >= parts and report.alias_bytes == report.cache_bytes
  assert report.bytes_per_device >= parts + report.temp_bytes


def test_abstract_rows_are_the_engines():
  """abstract_rows' shapes and dtypes are those DeviceLoop builds for a call feeding a prompt
  of its width W (16: EL's insertion is one token; a longer prompt is the host step's)."""
  mesh = sharding.make_mesh(data=-1)
  uids = ["a", "b", "c"]
  config = GenerationConfig(batch_size=4, capacity=128, steps_per_dispatch=8,
                            max_retrievals=1 << 30)
  engine = Engine(Decoder(preset("tiny")), None, TaskTokens(5, 2, 6), None, None, config, "el",
                  mesh=mesh, device=DeviceRetrieval.place(np.zeros((3, 64)), uids, mesh))
  engine.submit(Request(list(range(10, 26))))
  engine._admit()  # pylint: disable=protected-access
  records = records_per_call(config)
  rows, window, _ = engine._device._rows(engine, records)  # pylint: disable=protected-access
  described = lambda tree: jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), tree)
  assert window == 128
  assert engine._device.feeds(engine)  # pylint: disable=protected-access
  assert described(rows) == described(abstract_rows(4, loop_width(1), records, mesh))


def test_a_kb_too_large_for_the_slice_fails_with_the_compilers_message():
  """1.7e9 float32 keys of the tiny model's 64 dimensions: 101 GiB per v5p-8 device (95 GiB of
  HBM each). The CLI prints the configuration with the compiler's message and exits 1."""
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.aot_decode_loop", "--config=configs/el.py:demo",
       "--topology=v5p-8", "--kb_keys=1700000000", "--kb_dtype=float32", "--batch=8",
       "--capacity=256", "--steps_per_dispatch=8", "--k=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 1, run.stderr[-2000:]
  line = json.loads(run.stdout.strip().splitlines()[-1])
  assert line["kb_keys"] == 1700000000 and line["error"].startswith("RESOURCE_EXHAUSTED")
