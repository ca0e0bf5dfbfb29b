"""Self-RAG with OneGen: the critic score, adaptive decisions, one shared prefill for the k
evidence rows, cached continuations against a full forward, the chosen answer; the chain on
generated data (train in process -> launch.build_index -> launch.infer -> launch.evaluate) and
the three modes' rules; the converters."""

import concurrent.futures
import json
import math

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import launch
from processes import serve
from onegen_jax.data.convert_selfrag import convert_nq_oracle, convert_selfrag_file
from onegen_jax.data.generate import make_dataset
from onegen_jax.data.records import read_jsonl, write_jsonl
from onegen_jax.eval.scoring import score_selfrag
from onegen_jax.inference import selfrag
from onegen_jax.inference.requests import prompt_tokens, read_requests
from onegen_jax.inference.run_dir import generation_config, load_index_dir, load_run
from onegen_jax.inference.types import RequestOutput
from onegen_jax.model.decoder import Decoder
from onegen_jax.train import loop

from configs import selfrag as selfrag_config

MODES = selfrag.MODES
LIBRARY_MODES = ("no_retrieval", "always_retrieve")  # adaptive_retrieval: through launch.infer


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """The demo model trained in process on generated Self-RAG data, its index from
  launch.build_index, launch.infer --selfrag_mode=adaptive_retrieval on the dev lines (ROOT /
  adaptive_retrieval.jsonl): (root, launch.evaluate's JSON of those lines)."""
  root = tmp_path_factory.mktemp("selfrag")
  data, run = root / "data", root / "run"
  make_dataset("selfrag", str(data), seed=0, num_train=400, num_dev=12)  # launch.make_data's call
  config = selfrag_config.get_config("demo")
  config.train.update(steps=150, eval_every=0)
  config.data.update(generate="", train_path=f"{data}/train.jsonl", dev_path=f"{data}/dev.jsonl",
                     db_path=f"{data}/db.jsonl", tokenizer_path=f"{data}/tokenizer")
  loop.fit(config, str(run))
  launch(root, "build_index", f"--workdir={run}", f"--db={data}/db.jsonl", f"--out={root / 'index'}")
  ran = launch(root, "infer", f"--workdir={run}", f"--index={root / 'index'}", "--task=selfrag",
               f"--input={data}/dev.jsonl", f"--output={root}/adaptive_retrieval.jsonl",
               "--selfrag_mode=adaptive_retrieval", "--ndocs=3", "--max_new_tokens=24",
               "--batch_size=8")
  assert ran["requests"] == 12
  return root, launch(root, "evaluate", "--task=selfrag",
                      f"--predictions={root}/adaptive_retrieval.jsonl", f"--gold={data}/dev.jsonl")


@pytest.fixture(scope="module")
def predictions(chain, runner) -> dict[str, list[dict]]:
  """Each mode's output lines on the dev prompts: launch.infer's for adaptive_retrieval, the
  library's (what launch.infer --selfrag_mode calls) for the other two (k = 3)."""
  root, _ = chain
  make, _, prompts = runner
  lines = {mode: [r.record() for r in make(mode).run(prompts)] for mode in LIBRARY_MODES}
  return {"adaptive_retrieval": read_jsonl(f"{root}/adaptive_retrieval.jsonl"), **lines}


def test_the_command_line_chain_and_the_three_modes(chain, predictions):
  """Each mode keeps its rule; launch.evaluate scores launch.infer's lines as the library does."""
  root, evaluated = chain
  gold = read_jsonl(f"{root}/data/dev.jsonl")
  scores = {mode: score_selfrag(lines, gold) for mode, lines in predictions.items()}
  assert evaluated == pytest.approx(scores["adaptive_retrieval"])
  for mode in MODES:
    for p in predictions[mode]:
      assert p["retrieved"] == bool(p["evidence"])
      if p["retrieved"]:
        assert len(p["evidence"]) == 3 and p["text"] == p["evidence"][p["best"]]["text"]
  assert scores["no_retrieval"]["retrieval_rate"] == 0.0
  assert scores["always_retrieve"]["retrieval_rate"] == 1.0
  assert all((p["retrieve_prob"] > 0.2) == p["retrieved"] for p in predictions["adaptive_retrieval"])


@pytest.fixture(scope="module")
def runner(chain):
  """(make(mode, threshold) -> SelfRag on one engine built as launch.infer builds it, the loaded
  run, the dev prompts)."""
  root, _ = chain
  run = load_run(str(root / "run"))
  index, texts, _ = load_index_dir(str(root / "index"))
  prompts = prompt_tokens(run, read_requests(f"{root}/data/dev.jsonl"), 1 << 30)
  config = generation_config(run.task, 0, max_new_tokens=24, batch_size=8, capacity=1024)
  build = selfrag.selfrag_runner(run, index, texts, config)

  def make(mode, threshold=0.2, k=3):
    return build(selfrag.SelfRagConfig(mode, threshold, k, max_new_tokens=24))

  return make, run, prompts


def test_the_critic_score_of_a_hand_computed_case():
  ids = {token: i for i, token in enumerate(selfrag.WATCHED)}
  at = selfrag.WATCHED.index
  # Relevance at step 0: 0.6 vs 0.2; support at step 2 (Fully .5, Partially .3, None .2);
  # utility at step 3 (U5 .4, U4 .4, U1 .2).
  watched = [np.full(len(selfrag.WATCHED), np.log(1e-9)) for _ in range(5)]
  watched[0][at("[Relevant]")], watched[0][at("[Irrelevant]")] = np.log(0.6), np.log(0.2)
  for token, p in (("[Fully supported]", .5), ("[Partially supported]", .3),
                   ("[No support / Contradictory]", .2)):
    watched[2][at(token)] = np.log(p)
  for token, p in (("[Utility:5]", .4), ("[Utility:4]", .4), ("[Utility:1]", .2)):
    watched[3][at(token)] = np.log(p)
  out = RequestOutput([], [ids["[Relevant]"], 100, ids["[Partially supported]"],
                           ids["[Utility:4]"], 101], [True] * 5, [],
                      log_probs=[-0.1, -0.5, -0.2, -0.3, -0.4], watched=watched)
  config = selfrag.SelfRagConfig(w_rel=1.0, w_sup=1.0, w_use=0.5)
  got = selfrag.critique(out, ids, config)
  relevance = 0.6 / 0.8
  support = 0.5 / 1.0 + 0.5 * 0.3 / 1.0
  utility = (1.0 * 0.4 + 0.5 * 0.4 - 1.0 * 0.2) / 1.0
  seq = math.exp(-1.5 / 5)
  assert got.relevance == pytest.approx(relevance, abs=1e-6)
  assert got.support == pytest.approx(support, abs=1e-6)  # at the first support token
  assert got.utility == pytest.approx(utility, abs=1e-6)
  assert got.seq_score == pytest.approx(seq)
  assert got.score == pytest.approx(seq + relevance + support + 0.5 * utility, abs=1e-6)
  none = RequestOutput([], [100], [True], [], log_probs=[-1.0], watched=watched[:1])
  assert selfrag.critique(none, ids, config).support == 0.0  # no support token: 0
  assert selfrag.critique(none, ids, config).utility == 0.0


def test_adaptive_decisions_flip_at_the_threshold(runner):
  make, _, prompts = runner
  [first] = make("adaptive_retrieval").run(prompts[:1])
  p = first.retrieve_prob
  assert 0.0 < p < 1.0
  [below] = make("adaptive_retrieval", threshold=p - 1e-6).run(prompts[:1])
  [above] = make("adaptive_retrieval", threshold=p + 1e-6).run(prompts[:1])
  assert below.retrieved and below.evidence and below.retrieve_prob == pytest.approx(p)
  assert not above.retrieved and not above.evidence


def _full_forward(run, sequence: list[int], start: int, watch: tuple[int, ...]):
  """Log-probabilities of sequence[start:] and of the watched ids at each of those steps, from
  one forward over the whole sequence (no cache)."""
  tokens = jnp.asarray(sequence)[None]
  hidden = run.model.apply({"params": run.params}, tokens, jnp.ones_like(tokens),
                           jnp.arange(tokens.shape[1])[None], method=Decoder.hidden_states)
  logits = run.model.apply({"params": run.params}, hidden, method=Decoder.logits)[0]
  logits = jnp.where(jnp.arange(logits.shape[-1]) < len(run.tokenizer.hf), logits, -jnp.inf)
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  steps = range(start - 1, len(sequence) - 1)
  return ([float(log_probs[i, sequence[i + 1]]) for i in steps],
          [log_probs[i, list(watch)] for i in steps], np.asarray(hidden[0]))


def test_evidence_rows_share_one_prefill_and_equal_a_full_forward(runner):
  """always_retrieve on one prompt with k=3: the engine feeds the prompt and the query tokens
  once, then each paragraph and its continuation in its own row (counted); every candidate's
  critique equals the one computed from a full forward over prompt + query + paragraph +
  continuation, and the query searched is the hidden state at [Question Representation]."""
  make, run, prompts = runner
  sr = make("always_retrieve")
  fed_before = sr.engine.tokens_fed
  [result] = sr.run(prompts[:1])
  prompt, ids = prompts[0], sr.ids
  prefix = [*prompt, ids[selfrag.RETRIEVE], sr.query]
  insertions = [sr.policy.insertion(c.document) for c in result.evidence]
  assert len(result.evidence) == 3
  fed = sr.engine.tokens_fed - fed_before
  # The last generated token of each request is never fed; nothing else is fed twice.
  assert fed == len(prefix) + sum(len(ins) + len(c.tokens) - 1
                                  for ins, c in zip(insertions, result.evidence))
  watch = selfrag.watched_ids(run.tokenizer)
  for c, insertion in zip(result.evidence, insertions):
    sequence = [*prefix, *insertion, *c.tokens]
    log_probs, watched, hidden = _full_forward(run, sequence, len(prefix) + len(insertion), watch)
    full = selfrag.critique(RequestOutput([], c.tokens, [True] * len(c.tokens), [],
                                          log_probs=log_probs, watched=watched), ids, sr.config)
    for field in ("relevance", "support", "utility", "seq_score", "score"):
      assert getattr(full, field) == pytest.approx(getattr(c.critique, field), abs=1e-4), field
  query = hidden[len(prefix) - 1] / np.linalg.norm(hidden[len(prefix) - 1])
  found, scores = sr.policy.search(query[None], 3)
  assert [c.document for c in result.evidence] == list(found[0])
  np.testing.assert_allclose([c.retrieval_score for c in result.evidence], scores[0], atol=1e-4)


def test_the_chosen_answer_is_the_argmax_of_the_stated_score(runner):
  make, _, prompts = runner
  sr = make("always_retrieve")
  for result in sr.run(prompts[:4]):
    scores = [c.critique.score for c in result.evidence]
    assert result.best == int(np.argmax(scores))
    assert result.text == result.evidence[result.best].text
    assert result.answer == sr.answer(result.text)
    for c in result.evidence:
      k = c.critique
      assert k.score == pytest.approx(k.seq_score + k.relevance + k.support + 0.5 * k.utility)
    assert not any(t in result.answer for t in selfrag.WATCHED)


def test_the_converters_write_selfrag_lines(tmp_path):
  """Self-RAG's training format and the rule-based NQ-style conversion (a tiny qa folder)."""
  src = tmp_path / "selfrag.jsonl"
  write_jsonl(str(src), [
      {"instruction": f"Q{i}?", "input": "ctx" if i == 0 else "",
       "output": (f"[Retrieval]<paragraph>Title {i}\nText {i}.</paragraph>[Relevant]A{i}"
                  "[Fully supported][Utility:5]") if i % 2 else f"[No Retrieval]A{i}[Utility:4]"}
      for i in range(10)])
  train, dev, db = convert_selfrag_file(str(src))
  assert len(train) == 9 and len(dev) == 1 and len(db) == 5
  first = train[0]["messages"]
  assert first[0]["content"] == "### Instruction:\nQ0?\n\n### Input:\nctx\n\n### Response:\n"
  assert first[1]["content"] == "[No Retrieval]A0[Utility:4]</s>" and "positive" not in first[1]
  second = train[1]["messages"][1]
  assert second["content"].startswith("[Retrieval][Question Representation]<paragraph>Title 1")
  assert second["positive"] == [db[0]["uid"]] and len(second["negative"][0]) == 2
  assert db[0]["messages"][1]["content"] == "Title 1\nText 1.[Document Fragment Representation]"
  qa = tmp_path / "qa"
  qa.mkdir()
  write_jsonl(str(qa / "qa.jsonl"), [
      {"question": f"q{i}", "answers": [f"ans{i}"], "paragraphs": [
          {"pid": f"p{i}", "title": f"T{i}", "is_supporting": True,
           "text": f"it is ans{i}." if i % 3 else "nothing here."}]} for i in range(10)])
  train, dev, db = convert_nq_oracle(str(qa))
  assert len(db) == 10 and len(dev) == 1 and dev[0]["answers"] == ["ans9"]
  gold = [t for t in train if t["messages"][1].get("positive") != [None]]
  assert len(gold) == 9
  for line in gold:
    i = int(line["messages"][0]["content"].split("q")[-1].split("\n")[0])
    want = "[Relevant]" if i % 3 else "[Irrelevant]"
    assert want in line["messages"][1]["content"]
  distractors = [t for t in train if t["messages"][1].get("positive") == [None]]
  assert distractors and all("[Irrelevant]" in t["messages"][1]["content"] for t in distractors)
  assert json.dumps(train)  # JSON-ready


def test_the_server_runs_selfrag_as_launch_infer_does(chain, predictions, tmp_path):
  """launch.serve on the selfrag run: each dev line with "selfrag": {"mode", "ndocs"}, sent
  concurrently (batched together), gets launch.infer's (adaptive) or the library's (no retrieval)
  line; selfrag with stream is 422."""
  root, _ = chain
  url, proc = serve(root / "run", root / "index", tmp_path / "server.log", "--max_batch=8",
                    "--max_new_tokens=24")
  lines = read_jsonl(f"{root}/data/dev.jsonl")
  try:
    with httpx.Client(base_url=url, timeout=300) as client, \
         concurrent.futures.ThreadPoolExecutor(len(lines)) as pool:
      for mode in ("adaptive_retrieval", "no_retrieval"):
        post = lambda line: client.post("/v1/generate", json={
            "messages": line["messages"], "selfrag": {"mode": mode, "ndocs": 3}})
        got = [r.json() for r in pool.map(post, lines)]
        want = predictions[mode]
        for g, w in zip(got, want):
          assert (g["answer"], g["retrieved"], g["best"]) == (w["answer"], w["retrieved"], w["best"])
          assert [c["id"] for c in g["evidence"]] == [c["id"] for c in w["evidence"]]
          assert [c["score"] for c in g["evidence"]] == pytest.approx(
              [c["score"] for c in w["evidence"]], abs=1e-4)
      bad = client.post("/v1/generate", json={"messages": lines[0]["messages"], "stream": True,
                                               "selfrag": {"mode": "always_retrieve"}})
      assert bad.status_code == 422 and "selfrag" in bad.json()["error"]
  finally:
    proc.terminate()
    proc.wait(60)
