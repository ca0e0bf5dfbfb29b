"""Test setup: an emulated 8-device CPU mesh and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere. The cache is configured through jax's
environment variables, so the launchers the tests start as subprocesses (resume, multi-host,
the command-line chains, the server) share it: a program compiled by one process (the same
train step, the same engine step) is loaded, not compiled again, by the next.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the tpu extra) is installed for AOT only
# The collective timeout: XLA:CPU aborts the process when one of the 8 emulated devices' threads
# has not joined an all-reduce within 40 s; on 2 loaded cores (two xdist workers, a server, its
# long sampled requests) that killed a server once (`rendezvous.cc: Termination timeout ... only
# 7 of them arrived`), and likely the CI abort of an earlier stop.
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=600 " +
                           os.environ.get("XLA_FLAGS", "")).strip()
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
# take files in collection order, and one of these last would run on alone for minutes.
LONGEST_FIRST = ("test_selfrag", "test_resume", "test_multihost", "test_inference_e2e",
                 "test_hf_launch", "test_server", "test_engine")


def pytest_collection_modifyitems(items):
  """LONGEST_FIRST's files first, in that order; the rest as collected."""
  rank = lambda item: (LONGEST_FIRST.index(item.module.__name__)
                       if item.module.__name__ in LONGEST_FIRST else len(LONGEST_FIRST))
  items.sort(key=rank)


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
  env = dict(os.environ)  # XLA_FLAGS as set above
  path = os.path.join(workdir, f"{module}.out")
  with open(path, "w") as out:
    proc = subprocess.run([sys.executable, "-m", f"launch.{module}", *flags], cwd=ROOT, env=env,
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
