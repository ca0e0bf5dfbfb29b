"""OneGen losses against an independent numpy (float64) implementation written here."""

import jax.numpy as jnp
import numpy as np
import pytest

from onegen_jax import losses


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_cross_entropy(logits, targets, weights):
  total = 0.0
  for b in range(logits.shape[0]):
    for s in range(logits.shape[1]):
      row = logits[b, s].astype(np.float64)
      log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      total += weights[b, s] * (log_z - row[targets[b, s]])
  return total, weights.sum()


def np_info_nce(q, k, positive, query_valid, key_valid, key_group, key_id, positive_groups,
                temperature):
  """Loop-by-loop InfoNCE: each valid query against its positive and every other valid key that
  is of none of its positives' documents and is the first slot of its key id."""
  q, k = np_normalize(q.astype(np.float64)), np_normalize(k.astype(np.float64))
  total, count, correct = 0.0, 0, 0
  for i in range(len(q)):
    p = positive[i]
    if not query_valid[i] or p < 0 or not key_valid[p]:
      continue
    first_copy = lambda j: not any(key_valid[l] and key_id[l] == key_id[j] for l in range(j))
    allowed = [j for j in range(len(k)) if key_valid[j] and (
        j == p or (key_group[j] not in positive_groups[i] and first_copy(j)))]
    scores = np.array([q[i] @ k[j] for j in allowed]) / temperature
    log_probs = scores - (np.log(np.sum(np.exp(scores - scores.max()))) + scores.max())
    total -= log_probs[allowed.index(p)]
    correct += allowed[int(np.argmax(scores))] == p
    count += 1
  return total, count, correct


def np_bpr(q, k, positive, negatives, query_valid, key_valid):
  q, k = np_normalize(q.astype(np.float64)), np_normalize(k.astype(np.float64))
  total, count = 0.0, 0
  for i in range(len(q)):
    p = positive[i]
    if not query_valid[i] or p < 0 or not key_valid[p]:
      continue
    count += 1
    negs = [n for n in negatives[i] if n >= 0 and key_valid[n]]
    if negs:
      total += np.mean([np.log1p(np.exp(-(q[i] @ k[p] - q[i] @ k[n]))) for n in negs])
  return total, count


@pytest.fixture
def retrieval_case():
  """8 queries, 12 keys: invalid keys, a query whose positive is invalid, an unused query slot,
  key groups with false negatives (two keys of the positive's document), a query with a second
  listed positive (key 7's document), a key packed twice (slot 9 repeats key 4), -1 padded
  negatives."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(8, 16)).astype(np.float32)
  k = rng.normal(size=(12, 16)).astype(np.float32)
  k[3] = q[0] * 0.9 + 0.1 * k[3]  # key 3: same group as query 0's positive, a near-duplicate
  k[7] = q[2] * 0.9 + 0.1 * k[7]  # key 7: query 2's other listed positive
  k[9] = k[4]  # the same key packed by two hosts
  key_valid = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
  key_group = np.array([0, 1, 2, 0, 3, 4, 5, 6, 7, 3, 9, 10])
  key_id = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 10, 11])
  positive = np.array([0, 1, 2, 4, 5, 10, 6, -1])
  positive_groups = np.full((8, 2), -1)
  positive_groups[:, 0] = np.where(positive >= 0, key_group[np.clip(positive, 0, None)], -1)
  positive_groups[2, 1] = key_group[7]
  query_valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
  negatives = np.array([[1, 3, 11], [0, -1, -1], [4, 5, 6], [-1, -1, -1], [7, 8, 9],
                        [1, 2, 3], [0, 1, 2], [-1, -1, -1]])
  return q, k, positive, negatives, query_valid, key_valid, key_group, key_id, positive_groups


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.4).astype(np.float32)
  got_sum, got_count = losses.cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets),
                                                jnp.asarray(weights))
  want_sum, want_count = np_cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)
  assert float(got_count) == want_count


def _scores(case, key_group=None, key_id=None, positive_groups=None):
  q, k, positive, _, _, key_valid, group, ids, groups = case
  pick = lambda x, default: jnp.asarray(default if x is None else x)
  return losses.in_batch_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positive),
                                jnp.asarray(key_valid), pick(key_group, group), pick(key_id, ids),
                                pick(positive_groups, groups))


def test_info_nce_masks_invalid_keys_and_false_negatives(retrieval_case):
  q, k, positive, _, query_valid, key_valid, key_group, key_id, positive_groups = retrieval_case
  valid = losses.valid_queries(jnp.asarray(query_valid), jnp.asarray(positive), jnp.asarray(key_valid))
  scores = _scores(retrieval_case)
  got_sum, got_count = losses.info_nce_sum(scores, jnp.asarray(positive), valid, 0.05)
  want_sum, want_count, want_correct = np_info_nce(q, k, positive, query_valid, key_valid, key_group,
                                                   key_id, positive_groups, 0.05)
  assert float(got_count) == want_count == 5  # query 5's positive is invalid, 6 and 7 unused
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)
  correct = np.sum((np.argmax(np.asarray(scores), -1) == positive) & np.asarray(valid))
  assert correct == want_correct
  nce = lambda s: float(losses.info_nce_sum(s, jnp.asarray(positive), valid, 0.05)[0])
  # Key 3 shares query 0's positive group, key 7 is query 2's other positive: unmasked, both
  # would be (false) negatives close to their query.
  assert nce(_scores(retrieval_case, key_group=np.arange(12))) > want_sum + 1
  assert nce(_scores(retrieval_case, positive_groups=positive_groups[:, :1])) > want_sum + 1
  # Slot 9 repeats key 4: counted twice in the denominators of queries that have it as a negative.
  assert nce(_scores(retrieval_case, key_id=np.arange(12))) > want_sum + 1e-3


def test_bpr_uses_each_querys_own_negatives(retrieval_case):
  q, k, positive, negatives, query_valid, key_valid, *_ = retrieval_case
  valid = losses.valid_queries(jnp.asarray(query_valid), jnp.asarray(positive), jnp.asarray(key_valid))
  got_sum, got_count = losses.bpr_sum(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positive),
                                      jnp.asarray(negatives), jnp.asarray(key_valid), valid)
  want_sum, want_count = np_bpr(q, k, positive, negatives, query_valid, key_valid)
  assert float(got_count) == want_count
  np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)


def test_bpr_is_scale_invariant_per_vector(retrieval_case):
  """Each vector is normalised on its own: rescaling one key changes nothing."""
  q, k, positive, negatives, query_valid, key_valid, *_ = retrieval_case
  valid = losses.valid_queries(jnp.asarray(query_valid), jnp.asarray(positive), jnp.asarray(key_valid))
  args = (jnp.asarray(positive), jnp.asarray(negatives), jnp.asarray(key_valid), valid)
  scaled = k.copy()
  scaled[1] *= 37.0
  a = losses.bpr_sum(jnp.asarray(q), jnp.asarray(k), *args)[0]
  b = losses.bpr_sum(jnp.asarray(q), jnp.asarray(scaled), *args)[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def _batch(logits_shape, retrieval_case, query_valid=None):
  q, k, positive, negatives, qv, key_valid, key_group, key_id, positive_groups = retrieval_case
  rng = np.random.default_rng(2)
  b, s, v = logits_shape
  hidden = rng.normal(size=(b, s, q.shape[1])).astype(np.float32)
  query_index = np.stack([np.arange(8) % b, np.arange(8) % s], 1)
  key_index = np.stack([np.arange(12) % b, (np.arange(12) + 8) % s], 1)
  hidden[query_index[:, 0], query_index[:, 1]] = q
  hidden[key_index[:, 0], key_index[:, 1]] = k
  batch = dict(targets=rng.integers(0, v, (b, s)), loss_weight=(rng.random((b, s)) > 0.5).astype(np.float32),
               query_index=query_index, key_index=key_index, positive=positive, negatives=negatives,
               query_valid=qv if query_valid is None else query_valid, key_valid=key_valid,
               key_group=key_group, key_id=key_id, positive_groups=positive_groups)
  logits = rng.normal(size=logits_shape).astype(np.float32)
  return logits, hidden, {name: jnp.asarray(x) for name, x in batch.items()}


@pytest.mark.parametrize("loss_type", ["infonce", "bpr"])
def test_combined_loss_is_the_weighted_sum_of_numpy_losses(retrieval_case, loss_type):
  logits, hidden, batch = _batch((3, 20, 7), retrieval_case)
  sums = losses.loss_sums(jnp.asarray(logits), jnp.asarray(hidden), batch, loss_type, 0.02)
  gen_total, ret_total = losses.batch_totals(batch)
  total = losses.combine(sums, gen_total, ret_total, 0.5, 2.0)
  ce, n = np_cross_entropy(logits, np.asarray(batch["targets"]), np.asarray(batch["loss_weight"]))
  q, k, positive, negatives, query_valid, key_valid, key_group, key_id, groups = retrieval_case
  if loss_type == "infonce":
    ret, count, _ = np_info_nce(q, k, positive, query_valid, key_valid, key_group, key_id, groups,
                                0.02)
  else:
    ret, count = np_bpr(q, k, positive, negatives, query_valid, key_valid)
  np.testing.assert_allclose(float(total), 0.5 * ce / n + 2.0 * ret / count, rtol=1e-5)


def test_no_valid_query_leaves_only_generation_loss(retrieval_case):
  logits, hidden, batch = _batch((3, 20, 7), retrieval_case, query_valid=np.zeros(8, bool))
  sums = losses.loss_sums(jnp.asarray(logits), jnp.asarray(hidden), batch, "bpr", 0.02)
  gen_total, ret_total = losses.batch_totals(batch)
  assert float(ret_total) == 0
  total = losses.combine(sums, gen_total, ret_total, 1.0, 1.0)
  ce, n = np_cross_entropy(logits, np.asarray(batch["targets"]), np.asarray(batch["loss_weight"]))
  np.testing.assert_allclose(float(total), ce / n, rtol=1e-5)
  assert np.isfinite(float(losses.metrics(sums)["loss_ret"]))
