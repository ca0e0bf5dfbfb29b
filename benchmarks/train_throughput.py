"""Training throughput: our sharded train step against Hugging Face transformers (PyTorch).

The model is a 1.1B Llama (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads,
vocab 32000), batch 8 x 2048 tokens, float32 master weights with bfloat16 compute, AdamW after
global-norm clipping at 1.0 (both sides). Runs, each in its own process (clean peak memory):
- matmul: a bf16 N x N x N matmul through JAX, the ceiling that MFU is measured against;
- hf-torch: `LlamaForCausalLM` (sdpa attention, fused AdamW, bf16 autocast), one causal sequence
  per row;
- jax: our jitted, donated train step (`build_train_program`) for every combination of
  --losses (gen: L_gen only, one sequence per row; gen+ret: L_gen + L_ret (BPR) over packed
  examples and the documents their queries need), --remat, --attention, --scan, --dtypes
  (compute dtype), --dots (ModelConfig.dot_accumulation: bf16 weight matmuls accumulated in
  float32 forward and backward, or XLA's own dots), --gen_chunks (L_gen over that many sequence
  chunks) and --xla_flags (alternatives separated by ';', each run with that XLA_FLAGS);
- hf-torch once per --torch_dtypes (bfloat16: autocast; float32: none).
Figures: tokens/s (token slots B x S per second), model TFLOP/s (6 x parameters per token, LM
head included, embeddings not, plus causal attention at half: onegen_jax.train.metrics), MFU
against the measured matmul, peak memory (device peak bytes on an accelerator, process peak RSS
on CPU).

One command on a GPU runs everything:
  .venv/bin/python -m benchmarks.train_throughput
  ... --remat full,dots_with_no_batch_dims,none --attention cudnn,xla --scan true,false
On a TPU VM: `--attention splash,xla --skip_torch` (splash: Pallas, segment ids, no dense mask).
On CPU only the smoke configuration is practical (2 layers, hidden 256, batch 2 x 256):
  .venv/bin/python -m benchmarks.train_throughput --smoke
The real model's shape on CPU (the levers of issue 23; a few minutes per row):
  .venv/bin/python -m benchmarks.train_throughput --preset smollm2-135m --batch 4 --seq 256 \
      --steps 3 --losses gen --remat none,dots_with_no_batch_dims --dtypes float32,bfloat16 \
      --torch_dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import models, probes, results_md
from onegen_jax import sharding
from onegen_jax.data.packing import (BatchPacker, BatchShape, Corpus, Key, Query, Segment,
                                     pack_batches)
from onegen_jax.model.attention import resolve_impl
from onegen_jax.model.matmul import accumulates_in_float32
from onegen_jax.model.decoder import Decoder
from onegen_jax.train.metrics import flops_per_token
from onegen_jax.train.optimizer import adamw
from onegen_jax.train.step import LossConfig, batch_shardings, build_train_program

def gen_batch(rng: np.random.Generator, vocab: int, rows: int, seq_len: int) -> dict:
  """L_gen only: one causal sequence of random tokens per row (the contract's fields)."""
  examples = [Segment(rng.integers(1, vocab, seq_len).astype(np.int32), np.ones(seq_len, bool))
              for _ in range(rows)]
  return next(pack_batches(examples, Corpus({}), BatchShape(rows, seq_len, 1, 1, 1)))


def ret_batch(rng: np.random.Generator, vocab: int, rows: int, seq_len: int) -> dict:
  """L_gen + L_ret: examples of S/4 tokens with 2 queries, each against a positive and 2
  negatives among documents of S/16 tokens (one key at the end), packed until the batch is full."""
  ex_len, doc_len = seq_len // 4, seq_len // 16
  tokens = lambda n: rng.integers(1, vocab, n).astype(np.int32)
  corpus = Corpus({f"d{i}": Segment(tokens(doc_len), np.ones(doc_len, bool),
                                     keys=(Key(doc_len - 1, f"d{i}"),)) for i in range(1000)})
  packer = BatchPacker(corpus, BatchShape(rows, seq_len, 4 * rows, 16 * rows, 2))
  while True:
    uids = [f"d{i}" for i in rng.choice(1000, 6, replace=False)]
    queries = (Query(ex_len // 2, uids[0], tuple(uids[1:3])),
               Query(ex_len - 1, uids[3], tuple(uids[4:6])))
    if not packer.try_add(Segment(tokens(ex_len), np.ones(ex_len, bool), queries)):
      return packer.emit()


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON result line.

def peak_memory_gib(device=None) -> tuple[float, str]:
  """(GiB, what was measured): the device's peak bytes where it reports them, else peak RSS."""
  stats = device.memory_stats() if device is not None else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device"
  return probes.peak_rss_bytes() / 2**30, "host RSS"


def matmul_worker(args) -> dict:
  """bf16 N^3 matmul through JAX: best of 10 timed calls."""
  n = args.matmul_n
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = min(probes.timed(lambda: matmul(a, b).block_until_ready())[0] for _ in range(10))
  return {"tflops": 2 * n**3 / best / 1e12}


def jax_worker(args, job: dict) -> dict:
  """Our train step on one configuration: tokens/s over --steps after --warmup steps."""
  # auto: the model's own choice (splash on TPU, cuDNN on GPU, XLA on CPU), named in the table.
  attention = resolve_impl(job["attention"], "bfloat16", jax.default_backend())
  config = models.model_config(args.preset, dtype=job["dtype"], param_dtype="float32",
                               remat_policy=job["remat"], attention_impl=attention,
                               scan_layers=job["scan"], dot_accumulation=job["dots"])
  make = gen_batch if job["loss"] == "gen" else ret_batch
  batch = make(np.random.default_rng(0), config.vocab_size, args.batch, args.seq)
  schedule = optax.constant_schedule(1e-4)
  mesh = sharding.make_mesh(data=1, fsdp=-1)
  program = build_train_program(Decoder(config), adamw(schedule), schedule,
                                LossConfig(gen_chunks=job["gen_chunks"]), mesh, batch)
  shardings = batch_shardings(mesh, {k: v.ndim for k, v in batch.items()}, False)
  placed = jax.device_put(batch, shardings)
  state = program.init_state(0)
  compile_s, (state, _) = probes.timed(
      lambda: jax.block_until_ready(program.step(state, placed)))
  for _ in range(args.warmup - 1):
    state, _ = program.step(state, placed)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = program.step(state, placed)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / args.steps
  memory, where = peak_memory_gib(jax.devices()[0])
  return {"step_s": seconds, "compile_s": compile_s, "attention": attention,
          "f32_dots": accumulates_in_float32(job["dots"], job["dtype"], jax.default_backend()),
          "packing": float(np.mean(batch["segment_ids"] > 0)), "peak_gib": memory, "memory": where,
          "final_loss": float(metrics["loss"]),
          "params": models.count_params(state.params)}


def torch_worker(args, job: dict) -> dict:
  """transformers LlamaForCausalLM: sdpa attention, fused AdamW, clip 1.0, bf16 autocast when
  job["dtype"] is bfloat16 (float32 weights either way). (torch is imported here only: the JAX
  workers' memory figures stay free of it.)"""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from onegen_jax.hf import to_hf_config  # noqa: PLC0415
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_config = to_hf_config(models.model_config(args.preset), "LlamaForCausalLM")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM._from_config(
      hf_config, attn_implementation="sdpa", dtype=torch.float32).to(device)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0, fused=True)
  tokens = torch.randint(1, hf_config.vocab_size, (args.batch, args.seq), device=device)
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16,
                        enabled=job["dtype"] == "bfloat16"):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  compile_s, _ = probes.timed(lambda: (step(), sync()))
  for _ in range(args.warmup - 1):
    step()
  sync()
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync()
  seconds = (time.perf_counter() - start) / args.steps
  if device == "cuda":
    memory, where = torch.cuda.max_memory_allocated() / 2**30, "device"
  else:
    memory, where = peak_memory_gib()
  return {"step_s": seconds, "compile_s": compile_s, "attention": "sdpa", "packing": 1.0,
          "peak_gib": memory, "memory": where, "final_loss": float(loss),
          "params": sum(p.numel() for p in model.parameters()),
          "versions": f"torch {torch.__version__}, transformers {transformers.__version__}"}


def run_worker(args) -> None:
  job = json.loads(args.worker)
  if job["kind"] == "matmul":
    result = matmul_worker(args)
  elif job["kind"] == "torch":
    result = torch_worker(args, job)
  else:
    result = jax_worker(args, job)
  probes.worker_result({**job, **result})


# --------------------------------------------------------------------------------------------
# The parent: runs the workers one after another and writes the table.

def jobs(args) -> list[dict]:
  """matmul, the PyTorch baselines, then every JAX configuration."""
  out = [{"kind": "matmul", "xla_flags": ""}]
  if not args.skip_torch:
    out += [{"kind": "torch", "loss": "gen", "dtype": dtype, "xla_flags": ""}
            for dtype in args.torch_dtypes.split(",")]
  lists = [x.split(",") for x in (args.losses, args.remat, args.attention, args.scan, args.dtypes,
                                  args.dots, args.gen_chunks)]
  for loss, remat, attention, scan, dtype, dots, chunks, flags in itertools.product(
      *lists, args.xla_flags.split(";")):
    out.append({"kind": "jax", "loss": loss, "remat": remat, "attention": attention,
                "scan": scan == "true", "dtype": dtype, "dots": dots, "gen_chunks": int(chunks),
                "xla_flags": flags.strip()})
  return out


def worker_env(job: dict) -> dict | None:
  """The environment of JOB's process: this one's, with the job's XLA_FLAGS if it has any."""
  if not job["xla_flags"]:
    return None
  return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {job['xla_flags']}".strip())


def run_name(r: dict) -> str:
  """A result row's implementation column: what distinguishes its run."""
  if r["kind"] == "torch":
    return f"HF transformers PyTorch, {r['dtype']}{' autocast' if r['dtype'] != 'float32' else ''}"
  name = f"onegen_jax, {'scan' if r['scan'] else 'unrolled'}, remat {r['remat']}, {r['dtype']}"
  if r.get("f32_dots"):
    name += ", dots accumulated in f32"
  if r["gen_chunks"] > 1:
    name += f", L_gen in {r['gen_chunks']} chunks"
  return name + (f", XLA_FLAGS {r['xla_flags']}" if r["xla_flags"] else "")


def table_rows(results: list[dict], args) -> list[list]:
  """One row per training run: tokens/s, its ratio to the fastest PyTorch run of this run, TFLOP/s,
  MFU against the measured matmul, memory."""
  flops = flops_per_token(models.model_config(args.preset), args.seq)
  ceiling = next((r["tflops"] for r in results if r["kind"] == "matmul" and "tflops" in r), None)
  torch_s = min((r["step_s"] for r in results if r["kind"] == "torch" and "error" not in r),
                default=None)
  rows = []
  for r in results:
    if r["kind"] == "matmul":
      continue
    name = run_name(r)
    if "error" in r:
      rows.append([name, r["loss"], r.get("attention", ""), "failed: " + " / ".join(r["error"]),
                   "", "", "", "", "", ""])
      continue
    tokens_s = args.batch * args.seq / r["step_s"]
    tflops = tokens_s * flops / 1e12
    mfu = f"{tflops / ceiling:.1%}" if ceiling else "n/a"
    vs_torch = f"{torch_s / r['step_s']:.2f}x" if torch_s else "n/a"
    rows.append([name, r["loss"], r["attention"], f"{tokens_s:,.0f}", vs_torch, f"{tflops:.3g}",
                 mfu, f"{r['peak_gib']:.2f} ({r['memory']})", f"{r['compile_s']:.1f}",
                 f"{r['final_loss']:.3f}"])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="llama-1.1b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps, compile included")
  parser.add_argument("--losses", default="gen,gen+ret", help="gen, gen+ret")
  parser.add_argument("--remat", default="dots_with_no_batch_dims",
                      help="comma list of none, full, dots_with_no_batch_dims, dots")
  parser.add_argument("--attention", default="auto", help="comma list of auto (splash on TPU, "
                      "cudnn on GPU, else xla), splash, xla, cudnn")
  parser.add_argument("--scan", default="true",
                      help="comma list of true (nn.scan), false (unrolled)")
  parser.add_argument("--dtypes", default="bfloat16",
                      help="comma list of compute dtypes of the JAX runs: bfloat16, float32")
  parser.add_argument("--dots", default="native",
                      help="comma list of ModelConfig.dot_accumulation: auto (float32 on CPU), "
                      "float32, native")
  parser.add_argument("--gen_chunks", default="1",
                      help="comma list: L_gen over that many sequence chunks (1: the plain loss)")
  parser.add_argument("--xla_flags", default="",
                      help="';'-separated alternatives, each added to XLA_FLAGS of one JAX run")
  parser.add_argument("--torch_dtypes", default="bfloat16",
                      help="comma list for the PyTorch runs: bfloat16 (autocast), float32")
  parser.add_argument("--matmul_n", type=int, default=8192)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU smoke: preset smoke, batch 2 x 256, 5 timed steps, 1024^3 matmul")
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    args.preset, args.batch, args.seq, args.steps, args.warmup, args.matmul_n = (
        "smoke", 2, 256, 5, 1, 1024)
  if args.worker:
    run_worker(args)
    return
  worker_argv = [a for a in sys.argv[1:] if a != "--no_record"]
  results = [probes.spawn_worker("benchmarks.train_throughput", job, worker_argv, worker_env(job))
             for job in jobs(args)]
  headers = ["implementation", "loss", "attention", "tokens/s", "vs fastest PyTorch",
             "model TFLOP/s", "MFU", "peak GiB", "first step s", "loss after"]
  rows = table_rows(results, args)
  table = results_md.markdown_table(headers, rows)
  print(table)
  if not args.no_record:
    record(args, results, rows, table)


def record(args, results: list[dict], rows: list[list], table: str) -> None:
  """Notes and summary rows for RESULTS.md."""
  matmul = next((r for r in results if r["kind"] == "matmul"), {})
  torch_run = next((r for r in results if r["kind"] == "torch" and "error" not in r), {})
  size = next((r["params"] for r in results if "params" in r), 0)
  packing = next((r["packing"] for r in results
                  if r.get("loss") == "gen+ret" and "packing" in r), 0)
  notes = [
      f"Model `{args.preset}` ({size / 1e6:.1f}M parameters), batch {args.batch} x {args.seq}, "
      f"float32 master weights, the row's compute dtype, AdamW + clip 1.0; {args.steps} timed "
      f"steps after {args.warmup} untimed (the first includes compilation: 'first step s').",
      f"MFU denominator: bf16 {args.matmul_n}^3 matmul through JAX in this run: "
      f"{matmul.get('tflops', float('nan')):.3g} TFLOP/s.",
      "tokens/s counts token slots (B x S)." + (
          " The gen+ret batch is packed (examples of S/4 tokens, documents of S/16) to "
          f"{packing:.1%} real tokens, and its model FLOPs are counted as for full causal rows."
          if packing else ""),
      "Each run is its own process; peak memory is the device's peak bytes in use on an "
      "accelerator, the process peak RSS on CPU (model, optimizer, activations and runtime).",
  ]
  if torch_run:
    notes.append(f"Baseline: {torch_run['versions']}.")
  if args.smoke:
    notes.append("CPU smoke configuration only: it proves the script end to end. The 1.1B GPU "
                 "figures are not measured (no GPU was lent to this session); for reference, an "
                 "H200 gave the transformers baseline 48.5k tokens/s (328 TFLOP/s) and a JAX bf16 "
                 "matmul 805 TFLOP/s (shared/docs/JAX_NOTES.md).")
  tag = f"{args.preset}, {args.batch}x{args.seq}"
  ratio = lambda row: "" if row[4] in ("n/a", "") else f" ({row[4]} that run's fastest PyTorch)"
  summary = [(f"train tokens/s, {row[0]}, {row[1]} ({tag})", row[3] + ratio(row)) for row in rows]
  if args.smoke:
    summary.append(("train tokens/s, 1.1B Llama 8x2048, GPU", "not measured (no GPU lent)"))
  results_md.record("train_throughput", f"{args.preset}, batch {args.batch} x {args.seq}", table,
                notes, summary)


if __name__ == "__main__":
  main()
