"""The OpenAI-compatible API, beside the native one (app.py), for clients that speak OpenAI's (the
openai SDK, LangChain, scripts written for vLLM):

  POST /v1/chat/completions       messages -> chat.completion (stream: chat.completion.chunk)
  POST /v1/completions            prompt -> text_completion (stream: text_completion chunks)
  POST /v1/embeddings             texts -> document keys (role "document") or query vectors
  GET  /v1/models, /v1/models/ID  the one model served (launch.serve --served_model_name)

Bodies: openai_schema.py. A chat's prompt is all its messages, a completion's `prompt` one user
message, tokenised as /v1/generate tokenises its prompt (schema.engine_request). The text ends
before the first `stop` string, streamed or not (stop_text.py). finish_reason: "length" when
max_tokens ran out, else "stop". Extensions: request fields retrieve_k, candidates,
answer_prefix, selfrag (as /v1/generate's), repetition_penalty, loop_repeats; in the answer,
`onegen` on the message (chat), on the choice (completions) or on the last chunk's delta /
choice: output_record's stop_reason (the engine's), retrievals [{"position", "ids", "scores"}]
and for EL plain_text and mentions, all of the whole output (a stop string cuts the text only);
for a Self-RAG answer, launch.infer --selfrag_mode's record less its answer.

Errors: {"error": {"message", "type", "param", "code"}} with the native routes' statuses; an
internal error's id is its "id". With API keys every /v1/ route, old and new, needs
`Authorization: Bearer KEY` (`BearerKeys`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import fastapi
import numpy as np
from fastapi import responses

from onegen_jax.data.records import Message
from onegen_jax.inference.embeddings import Embedder, Unencodable
from onegen_jax.inference.requests import output_record
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.selfrag import SelfRagResult
from onegen_jax.inference.types import RequestOutput
from onegen_jax.serving import answers, schema, stop_text
from onegen_jax.serving.openai_schema import ChatBody, CompletionBody, EmbeddingsBody
from onegen_jax.serving.errors import ClientError, InternalError
from onegen_jax.serving.worker import EngineWorker, Job

BODIES = [ChatBody, CompletionBody, EmbeddingsBody]
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")
_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}  # other statuses: invalid_request_error
_PARAM = re.compile(r"([A-Za-z_][\w.]*): ")  # a reason that starts with a field names it
_FINISH = {"max_new_tokens": "length"}  # the engine's other reasons are "stop"


class OpenAIError(ClientError):
  """A client error with OpenAI's `code` (model_not_found, invalid_api_key)."""

  def __init__(self, status: int, reason: str, code: str):
    super().__init__(status, reason)
    self.code = code


def serves(path: str) -> bool:
  """Whether a path is one of these routes (its errors then take OpenAI's shape)."""
  return path in _ROUTES or path.startswith("/v1/models/")


def error_body(e: ClientError | InternalError) -> tuple[int, dict]:
  """(status, body) of an error in OpenAI's shape; the param is the field the reason names."""
  if isinstance(e, InternalError):
    return 500, {"error": {"message": "internal error", "type": "server_error", "param": None,
                           "code": None, "id": e.error_id}}
  param = _PARAM.match(str(e))
  return e.status, {"error": {"message": str(e), "type": _TYPES.get(e.status,
                                                                    "invalid_request_error"),
                              "param": param[1] if param else None,
                              "code": getattr(e, "code", None)}}


class BearerKeys:
  """ASGI middleware: a /v1/ request without `Authorization: Bearer KEY`, KEY one of `keys`, gets
  401 (OpenAI's shape); other paths (/health, /metrics) stay open."""

  def __init__(self, app, keys: Sequence[str]):
    self.app = app
    self.keys = [k.encode() for k in keys]

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
      refusal = self._refusal(dict(scope["headers"]).get(b"authorization"))
      if refusal is not None:
        _, body = error_body(OpenAIError(401, refusal, "invalid_api_key"))
        response = responses.JSONResponse(body, status_code=401,
                                          headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
        return
    await self.app(scope, receive, send)

  def _refusal(self, header: bytes | None) -> str | None:
    if header is None:
      return "no API key: send the header `Authorization: Bearer KEY`"
    scheme, _, key = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not any(hmac.compare_digest(key.strip(), k)
                                              for k in self.keys):
      return "invalid API key"
    return None


@dataclasses.dataclass(frozen=True)
class Served:
  """What the routes answer with: the run, its worker and limits, the embedder, the model's name
  and its `created` time (seconds)."""

  run: LoadedRun
  worker: EngineWorker
  limits: schema.Limits
  embedder: Embedder
  model_name: str
  created: int

  def card(self) -> dict:
    return {"id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "onegen_jax",
            "onegen": {"task": self.run.task.name, "mode": self.run.task.mode}}

  def check_model(self, name: str) -> None:
    """OpenAIError 404 (model_not_found) unless `name` is this server's model."""
    if name != self.model_name:
      raise OpenAIError(404, f"model: `{name}` does not exist; this server serves "
                        f"`{self.model_name}`", "model_not_found")

  async def read(self, request: fastapi.Request, model: type):
    """The body as `model` (schema.parse), for this server's model (else 404)."""
    body = schema.parse(await schema.read_body(request, self.limits.max_body_bytes), model)
    self.check_model(body.model)
    return body


def add_routes(app: fastapi.FastAPI, served: Served) -> None:
  """Registers the routes (app.py's error handlers give their errors OpenAI's shape)."""

  @app.post("/v1/chat/completions", openapi_extra=schema.openapi_body(ChatBody))
  async def chat(request: fastapi.Request):
    body = await served.read(request, ChatBody)
    prompt = tuple(Message(m.role, m.text) for m in body.messages)
    return await _Generation(served, body, chat=True).answer(request, prompt)

  @app.post("/v1/completions", openapi_extra=schema.openapi_body(CompletionBody))
  async def completions(request: fastapi.Request):
    body = await served.read(request, CompletionBody)
    prompt = (Message("user", _one_prompt(body.prompt)),)
    return await _Generation(served, body, chat=False).answer(request, prompt)

  @app.post("/v1/embeddings", openapi_extra=schema.openapi_body(EmbeddingsBody))
  async def embeddings(request: fastapi.Request):
    body = await served.read(request, EmbeddingsBody)
    texts = body.texts
    if body.role == "document":
      work = (served.embedder.documents, texts, _titles(body.title, len(texts)))
    elif body.title is not None:
      raise ClientError(422, "title: only a document has a title (role \"document\")")
    else:
      work = (served.embedder.queries, texts)
    try:
      vectors, tokens = await asyncio.wrap_future(served.worker.call(*work))
    except Unencodable as e:
      raise ClientError(400, str(e)) from None
    data = [{"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return responses.JSONResponse({"object": "list", "data": data, "model": served.model_name,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [served.card()]}

  @app.get("/v1/models/{model:path}")
  async def model(model: str):
    served.check_model(model)
    return served.card()


def _one_prompt(prompt) -> str:
  if isinstance(prompt, str):
    return prompt
  if len(prompt) == 1 and isinstance(prompt[0], str):
    return prompt[0]
  raise ClientError(400, "prompt: one string (or a list of one string) per request; several "
                    "prompts and token ids are not supported")


def _titles(title: str | list[str] | None, count: int) -> list[str]:
  if isinstance(title, list):
    if len(title) != count:
      raise ClientError(422, f"title: {len(title)} titles for {count} inputs")
    return title
  return [title or ""] * count


def _vector(vector: np.ndarray, encoding: str) -> list[float] | str:
  """OpenAI's encodings: a list of floats, or base64 of the little-endian float32 bytes."""
  if encoding == "base64":
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
  return vector.tolist()


@dataclasses.dataclass(frozen=True)
class _Ended:
  """An answer's end: its text (cut at a stop string), finish_reason, `onegen`, usage."""

  text: str
  finish_reason: str
  onegen: dict
  usage: dict


class _Generation:
  """One chat or text completion: its engine job, then its JSON object or its chunks."""

  def __init__(self, served: Served, body: ChatBody | CompletionBody, chat: bool):
    self.served, self.body, self.chat = served, body, chat
    self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                 "object": "chat.completion" if chat else "text_completion",
                 "created": int(time.time()), "model": served.model_name}

  async def answer(self, request: fastapi.Request, prompt: tuple[Message, ...]):
    served, body = self.served, self.body
    if body.n is not None and body.n != 1:
      raise ClientError(400, f"n: {body.n} choices asked; this server answers one (n=1)")
    if body.stream_options is not None and not body.stream:
      raise ClientError(400, "stream_options: only with stream=true")
    max_new, field = body.length
    prepared = schema.engine_request(
        prompt, body, max_new, served.run, served.limits, length_field=field, stop=body.stops,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, loop_repeats=body.loop_repeats)
    job = Job(prepared, asyncio.get_running_loop(),
              selfrag=schema.selfrag_config(body.selfrag, body, served.run, served.limits,
                                            prepared))
    served.worker.submit(job)
    if body.stream:
      return responses.StreamingResponse(self.chunks(job), media_type="text/event-stream")
    update = await answers.final(request, served.worker, job)
    if update is None:
      return responses.Response(status_code=499)  # nobody reads it
    ended = self.ended(job, answers.outcome(update))
    if self.chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": ended.text,
                                        "onegen": ended.onegen}}
    else:
      choice = {"index": 0, "text": ended.text, "logprobs": None, "onegen": ended.onegen}
    choice["finish_reason"] = ended.finish_reason
    return responses.JSONResponse({**self.head, "choices": [choice], "usage": ended.usage})

  async def chunks(self, job: Job) -> AsyncIterator[str]:
    """The answer as OpenAI's server-sent events: (chat: the role first) the text's pieces, a
    last chunk with finish_reason and `onegen`, the usage when asked, then [DONE]."""
    texts = answers.TextStream(self.served.run)
    stops = stop_text.StopStream(self.body.stops)
    try:
      if self.chat:
        yield self._chunk({"role": "assistant", "content": ""})
      async with contextlib.aclosing(answers.updates(self.served.worker, job)) as updates:
        async for update in updates:
          if not answers.is_final(update):
            piece = stops.add(texts.add(update.tokens)) if update.tokens else ""
            if piece:
              yield self._text_chunk(piece)
            continue
          ended = self.ended(job, answers.outcome(update))
          piece = stops.add(texts.finish()) + stops.finish()
          if piece:
            yield self._text_chunk(piece)
          yield self._chunk({"onegen": ended.onegen} if self.chat
                            else {"text": "", "onegen": ended.onegen}, ended.finish_reason)
          if self.body.stream_options is not None and self.body.stream_options.include_usage:
            yield _data({**self.head, "object": self._chunk_object, "choices": [],
                         "usage": ended.usage})
    except (ClientError, InternalError) as e:
      yield _data(error_body(e)[1])
    yield "data: [DONE]\n\n"

  @property
  def _chunk_object(self) -> str:
    return "chat.completion.chunk" if self.chat else "text_completion"

  def _text_chunk(self, piece: str) -> str:
    return self._chunk({"content": piece} if self.chat else {"text": piece})

  def _chunk(self, content: dict, finish_reason: str | None = None) -> str:
    choice = ({"index": 0, "delta": content} if self.chat
              else {"index": 0, **content, "logprobs": None})
    choice["finish_reason"] = finish_reason
    return _data({**self.head, "object": self._chunk_object, "choices": [choice]})

  def ended(self, job: Job, out: RequestOutput | SelfRagResult) -> _Ended:
    stops, tokenizer = self.body.stops, self.served.run.tokenizer
    if isinstance(out, SelfRagResult):
      record = out.record()
      text, _ = stop_text.cut(record.pop("answer"), stops)
      return _Ended(text, "stop", record,
                    _usage(len(job.request.prompt), len(tokenizer.tokenize([out.text])[0])))
    record = output_record(self.served.run, out)
    text, was_cut = stop_text.cut(record.pop("text"), stops)
    del record["finished"]
    finish = "stop" if was_cut else _FINISH.get(out.stop_reason, "stop")
    return _Ended(text, finish, record, _usage(len(out.prompt), sum(out.generated)))


def _usage(prompt: int, completion: int) -> dict:
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def _data(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"
