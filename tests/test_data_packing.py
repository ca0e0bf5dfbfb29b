"""Property test of sampling + packing: every example token exactly once, indices on the right
RET tokens, positives on the right uid, negatives unique and never a batch positive."""

import numpy as np
from hypothesis import given, settings, strategies as st

from onegen_jax.data.loader import pack_all
from onegen_jax.data.packing import BatchShape
from onegen_jax.data.tokenized import Database
from onegen_jax.data.retrieval_sampling import Sampling

EXAMPLE, DOC, RET_QUERY, RET_DOC = 5, 6, 2, 3  # first token of examples / documents; RET ids


def _documents(rng, n):
  docs = []
  for d in range(n):
    tokens, keys = [DOC, 200 + d], []
    for _ in range(rng.integers(1, 4)):
      tokens += list(rng.integers(50, 90, rng.integers(0, 4)))
      keys.append(len(tokens))
      tokens.append(RET_DOC)
    docs.append({"tokens": np.array(tokens, np.int32), "is_target": rng.random(len(tokens)) < .7,
                 "positions": np.array(keys, np.int32), "uid": f"d{d}", "index": d})
  return docs


def _examples(rng, n, num_keys):
  examples = []
  for e in range(n):
    tokens, positions, positives, negatives = [EXAMPLE, 100 + e], [], [], []
    for _ in range(rng.integers(0, 4)):
      tokens += list(rng.integers(10, 50, rng.integers(1, 5)))
      if rng.random() < .8:  # a valid anchor; else a RET token that is no query
        positions.append(len(tokens))
        positives.append(rng.choice(num_keys, min(num_keys, rng.integers(1, 3)), replace=False))
        negatives.append(rng.choice(num_keys, rng.integers(0, 5)))
      tokens.append(RET_QUERY)
    flat = lambda xs: np.array([k for x in xs for k in x], np.int32)
    examples.append({"tokens": np.array(tokens, np.int32),
                     "is_target": rng.random(len(tokens)) < .7, "index": e,
                     "positions": np.array(positions, np.int32),
                     "positive_keys": flat(positives), "negative_keys": flat(negatives),
                     "positive_counts": np.array([len(p) for p in positives], np.int32),
                     "negative_counts": np.array([len(n) for n in negatives], np.int32)})
  return examples


def _segments(batch, row):
  """[(start, stop)] of the row's segments."""
  seg = batch["segment_ids"][row]
  return [(int(np.argmax(seg == s)), int(np.argmax(seg == s)) + int(np.sum(seg == s)))
          for s in range(1, seg.max() + 1)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), num_docs=st.integers(1, 8), num_examples=st.integers(1, 12),
       rows=st.integers(3, 5), n_pos=st.integers(1, 3), n_neg=st.integers(0, 3),
       text_weight=st.sampled_from([1.0, 0.0, 0.25]))
def test_packing_keeps_tokens_and_points_at_the_right_ret_tokens(seed, num_docs, num_examples,
                                                                 rows, n_pos, n_neg, text_weight):
  rng = np.random.default_rng(seed)
  docs = _documents(rng, num_docs)
  db = Database(docs, text_weight)  # documents' GEN targets weigh text_weight
  examples = _examples(rng, num_examples, len(db))
  shape = BatchShape(rows, 64, num_queries=4, num_keys=64, num_negatives=3)
  sampling = Sampling(n_pos, n_neg, seed=seed)
  batches = pack_all(examples, db, shape, sampling)
  seen = []
  for b in batches:
    owner = {}  # (row, col) -> ("example", index, start) | ("doc", index, start)
    docs_here = []
    for row in range(rows):
      for start, stop in _segments(b, row):
        tokens = b["tokens"][row, start:stop]
        np.testing.assert_array_equal(b["positions"][row, start:stop], np.arange(stop - start))
        np.testing.assert_array_equal(b["targets"][row, start:stop - 1], tokens[1:])
        kind, index = ("example", tokens[1] - 100) if tokens[0] == EXAMPLE else ("doc", tokens[1] - 200)
        source = (examples if kind == "example" else docs)[index]
        np.testing.assert_array_equal(tokens, source["tokens"])  # the whole sequence, uncut
        trained = source["is_target"][1:] * (1.0 if kind == "example" else text_weight)
        np.testing.assert_array_equal(b["loss_weight"][row, start:stop - 1], trained)
        assert b["loss_weight"][row, stop - 1] == 0 and b["targets"][row, stop - 1] == 0
        (seen if kind == "example" else docs_here).append(index)
        owner.update({(row, c): (kind, index, start) for c in range(start, stop)})
      assert not b["loss_weight"][row][b["segment_ids"][row] == 0].any()
    assert len(docs_here) == len(set(docs_here))  # a document at most once per batch
    valid_keys = np.flatnonzero(b["key_valid"])

    def key_uid(slot):
      """The uid of the key a slot points at, read off the packed document itself."""
      row, col = b["key_index"][slot]
      kind, d, start = owner[(row, col)]
      assert kind == "doc" and b["tokens"][row, col] == RET_DOC
      k = list(docs[d]["positions"]).index(col - start)  # a key position of that document
      return f"d{d}" if k == 0 else f"d{d}-{k}"

    for slot in valid_keys:  # global ids: the document's place in the db, the key's id
      assert b["key_group"][slot] == owner[tuple(b["key_index"][slot])][1]
      assert db.key_uids[b["key_id"][slot]] == key_uid(slot)
    positives, negatives = set(), []
    per_example = {}
    for q in np.flatnonzero(b["query_valid"]):
      row, col = b["query_index"][q]
      kind, e, start = owner[(row, col)]
      assert kind == "example" and b["tokens"][row, col] == RET_QUERY
      ex = examples[e]
      anchor = list(ex["positions"]).index(col - start)
      key_ids = np.split(ex["positive_keys"], np.cumsum(ex["positive_counts"])[:-1])[anchor]
      candidates = {db.key_uids[k] for k in key_ids}
      assert key_uid(b["positive"][q]) in candidates  # the positive is the right uid
      listed_docs = sorted(int(uid.split("-")[0][1:]) for uid in candidates)
      groups = [int(g) for g in b["positive_groups"][q] if g >= 0]
      assert groups[0] == b["key_group"][b["positive"][q]] and sorted(groups) == listed_docs
      positives.add(int(b["positive"][q]))
      own = [int(s) for s in b["negatives"][q] if s >= 0]
      assert len(own) <= n_neg and all(key_uid(s) not in candidates for s in own)
      negatives += own
      per_example[e] = per_example.get(e, 0) + 1
    assert not b["query_valid"][np.sum(b["query_valid"]):].any()
    assert len(negatives) == len(set(negatives)) and not positives & set(negatives)
    for e, count in per_example.items():
      assert count == min(n_pos, len(examples[e]["positions"]))
  assert sorted(seen) == list(range(num_examples))  # every example exactly once
  again = pack_all(examples, db, shape, sampling)  # reproducible from the seed
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)



def test_negatives_follow_the_list_and_skip_a_later_members_positive():
  docs = [{"tokens": np.array([DOC, 200 + d, RET_DOC], np.int32), "is_target": np.ones(3, bool),
           "positions": np.array([2], np.int32), "uid": f"d{d}", "index": d} for d in range(6)]
  db = Database(docs)  # one key per document: key id == document index

  def example(index, positive, negatives):
    return {"tokens": np.array([EXAMPLE, 100 + index, 11, RET_QUERY], np.int32),
            "is_target": np.ones(4, bool), "index": index, "positions": np.array([3], np.int32),
            "positive_keys": np.array([positive], np.int32),
            "positive_counts": np.array([1], np.int32),
            "negative_keys": np.array(negatives, np.int32),
            "negative_counts": np.array([len(negatives)], np.int32)}

  def negative_doc(batch, query):
    row, col = batch["key_index"][batch["negatives"][query, 0]]
    return int(batch["tokens"][row, col - 1]) - 200

  shape = BatchShape(4, 64, num_queries=4, num_keys=16, num_negatives=2)
  a, b = example(0, 0, [1, 2]), example(1, 1, [3])
  [alone] = pack_all([a], db, shape, Sampling(1, 1))
  [both] = pack_all([a, b], db, shape, Sampling(1, 1))
  assert negative_doc(alone, 0) == 1  # the first listed negative
  assert negative_doc(both, 0) == 2  # 1 became b's positive after a joined: chosen again
  assert negative_doc(both, 1) == 3


def _shared_document_pair(task):
  """Two synthetic examples whose documents overlap: the first's positive is among the
  second's documents."""
  docs = lambda ex: {u for q in ex.queries for u in (q.positive, *q.negatives)}
  for a in task.train:
    for b in task.train:
      if a is not b and a.queries[0].positive in docs(b) - {b.queries[0].positive}:
        return a, b
  raise AssertionError("no two examples share a document")


def test_two_hosts_sharing_a_document_give_the_one_host_infonce_loss(task):
  """A document packed by two hosts is one key of the global batch for InfoNCE: the loss over
  the concatenated host batches equals the loss of one host packing both examples.

  Hidden states are set per key id (and each query near its positive and the shared document,
  so counting that document twice would show); everything else is the real packing, host
  offsets and loss."""
  import jax.numpy as jnp
  from conftest import BATCH_SHAPE
  from onegen_jax import losses
  from onegen_jax.data.loader import Host
  from onegen_jax.data.packing import BatchPacker
  a, b = _shared_document_pair(task)
  shared = task.corpus.key_ids[a.queries[0].positive]
  vector = np.random.default_rng(0).normal(size=(len(task.corpus.key_ids), 16))

  def packed(shape, *examples):
    packer = BatchPacker(task.corpus, shape)
    assert all(packer.try_add(ex) for ex in examples)
    return packer.emit()

  def infonce(batch):
    hidden = np.zeros(batch["tokens"].shape + (16,), np.float32)
    for slot in np.flatnonzero(batch["key_valid"]):
      hidden[tuple(batch["key_index"][slot])] = vector[batch["key_id"][slot]]
    for q in np.flatnonzero(batch["query_valid"]):
      positive = vector[batch["key_id"][batch["positive"][q]]]
      hidden[tuple(batch["query_index"][q])] = positive + 0.8 * vector[shared]
    logits = np.zeros(batch["tokens"].shape + (8,), np.float32)
    sums = losses.loss_sums(jnp.asarray(logits), jnp.asarray(hidden),
                            {k: jnp.asarray(v) for k, v in batch.items()}, "infonce", 0.1)
    return float(sums.ret_sum), float(sums.ret_count), float(sums.ret_correct)

  one_host = packed(BATCH_SHAPE, a, b)
  hosts = [Host(i, 2) for i in range(2)]
  parts = [h.offset(packed(h.local_shape(BATCH_SHAPE), ex)) for h, ex in zip(hosts, (a, b))]
  two_hosts = {k: np.concatenate([p[k] for p in parts]) for k in one_host}
  key_ids = two_hosts["key_id"][two_hosts["key_valid"]]
  assert len(key_ids) == len(set(key_ids)) + 1  # the shared document's key, once per host
  (one_sum, one_count, one_correct), (two_sum, two_count, two_correct) = map(
      infonce, (one_host, two_hosts))
  assert one_count == two_count == len(a.queries) + len(b.queries)
  np.testing.assert_allclose(two_sum, one_sum, rtol=1e-6)
  assert two_correct == one_correct
