"""Generation controls (issue 25): presence, frequency and repetition penalties inside the
compiled step, stop strings and the n-gram loop stop on the host, and launch.infer's refusal
of a too-long prompt (the pure rules without a model: test_generation_rules.py). A tiny random
model over the generated multihop data's byte-level BPE tokenizer, wired by make_engine as
launch.infer wires it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_util import generated
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import Message
from onegen_jax.data.tasks import get_task
from onegen_jax.inference.engine import Engine, GenerationConfig, Request, TaskTokens
from onegen_jax.inference.feeding import NO_PENALTY, PENALTIES
from onegen_jax.inference.requests import output_text, prompt_tokens
from onegen_jax.inference.retrieval_policy import make_policy
from onegen_jax.inference.run_dir import LoadedRun, make_engine
from onegen_jax.inference.step import penalise
from onegen_jax.inference.stopping import loop_span
from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder

CONFIG = GenerationConfig(max_new_tokens=40, batch_size=4, capacity=256)
DOCUMENT = "Paris is a city in France."
TEXTS = ["Who founded the company in Paris?", "Where was Alice born?", "hello world",
         "The city of"]


class OneDocument:
  """Every search finds the one document (RAG inserts DOCUMENT)."""

  def search_documents(self, queries: np.ndarray, k: int):
    return [["d0"] * k for _ in queries], np.ones((len(queries), k), np.float32)


@pytest.fixture(scope="module")
def run():
  """A LoadedRun: the tiny model, randomly initialised (float32), and the multihop tokenizer."""
  task = get_task("multihop")
  tokenizer = TaskTokenizer(f"{generated('multihop')}/tokenizer", task)
  model = Decoder(preset("tiny", vocab_size=-(-len(tokenizer.hf) // 64) * 64, dtype="float32"))
  x = jnp.ones((1, 8), jnp.int32)
  params = jax.device_get(model.init(jax.random.key(0), x, x, jnp.arange(8)[None])["params"])
  return LoadedRun(model, params, None, tokenizer, task, config={})


@pytest.fixture(scope="module")
def prompts(run):
  return [run.tokenizer.tokenize([t])[0] for t in TEXTS]


def _engine(run, **config):
  return make_engine(run, OneDocument(), {"d0": DOCUMENT}, dataclasses.replace(CONFIG, **config))


def _stream(out) -> list[int]:
  return [t for t, g in zip(out.tokens, out.generated) if g]


# -- penalties ---------------------------------------------------------------------------------
def _reference(logits, presence, frequency, repetition, prompt, output):
  """vLLM's order, entry by entry: the repetition penalty over the prompt's and output's tokens,
  then frequency x count + presence over the output's."""
  out = np.array(logits, np.float32)
  for t in set(prompt) | set(output):
    out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
  for t in set(output):
    out[t] -= np.float32(frequency * output.count(t) + presence)
  return out


def _history(prompt, output, width):
  row = [*prompt, *output]
  return row + [-1] * (width - len(row)), len(prompt)


def test_penalties_match_a_reference_and_spare_the_unpenalised():
  logits = np.float32([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                       [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                       [0.3, 0.2, -0.4, 0.1, -3.0, 0.25],
                       [1.0, -1.0, 0.5, 0.0, -2.0, 1.5]])
  # (presence, frequency, repetition, prompt, output stream)
  cases = [(0.5, 0.25, 2.0, [0, 1], [3, 3, 5]),  # positive logits divided, the negative 1 x 2
           (0.0, 0.0, 1.0, [], []),  # no penalty: every logit kept bit for bit
           (0.0, 0.125, 1.0, [], [0, 0, 0, 2, 4, 4]),  # counts 3, 1, 2; -inf-free negatives
           (1.0, 0.0, 1.5, [4, 4, 1], [3])]  # a zero logit, repeated prompt tokens
  rows = [_history(c[3], c[4], 9) for c in cases]
  history = np.int32([h for h, _ in rows])
  history[2] = [0, -1, 0, 0, 2, -1, 4, 4, -1]  # padding ids anywhere are ignored
  output_from = np.int32([n for _, n in rows])
  penalties = np.float32([c[:3] for c in cases])
  got = np.asarray(jax.jit(penalise)(logits, penalties, history, output_from))
  for row, (presence, frequency, repetition, prompt, output) in enumerate(cases):
    want = _reference(logits[row], presence, frequency, repetition, prompt, output)
    np.testing.assert_allclose(got[row], want, rtol=1e-6, err_msg=f"row {row}")
  assert got[1].tobytes() == logits[1].tobytes()
  assert got[0].tolist() == [1.0, -2.0, 0.5, 0.5, -2.0, -0.25]  # computed by hand
  assert np.argmax(logits[0]) == 3 and np.argmax(got[0]) == 0  # the penalties flip greedy
  assert np.argmax(logits[2]) == 0 and np.argmax(got[2]) == 5


def test_penalties_match_the_reference_on_random_rows():
  rng = np.random.default_rng(0)
  rows, vocab, width = 6, 40, 24
  logits = rng.normal(size=(rows, vocab)).astype(np.float32)
  cases = [(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), float(rng.uniform(0.5, 2)),
            rng.integers(0, vocab, rng.integers(0, 10)).tolist(),
            rng.integers(0, 8, rng.integers(0, 14)).tolist()) for _ in range(rows)]
  history, output_from = zip(*(_history(c[3], c[4], width) for c in cases))
  got = np.asarray(penalise(logits, np.float32([c[:3] for c in cases]), np.int32(history),
                            np.int32(output_from)))
  for row, case in enumerate(cases):
    np.testing.assert_allclose(got[row], _reference(logits[row], *case), rtol=1e-6, atol=1e-6)


def test_one_compiled_step_serves_penalised_and_plain_rows(run, prompts):
  """Rows 0 and 1 penalised (their outputs forced, so every run feeds the same shapes), rows 2
  and 3 plain: runs with other penalty values compile nothing new; the plain rows' tokens and
  log-probabilities equal those of a run without any penalised row, and the forced rows record
  the model's unpenalised log-probabilities."""
  query, eos = run.tokenizer.ids[run.task.query_token], run.tokenizer.hf.eos_token_id
  script = [t for t in range(100, 140) if t not in (query, eos)][:24]
  engine = _engine(run, max_new_tokens=24)

  def batch(engine, penalties):
    settings = [dict(zip(PENALTIES, p)) for p in penalties]
    ids = [engine.submit(Request(p, force=script if i < 2 else (), **settings[i]))
           for i, p in enumerate(prompts)]
    return engine.run(ids)

  sizes = []
  for values in ([(0.5, 0.25, 1.3), (0.0, 1.0, 0.8)], [(1.5, -0.5, 2.0), (0.25, 0.0, 1.1)],
                 [(-1.0, 2.0, 1.05), (2.0, 2.0, 3.0)]):
    outs = batch(engine, [*values, NO_PENALTY, NO_PENALTY])
    sizes.append(engine._step._cache_size())
  assert sizes[0] == sizes[1] == sizes[2], sizes  # no compile for new penalty values
  plain = batch(_engine(run, max_new_tokens=24), [NO_PENALTY] * 4)
  for got, want in zip(outs, plain):
    assert got.tokens == want.tokens and got.stop_reason == want.stop_reason
    assert got.log_probs == want.log_probs  # bit for bit: plain rows, unpenalised log-probs
  assert [_stream(o) for o in outs[:2]] == [script, script]


def _full_logits(run, tokens: list[int]) -> np.ndarray:
  """float32 [T, V]: the model's next-token logits at every position of one forward."""
  seq = jnp.asarray(tokens)[None]
  hidden = run.model.apply({"params": run.params}, seq, jnp.ones_like(seq),
                           jnp.arange(seq.shape[1])[None], method=Decoder.hidden_states)
  return np.asarray(run.model.apply({"params": run.params}, hidden, method=Decoder.logits)[0])


def test_penalised_greedy_tokens_follow_the_reference_over_a_full_forward(run, prompts):
  """Every output token of a penalised greedy row is the argmax of the reference penalties
  applied to the model's logits at its position (one forward over its final text): the prompt
  counts for the repetition penalty, the output stream so far (forced tokens included) for all
  three, an inserted document (the last row forces a query first) for none. Two slots: prompts
  and the document are prefilled beside decoding rows (apart, inference/feeding.py)."""
  query = run.tokenizer.ids[run.task.query_token]
  settings = [dict(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.6,
                   max_new_tokens=12),
              dict(frequency_penalty=0.8), dict(repetition_penalty=2.5, max_new_tokens=20),
              dict(presence_penalty=0.4, repetition_penalty=1.3, force=[prompts[3][0], query])]
  engine = _engine(run, batch_size=2)
  outs = engine.run([engine.submit(Request(p, **s)) for p, s in zip(prompts, settings)])
  assert outs[3].retrievals
  for prompt, setting, out in zip(prompts, settings, outs):
    logits = _full_logits(run, prompt + out.tokens)
    values = [setting.get(name, default) for name, default in zip(PENALTIES, NO_PENALTY)]
    stream = []
    for m, (token, in_stream) in enumerate(zip(out.tokens, out.generated)):
      if in_stream:
        want = _reference(logits[len(prompt) + m - 1], *values, prompt, stream)
        forced = len(stream) < len(setting.get("force", ()))
        assert forced or want[token] >= want.max() - 1e-4, (setting, m)
        stream.append(token)


@pytest.mark.parametrize("setting", [dict(frequency_penalty=1.0), dict(presence_penalty=1.0),
                                     dict(repetition_penalty=2.0)])
def test_a_penalty_makes_greedy_outputs_repeat_less(run, prompts, setting):
  """The tiny random model's greedy outputs repeat tokens; a penalty lowers the repeats summed
  over four prompts (repeated: output-stream tokens already in the stream, or, for the
  repetition penalty, already in the prompt or the stream)."""
  engine = _engine(run, max_new_tokens=64)
  seen_prompt = "repetition_penalty" in setting

  def repeats(out, prompt):
    stream = _stream(out)
    seen = set(prompt) if seen_prompt else set()
    count = 0
    for t in stream:
      count += t in seen
      seen.add(t)
    return count

  plain = engine.run([engine.submit(Request(p)) for p in prompts])
  penalised = engine.run([engine.submit(Request(p, **setting)) for p in prompts])
  before = sum(repeats(o, p) for o, p in zip(plain, prompts))
  after = sum(repeats(o, p) for o, p in zip(penalised, prompts))
  assert before > 0 and after < before, (before, after)


# -- stop strings ------------------------------------------------------------------------------
def _boundary_stop(tokenizer, tokens: list[int]) -> tuple[str, int]:
  """(a stop string spanning the boundary before tokens[i], i) for the middle-most i where the
  text grows by clean characters: the last two of text[:i] and the first two added."""
  candidates = []
  for i in range(2, len(tokens)):
    before, after = output_text(tokenizer, tokens[:i]), output_text(tokenizer, tokens[:i + 1])
    added = after[len(before):]
    if (after.startswith(before) and len(before) >= 2 and len(added) >= 2
        and "\ufffd" not in before[-2:] + added[:2]):
      candidates.append((before[-2:] + added[:2], i))
  assert candidates, "no clean token boundary in the output"
  return min(candidates, key=lambda c: abs(c[1] - len(tokens) // 2))


def test_a_stop_string_across_tokens_ends_the_request_at_the_token_completing_it(run, prompts):
  tokenizer = run.tokenizer
  engine = _engine(run)
  first = engine.run([engine.submit(Request(p)) for p in prompts[:2]])
  assert not any(o.retrievals for o in first)  # the whole output is one uninterrupted stream
  stop, i = _boundary_stop(tokenizer, first[0].tokens)
  # The first prefix whose text holds it (the engine decodes only a tail at each token).
  k = next(k for k in range(1, len(first[0].tokens) + 1)
           if stop in output_text(tokenizer, first[0].tokens[:k]))
  assert k <= i + 1
  stopped, other = engine.run([engine.submit(Request(prompts[0], stop=["never said", stop])),
                               engine.submit(Request(prompts[1], stop=["\u2603 never said"]))])
  assert stopped.stop_reason == "stop" and stopped.tokens == first[0].tokens[:k]
  assert stop in output_text(tokenizer, stopped.tokens)
  assert stop not in output_text(tokenizer, stopped.tokens[-1:])  # it spans tokens
  assert (other.tokens, other.stop_reason) == (first[1].tokens, first[1].stop_reason)


class RankedDocuments:
  """Every search ranks d0, d1, d2 in that order."""

  def search_documents(self, queries: np.ndarray, k: int):
    ids = ["d0", "d1", "d2"][:k]
    return [ids] * len(queries), np.tile(np.arange(1.0, 1.0 - len(ids) / 10, -0.1), (len(queries), 1))


@pytest.mark.parametrize("novel, want", [(False, [["d0", "d1"], ["d0", "d1"]]),
                                         (True, [["d0", "d1"], ["d1", "d2"]])])
def test_novel_documents_inserts_what_the_request_has_not_inserted_yet(run, prompts, novel, want):
  """Two forced query tokens retrieve with the same ranking: the second inserts d0 again, or with
  novel_documents the best document not inserted yet (d1), its kept results d1, d2."""
  texts = {"d0": DOCUMENT, "d1": "Lyon is a city too.", "d2": "Nice is by the sea."}
  query = run.tokenizer.ids[run.task.query_token]
  engine = make_engine(run, RankedDocuments(), texts, dataclasses.replace(
      CONFIG, max_new_tokens=3, retrieve_k=2, novel_documents=novel))
  [out] = engine.run([engine.submit(Request(prompts[0], force=[query, query]))])
  assert [r.ids for r in out.retrievals[:2]] == want
  inserted = [t for t, g in zip(out.tokens, out.generated) if not g]
  assert inserted == [t for ids in want for t in run.tokenizer.insertion_tokens(texts[ids[0]])]
  with pytest.raises(ValueError, match="novel_documents is RAG's"):
    make_policy("el", None, None, 7, novel=True)


def test_a_stop_string_in_an_inserted_document_does_not_stop(run, prompts):
  """Only the output after the engine's last insertion is searched: the retrieved document's
  text holds the stop string, the request goes on as without it."""
  engine = _engine(run)
  [first] = engine.run([engine.submit(Request(prompts[3]))])
  assert first.retrievals and DOCUMENT in output_text(run.tokenizer, first.tokens)
  [again] = engine.run([engine.submit(Request(prompts[3], stop=["is a city in"]))])
  assert (again.tokens, again.stop_reason) == (first.tokens, first.stop_reason)


def test_stop_strings_need_an_engine_that_decodes(run, prompts):
  engine = Engine(run.model, run.params, TaskTokens(query=3, eos=0), OneDocument().search_documents,
                  documents=None, config=CONFIG, mode="rag")
  with pytest.raises(ValueError, match="decodes text"):
    engine.submit(Request(prompts[0], stop=["x"]))
  with pytest.raises(ValueError, match="non-empty strings"):
    _engine(run).submit(Request(prompts[0], stop="x"))  # one string, not a sequence of them
  with pytest.raises(ValueError, match="loop_repeats=1"):
    engine.submit(Request(prompts[0], loop_repeats=1))


# -- the loop stop -----------------------------------------------------------------------------
def test_a_looping_greedy_output_ends_with_repetition(run, prompts):
  engine = _engine(run, max_new_tokens=96)
  plain = engine.run([engine.submit(Request(p)) for p in prompts])
  # The first (request, output-stream length) where three copies of a span end the stream.
  loops = [(i, n) for i, out in enumerate(plain) for n in range(1, len(_stream(out)) + 1)
           if loop_span(_stream(out)[:n], 3, CONFIG.loop_max_span, CONFIG.loop_min_tokens)]
  assert loops, "no greedy output loops"
  i, n = min(loops, key=lambda x: x[1])
  assert n < 96
  [out] = engine.run([engine.submit(Request(prompts[i], loop_repeats=3))])
  assert out.stop_reason == "repetition" and _stream(out) == _stream(plain[i])[:n]
  looped = engine.run([engine.submit(Request(prompts[i], loop_repeats=3, max_new_tokens=n))])[0]
  assert looped.stop_reason == "repetition"  # repetition is checked before max_new_tokens


# -- launch.infer's input ----------------------------------------------------------------------
def test_a_prompt_over_the_limit_is_refused_naming_its_line(run):
  long = (Message("user", " ".join(["word"] * 80)),)
  short = (Message("user", "Who?"),)
  lengths = [len(t) for t in prompt_tokens(run, [short, long], 1 << 30)]
  assert prompt_tokens(run, [short, long], lengths[1]) == prompt_tokens(run, [short, long], 1 << 30)
  with pytest.raises(ValueError) as e:
    prompt_tokens(run, [long, short, long], lengths[1] - 1, names=["in.jsonl:1", "in.jsonl:2",
                                                                   "in.jsonl:4"])
  assert str(e.value).splitlines() == [
      f"in.jsonl:{n}: the prompt has {lengths[1]} tokens, over the limit of {lengths[1] - 1}"
      for n in (1, 4)]
