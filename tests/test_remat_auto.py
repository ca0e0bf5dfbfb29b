"""train/remat_auto.py: model.remat_policy="auto" compiles the candidates in order and takes the
first whose step fits the budget; the budget's sources; a clear error when nothing fits."""

import os

import jax
import pytest

from onegen_jax.train import program as program_lib
from onegen_jax.train import remat_auto
from tests.conftest import demo_config


def _config(remat_policy: str):
  return demo_config(mesh=dict(data=2, fsdp=1, tensor=1), model=dict(remat_policy=remat_policy))


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
  """Bytes per device of the demo step under each candidate, compiled here independently."""
  devices = jax.devices()[:2]
  out = {}
  for policy in remat_auto.CANDIDATES:
    program = program_lib.build_program(_config(policy), devices=devices)
    out[policy] = remat_auto.compiled_bytes(program_lib.compile_step(_config(policy), program))
  return out


def test_rematerialising_saves_memory_in_the_demo_step(sizes):
  assert sizes["none"] > sizes["full"], sizes


@pytest.mark.parametrize("budget_of", ["none", "full"])
def test_auto_takes_the_first_candidate_within_the_budget(sizes, budget_of, monkeypatch):
  budget = sizes[budget_of]
  monkeypatch.setattr(remat_auto, "device_budget", lambda devices: budget)
  program = program_lib.build_program(_config("auto"), devices=jax.devices()[:2])
  expected = next(p for p in remat_auto.CANDIDATES if sizes[p] <= budget)
  assert program.model.config.remat_policy == expected


def test_nothing_fits_names_every_candidate(monkeypatch):
  monkeypatch.setattr(remat_auto, "device_budget", lambda devices: 1)
  with pytest.raises(ValueError, match="none .* GiB.*dots_with_no_batch_dims .* GiB.*full .* GiB"):
    program_lib.build_program(_config("auto"), devices=jax.devices()[:2])


def test_cpu_budget_is_the_host_ram_shared_by_its_devices():
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  devices = jax.devices()
  assert remat_auto.device_budget(devices, fraction=1.0) == ram // len(devices)
