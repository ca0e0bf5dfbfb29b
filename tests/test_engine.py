"""The OneGen engine on the tiny model trained on the synthetic entity-linking task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import synthetic_task
from onegen_jax.data.synthetic import CONTINUE, EOS, RET_QUERY
from onegen_jax.inference.engine import Engine, GenerationConfig, TaskTokens
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import ExactIndex
from onegen_jax.train.program import model_config


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
