"""LoRA (Hu et al., 2021) over a frozen, possibly low-precision base, as PEFT defines it.

`LoraDense` stands in for the decoder's nn.Dense projections when `ModelConfig.lora` is set: the
same 'kernel' (and 'bias') names, in the base dtype (int8 + 'kernel_scale': model/quant.py), and
on the adapted projections 'lora_a' [in, r] (PEFT's kaiming-uniform init) and 'lora_b' [r, out]
(zeros, so the model starts as its base): y = x W + (alpha / r) dropout(x) A B.

The parameter tree of such a model splits (`split`) into the trainable tree (every lora_a/lora_b,
the modules in `modules_to_save`, and under 'trainable_tokens' the rows `token_ids` of the
embedding [n, D] and of an untied lm_head [D, n]: PEFT's trainable_token_indices) and the frozen
rest; `merge` puts them back together, the trained rows written over the frozen tables' rows.
`with_base` fills a LoRA tree from a plain Decoder's parameters; `merge_adapters` folds it back
into a plain tree (W + (alpha / r) A B), for export and serving.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from onegen_jax.model import quant
from onegen_jax.model.config import LoraConfig

# Tables whose rows `token_ids` train: module -> (leaf, vocab axis).
TOKEN_TABLES = {"embed_tokens": ("embedding", 0), "lm_head": ("kernel", 1)}
TOKENS = "trainable_tokens"
ADAPTERS = ("lora_a", "lora_b")
# The random int8 base (no `init_from`: tests) is N(0, 0.02), the decoder's init, quantized with
# this step (4 standard deviations at 127).
_RANDOM_INT8_STEP = 4 * 0.02 / quant.INT8_MAX


class LoraDense(nn.Module):
  """x [..., in] -> [..., features]: a frozen kernel plus, when `adapted`, the LoRA path."""

  features: int
  names: tuple[str, str]  # logical axes of the kernel (in, out)
  lora: LoraConfig
  dtype: str  # compute dtype
  use_bias: bool = False
  adapted: bool = True
  kernel_init: Callable = nn.initializers.normal(0.02)
  dot_general: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shape = (x.shape[-1], self.features)
    frozen = self.lora.frozen_dtype
    box = nn.with_logical_partitioning
    if self.lora.base_dtype == "int8":
      draw = lambda key, shape: jnp.clip(jnp.round(self.kernel_init(key, shape) / _RANDOM_INT8_STEP),
                                         -quant.INT8_MAX, quant.INT8_MAX).astype(jnp.int8)
      q = self.param("kernel", box(draw, self.names), shape)
      scale = self.param("kernel_scale", box(nn.initializers.constant(_RANDOM_INT8_STEP),
                                             (self.names[1],)), (self.features,), jnp.float32)
      kernel = quant.dequantize(q, scale, self.dtype)
    else:
      kernel = self.param("kernel", box(self.kernel_init, self.names), shape, frozen)
    dot = self.dot_general or jax.lax.dot_general
    matmul = lambda a, b: dot(a, b.astype(self.dtype), (((a.ndim - 1,), (0,)), ((), ())))
    x = x.astype(self.dtype)
    y = matmul(x, kernel)
    if self.use_bias:
      bias = self.param("bias", box(nn.initializers.zeros, (self.names[1],)), (self.features,),
                        frozen)
      y += bias.astype(self.dtype)
    if not self.adapted:
      return y
    r = self.lora.rank
    a = self.param("lora_a", box(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                 (self.names[0], "lora_rank")), (shape[0], r), jnp.float32)
    b = self.param("lora_b", box(nn.initializers.zeros, ("lora_rank", self.names[1])),
                   (r, self.features), jnp.float32)
    # Dropout on the adapter's input only, and only when the caller passes a 'dropout' rng (the
    # train step); evaluation and serving pass none.
    h = nn.Dropout(self.lora.dropout)(x, deterministic=not self.has_rng("dropout"))
    return y + matmul(matmul(h, a), b) * jnp.asarray(self.lora.scale, self.dtype)


def _is_trained(path: tuple[str, ...], lora: LoraConfig) -> bool:
  return path[-1] in ADAPTERS or path[0] in lora.modules_to_save


def _map_boxed(fn, leaf, names=None):
  """fn(value) of a leaf, inside its nn.LogicallyPartitioned box if it has one (names replaced
  when given)."""
  if isinstance(leaf, nn.LogicallyPartitioned):
    return leaf.replace(value=fn(leaf.value), names=leaf.names if names is None else names)
  return fn(leaf)


def _frozen(path: tuple[str, ...], leaf, lora: LoraConfig):
  """A frozen leaf in its storage dtype: floating weights in lora.frozen_dtype, int8 kernels and
  their float32 scales as they are."""
  def cast(x):
    floating = jnp.issubdtype(x.dtype, jnp.floating) and path[-1] != "kernel_scale"
    return x.astype(lora.frozen_dtype) if floating else x
  return _map_boxed(cast, leaf)


def split(params, lora: LoraConfig) -> tuple[dict, dict]:
  """A LoRA Decoder's 'params' tree (boxed or not) -> (trainable, frozen); see the module doc.
  The token rows are float32 copies of the tables' rows, without a vocab sharding."""
  flat = traverse_util.flatten_dict(params)
  trainable = {p: v for p, v in flat.items() if _is_trained(p, lora)}
  frozen = {p: _frozen(p, v, lora) for p, v in flat.items() if not _is_trained(p, lora)}
  ids = np.asarray(lora.token_ids, np.int32)
  for module, (leaf, axis) in TOKEN_TABLES.items():
    table = flat.get((module, leaf))
    if ids.size and (module, leaf) in frozen:
      names = None
      if isinstance(table, nn.LogicallyPartitioned):
        names = tuple(None if i == axis else n for i, n in enumerate(table.names))
      rows = lambda x: jnp.take(x, ids, axis=axis).astype(jnp.float32)
      trainable[(TOKENS, module)] = _map_boxed(rows, table, names)
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen, lora: LoraConfig):
  """(trainable, frozen) of `split` -> the LoRA Decoder's 'params' tree: the trained token rows
  written over the frozen tables' rows (in the tables' dtype)."""
  flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
  ids = np.asarray(lora.token_ids, np.int32)
  for module, (leaf, axis) in TOKEN_TABLES.items():
    rows = flat.pop((TOKENS, module), None)
    if rows is not None:
      table = flat[(module, leaf)]
      flat[(module, leaf)] = table.at[(slice(None),) * axis + (ids,)].set(rows.astype(table.dtype))
  return traverse_util.unflatten_dict(flat)


def with_base(params, base):
  """The LoRA tree `params` with every base weight taken from `base`, a plain Decoder's 'params'
  tree of the same model: kernels quantized where `params` holds int8, other leaves cast to the
  dtype they have in `params`; adapters (and leaves `base` lacks) kept."""
  flat = traverse_util.flatten_dict(params)
  for path, value in traverse_util.flatten_dict(base).items():
    scale_path = (*path[:-1], "kernel_scale")
    if path[-1] == "kernel" and scale_path in flat:
      flat[path], flat[scale_path] = quant.quantize(value)
    else:
      flat[path] = jnp.asarray(value, flat[path].dtype)
  return traverse_util.unflatten_dict(flat)


def merge_adapters(params, lora: LoraConfig, dtype: str = "float32"):
  """A LoRA Decoder's 'params' tree (after `merge`) -> the plain Decoder's, every leaf in `dtype`:
  each adapted kernel W (int8: dequantized) becomes W + (alpha / r) A B (stacked layers too)."""
  flat = traverse_util.flatten_dict(params)
  plain = {}
  for path, value in flat.items():
    if path[-1] in (*ADAPTERS, "kernel_scale"):
      continue
    module = path[:-1]
    if path[-1] == "kernel" and (*module, "kernel_scale") in flat:
      value = quant.dequantize(value, flat[(*module, "kernel_scale")], jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    if path[-1] == "kernel" and (*module, "lora_a") in flat:
      a, b = flat[(*module, "lora_a")], flat[(*module, "lora_b")]
      value = value + lora.scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    plain[path] = value.astype(dtype)
  return traverse_util.unflatten_dict(plain)
