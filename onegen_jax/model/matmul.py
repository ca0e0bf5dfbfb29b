"""The model's weight matmuls with low-precision operands and float32 accumulation, forward and
backward (`ModelConfig.dot_accumulation`).

Why: XLA:CPU runs a bfloat16 x bfloat16 -> bfloat16 dot on its generic kernel, but a bfloat16 x
bfloat16 -> float32 dot (`preferred_element_type`) on a library kernel that uses the CPU's
AVX512-BF16 instructions: 2-4x the GEMM rate on the benchmark machine (benchmarks/RESULTS.md,
finding 9). JAX's own transpose of such a dot hands the float32 cotangent to both backward dots,
which then run in float32; the custom VJP here keeps them bfloat16 x bfloat16 -> float32 too.
The weight gradient x^T @ g contracts the token axis, the leading axis of both operands; XLA:CPU
runs that dot (or one on a transposed view, which layout assignment turns back into the same
thing) at half its rate for the same dot on row-major operands (finding 14), so the backward pass
copies x^T into a row-major array first (`row_major_transpose`).
Outputs are cast back to the operands' dtype, as a plain low-precision dot returns them. TPUs and
GPUs accumulate low-precision dots in float32 natively: "auto" leaves them alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax



def accumulates_in_float32(setting: str, dtype: str, backend: str) -> bool:
  """Whether `dot_accumulation` = setting (config.DOT_ACCUMULATIONS) routes a model's matmuls
  through `matmul`: "float32" always for a low-precision compute dtype, "auto" only on a CPU
  backend, "native" never."""
  low_precision = jnp.dtype(dtype).itemsize < 4
  return low_precision and (setting == "float32" or (setting == "auto" and backend == "cpu"))


def _dot_f32(a: jnp.ndarray, b: jnp.ndarray, contract: tuple[tuple[int, ...], tuple[int, ...]],
             dtype) -> jnp.ndarray:
  return lax.dot_general(a, b, (contract, ((), ())),
                         preferred_element_type=jnp.float32).astype(dtype)


@jax.custom_vjp
def matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """x [..., K] @ w [K, N] -> [..., N] in x's dtype, accumulated in float32 (gradients too)."""
  return _dot_f32(x, w, ((x.ndim - 1,), (0,)), x.dtype)


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def row_major_transpose(x: jnp.ndarray) -> jnp.ndarray:
  """x [T, K] -> x^T [K, T] as a physical row-major copy: reshaped to [K, T/2, 2] behind an
  optimization barrier, so XLA cannot fold the transpose into the consumer's operand layout (the
  split keeps T's sharding on its major part). Odd T: the plain transposed view."""
  rows, cols = x.shape
  if rows % 2:
    return x.T
  return lax.optimization_barrier(x.T.reshape(cols, rows // 2, 2)).reshape(cols, rows)


def _matmul_bwd(residuals, g):
  """g [..., N] -> (dx [..., K] = g @ w^T, dw [K, N] = x^T @ g over every leading axis)."""
  x, w = residuals
  g = g.astype(x.dtype)
  x_t = row_major_transpose(x.reshape(-1, x.shape[-1]))
  return (_dot_f32(g, w, ((g.ndim - 1,), (1,)), x.dtype),
          _dot_f32(x_t, g.reshape(-1, g.shape[-1]), ((1,), (0,)), w.dtype))


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """A `lax.dot_general` for `flax.linen.Dense(dot_general=...)`: Dense's contraction (lhs's last
  axis with a [K, N] kernel's first, default precision) goes through `matmul`; anything else to
  lax.dot_general."""
  dense = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (dimension_numbers != dense or rhs.ndim != 2 or precision is not None
      or preferred_element_type is not None):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return matmul(lhs, rhs)
