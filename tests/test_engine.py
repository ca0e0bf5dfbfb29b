"""The tiny model learns the synthetic entity-linking task; the OneGen engine on that model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import demo_config, synthetic_task
from onegen_jax.data.synthetic import CONTINUE, EOS, RET_QUERY
from onegen_jax.inference.engine import Engine, GenerationConfig, Request, TaskTokens
from onegen_jax.inference.feeding import rows_apart
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.candidates import CandidateScorer
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex
from onegen_jax.train import loop
from onegen_jax.train.program import model_config


@pytest.fixture(scope="module")
def trained_demo():
  """(state, final metrics, config) of the tiny model trained 600 steps on the synthetic task
  (trained once per run: only this module uses it)."""
  config = demo_config(train=dict(steps=600, log_every=600, eval_every=0))
  state, final = loop.fit(config)
  return state, final, config


def test_tiny_model_learns_the_synthetic_task(trained_demo):
  _, final, _ = trained_demo
  uniform = math.log(512)
  assert final["eval_loss_gen"] < 0.3 * uniform
  assert final["eval_retrieval_accuracy"] >= 0.9
  assert final["eval_num_valid_queries"] >= 300


@pytest.fixture(scope="module")
def linker(trained_demo):
  """(model, params, index over the entity keys, held-out prompts with their gold entities)."""
  state, _, config = trained_demo
  model = Decoder(model_config(config.model))
  task = synthetic_task()
  docs = list(task.corpus.documents.items())
  encoder = Encoder(model, jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1, 1),
                                             ("data", "fsdp", "tensor")), rows=8, seq_len=64)
  vectors = encoder.encode(state.params, [EncodeItem(d.tokens, (d.keys[0].position,)) for _, d in docs])
  index = ExactIndex().build(vectors, [uid for uid, _ in docs])
  prompts, gold = [], []
  for example in task.heldout[:8]:
    user = int(np.argmax(example.is_target)) - 1  # the user turn ends before the first target
    prompts.append([int(t) for t in example.tokens[:user + 1]])
    gold.append([q.positive for q in example.queries])
  return model, jax.device_get(state.params), index, prompts, gold


def _engine(linker, batch_size):
  model, params, index, _, _ = linker
  return Engine(model, params, TaskTokens(query=RET_QUERY, eos=EOS, force_after_query=CONTINUE),
                index.search, documents=None, mode="el",
                config=GenerationConfig(max_new_tokens=40, batch_size=batch_size, capacity=128))


def test_engine_links_mentions_in_one_pass(linker):
  model, params, _, prompts, gold = linker
  outs = _engine(linker, batch_size=4).generate(prompts)
  linked = [[r.ids[0] for r in out.retrievals] for out in outs]
  assert all(out.finished for out in outs)  # every request stopped on EOS
  correct = sum(a == b for got, want in zip(linked, gold) for a, b in zip(got, want))
  total = sum(len(g) for g in gold)
  assert [len(l) for l in linked] == [len(g) for g in gold]  # one [LK] per mention
  assert correct / total >= 0.8, (correct, total)
  for out in outs:
    for retrieval in out.retrievals:
      # [_CONTINUE_] was forced right after the RET token, not generated.
      i = retrieval.position - len(out.prompt)
      assert out.tokens[i] == RET_QUERY and out.generated[i]
      assert out.tokens[i + 1] == CONTINUE and not out.generated[i + 1]
    # The query vector is the hidden state at the RET position of one forward over the final text.
    text = jnp.asarray(out.prompt + out.tokens)[None]
    hidden = model.apply({"params": params}, text, jnp.ones_like(text), jnp.arange(text.shape[1])[None],
                         method=Decoder.hidden_states)[0]
    for retrieval in out.retrievals:
      want = np.asarray(hidden[retrieval.position])
      np.testing.assert_allclose(retrieval.vector, want / np.linalg.norm(want), atol=1e-5)


def test_batched_output_equals_each_request_alone(linker):
  _, _, _, prompts, _ = linker
  batched = _engine(linker, batch_size=4).generate(prompts[:4])
  alone = _engine(linker, batch_size=1)
  for prompt, out in zip(prompts[:4], batched):
    single = alone.generate([prompt])[0]
    assert single.tokens == out.tokens
    assert [r.ids for r in single.retrievals] == [r.ids for r in out.retrievals]


def _mixed_engine(linker, batch_size, **config):
  model, params, index, _, _ = linker
  return Engine(model, params, TaskTokens(query=RET_QUERY, eos=EOS, force_after_query=CONTINUE),
                index.search, documents=None, mode="el",
                config=GenerationConfig(batch_size=batch_size,
                                        **{"max_new_tokens": 40, "capacity": 128, **config}))


def _same(a, b):
  assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
  assert [(r.position, r.ids) for r in a.retrievals] == [(r.position, r.ids) for r in b.retrievals]


def test_continuous_batching_equals_each_request_alone(linker):
  """Six requests of very different output lengths (max_new_tokens cut some short) through two
  slots: a freed slot takes the next request while the other decodes; static batches too."""
  _, _, _, prompts, _ = linker
  requests = [Request(p) for p in prompts[:6]]
  alone = [_mixed_engine(linker, 1).generate([r.prompt])[0] for r in requests]
  for continuous in (True, False):
    engine = _mixed_engine(linker, 2, continuous=continuous)
    ids = [engine.submit(r) for r in requests]
    while engine.busy:
      engine.step()
    for i, want in zip(ids, alone):
      _same(engine.output(i), want)
  assert len({len(o.tokens) for o in alone}) > 1  # the workload is mixed


def test_sampling_does_not_depend_on_the_batch(linker):
  _, _, _, prompts, _ = linker
  config = dict(temperature=1.0, top_p=0.9, seed=3)
  engine = _mixed_engine(linker, 4, **config)
  batched = engine.run([engine.submit(Request(p, seed=i)) for i, p in enumerate(prompts[:4])])
  for i, (prompt, out) in enumerate(zip(prompts[:4], batched)):
    alone = _mixed_engine(linker, 1, **config)
    _same(alone.run([alone.submit(Request(prompt, seed=i))])[0], out)
  greedy = _mixed_engine(linker, 4).generate(prompts[:4])
  assert [o.tokens for o in greedy] != [o.tokens for o in batched]  # it did sample


def test_a_session_continued_over_its_cache_equals_the_dialogue_at_once(linker):
  """Round 2 appended to round 1's kept cache gives what one request over the whole dialogue
  gives (tokens, retrieval positions and ids, query vectors)."""
  _, _, _, prompts, _ = linker
  engine = _mixed_engine(linker, 2)
  first = engine.submit(Request(prompts[0], keep_session=True))
  other = engine.submit(Request(prompts[2]))  # shares the batch with both rounds
  engine.run([first, other])
  # The synthetic model was trained on one turn (it ends round 2 at once): round 2 replays its
  # own answer to that prompt asked alone, RET tokens included, so round 2 retrieves.
  alone = _mixed_engine(linker, 1).generate([prompts[1]])[0]
  script = [t for t, g in zip(alone.tokens, alone.generated) if g]
  second = engine.continue_session(first, prompts[1], force=script)
  third = engine.submit(Request(prompts[3]))
  [continued, _] = engine.run([second, third])
  round1 = engine.output(first)
  whole = _mixed_engine(linker, 1).generate([[*round1.prompt, *round1.tokens, *prompts[1]]],
                                            force=[script])[0]
  assert continued.prompt == whole.prompt
  _same(continued, whole)
  assert continued.retrievals
  for a, b in zip(continued.retrievals, whole.retrievals):
    np.testing.assert_allclose(a.vector, b.vector, atol=1e-5)
  with pytest.raises(KeyError):  # a session goes on once; the continuation kept its own
    engine.continue_session(first, prompts[1])
  engine.close_session(second)
  with pytest.raises(KeyError):
    engine.continue_session(second, prompts[1])
  assert engine.release(first) is round1
  with pytest.raises(KeyError):
    engine.output(first)


def test_candidates_restrict_and_rank_as_the_unrestricted_scores(linker):
  model, params, index, prompts, _ = linker
  task = synthetic_task()
  uids = list(task.corpus.documents)
  keys = np.asarray(Encoder(model, jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1, 1),
                                                     ("data", "fsdp", "tensor")),
                            rows=8, seq_len=64).encode(
      params, [EncodeItem(d.tokens, (d.keys[0].position,)) for d in task.corpus.documents.values()]))
  scorer = CandidateScorer(keys, uids)
  rng = np.random.default_rng(0)
  engine = Engine(model, params, TaskTokens(query=RET_QUERY, eos=EOS, force_after_query=CONTINUE),
                  index.search, documents=None, mode="el", search_candidates=scorer.search,
                  config=GenerationConfig(max_new_tokens=40, batch_size=4, capacity=128,
                                          retrieve_k=3))
  candidates = [list(rng.choice(uids, 5, replace=False)) + ["not-an-entity"] for _ in prompts[:4]]
  ids = [engine.submit(Request(p, candidates=c)) for p, c in zip(prompts[:4], candidates)]
  outs = engine.run(ids)
  assert sum(len(o.retrievals) for o in outs) > 0
  for out, allowed in zip(outs, candidates):
    for r in out.retrievals:
      assert set(r.ids) <= set(allowed[:5]) and len(r.ids) == 3
      scores = {u: float(keys[uids.index(u)] @ r.vector) for u in allowed[:5]}
      assert r.ids == sorted(scores, key=scores.get, reverse=True)[:3]
      np.testing.assert_allclose(r.scores, [scores[u] for u in r.ids], atol=1e-5)


def test_a_request_that_outgrows_its_cache_row_ends_alone(linker):
  """A request whose next tokens would not fit its row ends with stop_reason "capacity"; its
  tokens so far are those it has with room to spare, and the other rows go on."""
  _, _, _, prompts, _ = linker
  roomy = _mixed_engine(linker, 2).generate(prompts[:2])
  full = len(roomy[0].prompt) + len(roomy[0].tokens)
  tight = _mixed_engine(linker, 2, capacity=full - 4)
  first = tight.submit(Request(prompts[0]))
  second = tight.submit(Request(prompts[1]))
  out, other = tight.run([first, second])
  assert out.stop_reason == "capacity" and out.tokens == roomy[0].tokens[:len(out.tokens)]
  assert len(out.prompt) + len(out.tokens) - 1 <= full - 4  # all but the last token were fed
  assert other.done


@pytest.mark.parametrize("queued, width, want", [
    ([0, 1, 1, 150], 256, ([3], 1)),  # one prompt beside decoding rows: 256 + 4 slots, not 1024
    ([0, 0, 0, 0, 0, 0, 0, 30], 32, ([7], 1)),  # alone: no width-1 call for idle rows
    ([0, 1, 30, 30, 30, 1, 1, 1], 32, ([2, 3, 4, 0], 3)),  # padded to 4 rows, idle rows first
    ([20, 20, 20, 1], 32, None),  # 4 of 4 rows: one call
    ([1, 1, 1, 1], 1, None),  # nothing prefills
    ([2, 1, 1, 1], 16, ([0], 1)),  # the narrowest prefill: 16 + 4 slots apart vs 64
])
def test_rows_apart_only_when_fewer_token_slots_are_fed(queued, width, want):
  got = rows_apart(np.asarray(queued, np.int32), width)
  assert (got if got is None else (got[0].tolist(), got[1])) == want
