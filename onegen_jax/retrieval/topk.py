"""Top k over a key matrix whose rows are sharded over mesh axes: each shard's own top k under
`shard_map`, then one merge of the shards' candidates. `index.ExactIndex` / `ApproxIndex` (a 1-D
mesh of their own) and `device_kb` (the model's mesh) both search with it."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

# scores float32 [C, n] of one shard, k -> (values [C, k], local indices int32 [C, k])
LocalTopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


def sharded_top_k(queries: jax.Array, vectors: jax.Array, n: int, k: int, mesh: Mesh,
                  axes: tuple[str, ...], local_top_k: LocalTopK, precision: jax.lax.Precision
                  ) -> tuple[jax.Array, jax.Array]:
  """Top k of dot-product scores over a row-sharded key matrix: each shard's own top k under
  `shard_map`, then one merge of the shards' candidates.

  queries [C, D] (replicated; scored in the vectors' dtype, accumulated in float32), vectors
  [Npad, D] with rows sharded over the mesh axes `axes` (Npad a multiple of their product), n
  real rows (the rest never score) ->
  (scores float32 [C, k'], rows int32 [C, k']), best first, k' = min(k, the candidates): k
  unless k exceeds the padded rows. Ties: the lower row first.
  """

  def shard_top_k(q, shard):
    rows = shard.shape[0]
    first = jax.lax.axis_index(axes) * rows
    scores = jnp.dot(q.astype(shard.dtype), shard.T, precision=precision,
                     preferred_element_type=jnp.float32)
    scores = jnp.where(first + jnp.arange(rows) < n, scores, -jnp.inf)
    values, local = local_top_k(scores, min(k, rows))
    return values, local + first

  values, rows = jax.shard_map(shard_top_k, mesh=mesh, in_specs=(P(), P(axes, None)),
                               out_specs=P(None, axes))(queries, vectors)
  # shard candidates are in row order: ties stay stable
  values, best = jax.lax.top_k(values, min(k, values.shape[1]))
  return values, jnp.take_along_axis(rows, best, axis=1)


def exact_top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """A shard's exact top k (LocalTopK)."""
  return jax.lax.top_k(scores, k)


def approx_top_k(recall_target: float, total_rows: int, scores: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array]:
  """A shard's `approx_max_k` (LocalTopK once the first two are bound): the recall is estimated
  for the whole key set of `total_rows` (padded) rows, of which a shard is a part."""
  return jax.lax.approx_max_k(scores, k, recall_target=recall_target,
                              reduction_input_size_override=total_rows)
