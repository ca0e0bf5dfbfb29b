"""Every entry point under benchmarks/ runs end to end at its tiniest arguments (CPU smoke).

Each benchmark runs as `python -m benchmarks.X` in a subprocess on one CPU device with
`--no_record` (a few seconds to ~15 s each, worker processes included), so a refactor of the
engine, encoder, index or train step cannot break a benchmark silently; the assertions check the
exit code, the table it printed (no worker failed) and that RESULTS.md was left alone.
`benchmarks.quality` is only asked for `--help` and parsed here (a real run needs a model and data).
"""

import hashlib
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.processes  # run by .ci/run, not by make test (see pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")

# module -> (arguments, text its output must contain)
SMOKE = {
    "benchmarks.inference_onepass": (
        ["--query_lengths=16", "--retrievals=2", "--rounds=2", "--repeats=1",
         "--output_tokens=4", "--doc_tokens=8", "--num_docs=8"],
        "| query tokens q | retrievals / round |"),
    "benchmarks.batching": (
        ["--requests=6", "--batch_size=2", "--prompt_len=4,8", "--short=2,4", "--long=12,16",
         "--doc_tokens=8", "--num_docs=8", "--repeats=1"],
        "| continuous |"),
    "benchmarks.decode_loop": (
        ["--presets=tiny", "--steps=1,2", "--workloads=rag", "--requests=2", "--batch_size=2",
         "--prompt_len=4", "--output_len=4", "--retrievals=1", "--doc_tokens=4", "--num_docs=8",
         "--repeats=1"],
        "| tiny | rag | device loop | 2 |"),
    "benchmarks.decode_capacity": (
        ["--preset=tiny", "--capacities=256", "--cached=16", "--prefill=16", "--repeats=1"],
        "| unrolled | 256 |"),
    "benchmarks.encode": (
        ["--preset=tiny", "--num_docs=8", "--min_len=4", "--max_len=20", "--rows=2",
         "--packed_lens=32", "--padded_len=32", "--max_reads=8", "--repeats=1"],
        "| packed 32 |"),
    "benchmarks.train_throughput": (
        ["--preset=tiny", "--batch=2", "--seq=64", "--steps=1", "--warmup=1", "--losses=gen+ret",
         "--attention=xla", "--matmul_n=128", "--skip_torch", "--dtypes=float32", "--gen_chunks=2",
         "--xla_flags=--xla_cpu_enable_fast_min_max=false"],
        "| onegen_jax, scan, remat dots_with_no_batch_dims, float32, L_gen in 2 chunks, XLA_FLAGS "
        "--xla_cpu_enable_fast_min_max=false | gen+ret |"),
    "benchmarks.gemm": (["--preset=tiny", "--tokens=16", "--reps=1"], "| lm head ("),
    "benchmarks.index": (
        ["--sizes=16:400", "--queries=8", "--cluster_size=50", "--scann=0.5:10"],
        "| ScannIndex leaves 0.5, reorder 10 |"),
}


def _digest(path: str) -> str:
  """sha256 of a file's bytes."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _run(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  """`python -m module args` from the repository root on one CPU device (compiles cached)."""
  env = dict(os.environ, XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _check(module: str, args: list[str], expected: str, tmp_path) -> None:
  """Runs the benchmark with --no_record: exit 0, `expected` in its output, RESULTS.md intact."""
  before = _digest(RESULTS)
  extra = [f"--data_dir={tmp_path}"] if module == "benchmarks.index" else []
  run = _run(module, *args, *extra, "--no_record")
  assert run.returncode == 0, f"{module} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
  assert expected in run.stdout, run.stdout[-3000:]
  assert "failed" not in run.stdout, run.stdout[-3000:]  # a worker's error becomes a table cell
  assert _digest(RESULTS) == before, f"{module} --no_record changed RESULTS.md"


@pytest.mark.parametrize("module", sorted(SMOKE))
def test_benchmark_runs(module, tmp_path):
  """The benchmark exits 0 and prints its table, RESULTS.md untouched."""
  _check(module, *SMOKE[module], tmp_path)


def test_quality_help():
  """Only --help: a real run needs a model and data (benchmarks/quality_device.sh)."""
  run = _run("benchmarks.quality", "--help", timeout=60)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "--record_from" in run.stdout


def test_quality_writes_results_only_when_asked(tmp_path):
  """A scratch run of the quality study must not rewrite the committed RESULTS.md: --record is
  opt-in (a run with it on replaces its task's section)."""
  from benchmarks.quality import cli
  assert cli.parse_args(["--out", str(tmp_path), "--tasks="]).record is False
  assert cli.parse_args(["--out", str(tmp_path), "--tasks=", "--record"]).record is True
