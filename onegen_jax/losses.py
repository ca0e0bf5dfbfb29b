"""OneGen losses as pure functions of arrays.

Each loss returns a (sum, count) pair rather than a mean, so that a batch split into micro-batches
can be normalised by the counts of the whole batch: gradient accumulation then equals one large
batch exactly. `combine` turns the sums into lambda_g * L_gen + lambda_r * L_ret.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from onegen_jax.model.ret_vectors import gather_vectors, l2_normalize

NEG_INF = -1e9


class LossSums(NamedTuple):
  """Summed losses and their normalisers over (part of) a batch; all float32 scalars."""

  gen_sum: jnp.ndarray  # sum over GEN targets of the cross-entropy
  gen_count: jnp.ndarray  # number of GEN targets (sum of loss weights)
  ret_sum: jnp.ndarray  # sum over valid queries of the contrastive loss
  ret_count: jnp.ndarray  # number of valid queries
  ret_correct: jnp.ndarray  # valid queries whose positive ranks first among the in-batch keys


def cross_entropy_sum(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray):
  """logits [B, S, V], targets int32 [B, S], weights float32 [B, S] -> (sum of w * CE, sum of w)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def chunked_cross_entropy_sum(logits_fn, hidden: jnp.ndarray, targets: jnp.ndarray,
                              weights: jnp.ndarray, num_chunks: int):
  """cross_entropy_sum without ever holding the whole [B, S, V] logits (MaxText's vocab tiling).

  hidden [B, S, D] is cut along the sequence into `num_chunks` chunks of S / num_chunks tokens;
  a `lax.scan` computes each chunk's logits (logits_fn: [B, s, D] -> [B, s, V]) and reduces them
  to a sum at once. The chunk body is rematerialised (jax.checkpoint), so the backward pass too
  holds one chunk's logits at a time. Equals cross_entropy_sum(logits_fn(hidden), ...) up to
  float32 summation order.
  """
  rows, seq_len = targets.shape
  if seq_len % num_chunks:
    raise ValueError(f"loss.gen_chunks={num_chunks} does not divide the sequence length {seq_len}")
  size = seq_len // num_chunks
  chunks = lambda x: jnp.moveaxis(x.reshape(rows, num_chunks, size, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk(total, xs):
    h, t, w = xs
    return total + cross_entropy_sum(logits_fn(h), t, w)[0], None

  total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32),
                          (chunks(hidden), chunks(targets), chunks(weights)))
  return total, jnp.sum(weights)


def valid_queries(query_valid: jnp.ndarray, positive: jnp.ndarray, key_valid: jnp.ndarray):
  """bool [Q]: the query slot is used and its positive key exists."""
  return query_valid & key_valid[jnp.clip(positive, 0)] & (positive >= 0)


def in_batch_scores(queries: jnp.ndarray, keys: jnp.ndarray, positive: jnp.ndarray,
                    key_valid: jnp.ndarray, key_group: jnp.ndarray, key_id: jnp.ndarray,
                    positive_groups: jnp.ndarray) -> jnp.ndarray:
  """Cosine scores [Q, K] with every key but the allowed ones set to NEG_INF.

  queries [Q, D], keys [K, D], positive int32 [Q] (index into keys), key_valid bool [K],
  key_group int32 [K] (global document id), key_id int32 [K] (global key id),
  positive_groups int32 [Q, P] (documents of each query's listed positives, -1 padded).
  Allowed for a query: its positive, and every other valid key that is
  - not of a document of its listed positives (false negatives: another sentence key of the gold
    paragraph, another gold paragraph of a multi-positive query), and
  - the first slot of its key id (a document packed by two hosts is one negative, not two).
  """
  scores = l2_normalize(queries) @ l2_normalize(keys).T
  num_keys = keys.shape[0]
  slots = jnp.arange(num_keys)
  is_positive = slots[None, :] == jnp.clip(positive, 0)[:, None]
  of_positive_doc = jnp.any((key_group[None, :, None] == positive_groups[:, None, :])
                            & (positive_groups[:, None, :] >= 0), axis=-1)  # [Q, K]
  earlier_copy = jnp.any((key_id[None, :] == key_id[:, None]) & key_valid[:, None]
                         & (slots[:, None] < slots[None, :]), axis=0)  # [K]
  allowed = key_valid[None, :] & (is_positive | (~of_positive_doc & ~earlier_copy[None, :]))
  return jnp.where(allowed, scores, NEG_INF)


def info_nce_sum(scores: jnp.ndarray, positive: jnp.ndarray, valid: jnp.ndarray,
                 temperature: float):
  """InfoNCE over in-batch keys. scores [Q, K] (masked), positive int32 [Q], valid bool [Q].

  Returns (sum over valid queries of -log softmax(scores / t)[positive], number valid).
  """
  log_probs = jax.nn.log_softmax(scores / temperature, axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.clip(positive, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid.astype(jnp.float32))


def bpr_sum(queries: jnp.ndarray, keys: jnp.ndarray, positive: jnp.ndarray,
            negatives: jnp.ndarray, key_valid: jnp.ndarray, valid: jnp.ndarray):
  """BPR: mean over each query's own negatives of -log sigmoid(cos(q, pos) - cos(q, neg)).

  queries [Q, D], keys [K, D], positive int32 [Q], negatives int32 [Q, N] (-1 = none),
  valid bool [Q]. Every vector is L2-normalised on its own (the reference normalises over the
  sequence axis, a bug). A valid query without any negative contributes 0 but still counts.
  Returns (sum over valid queries, number valid).
  """
  q = l2_normalize(queries)
  k = l2_normalize(keys)
  s_pos = jnp.sum(q * k[jnp.clip(positive, 0)], axis=-1)  # [Q]
  s_neg = jnp.einsum("qd,qnd->qn", q, k[jnp.clip(negatives, 0)])  # [Q, N]
  neg_ok = (negatives >= 0) & key_valid[jnp.clip(negatives, 0)]
  per_pair = -jax.nn.log_sigmoid(s_pos[:, None] - s_neg)
  per_query = jnp.sum(jnp.where(neg_ok, per_pair, 0.0), axis=-1) / jnp.maximum(
      jnp.sum(neg_ok, axis=-1), 1)
  return jnp.sum(jnp.where(valid, per_query, 0.0)), jnp.sum(valid.astype(jnp.float32))


def loss_sums(logits: jnp.ndarray | None, hidden: jnp.ndarray, batch: dict, loss_type: str,
              temperature: float, gen_sums: tuple | None = None) -> LossSums:
  """All OneGen loss sums of one (micro-)batch in the batch contract (see docs/architecture.md).

  gen_sums: L_gen's (sum, count) computed already (chunked_cross_entropy_sum); logits then None.
  """
  gen_sum, gen_count = gen_sums if gen_sums is not None else cross_entropy_sum(
      logits, batch["targets"], batch["loss_weight"])
  ret = retrieval_sums(gather_vectors(hidden, batch["query_index"]),
                       gather_vectors(hidden, batch["key_index"]), batch, loss_type, temperature)
  return LossSums(gen_sum, gen_count, *ret)


def retrieval_sums(queries: jnp.ndarray, keys: jnp.ndarray, batch: dict, loss_type: str,
                   temperature: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(ret_sum, ret_count, ret_correct) of LossSums from the query vectors [Q, D] and key vectors
  [K, D] of the batch's query and key slots."""
  valid = valid_queries(batch["query_valid"], batch["positive"], batch["key_valid"])
  scores = in_batch_scores(queries, keys, batch["positive"], batch["key_valid"], batch["key_group"],
                           batch["key_id"], batch["positive_groups"])
  if loss_type == "infonce":
    ret_sum, ret_count = info_nce_sum(scores, batch["positive"], valid, temperature)
  elif loss_type == "bpr":
    ret_sum, ret_count = bpr_sum(queries, keys, batch["positive"], batch["negatives"],
                                 batch["key_valid"], valid)
  else:
    raise ValueError(f"loss_type={loss_type!r}; expected 'infonce' or 'bpr'")
  correct = jnp.argmax(scores, axis=-1) == batch["positive"]
  return ret_sum, ret_count, jnp.sum((correct & valid).astype(jnp.float32))


def batch_totals(batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(number of GEN targets, number of valid queries) of a batch, with or without a leading
  micro-batch axis: the normalisers of the whole batch, known before any forward pass."""
  valid = valid_queries(batch["query_valid"], batch["positive"], batch["key_valid"]) if (
      batch["query_valid"].ndim == 1) else jax.vmap(valid_queries)(
          batch["query_valid"], batch["positive"], batch["key_valid"])
  return jnp.sum(batch["loss_weight"]), jnp.sum(valid.astype(jnp.float32))


def combine(sums: LossSums, gen_total: jnp.ndarray, ret_total: jnp.ndarray, lambda_gen: float,
            lambda_ret: float) -> jnp.ndarray:
  """lambda_g * L_gen + lambda_r * L_ret of the part `sums`, normalised by the whole batch's totals.

  Summing this over the micro-batches of a batch gives the loss of the whole batch. L_ret counts
  only when the whole batch has at least one valid query.
  """
  loss_gen = sums.gen_sum / jnp.maximum(gen_total, 1.0)
  loss_ret = jnp.where(ret_total > 0, sums.ret_sum / jnp.maximum(ret_total, 1.0), 0.0)
  return lambda_gen * loss_gen + lambda_ret * loss_ret


def metrics(totals: LossSums) -> dict[str, jnp.ndarray]:
  """Per-batch metrics from the summed losses of the whole batch."""
  count = jnp.maximum(totals.ret_count, 1.0)
  return {
      "loss_gen": totals.gen_sum / jnp.maximum(totals.gen_count, 1.0),
      "loss_ret": totals.ret_sum / count,
      "retrieval_accuracy": totals.ret_correct / count,
      "num_valid_queries": totals.ret_count,
      "num_gen_targets": totals.gen_count,
  }
