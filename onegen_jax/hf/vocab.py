"""Vocabulary growth: rows for new (OneGen special) tokens, initialised from their descriptions.

`grow_vocab` adds or re-initialises rows of the embedding table (and of an untied LM head) given
token ids and description token ids; `add_task_tokens` does it for a task's special tokens read
through its tokenizer (what `launch.import_hf --config=...` and the quality benchmark run).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import NamedSharding

from onegen_jax import sharding
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.tasks import get_task
from onegen_jax.model.config import ModelConfig


def _grown(table: jax.Array, ids: jax.Array, descriptions: jax.Array, weights: jax.Array,
           size: int, axis: int) -> jax.Array:
  """`table` with its vocab `axis` zero-padded to `size` and rows `ids` [N] set to the weighted
  mean (`weights` [N, L], rows summing to 1) of the rows `descriptions` [N, L]."""
  rows = jnp.moveaxis(table, axis, 0)  # [V, D]
  means = jnp.einsum("nl,nld->nd", weights, rows[descriptions].astype(jnp.float32))
  grown = jnp.pad(rows, ((0, size - rows.shape[0]), (0, 0)))
  return jnp.moveaxis(grown.at[ids].set(means.astype(rows.dtype)), 0, axis)


def _grow_table(table, size: int, init_rows: dict[int, list[int]], axis: int):
  """Runs `_grown` as one program; a NamedSharding of `table` is kept on the result."""
  width = max((len(d) for d in init_rows.values()), default=1)
  descriptions = np.zeros((len(init_rows), width), np.int32)
  weights = np.zeros((len(init_rows), width), np.float32)
  for i, desc in enumerate(init_rows.values()):
    descriptions[i, :len(desc)] = desc
    weights[i, :len(desc)] = 1.0 / len(desc)
  target = table.sharding if isinstance(getattr(table, "sharding", None), NamedSharding) else None
  grow = jax.jit(functools.partial(_grown, size=size, axis=axis), out_shardings=target)
  ids = np.fromiter(init_rows, np.int32, len(init_rows))
  return sharding.wait_on_cpu(grow(table, ids, descriptions, weights))


def grow_vocab(params, model_config: ModelConfig, new_vocab_size: int,
               init_rows: dict[int, list[int]], pad_to_multiple: int = 1):
  """Adds vocabulary rows for new (OneGen special) tokens.

  The vocab becomes V' = new_vocab_size rounded up to `pad_to_multiple`. For every id in
  `init_rows` (new ids, or existing unused rows such as Qwen2's padding rows), its embedding row
  becomes the mean of the embedding rows of its description's token ids, and, when untied, its
  lm_head column the mean of their lm_head columns. Other added rows are zero.
  Returns (params, model_config with vocab_size=V'): embedding [V', D], lm_head kernel [D, V'].
  """
  old = model_config.vocab_size
  size = -(-new_vocab_size // pad_to_multiple) * pad_to_multiple
  if new_vocab_size < old:
    raise ValueError(f"new_vocab_size={new_vocab_size} is below the current {old}")
  for token, desc in init_rows.items():
    if not 0 <= token < new_vocab_size:
      raise ValueError(f"token id {token} is outside the new vocabulary [0, {new_vocab_size})")
    if not desc or not all(0 <= t < old for t in desc):
      raise ValueError(f"description of token {token} must be a non-empty list of ids < {old}")
  params = dict(params)
  params["embed_tokens"] = {"embedding": _grow_table(
      params["embed_tokens"]["embedding"], size, init_rows, axis=0)}
  if not model_config.tie_embeddings:
    params["lm_head"] = {"kernel": _grow_table(
        params["lm_head"]["kernel"], size, init_rows, axis=1)}
  return params, model_config.replace(vocab_size=size)


class TaskTokens(NamedTuple):
  """A model with a task's special tokens added (what `add_task_tokens` returns)."""

  params: Any  # the Decoder's 'params' tree, vocabulary tables grown to model_config.vocab_size
  model_config: ModelConfig  # vocab_size: the padded vocabulary V'
  vocab_size: int  # the real vocabulary: max(the model's, the tokenizer's with the task's tokens)
  tokenizer: TaskTokenizer  # the tokenizer of tokenizer_dir plus the task's tokens
  initialised: dict[str, int]  # token -> id of the task's tokens new to the tokenizer


def add_task_tokens(params, model_config: ModelConfig, tokenizer_dir: str, task_name: str,
                    pad_to_multiple: int = 1) -> TaskTokens:
  """Adds the special tokens of task `task_name` to a model and its tokenizer (`tokenizer_dir`).

  Tokens the tokenizer already knew keep their rows; each new one gets the mean of its
  description's rows (`grow_vocab`). The vocabulary becomes max(model_config.vocab_size, the
  tokenizer's size with the task's tokens), rounded up to `pad_to_multiple`.
  """
  known = len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
  tokenizer = TaskTokenizer(tokenizer_dir, get_task(task_name))
  init_rows = {i: d for i, d in tokenizer.description_ids().items() if i >= known}
  vocab = max(model_config.vocab_size, tokenizer.vocab_size)
  params, model_config = grow_vocab(params, model_config, vocab, init_rows, pad_to_multiple)
  initialised = {t: i for t, i in tokenizer.ids.items() if i in init_rows}
  return TaskTokens(params, model_config, vocab, tokenizer, initialised)
