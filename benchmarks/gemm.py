"""The train step's weight matmuls and attention one by one: XLA:CPU (model/matmul.py's and
model/dense_attention.py's bfloat16 x bfloat16 -> float32 dots) against PyTorch's bfloat16 kernels
on the same shapes, forward and backward.

Per projection of a decoder layer (and the LM head) at T tokens, the three dots of its training
step: forward x [T, K] @ w [K, N]; dx = g [T, N] @ w^T; dw = x^T @ g, contracting the token axis,
both as XLA's dot on the leading axes ("dw TN") and on the row-major copy of x^T that matmul.py's
backward pass makes ("dw copy", the copy's cost included). Each dot is timed alone (min over
--reps interleaved rounds, so a burst of other load on the machine hits every variant alike).
Attention (one layer, --rows x tokens/rows, causal): forward + backward of JAX's own autodiff of
`jax.nn.dot_product_attention` (XLA), of dense_attention's custom VJP, and of torch's
scaled_dot_product_attention under bf16.
  .venv/bin/python -m benchmarks.gemm --preset smollm2-135m --tokens 1024 --rows 4
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from benchmarks import models, results_md
from onegen_jax.model.attention import packed_causal_mask
from onegen_jax.model.dense_attention import dense_attention
from onegen_jax.model.matmul import row_major_transpose

F32, BF16 = jnp.float32, jnp.bfloat16


def projections(preset: str) -> dict[str, tuple[int, int, int]]:
  """name -> (K, N, how many such matmuls the model has) of the weight matmuls (o_proj is
  counted with q_proj as the same shape; exact when heads x head_dim = hidden)."""
  c = models.model_config(preset)
  head_dim = c.head_dim or c.hidden_size // c.num_heads
  layers = c.num_layers
  return {"q/o proj": (c.hidden_size, c.num_heads * head_dim, 2 * layers),
          "k/v proj": (c.hidden_size, c.num_kv_heads * head_dim, 2 * layers),
          "gate/up proj": (c.hidden_size, c.intermediate_size, 2 * layers),
          "down proj": (c.intermediate_size, c.hidden_size, layers),
          "lm head": (c.hidden_size, c.vocab_size, 1)}


def _dot(a, b, contract):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=F32)


JAX_DOTS = {
    "forward": jax.jit(lambda x, w, g: _dot(x, w, ((1,), (0,)))),
    "dx": jax.jit(lambda x, w, g: _dot(g, w, ((1,), (1,)))),
    "dw TN": jax.jit(lambda x, w, g: _dot(x, g, ((0,), (0,)))),
    "dw copy": jax.jit(lambda x, w, g: _dot(row_major_transpose(x), g, ((1,), (0,)))),
}
TORCH_DOTS = {"forward": lambda x, w, g: x @ w, "dx": lambda x, w, g: g @ w.T,
              "dw": lambda x, w, g: x.T @ g}


def best_seconds(calls: dict, reps: int) -> dict[str, float]:
  """Each call once untimed, then `reps` interleaved rounds; the fastest round of each."""
  for call in calls.values():
    call()
  best = dict.fromkeys(calls, float("inf"))
  for _ in range(reps):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def measure(tokens: int, k: int, n: int, reps: int) -> dict[str, float]:
  """GFLOP/s of every dot of one (K, N) projection at `tokens` tokens."""
  rng = np.random.default_rng(0)
  x, w, g = (rng.normal(size=s).astype(np.float32) for s in ((tokens, k), (k, n), (tokens, n)))
  jx, jw, jg = (jnp.asarray(a, BF16) for a in (x, w, g))
  tx, tw, tg = (torch.from_numpy(a).to(torch.bfloat16) for a in (x, w, g))
  calls = {f"jax {name}": (lambda f=f: jax.block_until_ready(f(jx, jw, jg)))
           for name, f in JAX_DOTS.items()}
  calls |= {f"torch {name}": (lambda f=f: f(tx, tw, tg)) for name, f in TORCH_DOTS.items()}
  flops = 2.0 * tokens * k * n
  return {name: flops / s / 1e9 for name, s in best_seconds(calls, reps).items()}


def attention_ms(preset: str, rows: int, seq: int, reps: int) -> dict[str, float]:
  """Milliseconds of one layer's causal attention, forward + backward, per implementation."""
  c = models.model_config(preset)
  head_dim = c.head_dim or c.hidden_size // c.num_heads
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(rows, seq, h, head_dim)).astype(np.float32)
             for h in (c.num_heads, c.num_kv_heads, c.num_kv_heads))
  mask = packed_causal_mask(jnp.ones((rows, seq), jnp.int32))
  xla = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")

  def grads(attend):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask).astype(F32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  jq, jk, jv = (jnp.asarray(a, BF16) for a in (q, k, v))
  tq, tk, tv = (torch.from_numpy(a).to(torch.bfloat16).transpose(1, 2).requires_grad_()
                for a in (q, k, v))

  def torch_step():
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                           enable_gqa=True)
    out.float().pow(2).sum().backward()

  calls = {f"jax {name}": (lambda f=grads(f): jax.block_until_ready(f(jq, jk, jv)))
           for name, f in (("autodiff", xla), ("dense_attention", dense_attention))}
  calls["torch sdpa"] = torch_step
  return {name: s * 1e3 for name, s in best_seconds(calls, reps).items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="smollm2-135m")
  parser.add_argument("--tokens", type=int, default=1024, help="T: batch rows x sequence length")
  parser.add_argument("--rows", type=int, default=4, help="attention: rows of tokens/rows")
  parser.add_argument("--reps", type=int, default=8)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
  parser.add_argument("--no_record", action="store_true", help="print only; leave RESULTS.md")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  headers = ["projection (K x N)", "forward jax / torch", "dx jax / torch", "dw TN jax",
             "dw copy jax", "dw torch", "dw copy / TN"]
  rows, totals = [], {"jax": 0.0, "jax TN": 0.0, "torch": 0.0}
  for name, (k, n, count) in projections(args.preset).items():
    r = measure(args.tokens, k, n, args.reps)
    flops = 2.0 * args.tokens * k * n * count / 1e9
    totals["jax"] += flops * (1 / r["jax forward"] + 1 / r["jax dx"] + 1 / r["jax dw copy"])
    totals["jax TN"] += flops * (1 / r["jax forward"] + 1 / r["jax dx"] + 1 / r["jax dw TN"])
    totals["torch"] += flops * (1 / r["torch forward"] + 1 / r["torch dx"] + 1 / r["torch dw"])
    rows.append([f"{name} ({k} x {n})", f"{r['jax forward']:.0f} / {r['torch forward']:.0f}",
                 f"{r['jax dx']:.0f} / {r['torch dx']:.0f}", f"{r['jax dw TN']:.0f}",
                 f"{r['jax dw copy']:.0f}", f"{r['torch dw']:.0f}",
                 f"{r['jax dw copy'] / r['jax dw TN']:.2f}x"])
  att = attention_ms(args.preset, args.rows, args.tokens // args.rows, args.reps)
  att_table = results_md.markdown_table(
      ["attention fwd+bwd, one layer", "ms"], [[name, f"{ms:.1f}"] for name, ms in att.items()])
  table = results_md.markdown_table(headers, rows) + "\n\n" + att_table
  print(table)
  ratio = totals["torch"] / totals["jax"]
  ratio_tn = totals["torch"] / totals["jax TN"]
  print(f"every weight matmul of the model, three dots each: jax at {ratio:.2f}x torch's rate "
        f"(dw TN instead of the copy: {ratio_tn:.2f}x)")
  if not args.no_record:
    notes = [f"GFLOP/s, bfloat16 operands at {args.tokens} tokens; jax accumulates in float32 "
             "(model/matmul.py), torch's bf16 matmul likewise internally.",
             f"Time of every weight matmul of the model (three dots each, at these rates): jax at "
             f"{ratio:.2f}x torch's rate with matmul.py's dw copy, {ratio_tn:.2f}x with XLA's TN "
             "dot.",
             f"Attention at {args.rows} x {args.tokens // args.rows}: dense_attention in "
             f"{att['jax dense_attention'] / att['jax autodiff']:.2f}x the time of JAX's autodiff "
             f"of dot_product_attention, {att['jax dense_attention'] / att['torch sdpa']:.2f}x "
             "torch's sdpa."]
    results_md.record("gemm", f"{args.preset} weight matmuls at {args.tokens} tokens", table,
                      notes, [(f"weight-matmul rate vs PyTorch bf16 ({args.preset}, "
                               f"{args.tokens} tokens)", f"{ratio:.2f}x (TN dw: {ratio_tn:.2f}x)")],
                      extra_machine=f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
  main()
