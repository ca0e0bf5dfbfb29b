"""Test setup: an emulated 8-device CPU mesh and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere. The flags and the cache are set in the
environment, so the launchers the tests start as subprocesses (resume, the command-line chains,
the server) inherit them: 8 devices, and a program compiled by one process (the same train step,
the same engine step) is loaded, not compiled again, by the next.
"""

import os

from processes import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the tpu extra) is installed for AOT only
os.environ["XLA_FLAGS"] = f"{xla_flags(8)} {os.environ.get('XLA_FLAGS', '')}".strip()
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
    "JAX_TEST_CACHE", os.path.expanduser("~/.cache/onegen-jax-tests"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import filelock  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from configs import el, multihop  # noqa: E402
from onegen_jax.data import synthetic  # noqa: E402
from onegen_jax.data.generate import make_dataset  # noqa: E402
from onegen_jax.data.records import read_jsonl, write_jsonl  # noqa: E402
from onegen_jax.data.tasks import get_task  # noqa: E402
from onegen_jax.inference.engine import GenerationConfig  # noqa: E402
from onegen_jax.data.packing import BatchShape, pack_batches  # noqa: E402
from onegen_jax.train import loop, program as program_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SHAPE = BatchShape(rows=8, seq_len=64, num_queries=16, num_keys=64, num_negatives=3)


# The longest test files (measured on a clean clone), started first: make test's two workers
# take files in collection order (--no-loadscope-reorder), and one of these last would run on
# alone for minutes. test_server builds the trained runs and chains that test_inference_e2e
# uses too: both first on one worker, so the other worker never waits for them.
LONGEST_FIRST = ("test_server", "test_selfrag", "test_inference_e2e", "test_engine",
                 "test_openai_api", "test_train_step", "test_sharded_inference", "test_resume",
                 "test_multihost", "test_hf_launch")


def pytest_collection_modifyitems(items):
  """LONGEST_FIRST's files first, in that order; the rest as collected."""
  rank = lambda item: (LONGEST_FIRST.index(item.path.stem) if item.path.stem in LONGEST_FIRST
                       else len(LONGEST_FIRST))
  items.sort(key=rank)


def el_demo(overrides: dict):
  """configs/el.py:demo with OVERRIDES ({"train.steps": 6, ...}) set: the config that
  `python -m launch.train *el_demo_flags(OVERRIDES)` runs with from the repository root (its
  relative data paths are resolved from there)."""
  config = el.get_config("demo")
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  for key in ("train_path", "db_path", "dev_path", "tokenizer_path"):
    config.data[key] = os.path.join(ROOT, config.data[key])
  return config


def el_demo_flags(overrides: dict) -> list[str]:
  """launch.train's flags for el_demo(OVERRIDES)."""
  return ["--config=configs/el.py:demo", *(f"--config.{k}={v}" for k, v in overrides.items())]


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
def program():
  """Builds (and caches) a compiled TrainProgram of the tiny model: program(mesh=(d, f, t), ...)."""
  return _program


# The generation settings of the end-to-end tests (library, command line and server alike).
E2E_CONFIG = GenerationConfig(max_new_tokens=48, batch_size=4, capacity=512, retrieve_k=3)


def write_requests(data, query_token: str):
  """DATA/requests.jsonl: the dev lines, every other one (the 2nd, 4th, ...) with an
  answer_prefix: its gold answer up to and including its first query RET token. Whatever a
  briefly trained model emits on this CPU, the inference tests' comparisons then cover
  retrievals, inserted paragraphs (RAG) and linked mentions (EL)."""
  lines = read_jsonl(f"{data}/dev.jsonl")
  for line in lines[1::2]:
    answer = line["messages"][-1]["content"]
    line["answer_prefix"] = answer[:answer.index(query_token) + len(query_token)]
  write_jsonl(f"{data}/requests.jsonl", lines)


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """The directory NAME, filled by `build(directory)` once for the whole run. Under pytest-xdist
  it lies in the workers' common temp dir behind a file lock: the first worker builds it, the
  other waits and reuses it. (A session fixture with parameters is also set up again each time
  pytest switches parameters: then it is found built.)"""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = base / name
  with filelock.FileLock(f"{path}.lock"):
    if not (path / ".built").exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir(parents=True)
      build(path)
      (path / ".built").touch()
  return path


@pytest.fixture(scope="session", params=["el", "multihop"])
def trained(request, tmp_path_factory):
  """(task, mode, data dir, root, config) of the el.py / multihop.py demo model trained 150 steps
  on generated data (6 dev lines; DATA/requests.jsonl: write_requests); the run is ROOT/run."""
  name = request.param
  root = built_once(tmp_path_factory, f"trained-{name}", lambda root: _train(name, root))
  return name, get_task(name).mode, root / "data", root, _trained_config(name, root / "data")


def _trained_config(name: str, data):
  config = {"el": el, "multihop": multihop}[name].get_config("demo")
  config.train.update(steps=150, eval_every=0, log_every=150)
  config.data.update(generate="", train_path=f"{data}/train.jsonl", db_path=f"{data}/db.jsonl",
                     dev_path=f"{data}/dev.jsonl", tokenizer_path=f"{data}/tokenizer")
  return config


def _train(name: str, root):
  make_dataset(name, str(root / "data"), seed=0, num_train=120, num_dev=6)
  write_requests(root / "data", get_task(name).query_token)
  loop.fit(_trained_config(name, root / "data"), str(root / "run"))


def launch(workdir, module: str, *flags) -> dict:
  """Runs `python -m launch.MODULE *flags` (8 emulated devices) to its end; asserts it exits 0;
  returns the JSON of its last stdout line."""
  path = os.path.join(workdir, f"{module}.out")
  with open(path, "w") as out:
    proc = subprocess.run([sys.executable, "-m", f"launch.{module}", *flags], cwd=ROOT,
                          stdout=out, stderr=subprocess.PIPE, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return last_json(path)


def last_json(path) -> dict:
  """The JSON of a launcher's last stdout line (saved in `path`)."""
  with open(path) as f:
    return json.loads(f.read().strip().splitlines()[-1])


@dataclasses.dataclass(frozen=True)
class Chain:
  """What build_index (scann) and infer (E2E_CONFIG, requests.jsonl) wrote from the command line."""

  index: str
  predictions: str
  built: dict
  ran: dict


@pytest.fixture(scope="session")
def chain(trained, tmp_path_factory) -> Chain:
  out = built_once(tmp_path_factory, f"chain-{trained[0]}", lambda out: _chain(trained, out))
  return Chain(str(out / "index"), str(out / "pred.jsonl"), last_json(out / "build_index.out"),
               last_json(out / "infer.out"))


def _chain(trained, out):
  _, _, data, root, _ = trained
  launch(out, "build_index", f"--workdir={root / 'run'}", f"--db={data}/db.jsonl",
         "--backend=scann", f"--out={out / 'index'}")
  c = E2E_CONFIG
  launch(out, "infer", f"--workdir={root / 'run'}", f"--index={out / 'index'}",
         f"--input={data}/requests.jsonl", f"--output={out / 'pred.jsonl'}",
         f"--max_new_tokens={c.max_new_tokens}", f"--batch_size={c.batch_size}",
         f"--capacity={c.capacity}", f"--retrieve_k={c.retrieve_k}",
         f"--max_retrievals={c.max_retrievals}")
