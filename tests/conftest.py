"""Test setup: an emulated 8-device CPU mesh and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the tpu extra) is installed for AOT only
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 " +
                           os.environ.get("XLA_FLAGS", "")).strip()

import functools  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_TEST_CACHE", os.path.expanduser("~/.cache/onegen-jax-tests")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from configs import el  # noqa: E402
from onegen_jax.data import synthetic  # noqa: E402
from onegen_jax.data.packing import BatchShape, pack_batches  # noqa: E402
from onegen_jax.train import loop, program as program_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SHAPE = BatchShape(rows=8, seq_len=64, num_queries=16, num_keys=64, num_negatives=3)


def demo_config(**sections):
  """The el.py demo config on the synthetic task (BATCH_SHAPE), with `sections` =
  {"mesh": {...}, "loss": {...}, ...} overridden."""
  config = el.get_config("demo")
  config.data.update(kind="synthetic", num_train=4000, num_heldout=256)
  config.checkpoint.update(best_metric="retrieval_accuracy")  # the synthetic task has no db
  config.batch.update(rows=BATCH_SHAPE.rows, seq_len=BATCH_SHAPE.seq_len,
                      num_queries=BATCH_SHAPE.num_queries, num_keys=BATCH_SHAPE.num_keys,
                      num_negatives=BATCH_SHAPE.num_negatives)
  for section, values in sections.items():
    config[section].update(values)
  return config


@functools.lru_cache(maxsize=None)
def _program(mesh=(8, 1, 1), accum_steps=1, rows=8, loss_type="bpr", lambda_ret=1.0,
             dtype="float32"):
  config = demo_config(mesh=dict(zip(("data", "fsdp", "tensor"), mesh)),
                       batch=dict(accum_steps=accum_steps, rows=rows),
                       loss=dict(loss_type=loss_type, lambda_ret=lambda_ret),
                       optim=dict(schedule="constant", lr=1e-3), model=dict(dtype=dtype))
  return program_lib.build_program(config, devices=jax.devices()[:math.prod(mesh)])


@functools.lru_cache(maxsize=None)
def synthetic_task():
  return synthetic.make_task(seed=0, num_train=400, num_heldout=64)


@pytest.fixture(scope="session")
def task():
  return synthetic_task()


@pytest.fixture(scope="session")
def batches(task):
  """Packed batches of BATCH_SHAPE from the synthetic task."""
  return list(pack_batches(task.train, task.corpus, BATCH_SHAPE))


@pytest.fixture(scope="session")
def trained_demo():
  """(state, final metrics, config) of the tiny model trained 600 steps on the synthetic task."""
  config = demo_config(train=dict(steps=600, log_every=600, eval_every=0))
  state, final = loop.fit(config)
  return state, final, config


@pytest.fixture(scope="session")
def program():
  """Builds (and caches) a compiled TrainProgram of the tiny model: program(mesh=(d, f, t), ...)."""
  return _program
