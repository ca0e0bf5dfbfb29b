"""The OpenAI-compatible API (serving/openai_api.py) of the real server (launch.serve as a
subprocess, one for the file, with API keys), through the official `openai` client: chat and
text completions answer what /v1/generate answers for the same prompt, streamed chunks add up to
the whole answer, stop strings cut the text, embeddings are build_index's keys and the engine's
query vectors, extension fields reach the engine, every bad input gets its status and the SDK
its exception, and a schema fuzzer (schemathesis) finds no server error."""

import base64
import collections
import time

import httpx
import hypothesis
import numpy as np
import openai
import pytest
import schemathesis

from conftest import E2E_CONFIG
from test_server import assert_same_answers, dev_lines, generate, request_body, start_server
from onegen_jax.data.records import Message, db_entry, read_jsonl
from onegen_jax.data.tasks import get_task
from onegen_jax.inference.requests import prompt_tokens
from onegen_jax.inference.run_dir import load_index_dir, load_run, make_engine
from onegen_jax.inference.types import Request

pytestmark = pytest.mark.parametrize("trained", ["el"], indirect=True)  # EL: candidates, mentions

KEY = "sk-test"
MODEL = "onegen-test"
MAX_TOKENS = 16  # the server's default and largest: fuzzed requests stay short
SAMPLED = {"temperature": 3.0, "seed": 5}  # a hot, seeded request: long output, the same each time
FUZZ_EXAMPLES, FUZZ_SECONDS = 50, 15.0  # per operation: at most so many cases, sent within so long


@pytest.fixture(scope="module")
def api(trained, chain, tmp_path_factory):
  """(base url, an openai.OpenAI client for it, an httpx client with the key)."""
  log = tmp_path_factory.mktemp("openai") / "server.log"
  url, proc = start_server(trained, chain, log, f"--api_key=sk-other,{KEY}",
                           f"--served_model_name={MODEL}", f"--max_new_tokens={MAX_TOKENS}",
                           f"--max_new_tokens_limit={MAX_TOKENS}")
  assert "no API key" not in log.read_text()
  client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
  with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                    timeout=120) as http:
    yield url, client, http
  client.close()
  proc.terminate()
  proc.wait(60)


def onegen(message_or_choice) -> dict:
  return message_or_choice.model_extra["onegen"]


def finish_reason(stop_reason: str) -> str:
  return "length" if stop_reason == "max_new_tokens" else "stop"


def test_chat_answers_what_v1_generate_answers(trained, api):
  """A dev line's prompt messages through chat.completions and the line through /v1/generate:
  the same text, retrievals, mentions, token counts; content as text parts changes nothing."""
  _, client, http = api
  for line in dev_lines(trained)[:2]:  # the second's answer prefix retrieves and links
    native = generate(http, **request_body(line))
    prompt = line["messages"][:-1]
    extra = {"answer_prefix": line["answer_prefix"]} if "answer_prefix" in line else {}
    chat = client.chat.completions.create(model=MODEL, messages=prompt, extra_body=extra)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.model == MODEL and len(chat.choices) == 1
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert_same_answers([{**onegen(choice.message), "text": choice.message.content}],
                        [{k: v for k, v in native.items() if k != "finished"}])
    assert choice.finish_reason == finish_reason(native["stop_reason"])
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        native["usage"]["prompt_tokens"], native["usage"]["generated_tokens"])
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    content = prompt[0]["content"]
    parts = [{"role": "user", "content": [{"type": "text", "text": content[:20]},
                                          {"type": "text", "text": content[20:]}]}]
    again = client.chat.completions.create(model=MODEL, messages=parts, extra_body=extra)
    assert again.choices[0].message.content == choice.message.content
  assert onegen(choice.message)["retrievals"] and onegen(choice.message)["mentions"]


def test_streamed_chat_adds_up_and_stop_strings_cut_the_text(trained, api):
  """A sampled, seeded request: its streamed deltas add up to its content; with a stop string
  from the middle of that content, the content ends before it, streamed or not."""
  _, client, _ = api
  request = {"model": MODEL, "messages": dev_lines(trained)[0]["messages"][:1], **SAMPLED}
  whole = client.chat.completions.create(**request)
  text = whole.choices[0].message.content
  assert len(text) >= 6, text
  chunks = list(client.chat.completions.create(**request, stream=True,
                                               stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  last, usage = chunks[-2], chunks[-1]
  assert last.choices[0].finish_reason == whole.choices[0].finish_reason
  assert onegen(last.choices[0].delta)["stop_reason"] == onegen(whole.choices[0].message)[
      "stop_reason"]
  assert usage.choices == [] and usage.usage == whole.usage

  stop = text[len(text) // 2:len(text) // 2 + 3]
  want = text[:text.index(stop)]
  for stops in (stop, [stop, "never in the text \u2603"]):
    cut = client.chat.completions.create(**request, stop=stops)
    assert cut.choices[0].message.content == want
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**request, stop=stops, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_take_the_prompt_as_one_user_message(trained, api):
  _, client, http = api
  user = dev_lines(trained)[2]["messages"][0]["content"]
  native = generate(http, prompt=user, **SAMPLED)
  assert len(native["text"]) >= 6, native
  for prompt in (user, [user]):
    completion = client.completions.create(model=MODEL, prompt=prompt, **SAMPLED)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == native["text"]
    assert onegen(completion.choices[0])["stop_reason"] == native["stop_reason"]
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]
  chunks = list(client.completions.create(model=MODEL, prompt=user, stream=True, **SAMPLED))
  assert all(c.object == "text_completion" for c in chunks)
  assert "".join(c.choices[0].text for c in chunks) == native["text"]
  assert chunks[-1].choices[0].finish_reason == finish_reason(native["stop_reason"])
  stop = native["text"][-4:-1]
  cut = client.completions.create(model=MODEL, prompt=user, stop=stop, **SAMPLED)
  assert cut.choices[0].text == native["text"][:native["text"].index(stop)]


def test_document_embeddings_are_the_keys_build_index_stored(trained, chain, api):
  """db documents sent as their text and title: the vectors build_index wrote for them; the
  text without its RET token (one is appended) and base64 give the same."""
  _, client, _ = api
  task = get_task(trained[0])
  lines = read_jsonl(f"{trained[2]}/db.jsonl")[:6]
  before, after = task.doc_instruction.split("{title}")
  titles = [l["messages"][0]["content"].removeprefix(before).removesuffix(after) for l in lines]
  texts = [l["messages"][1]["content"] for l in lines]
  assert [db_entry(task, l["uid"], t, b) for l, t, b in zip(lines, titles, texts)] == lines
  index, _, vectors = load_index_dir(chain.index)
  want = vectors[[index.ids.index(l["uid"]) for l in lines]]
  got = client.embeddings.create(model=MODEL, input=texts, extra_body={"title": titles})
  assert got.object == "list" and [d.index for d in got.data] == list(range(len(lines)))
  np.testing.assert_allclose([d.embedding for d in got.data], want, atol=1e-5)
  assert got.usage.prompt_tokens == got.usage.total_tokens > 0

  bare = client.embeddings.create(model=MODEL, input=texts[0].replace(task.doc_token, ""),
                                  encoding_format="float", extra_body={"title": titles[0]})
  np.testing.assert_allclose(bare.data[0].embedding, want[0], atol=1e-5)
  floats, packed = (client.embeddings.create(model=MODEL, input=texts[:2], encoding_format=f,
                                             extra_body={"title": titles[:2]})
                    for f in ("float", "base64"))
  for f, p in zip(floats.data, packed.data):
    assert np.frombuffer(base64.b64decode(p.embedding), "<f4").tolist() == f.embedding


def test_query_embeddings_are_what_the_engine_searches(trained, chain, api):
  """role "query": the vector the engine searches when the model emits the query token right
  after the text's prompt (an engine in this process, the first output token forced to it)."""
  _, client, _ = api
  texts = [line["messages"][0]["content"] for line in dev_lines(trained)[:3]]
  got = client.embeddings.create(model=MODEL, input=texts, extra_body={"role": "query"})
  run = load_run(str(trained[3] / "run"))
  index, documents, vectors = load_index_dir(chain.index)
  engine = make_engine(run, index, documents, E2E_CONFIG, vectors=vectors)
  query = run.tokenizer.ids[run.task.query_token]
  prompts = prompt_tokens(run, [(Message("user", t),) for t in texts], max_len=1 << 62)
  outputs = engine.run([engine.submit(Request(p, force=[query], max_new_tokens=2))
                        for p in prompts])
  np.testing.assert_allclose([d.embedding for d in got.data],
                             [out.retrievals[0].vector for out in outputs], atol=1e-5)
  assert got.usage.prompt_tokens == sum(len(p) + 1 for p in prompts)


def test_extension_fields_reach_the_engine(trained, api):
  """retrieve_k and candidates (extra_body) shape the retrievals the `onegen` field reports."""
  _, client, _ = api
  line = dev_lines(trained)[1]  # its answer prefix ends with the query token: a retrieval
  request = {"model": MODEL, "messages": line["messages"][:-1]}
  prefix = {"answer_prefix": line["answer_prefix"]}
  two = client.chat.completions.create(**request, extra_body={**prefix, "retrieve_k": 2})
  retrievals = onegen(two.choices[0].message)["retrievals"]
  assert retrievals and all(len(r["ids"]) == 2 for r in retrievals)
  candidates = [l["uid"] for l in read_jsonl(f"{trained[2]}/db.jsonl")[5:8]]
  only = client.chat.completions.create(
      **request, extra_body={**prefix, "retrieve_k": 3, "candidates": candidates})
  first = onegen(only.choices[0].message)["retrievals"][0]
  assert sorted(first["ids"]) == sorted(candidates)
  assert first["scores"] == sorted(first["scores"], reverse=True)


def test_models_and_api_keys(trained, api):
  url, client, _ = api
  listed = client.models.list().data
  assert [m.id for m in listed] == [MODEL] and listed[0].owned_by == "onegen_jax"
  assert listed[0].model_extra["onegen"]["task"] == trained[0]
  assert client.models.retrieve(MODEL).id == MODEL
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("gpt-4")
  with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0) as wrong:
    with pytest.raises(openai.AuthenticationError) as refused:
      wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "invalid_api_key"
  with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-other", max_retries=0) as other:
    assert other.models.list().data[0].id == MODEL  # either key
  for path in ("/v1/chat/completions", "/v1/generate", "/v1/embeddings"):  # old routes too
    response = httpx.post(f"{url}{path}", json={"prompt": "hi"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
  assert httpx.get(f"{url}/health").status_code == 200
  assert httpx.get(f"{url}/metrics").status_code == 200


def test_bad_input_gets_its_status_and_the_sdk_its_exception(api):
  url, client, http = api
  chat, complete, embed = (client.chat.completions.create, client.completions.create,
                           client.embeddings.create)
  ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
  bad = [  # (call, arguments, exception, status, param)
      (chat, {**ok, "n": 2}, openai.BadRequestError, 400, "n"),
      (chat, {**ok, "stream_options": {"include_usage": True}}, openai.BadRequestError, 400,
       "stream_options"),
      (chat, {**ok, "messages": [{"role": "user", "content": "word " * 600}]},
       openai.BadRequestError, 400, None),
      (complete, {"model": MODEL, "prompt": ["a", "b"]}, openai.BadRequestError, 400, "prompt"),
      (complete, {"model": MODEL, "prompt": [1, 2, 3]}, openai.BadRequestError, 400, "prompt"),
      (embed, {"model": MODEL, "input": "a[SE]b[SE]"}, openai.BadRequestError, 400, "input.0"),
      (embed, {"model": MODEL, "input": "word " * 600, "extra_body": {"role": "query"}},
       openai.BadRequestError, 400, "input.0"),
      (chat, {**ok, "model": "gpt-4"}, openai.NotFoundError, 404, "model"),
      (embed, {"model": "gpt-4", "input": "a"}, openai.NotFoundError, 404, "model"),
      (chat, {**ok, "messages": [{"role": "user", "content": "x" * 30000}]},
       openai.APIStatusError, 413, None),
      (chat, {**ok, "temperature": -1}, openai.UnprocessableEntityError, 422, "temperature"),
      (chat, {**ok, "max_tokens": MAX_TOKENS + 1}, openai.UnprocessableEntityError, 422,
       "max_tokens"),
      (chat, {**ok, "messages": []}, openai.UnprocessableEntityError, 422, "messages"),
      (chat, {**ok, "messages": [{"role": "robot", "content": "x"}]},
       openai.UnprocessableEntityError, 422, "messages.0.role"),
      (chat, {**ok, "seed": 1 << 40}, openai.UnprocessableEntityError, 422, "seed"),
      (chat, {**ok, "extra_body": {"colour": "blue"}}, openai.UnprocessableEntityError, 422,
       "colour"),
      (chat, {**ok, "extra_body": {"retrieve_k": 1000}}, openai.UnprocessableEntityError, 422,
       "retrieve_k"),
      (chat, {**ok, "extra_body": {"loop_repeats": 1}}, openai.UnprocessableEntityError, 422,
       "loop_repeats"),
      (chat, {**ok, "extra_body": {"selfrag": {}}}, openai.UnprocessableEntityError, 422,
       "selfrag"),
      (embed, {"model": MODEL, "input": []}, openai.UnprocessableEntityError, 422, "input"),
      (embed, {"model": MODEL, "input": ["a", "b"], "extra_body": {"title": ["t"]}},
       openai.UnprocessableEntityError, 422, "title"),
      (embed, {"model": MODEL, "input": "a", "extra_body": {"role": "query", "title": "t"}},
       openai.UnprocessableEntityError, 422, "title"),
  ]
  for call, arguments, exception, status, param in bad:
    with pytest.raises(exception) as raised:
      call(**arguments)
    error = raised.value
    assert type(error) is exception and error.status_code == status, (arguments, error)
    assert error.param == param and error.message and "\n" not in error.body["message"], error
    assert error.type == {404: "not_found_error"}.get(status, "invalid_request_error")
  malformed = http.post("/v1/chat/completions", content=b'{"model": ',
                        headers={"content-type": "application/json"})
  assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]["message"]
  assert http.get("/v1/chat/completions").status_code == 405
  native = http.post("/v1/generate", json={"prompt": "hi", "colour": "blue"})
  assert native.status_code == 422 and native.json()["error"].startswith("colour:")  # unchanged
  assert chat(**ok).choices[0].message.content is not None  # still serving


def test_a_schema_fuzzer_finds_no_server_error(api):
  """schemathesis generates bodies, paths and queries from the server's OpenAPI document for
  every operation (bounded: FUZZ_EXAMPLES cases or FUZZ_SECONDS each); none gets a 5xx or an
  internal error inside a stream, and the server stays healthy. A body's `model` is set to the
  served one, so the cases reach the checks behind it."""
  url, _, _ = api
  schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
  operations = [result.ok() for result in schema.get_all_operations()]
  ran = collections.Counter()  # (operation, status) -> cases
  for operation in operations:
    deadline = time.monotonic() + FUZZ_SECONDS

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         phases=[hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy())
    def fuzz(case):
      if time.monotonic() > deadline:
        return
      if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
      response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                           timeout=120)
      ran[operation.label, response.status_code] += 1
      assert response.status_code < 500, (operation.label, case.body, response.text[:500])
      assert '"internal error"' not in response.text, (operation.label, case.body)

    fuzz()
  print(f"schemathesis: {sum(ran.values())} cases (operation, status): {dict(sorted(ran.items()))}")
  assert {label for label, _ in ran} == {operation.label for operation in operations}
  assert httpx.get(f"{url}/health").status_code == 200
