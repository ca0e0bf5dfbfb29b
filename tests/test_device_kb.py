"""The device KB (retrieval/device_kb.py) against the host paths it must equal: ExactIndex /
ApproxIndex (ids exactly, scores to 1e-5), Index.search_documents, CandidateScorer (EL
candidates) and TaskTokenizer.insertion_tokens (the RAG token table, two tokenizer families), on
the 8-device mesh and a (1, 2, 4) mesh, with a row count that does not divide the shards, k over
the hits, bfloat16 keys, and search inside jax.jit and a lax.while_loop body; and each retrieval
policy's device half against its host half."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from data_util import generated
from test_parity import tokenizer_dir
from onegen_jax import sharding
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.reading import load_documents
from onegen_jax.data.tasks import MULTIHOP
from onegen_jax.inference.retrieval_policy import make_policy
from onegen_jax.retrieval import device_kb
from onegen_jax.retrieval.candidates import CandidateScorer, RankPrior
from onegen_jax.retrieval.index import ApproxIndex, ExactIndex

N, D, Q = 37, 16, 6  # 37 keys: not a multiple of 8 shards
MESHES = {"8": dict(data=-1), "1x2x4": dict(data=1, fsdp=2, tensor=4)}


def _key_uids(n: int) -> list[str]:
  """Documents of 1 to 3 keys ("d4", "d4-1", "d4-2", as records.document_uid reads them)."""
  uids, doc = [], 0
  while len(uids) < n:
    uids += [f"d{doc}", *(f"d{doc}-{j}" for j in range(1, doc % 3 + 1))][:n - len(uids)]
    doc += 1
  return uids


UIDS = _key_uids(N)


def _unit(rng, shape) -> np.ndarray:
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
  """(keys [N, D], queries [Q, D]); key 30 repeats key 3 (a tie: the lower row first)."""
  rng = np.random.default_rng(0)
  vectors = _unit(rng, (N, D))
  vectors[30] = vectors[3]
  return vectors, _unit(rng, (Q, D))


@pytest.fixture(scope="module", params=list(MESHES))
def mesh(request):
  return sharding.make_mesh(**MESHES[request.param])


def _rows(ids) -> list[list[int]]:
  return [[UIDS.index(u) for u in row] for row in ids]


@functools.partial(jax.jit, static_argnames="k")
def _search(kb, queries, k, candidates=None):
  return device_kb.search(kb, queries, k, candidates)


def test_search_equals_the_exact_index(mesh, data):
  vectors, queries = data
  kb = device_kb.build(vectors, UIDS, mesh)
  assert kb.shards == 8 and kb.keys.shape[0] == 40
  index = ExactIndex().build(vectors, UIDS)
  for k in (1, 5, N):
    want_ids, want_scores = index.search(queries, k)
    ids, scores = _search(kb, queries, k=k)
    np.testing.assert_array_equal(ids, _rows(want_ids))
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_k_over_the_keys_gives_minus_one(mesh, data):
  vectors, queries = data
  kb = device_kb.build(vectors, UIDS, mesh)
  want_ids, want_scores = ExactIndex().build(vectors, UIDS).search(queries, N)
  ids, scores = _search(kb, queries, k=N + 9)
  np.testing.assert_array_equal(ids[:, :N], _rows(want_ids))
  np.testing.assert_allclose(scores[:, :N], want_scores, atol=1e-5)
  assert (np.asarray(ids[:, N:]) == -1).all() and np.isneginf(scores[:, N:]).all()


def test_bfloat16_keys_under_the_model_mesh(data):
  """bfloat16 keys (the TPU layout) searched with queries laid out as the decode step's (rows
  over data x fsdp) under the model's mesh and rules: ExactIndex over the same rounded values,
  the products accumulated in float32."""
  vectors, queries = data
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  kb = device_kb.build(vectors, UIDS, mesh, dtype=jnp.bfloat16)
  rounded = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  want_ids, want_scores = ExactIndex().build(rounded(vectors), UIDS).search(rounded(queries), 5)
  with sharding.activate(mesh):
    placed = jax.device_put(np.concatenate([queries, queries[:2]]),
                            NamedSharding(mesh, P(("data", "fsdp"), None)))
    ids, scores = _search(kb, placed, k=5)
  np.testing.assert_array_equal(ids[:Q], _rows(want_ids))
  np.testing.assert_allclose(scores[:Q], want_scores, atol=1e-5)


def test_approx_search_equals_the_approx_index(data):
  """On CPU approx_max_k is exact; the point is the wiring (recall_target, precision)."""
  vectors, queries = data
  kb = device_kb.build(vectors, UIDS, sharding.make_mesh(data=-1), recall_target=0.9)
  want_ids, want_scores = ApproxIndex(recall_target=0.9).build(vectors, UIDS).search(queries, 4)
  ids, scores = _search(kb, queries, k=4)
  np.testing.assert_array_equal(ids, _rows(want_ids))
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("prior", [None, RankPrior(0.05, (-0.2, -1.0, -2.5))])
def test_candidates_equal_the_candidate_scorer(mesh, data, prior):
  """Per-query candidate lists (duplicates, a uid that is no key, shorter than k, one empty),
  with and without a rank prior, give CandidateScorer.search's ids and scores; slots past a
  query's hits are -1; a query without candidates (None) searches the whole KB."""
  vectors, queries = data
  kb = device_kb.build(vectors, UIDS, mesh)
  rng = np.random.default_rng(1)
  lists = [list(rng.choice(UIDS, size=n)) for n in (7, 3, 1, 12)] + [[], None]
  lists[0][1:1] = ["no-such-entity", lists[0][0]]
  candidates = device_kb.candidate_rows(UIDS, lists, width=16, prior=prior)
  scorer = CandidateScorer(vectors, UIDS, prior)
  k = 4
  ids, scores = _search(kb, queries, k=k, candidates=candidates)
  for i, cands in enumerate(lists):
    if cands is None:
      [want_ids], [want_scores] = ExactIndex().build(vectors, UIDS).search(queries[i:i + 1], k)
    else:
      want_ids, want_scores = scorer.search(queries[i], cands, k)
    n = len(want_ids)
    assert list(ids[i, :n]) == [UIDS.index(u) for u in want_ids]
    np.testing.assert_allclose(scores[i, :n], want_scores, atol=1e-5)
    assert (np.asarray(ids[i, n:]) == -1).all() and np.isneginf(scores[i, n:]).all()
  with pytest.raises(ValueError, match="over width"):
    device_kb.candidate_rows(UIDS, lists, width=2)


def test_search_documents_equals_the_index(mesh, data):
  vectors, queries = data
  table = device_kb.insertion_table(UIDS, _Tokens().insertion_tokens)
  kb, documents = device_kb.build(vectors, UIDS, mesh, table=table), table.documents
  index = ExactIndex().build(vectors, UIDS)
  assert kb.num_docs == index.num_documents == len(documents) and kb.keys_per_doc == 3
  search = jax.jit(device_kb.search_documents, static_argnames="k")
  for k in (1, 3, index.num_documents):
    want_docs, want_scores = index.search_documents(queries, k)
    docs, scores = search(kb, queries, k=k)
    assert [[documents[d] for d in row] for row in np.asarray(docs)] == want_docs
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  docs, scores = search(kb, queries, k=index.num_documents + 4)
  assert (np.asarray(docs[:, -4:]) == -1).all() and np.isneginf(scores[:, -4:]).all()


class _Tokens:
  """A stand-in tokenizer: a document's insertion is its uid's characters."""

  def insertion_tokens(self, text):
    return [ord(c) for c in text]


@pytest.mark.parametrize("family", ["sentencepiece", "gpt2"])
def test_the_token_table_holds_insertion_tokens(family):
  """Each document row's tokens are TaskTokenizer.insertion_tokens of its text, read back on
  device by `insertion` (a -1 row reads as nothing), on the (1, 2, 4) mesh."""
  tokenizer = TaskTokenizer(tokenizer_dir(family, "multihop"), MULTIHOP)
  docs, _ = load_documents(MULTIHOP, f"{generated('multihop')}/db.jsonl")
  texts = {d.uid: d.text(MULTIHOP) for d in docs[:9]}
  texts[docs[0].uid] = " Ünïcode, leading space\nand a line break "
  uids = [u for doc in texts for u in (doc, f"{doc}-1")]  # two keys each
  mesh = sharding.make_mesh(**MESHES["1x2x4"])
  table = device_kb.insertion_table(uids, lambda uid: tokenizer.insertion_tokens(texts[uid]))
  kb = device_kb.build(_unit(np.random.default_rng(2), (len(uids), D)), uids, mesh, table=table)
  documents = table.documents
  assert documents == list(texts)
  rows = jnp.asarray([*range(len(documents)), -1], jnp.int32)
  tokens, lengths = jax.jit(device_kb.insertion)(kb, rows)
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  for i, uid in enumerate(documents):
    want = tokenizer.insertion_tokens(texts[uid])
    assert lengths[i] == len(want) and tokens[i, :len(want)].tolist() == want
    assert not tokens[i, len(want):].any()
  assert lengths[-1] == 0 and not tokens[-1].any()


def test_search_inside_a_while_loop(data):
  """A lax.while_loop whose body searches (whole KB and candidates) and reads the insertion of
  its best document gives what the same calls give one by one."""
  vectors, queries = data
  mesh = sharding.make_mesh(**MESHES["1x2x4"])
  kb = device_kb.build(vectors, UIDS, mesh,
                       table=device_kb.insertion_table(UIDS, _Tokens().insertion_tokens))
  candidates = device_kb.candidate_rows(UIDS, [UIDS[i::5] for i in range(Q)])

  def searched(q):
    docs, _ = device_kb.search_documents(kb, q, 1)
    _, lengths = device_kb.insertion(kb, docs[:, 0])
    return jnp.concatenate([device_kb.search(kb, q, 2)[0],
                            device_kb.search(kb, q, 2, candidates)[0], lengths[:, None]], axis=1)

  def body(state):
    i, q, found = state
    return i + 1, jnp.roll(q, 1, axis=1), found.at[i].set(searched(q))

  steps = 3
  _, _, found = jax.jit(lambda q: jax.lax.while_loop(
      lambda s: s[0] < steps, body, (0, q, jnp.zeros((steps, Q, 5), jnp.int32))))(queries)
  one, q = jax.jit(searched), jnp.asarray(queries)
  for step in range(steps):
    np.testing.assert_array_equal(found[step], one(q))
    q = jnp.roll(q, 1, axis=1)


def test_footprint_is_the_bytes_on_each_device(data):
  vectors, _ = data
  mesh = sharding.make_mesh(data=-1)
  kb = device_kb.build(vectors, UIDS, mesh,
                       table=device_kb.insertion_table(UIDS, _Tokens().insertion_tokens))
  on_device = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(kb))
  assert kb.footprint().total == on_device
  el = device_kb.build(vectors, UIDS, mesh, dtype=jnp.bfloat16)
  assert el.footprint() == device_kb.Footprint(keys=5 * D * 2)
  # llama2-7b EL's 10M x 4096 bfloat16 keys over v5p-64: 156250 rows of 8 KiB per chip.
  big = device_kb.footprint(10_000_000, 4096, jnp.bfloat16, shards=64)
  assert big.total == 156_250 * 4096 * 2
  assert big.summary(2 << 30) == "device KB: 1220.7 MiB per device of budget 2048.0 MiB (fits)"
  assert not big.fits(1 << 30) and "does not fit: ScaNN" in big.summary(1 << 30)


def test_each_policy_follows_a_retrieval_on_device_as_on_the_host(data):
  """retrieval_policy's device half (device_search, then device_follow of the best row, jitted)
  gives the ids and tokens of its host half (search / search_among, then follow): RAG inserts
  the best document's insertion, EL forces its token (also after a search without a hit)."""
  vectors, queries = data
  mesh = sharding.make_mesh(**MESHES["1x2x4"])
  texts = {u: f"text of {u}" for u in UIDS}
  tokens = _Tokens()
  insertion = lambda uid: tokens.insertion_tokens(texts[uid])
  table = device_kb.insertion_table(UIDS, insertion)
  kb, documents = device_kb.build(vectors, UIDS, mesh, table=table), table.documents
  index = ExactIndex().build(vectors, UIDS)
  scorer = CandidateScorer(vectors, UIDS)
  force = 7
  rag = make_policy("rag", index.search_documents, insertion, None)
  el = make_policy("el", index.search, None, force, scorer.search)
  lists = [UIDS[i::4] for i in range(Q - 1)] + [["no-such-entity"]]
  candidates = device_kb.candidate_rows(UIDS, lists)

  @functools.partial(jax.jit, static_argnums=0)
  def after(policy, queries, candidates=None):
    rows, scores = policy.device_search(kb, queries, 3, candidates)
    return (rows, scores, *policy.device_follow(kb, rows[:, 0]))

  for policy, names, among in ((rag, documents, None), (el, UIDS, None), (el, UIDS, candidates)):
    rows, scores, inserted, lengths = after(policy, queries, among)
    for i, query in enumerate(queries):
      if among is None:
        [ids], [want] = policy.search(query[None], 3)
      else:
        ids, want = policy.search_among(query, lists[i], 3)
      n = len(ids)
      assert [names[r] for r in rows[i, :n]] == list(ids) and (np.asarray(rows[i, n:]) == -1).all()
      np.testing.assert_allclose(scores[i, :n], want, atol=1e-5)
      assert inserted[i, :lengths[i]].tolist() == policy.follow(ids)
  with pytest.raises(ValueError, match="RAG searches documents"):
    rag.device_search(kb, queries, 3, candidates)
